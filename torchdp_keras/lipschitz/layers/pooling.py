"""1-Lipschitz pooling over disjoint windows: their L2 norms, or their maxima."""

from __future__ import annotations

import math

import keras
from keras import ops

from torchdp_keras._validation import check_positive
from torchdp_keras.errors import DPConfigError
from torchdp_keras.lipschitz.layers.base import WeightlessDPLayer
from torchdp_keras.lipschitz.layers.spectral import _pair

__all__ = [
    "DP_MaxPool2D",
    "DP_ScaledGlobalL2NormPooling2D",
    "DP_ScaledL2NormPooling1D",
    "DP_ScaledL2NormPooling2D",
]


class _L2NormPoolingMixin(WeightlessDPLayer):
    """Bounds of `y_i = sqrt(||x_{w_i}||^2 + eps)` over disjoint windows `w_i`.

    For one example with `||x|| <= X`, `n` output values and an output
    gradient `v` with `||v|| <= G`:

    - output: `||y||^2 = sum_i (||x_{w_i}||^2 + eps) <= ||x||^2 + n eps`
      because the windows are disjoint, so `propagate_inputs(X) =
      sqrt(X^2 + n eps)`.
    - input gradient: the gradient of `y_i` is `x_{w_i} / sqrt(||x_{w_i}||^2
      + eps)`, of norm `< 1`, supported on window `w_i` only. The windows
      are disjoint, so `||J^T v||^2 = sum_i v_i^2 ||x_{w_i}||^2 /
      (||x_{w_i}||^2 + eps) <= ||v||^2`: `backpropagate_inputs(X, G) = G`.
      (Pixels in no window get a zero gradient.)
    - no weights: `backpropagate_params = 0`.
    """

    eps: float
    _num_outputs: int | None
    k_coef_lip: float = 1.0

    def backpropagate_inputs(self, input_bound: float, gradient_bound: float) -> float:
        """Returns `k_coef_lip * gradient_bound` (the output is scaled by `k_coef_lip`)."""
        return self.k_coef_lip * float(gradient_bound)

    def _outputs_per_example(self) -> int:
        if not self.built or self._num_outputs is None:
            raise ValueError(
                f"Layer {self.name!r} must be built (called on an input of known "
                f"shape) before its bounds are computed: they depend on the number "
                f"of output values per example."
            )
        return self._num_outputs

    def propagate_inputs(self, input_bound: float) -> float:
        """Returns `k_coef_lip * sqrt(input_bound**2 + n * eps)` (`n` output values)."""
        root = math.sqrt(float(input_bound) ** 2 + self._outputs_per_example() * self.eps)
        return self.k_coef_lip * root


def _deel_lip_pooling_arguments(kwargs: dict, eps):
    """(eps, k_coef_lip) from deel-lip's `eps_grad_sqrt`, `k_coef_lip` and `data_format`."""
    data_format = kwargs.pop("data_format", None)
    if data_format not in (None, "channels_last"):
        raise DPConfigError(
            f"Expected data_format=None or 'channels_last'. Received: data_format={data_format!r}"
        )
    grad_eps = kwargs.pop("eps_grad_sqrt", None)
    if grad_eps is not None:
        if eps is not None:
            raise DPConfigError(
                "Expected one of eps and eps_grad_sqrt (deel-lip's name), not both. "
                f"Received: eps={eps!r}, eps_grad_sqrt={grad_eps!r}"
            )
        eps = check_positive(grad_eps, "eps_grad_sqrt")
    k_coef_lip = check_positive(kwargs.pop("k_coef_lip", 1.0), "k_coef_lip")
    return eps, k_coef_lip


def _check_image_shape(input_shape, layer: str) -> None:
    if len(input_shape) != 4 or any(d is None for d in input_shape[1:]):
        raise DPConfigError(
            f"{layer} expects inputs (batch, height, width, channels) with known "
            f"height, width and channels. Received: input_shape={tuple(input_shape)}"
        )


