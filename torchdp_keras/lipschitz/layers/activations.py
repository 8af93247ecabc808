"""1-Lipschitz activations: sorting within groups of features (norm-preserving), and ReLU."""

from __future__ import annotations

import keras
from keras import ops

from torchdp_keras._validation import check_int
from torchdp_keras.errors import DPConfigError
from torchdp_keras.lipschitz.layers.base import NormPreservingDPLayer

__all__ = ["DP_FullSort", "DP_GroupSort", "DP_ReLU"]


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
    """Sorts the values within consecutive groups of `n` features of the last axis.

    deel-lip's `GroupSort(n=None)`: the default sorts the whole last axis
    (`n` becomes its size when the layer is built); `n=2` is the MaxMin
    activation `(a, b) -> (min(a, b), max(a, b))` (`DP_GroupSort2`). Each
    example is permuted, so `propagate_inputs(X) = X`,
    `backpropagate_inputs(X, G) = G` and `backpropagate_params = 0` (see
    `_PermutationMixin` for the proof).

    Args:
        n: Size of each group, an integer `>= 1`, or None for the whole last
            axis; the last input dimension must be a multiple of it (alias:
            `group_size`, this package's earlier name).
        **kwargs: Passed to `keras.layers.Layer`.

    Raises:
        DPConfigError: `n` is not None or an integer `>= 1`, or (when built)
            the last input dimension is not a multiple of it.
    """

    def __init__(self, n: int | None = None, *, group_size: int | None = None, **kwargs) -> None:
        if group_size is not None:
            if n is not None:
                raise DPConfigError(
                    "Expected one of n (deel-lip's name) and group_size, not both. "
                    f"Received: n={n!r}, group_size={group_size!r}"
                )
            n = group_size
        data_format = kwargs.pop("data_format", "channels_last")  # deel-lip's argument
        if data_format != "channels_last":
            raise DPConfigError(
                f"Expected data_format='channels_last'. Received: data_format={data_format!r}"
            )
        super().__init__(**kwargs)
        self.n = None if n is None else check_int(n, "n")

    @property
    def group_size(self) -> int | None:
        """`n` (this package's earlier name)."""
        return self.n

    def build(self, input_shape) -> None:
        last = input_shape[-1]
        if self.n is None and last is not None:
            self.n = int(last)
        if last is None or self.n is None or last % self.n != 0:
            raise DPConfigError(
                f"Expected the last input dimension to be divisible by n. "
                f"Received: n={self.n}, input_shape={tuple(input_shape)}"
            )

    def call(self, inputs):
        if self.n == 1:
            return inputs
        shape = tuple(inputs.shape)
        if self.n == shape[-1]:
            return ops.sort(inputs, axis=-1)
        grouped = ops.reshape(inputs, (-1, *shape[1:-1], shape[-1] // self.n, self.n))
        return ops.reshape(ops.sort(grouped, axis=-1), (-1, *shape[1:]))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"n": self.n})
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


@keras.saving.register_keras_serializable(package="torchdp_keras")
class DP_ReLU(keras.layers.ReLU, NormPreservingDPLayer):
    """`keras.layers.ReLU` with the bounds of a 1-Lipschitz, norm-non-increasing map.

    `|max(a, 0)| <= |a|` entrywise, so `||relu(x)|| <= ||x||`
    (`propagate_inputs(X) = X`); its derivative is 0 or 1 entrywise, so the
    input gradient is the output gradient with entries zeroed
    (`backpropagate_inputs(X, G) = G`); no weights. (deel-lipdp lists it among
    its gradient-norm-preserving layers; it is not one, but the bounds only
    need 1-Lipschitz.) Keras's `max_value`, `negative_slope` and `threshold`
    are refused unless they keep these bounds (`negative_slope` in [0, 1],
    `threshold` 0).

    Raises:
        DPConfigError: an option that breaks the bounds.
    """

    def __init__(self, max_value=None, negative_slope=0.0, threshold=0.0, **kwargs) -> None:
        slope_ok = isinstance(negative_slope, (int, float)) and 0 <= negative_slope <= 1
        if not slope_ok or threshold != 0:
            raise DPConfigError(
                "Expected negative_slope in [0, 1] and threshold=0 (a 1-Lipschitz map whose "
                "output norm is at most its input's). Received: "
                f"negative_slope={negative_slope!r}, threshold={threshold!r}"
            )
        super().__init__(
            max_value=max_value, negative_slope=negative_slope, threshold=threshold, **kwargs
        )
