"""1-Lipschitz activations that preserve the norm: sorting within groups of features."""

from __future__ import annotations

import keras
from keras import ops

from torchdp_keras._validation import check_int
from torchdp_keras.errors import DPConfigError
from torchdp_keras.lipschitz.layers.base import NormPreservingDPLayer

__all__ = ["DP_FullSort", "DP_GroupSort"]


class _PermutationMixin(NormPreservingDPLayer):
    """Bounds of a layer that permutes the values of each example.

    A permutation `y = P_x x` (the permutation may depend on `x`) keeps the
    norm of every example, and the map is 1-Lipschitz: sorting is piecewise
    a fixed permutation, and `||sort(a) - sort(b)|| <= ||a - b||` (the
    rearrangement inequality), so where it is differentiable the Jacobian is
    a permutation matrix, and autograd through `sort` scatters the output
    gradient back with one permutation (also at ties). Hence, for
    `||x|| <= X` and output gradient `<= G`: output `<= X`, input gradient
    `<= G`, no weights.
    """


@keras.saving.register_keras_serializable(package="torchdp_keras")
class DP_GroupSort(keras.layers.Layer, _PermutationMixin):
    """Sorts the values within consecutive groups of `group_size` features of the last axis.

    With `group_size=2` this is the MaxMin activation
    `(a, b) -> (min(a, b), max(a, b))`. Each example is permuted, so
    `propagate_inputs(X) = X`, `backpropagate_inputs(X, G) = G` and
    `backpropagate_params = 0` (see `_PermutationMixin` for the proof).

    Args:
        group_size: Size of each group, an integer `>= 1`; the last input
            dimension must be a multiple of it.
        **kwargs: Passed to `keras.layers.Layer`.

    Raises:
        DPConfigError: `group_size` is not an integer `>= 1`, or (when built)
            the last input dimension is not a multiple of it.
    """

    def __init__(self, group_size: int = 2, **kwargs) -> None:
        super().__init__(**kwargs)
        self.group_size = check_int(group_size, "group_size")

    def build(self, input_shape) -> None:
        last = input_shape[-1]
        if last is None or last % self.group_size != 0:
            raise DPConfigError(
                f"Expected the last input dimension to be divisible by group_size. "
                f"Received: group_size={self.group_size}, input_shape={tuple(input_shape)}"
            )

    def call(self, inputs):
        if self.group_size == 1:
            return inputs
        shape = tuple(inputs.shape)
        grouped = ops.reshape(
            inputs, (-1, *shape[1:-1], shape[-1] // self.group_size, self.group_size)
        )
        return ops.reshape(ops.sort(grouped, axis=-1), (-1, *shape[1:]))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"group_size": self.group_size})
        return config


@keras.saving.register_keras_serializable(package="torchdp_keras")
class DP_FullSort(keras.layers.Layer, _PermutationMixin):
    """Sorts the whole last axis (ascending).

    A permutation of each example: `propagate_inputs(X) = X`,
    `backpropagate_inputs(X, G) = G`, `backpropagate_params = 0` (see
    `_PermutationMixin` for the proof).

    Args:
        **kwargs: Passed to `keras.layers.Layer`.
    """

    def call(self, inputs):
        return ops.sort(inputs, axis=-1)

    def compute_output_shape(self, input_shape):
        return input_shape
