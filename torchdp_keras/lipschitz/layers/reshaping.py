"""Reshaping layers (they only rearrange the values of each example), the input layer and Lambda."""

from __future__ import annotations

import keras
import torch

from torchdp_keras.errors import DPConfigError, DPError
from torchdp_keras.lipschitz.layers.base import NormPreservingDPLayer

__all__ = [
    "DP_Flatten",
    "DP_GNP_Factory",
    "DP_InputLayer",
    "DP_Lambda",
    "DP_Permute",
    "DP_Reshape",
]


class _IdentityBoundsMixin(NormPreservingDPLayer):
    """Bounds of a layer that rearranges each example's values without changing them.

    Flatten, Reshape and Permute move the entries of one example around and
    never mix examples, so the L2 norm of the example is unchanged, the
    gradient is rearranged back (same norm), and there are no weights:
    `propagate_inputs(X) = X`, `backpropagate_inputs(X, G) = G`,
    `backpropagate_params = 0`.
    """


@keras.saving.register_keras_serializable(package="torchdp_keras")
class DP_Flatten(keras.layers.Flatten, _IdentityBoundsMixin):
    """`keras.layers.Flatten` with the identity bounds (see `_IdentityBoundsMixin`)."""


@keras.saving.register_keras_serializable(package="torchdp_keras")
class DP_Reshape(keras.layers.Reshape, _IdentityBoundsMixin):
    """`keras.layers.Reshape(target_shape)` with the identity bounds.

    See `_IdentityBoundsMixin`.
    """


@keras.saving.register_keras_serializable(package="torchdp_keras")
class DP_Permute(keras.layers.Permute, _IdentityBoundsMixin):
    """`keras.layers.Permute(dims)` with the identity bounds (see `_IdentityBoundsMixin`)."""


@keras.saving.register_keras_serializable(package="torchdp_keras")
class DP_InputLayer(keras.layers.InputLayer, _IdentityBoundsMixin):
    """`keras.layers.InputLayer` (deel-lipdp's `DP_InputLayer`): the identity."""


def _check_norms(layer, inputs, outputs):
    """Raises if `layer` made an example's norm larger (not under torch.func transforms)."""
    # Under torch.func transforms (per-example diagnostics) a data-dependent
    # check cannot run; every training step of a Lipschitz model runs it.
    if (
        isinstance(inputs, torch.Tensor)
        and isinstance(outputs, torch.Tensor)
        and not torch._C._functorch.is_functorch_wrapped_tensor(inputs)
    ):
        before = torch.linalg.vector_norm(inputs.reshape(inputs.shape[0], -1), dim=1)
        after = torch.linalg.vector_norm(outputs.reshape(outputs.shape[0], -1), dim=1)
        if bool((after > before * (1 + 1e-5) + 1e-6).any()):
            raise DPError(
                f"{type(layer).__name__} '{layer.name}': the layer increased an example's norm "
                f"({float((after - before).max()):.6g} more), so the gradient bounds "
                "computed for the model no longer hold. Use a norm-preserving function."
            )


def DP_GNP_Factory(layer_cls):  # noqa: N802 (deel-lipdp's name)
    """deel-lipdp's factory: a weightless Keras layer class as a DP layer of identity bounds.

    deel-lipdp trusts the layer to be gradient-norm preserving. The bounds
    here need it to act on each example alone, be 1-Lipschitz and never
    increase an example's norm; the last is checked on every call (a
    `DPError` otherwise), the first two remain yours to ensure.

    Args:
        layer_cls: A `keras.layers.Layer` subclass without weights.

    Returns:
        The class `DP_<name>`.
    """
    if not (isinstance(layer_cls, type) and issubclass(layer_cls, keras.layers.Layer)):
        raise DPConfigError(
            f"Expected a keras.layers.Layer subclass. Received: layer_cls={layer_cls!r}"
        )

    def call(self, *args, **kwargs):
        outputs = layer_cls.call(self, *args, **kwargs)
        _check_norms(self, args[0] if args else None, outputs)
        return outputs

    return type(f"DP_{layer_cls.__name__}", (layer_cls, _IdentityBoundsMixin), {"call": call})


@keras.saving.register_keras_serializable(package="torchdp_keras")
class DP_Lambda(keras.layers.Lambda, _IdentityBoundsMixin):
    """`keras.layers.Lambda(function)` that the bounds treat as the identity (deel-lipdp's).

    deel-lipdp trusts the function to be gradient-norm preserving. The
    bounds here need less but still something the layer cannot verify: the
    function must map each example on its own, be 1-Lipschitz, and not
    increase the example's norm (a reshape, a crop, a sign flip, a
    permutation). The last condition is checked on every call: an example
    whose output norm exceeds its input's raises `DPError`, instead of
    training with gradients above the bounds the noise is calibrated to.
    Whether the function is 1-Lipschitz and example-wise remains yours to
    ensure, as in deel-lipdp.

    Args:
        function: The function, as `keras.layers.Lambda`.
        **kwargs: Passed to `keras.layers.Lambda`.
    """

    def call(self, inputs, mask=None, training=None):
        outputs = super().call(inputs, mask=mask, training=training)
        _check_norms(self, inputs, outputs)
        return outputs
