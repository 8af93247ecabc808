"""Reshaping layers: they only rearrange the values of each example."""

from __future__ import annotations

import keras

from torchdp_keras.lipschitz.layers.base import NormPreservingDPLayer

__all__ = ["DP_Flatten", "DP_Permute", "DP_Reshape"]


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