@keras.saving.register_keras_serializable(package="torchdp_keras")
class DP_ScaledL2NormPooling2D(keras.layers.Layer, _L2NormPoolingMixin):
    """L2-norm pooling over non-overlapping windows (channels_last).

    `y[i, j, c] = sqrt(sum_{window (i, j)} x[., ., c]^2 + eps)`: the L2 norm
    of each `pool_size` window, channel by channel (deel-lip's
    `ScaledL2NormPooling2D`, i.e. `sqrt(pool area)` times the root mean
    square). Rows or columns left over by the windows are dropped
    (`padding="valid"`). Overlapping windows (`strides != pool_size`) would
    count pixels several times and break 1-Lipschitzness, so they are
    refused.

    Bounds (see `_L2NormPoolingMixin`): `propagate_inputs(X) =
    sqrt(X^2 + n eps)` with `n = out_height * out_width * channels`,
    `backpropagate_inputs(X, G) = G`, `backpropagate_params = 0`.

    Args:
        pool_size: An integer or a pair of integers `>= 1`.
        strides: None (the pool size) or equal to `pool_size`.
        padding: Only `"valid"`.
        eps: A number `> 0` added under the square root, so that the gradient
            at a zero window is defined (0); default 1e-12. deel-lip's
            `eps_grad_sqrt` plays the same role and is accepted as its alias
            (deel-lip uses it in the gradient only; here it is also in the
            output, which `propagate_inputs` accounts for).
        **kwargs: Passed to `keras.layers.Layer`; deel-lip's `k_coef_lip`
            (the output is multiplied by it, and the bounds with it) and
            `data_format` (None or "channels_last") are accepted.

    Raises:
        DPConfigError: an argument is out of range, `strides` differs from
            `pool_size`, or `padding` is not `"valid"`.
    """

    def __init__(
        self, pool_size=2, strides=None, padding: str = "valid", eps: float | None = None, **kwargs
    ) -> None:
        eps, self.k_coef_lip = _deel_lip_pooling_arguments(kwargs, eps)
        eps = 1e-12 if eps is None else eps
        super().__init__(**kwargs)
        self.pool_size = _pair(pool_size, "pool_size")
        if strides is not None and _pair(strides, "strides") != self.pool_size:
            raise DPConfigError(
                f"Expected strides=None or strides equal to pool_size (overlapping "
                f"windows are not 1-Lipschitz). Received: strides={strides!r}, "
                f"pool_size={pool_size!r}"
            )
        if not isinstance(padding, str) or padding.lower() != "valid":
            raise DPConfigError(f'Expected padding="valid". Received: padding={padding!r}')
        self.padding = "valid"
        self.eps = check_positive(eps, "eps")
        self._num_outputs = None

    def build(self, input_shape) -> None:
        _check_image_shape(input_shape, "DP_ScaledL2NormPooling2D")
        _, h, w, c = self.compute_output_shape(input_shape)
        if h < 1 or w < 1:
            raise DPConfigError(
                f"The input is smaller than the pooling window. Received: "
                f"pool_size={self.pool_size}, input_shape={tuple(input_shape)}"
            )
        self._num_outputs = int(h * w * c)

    def call(self, inputs):
        _, h, w, c = inputs.shape
        ph, pw = self.pool_size
        ho, wo = h // ph, w // pw
        x = inputs[:, : ho * ph, : wo * pw, :]
        x = ops.reshape(x, (-1, ho, ph, wo, pw, c))
        pooled = ops.sqrt(ops.sum(ops.square(x), axis=(2, 4)) + self.eps)
        return pooled if self.k_coef_lip == 1.0 else pooled * self.k_coef_lip

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape
        ph, pw = self.pool_size
        return (b, None if h is None else h // ph, None if w is None else w // pw, c)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "pool_size": self.pool_size,
                "strides": None,
                "padding": self.padding,
                "eps": self.eps,
                "k_coef_lip": self.k_coef_lip,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="torchdp_keras")
class DP_ScaledGlobalL2NormPooling2D(keras.layers.Layer, _L2NormPoolingMixin):
    """Global L2-norm pooling: `y_c = sqrt(sum_{h, w} x[h, w, c]^2 + eps)` (channels_last).

    Bounds (see `_L2NormPoolingMixin`, one window per channel):
    `propagate_inputs(X) = sqrt(X^2 + C eps)` with `C` the number of
    channels, `backpropagate_inputs(X, G) = G`, `backpropagate_params = 0`.

    Args:
        eps: A number `> 0` added under the square root.
        **kwargs: Passed to `keras.layers.Layer`.

    Raises:
        DPConfigError: `eps` is not a finite number `> 0`.
    """

    def __init__(self, eps: float = 1e-12, **kwargs) -> None:
        super().__init__(**kwargs)
        self.eps = check_positive(eps, "eps")
        self._num_outputs = None

    def build(self, input_shape) -> None:
        if len(input_shape) != 4 or input_shape[-1] is None:
            raise DPConfigError(
                f"DP_ScaledGlobalL2NormPooling2D expects inputs (batch, height, width, "
                f"channels) with known channels. Received: input_shape={tuple(input_shape)}"
            )
        self._num_outputs = int(input_shape[-1])

    def call(self, inputs):
        return ops.sqrt(ops.sum(ops.square(inputs), axis=(1, 2)) + self.eps)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"eps": self.eps})
        return config


