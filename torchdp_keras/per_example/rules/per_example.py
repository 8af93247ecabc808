"""Explicit per-example gradients of one layer (the mixed-clipping fallback).

For a layer that has no rule in the registry (or whose rule declines the
instance: a grouped convolution, a LoRA-enabled Dense), `clipping_mode="auto"`
uses this rule, which materialises the per-example gradients of that layer
only. Its forward pass runs the layer one example at a time (`vmap` over the
examples of the layer's stateless call) with its weights given as a
`(B, P)` tensor holding one copy of the flattened weights per example; that
tensor is the tap, so the engine's single backward pass yields the
per-example gradients directly, as `dL/dz`. Memory is B x (the layer's
parameters), not B x (the model's).

Random layers inside the layer (dropout) draw their masks in that same
vmapped forward, one per example (`randomness="different"`): the output the
loss is computed from and the per-example gradients come from one
evaluation, so the gradient clipped is the gradient of the function that
was evaluated (no second draw).
"""

from __future__ import annotations

import math

import torch
from keras import tree

from torchdp_keras import _keras_compat as keras_compat
from torchdp_keras.per_example.rules.base import Forward, LayerRule, sq_norm_rows


class PerExampleGradientRule(LayerRule):
    """Per-example gradients of one layer through `torch.func` (any layer type)."""

    recomputes_in_hooks = True  # its forward runs the layer per example itself

    def forward(self, layer, args, kwargs):
        weights = list(layer.trainable_variables)
        others = list(layer.non_trainable_variables)
        other_values = [v.value.detach() for v in others]
        shapes = [tuple(w.value.shape) for w in weights]
        sizes = [math.prod(shape) for shape in shapes]
        batch = _batch_size(args, kwargs)
        flat = torch.cat([w.value.reshape(-1) for w in weights])
        # One copy of the weights per example: the tap (its gradient is the
        # per-example gradients). expand() is a view; autograd's gradient
        # with respect to it is a full (B, P) tensor.
        z = flat.unsqueeze(0).expand(batch, flat.numel())
        if not z.requires_grad:
            z.requires_grad_(True)

        def is_batched(a):
            return isinstance(a, torch.Tensor) and a.ndim > 0 and a.shape[0] == batch

        # Positional and keyword tensors with the batch axis (inputs, masks)
        # are sliced per example; everything else is passed as it is.
        names = list(kwargs)
        values = list(args) + [kwargs[k] for k in names]
        batched = [is_batched(v) for v in values]
        tensors = [v for v, b in zip(values, batched) if b]

        def call_one(row, example_tensors):
            parts = iter(example_tensors)
            filled = [next(parts).unsqueeze(0) if b else v for v, b in zip(values, batched)]
            call_kwargs = dict(zip(names, filled[len(args) :]))
            weight_values = [
                part.reshape(shape) for part, shape in zip(torch.split(row, sizes), shapes)
            ]
            mapping = list(zip(weights, weight_values)) + list(zip(others, other_values))
            with keras_compat.StatelessScope(state_mapping=mapping):
                out = layer(*filled[: len(args)], **call_kwargs)
            return tree.map_structure(
                lambda t: t.squeeze(0) if isinstance(t, torch.Tensor) else t, out
            )

        def finish(z):
            return torch.func.vmap(call_one, randomness="different")(z, tensors)

        return Forward(z, finish, (shapes, sizes))

    def fold_units(self, layer, args, kwargs, grad, units):
        # The tap's gradient rows are the per-example gradients: a group's
        # gradient is their sum.
        return args, kwargs, grad.reshape(units, -1, grad.shape[-1]).sum(dim=1)

    def squared_norms(self, layer, args, kwargs, grad, cache):
        return sq_norm_rows(grad)

    def clipped_sums(self, layer, args, kwargs, grad, factors, cache):
        shapes, sizes = cache["saved"]
        total = torch.mv(grad.t(), factors.to(grad.dtype))
        return [part.reshape(shape) for part, shape in zip(torch.split(total, sizes), shapes)]


def _batch_size(args, kwargs) -> int:
    for value in list(args) + list(kwargs.values()):
        for leaf in tree.flatten(value):
            if isinstance(leaf, torch.Tensor) and leaf.ndim > 0:
                return int(leaf.shape[0])
    raise ValueError("Expected a batched tensor among the layer's arguments.")
