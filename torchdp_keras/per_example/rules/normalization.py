"""Fast clipping rule for `LayerNormalization`, `GroupNormalization`, `RMSNormalization`.

These layers compute `y = x_hat * gamma + beta` (`scale` and no `beta` for
`RMSNormalization`), with `x_hat` the input
normalised over axes that do not include the batch, so each example's
normalisation is its own (no mixing across examples). With `g` the gradient
at `y`, example i's gradients are `sum(g_i * x_hat_i)` for `gamma` and
`sum(g_i)` for `beta`, summed over every axis except the parameter's own.
`x_hat` is the layer's own output with `gamma = 1` and `beta = 0`, so every
option of the layer (`rms_scaling`, `epsilon`, groups, dtypes) is honoured
exactly: the rule's forward runs that call once and applies the affine
part itself, so the layer is normalised once per step. These gradients are
as small as the parameters, so they are formed explicitly.
"""

from __future__ import annotations

import keras
import torch

from torchdp_keras import _keras_compat as keras_compat
from torchdp_keras.per_example.rules.base import (
    SAVED_KEY,
    Forward,
    LayerRule,
    handles,
    identity,
    sq_norm_rows,
)


def _parameter_axes(layer, ndim: int) -> list[int]:
    axis = layer.axis
    axes = [axis] if isinstance(axis, int) else list(axis)
    return sorted(a % ndim for a in axes)


_LAYERS = (
    keras.layers.LayerNormalization,
    keras.layers.GroupNormalization,
    keras.layers.RMSNormalization,
)


def _scale(layer):
    """The multiplicative parameter: `scale` of RMSNormalization, else `gamma`."""
    if isinstance(layer, keras.layers.RMSNormalization):
        return getattr(layer, "scale", None)
    return getattr(layer, "gamma", None)


@handles(*_LAYERS)
class NormalizationRule(LayerRule):
    """The scale (`gamma`) and offset (`beta`) of the normalisation layers."""

    def unsupported_reason(self, layer) -> str | None:
        own = [w for w in (_scale(layer), getattr(layer, "beta", None)) if w is not None]
        trainable = layer.trainable_weights
        if not isinstance(layer, _LAYERS):
            return "not a LayerNormalization, GroupNormalization or RMSNormalization"
        if len(trainable) != len({id(w) for w in trainable}) or not {id(w) for w in trainable} <= {
            id(w) for w in own
        }:
            return "trainable weights other than its scale and offset"
        return None

    def forward(self, layer, args, kwargs):
        # One normalisation: x_hat from the layer's own call with the affine
        # parameters at (1, 0), then the affine part; x_hat is kept for the norms.
        x_hat = self._normalized(layer, args, kwargs)
        scale, beta = _scale(layer), getattr(layer, "beta", None)
        y = x_hat
        axes = _parameter_axes(layer, x_hat.ndim)
        shape = [x_hat.shape[a] if a in axes else 1 for a in range(x_hat.ndim)]
        if scale is not None:
            y = y * scale.value.to(y.dtype).reshape(shape)
        if beta is not None:
            y = y + beta.value.to(y.dtype).reshape(shape)
        return Forward(y, identity, x_hat)

    def tap_output(self, layer, output):
        return output

    @staticmethod
    def _normalized(layer, args, kwargs, grad_enabled=True):
        mapping = []
        scale = _scale(layer)
        if scale is not None:
            mapping.append((scale, torch.ones_like(scale.value)))
        if getattr(layer, "beta", None) is not None:
            mapping.append((layer.beta, torch.zeros_like(layer.beta.value)))
        call_kwargs = {k: v for k, v in kwargs.items() if k != "training"}
        with torch.set_grad_enabled(grad_enabled and torch.is_grad_enabled()):
            with keras_compat.StatelessScope(state_mapping=mapping):
                return torch.as_tensor(layer.call(args[0], **call_kwargs))

    def _per_example(self, layer, args, kwargs, grad, cache):
        if "grads" in cache:
            return cache["grads"]
        scale = _scale(layer)
        x_hat = cache.get(SAVED_KEY)
        if x_hat is None:  # the layer ran outside `forward` (a sublayer)
            x_hat = self._normalized(layer, args, kwargs, grad_enabled=False)
        # The backward pass is over, so the forward's x_hat is free to reuse.
        x_hat = x_hat.detach().to(grad.dtype)
        axes = _parameter_axes(layer, grad.ndim)
        summed = tuple(a for a in range(1, grad.ndim) if a not in axes)
        grads = []
        for weight in layer.trainable_weights:
            product = x_hat.mul_(grad) if weight is scale else grad
            per_example = product.sum(dim=summed) if summed else product
            grads.append(per_example.reshape(grad.shape[0], *weight.shape))
        cache["grads"] = grads
        return grads

    def squared_norms(self, layer, args, kwargs, grad, cache):
        return sum(sq_norm_rows(g) for g in self._per_example(layer, args, kwargs, grad, cache))

    def clipped_sums(self, layer, args, kwargs, grad, factors, cache):
        grads = self._per_example(layer, args, kwargs, grad, cache)
        return [torch.tensordot(factors.to(g.dtype), g, dims=1) for g in grads]