@keras.saving.register_keras_serializable(package="torchdp_keras")
class DP_ScaledL2NormPooling1D(keras.layers.Layer, _L2NormPoolingMixin):
    """The L2 norm along one axis: `y = sqrt(sum_axis x^2 + eps)` (deel-lipdp's layer).

    Every output value is the norm of a disjoint slice of the example, so the
    bounds of `_L2NormPoolingMixin` hold with `n` the number of output
    values per example: `propagate_inputs(X) = sqrt(X^2 + n eps)` (deel-lipdp
    reports `X`, which the `eps` under the square root can exceed),
    `backpropagate_inputs(X, G) = G`, `backpropagate_params = 0`.

    Args:
        axis: The axis reduced (not the batch axis); default -1.
        eps: A number `> 0` under the square root; default 1e-6 (deel-lipdp's).
        **kwargs: Passed to `keras.layers.Layer`.

    Raises:
        DPConfigError: `eps` is not a finite number `> 0`, `axis` is the batch
            axis, or (when built) a dimension is unknown.
    """

    def __init__(self, axis: int = -1, eps: float = 1e-6, **kwargs) -> None:
        super().__init__(**kwargs)
        self.axis = int(axis)
        self.eps = check_positive(eps, "eps")
        self._num_outputs = None

    def build(self, input_shape) -> None:
        rank = len(input_shape)
        axis = self.axis % rank
        if axis == 0:
            raise DPConfigError(
                f"Expected a non-batch axis. Received: axis={self.axis} for rank {rank}"
            )
        kept = [d for i, d in enumerate(input_shape) if i not in (0, axis)]
        if any(d is None for d in kept) or input_shape[axis] is None:
            raise DPConfigError(
                f"DP_ScaledL2NormPooling1D needs known dimensions. Received: "
                f"input_shape={tuple(input_shape)}"
            )
        self._num_outputs = int(math.prod(kept))

    def call(self, inputs):
        return ops.sqrt(ops.sum(ops.square(inputs), axis=self.axis) + self.eps)

    def compute_output_shape(self, input_shape):
        axis = self.axis % len(input_shape)
        return tuple(d for i, d in enumerate(input_shape) if i != axis)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"axis": self.axis, "eps": self.eps})
        return config


@keras.saving.register_keras_serializable(package="torchdp_keras")
class DP_MaxPool2D(keras.layers.MaxPooling2D, WeightlessDPLayer):
    """`keras.layers.MaxPooling2D` over disjoint windows (deel-lipdp's `DP_MaxPool2D`).

    With `strides` equal to `pool_size` (deel-lipdp asserts it) every input
    value is in at most one window. Each output is one of its window's
    values, so `||y|| <= ||x||` (`propagate_inputs(X) = X`), and the gradient
    routes each output's gradient to one input (`backpropagate_inputs(X, G)
    = G`); no weights.

    Raises:
        DPConfigError: `strides` is neither None nor `pool_size`, or
            `data_format` is not channels_last.
    """

    def __init__(self, pool_size=(2, 2), strides=None, padding="valid", **kwargs) -> None:
        pair = _pair(pool_size, "pool_size")
        if strides is not None and _pair(strides, "strides") != pair:
            raise DPConfigError(
                f"Expected strides=None or strides equal to pool_size (overlapping windows "
                f"count a value several times). Received: strides={strides!r}, "
                f"pool_size={pool_size!r}"
            )
        if kwargs.get("data_format") not in (None, "channels_last"):
            raise DPConfigError(
                f"Expected data_format='channels_last'. Received: "
                f"data_format={kwargs['data_format']!r}"
            )
        super().__init__(pool_size=pair, strides=pair, padding=padding, **kwargs)

    def propagate_inputs(self, input_bound: float) -> float:
        """Returns `input_bound`."""
        return float(input_bound)
