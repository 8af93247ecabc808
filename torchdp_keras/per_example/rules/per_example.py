"""Explicit per-example gradients of one layer (the mixed-clipping fallback).

For a layer that has no rule in the registry (or whose rule declines the
instance: a grouped convolution, a LoRA-enabled Dense), `clipping_mode="auto"`
uses this rule, which materialises the per-example gradients of that layer
only: `vmap` over the
examples of the `vjp` of the layer's stateless call on one example, with the
output gradient the engine captured as cotangent. Memory is B x (the layer's
parameters), not B x (the model's). The layer's forward runs once more per
step: a layer with internal randomness gets per-example gradients for a fresh
draw of it (still a consistent, correctly clipped DP update, but not the
gradient of the forward pass the loss came from); give such layers a rule.
"""

from __future__ import annotations

import torch
from keras.src import backend as keras_backend

from torchdp_keras.per_example.rules.base import LayerRule, identity, sq_norm_rows


class PerExampleGradientRule(LayerRule):
    """Per-example gradients of one layer through `torch.func` (any layer type)."""

    def forward(self, layer, args, kwargs):
        return layer(*args, **kwargs), identity

    def tap_output(self, layer, output):
        return output

    def _gradients(self, layer, args, kwargs, grad, cache):
        if "grads" in cache:
            return cache["grads"]
        weights = list(layer.trainable_variables)
        others = list(layer.non_trainable_variables)
        weight_values = [w.value.detach() for w in weights]
        other_values = [v.value.detach() for v in others]
        batch = grad.shape[0]

        def is_batched(a):
            return isinstance(a, torch.Tensor) and a.ndim > 0 and a.shape[0] == batch

        # Positional and keyword tensors with the batch axis (inputs, masks)
        # are sliced per example; everything else is passed as it is.
        names = list(kwargs)
        values = list(args) + [kwargs[k] for k in names]
        batched = [is_batched(v) for v in values]
        tensors = [v for v, b in zip(values, batched) if b]

        def call_one(weight_values, example_tensors):
            parts = iter(example_tensors)
            filled = [next(parts).unsqueeze(0) if b else v for v, b in zip(values, batched)]
            call_kwargs = dict(zip(names, filled[len(args) :]))
            mapping = list(zip(weights, weight_values)) + list(zip(others, other_values))
            with keras_backend.StatelessScope(state_mapping=mapping):
                return layer(*filled[: len(args)], **call_kwargs)

        def one(example_tensors, g):
            _, vjp_fn = torch.func.vjp(lambda v: call_one(v, example_tensors), weight_values)
            return vjp_fn(g.unsqueeze(0))[0]

        grads = torch.func.vmap(one)(tensors, grad)
        cache["grads"] = grads
        return grads

    def squared_norms(self, layer, args, kwargs, grad, cache):
        grads = self._gradients(layer, args, kwargs, grad, cache)
        return sum(sq_norm_rows(g) for g in grads)

    def clipped_sums(self, layer, args, kwargs, grad, factors, cache):
        grads = self._gradients(layer, args, kwargs, grad, cache)
        return [torch.tensordot(factors.to(g.dtype), g, dims=1) for g in grads]
