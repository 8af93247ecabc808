"""Linear layers whose operator norm is kept at most 1 (spectral normalisation).

Both layers store an unconstrained kernel and `project()` maps it back to
the set `{W : ||W||_2 <= 1}` after every optimizer step: a few Bjorck
orthonormalisation iterations (which push every singular value towards 1, so
the layer keeps its expressiveness), then an exact rescaling by the largest
singular value computed in float64, with a safety margin for the rounding of
the final cast. The rescaled kernel is re-checked, so `||W||_2 <= 1` holds
for the stored (rounded) kernel, which is what the bounds need.
"""

from __future__ import annotations

import contextlib
import math

import keras
import torch
from keras import ops

from torchdp_keras._validation import check_int
from torchdp_keras.errors import DPConfigError
from torchdp_keras.lipschitz.layers.base import DPLayer, check_nm_coef, check_no_bias

__all__ = ["DP_SpectralConv2D", "DP_SpectralDense", "spectral_projection"]

_DEFAULT_BJORCK_ITERATIONS = 15
_BASE_MARGIN = 1e-6


def _spectral_norm(matrix: torch.Tensor) -> float:
    """The exact largest singular value of a 2-D tensor, computed in float64."""
    return float(torch.linalg.matrix_norm(matrix.detach().double(), ord=2))


def _bjorck(matrix: torch.Tensor, iterations: int) -> torch.Tensor:
    """Runs `iterations` Bjorck steps `W <- W (1.5 I - 0.5 W^T W)`.

    Each step maps every singular value `s` in `[0, 1]` to
    `1.5 s - 0.5 s^3`, which stays in `[0, 1]` and converges to 1 (0 stays 0),
    so the input must have `||W||_2 <= 1`. The Gram matrix of the smaller side
    is used (`(1.5 I - 0.5 W W^T) W` is the same map).
    """
    rows, cols = matrix.shape
    if rows >= cols:
        eye = torch.eye(cols, dtype=matrix.dtype, device=matrix.device)
        for _ in range(iterations):
            matrix = matrix @ (1.5 * eye - 0.5 * (matrix.T @ matrix))
    else:
        eye = torch.eye(rows, dtype=matrix.dtype, device=matrix.device)
        for _ in range(iterations):
            matrix = (1.5 * eye - 0.5 * (matrix @ matrix.T)) @ matrix
    return matrix


# Below this many entries the projection's dozens of tiny float64 kernels run
# faster on one thread: on a busy CPU every parallel region of an intra-op
# pool waits for a time slice (measured here: 480 ms vs 0.4 ms for 15 Bjorck
# steps of a 144 x 16 kernel with the other core loaded).
_SINGLE_THREAD_ENTRIES = 1 << 17


@contextlib.contextmanager
def _threads_for(matrix: torch.Tensor):
    """One intra-op thread for small matrices on CPU; the setting is restored afterwards."""
    threads = torch.get_num_threads()
    small = matrix.device.type == "cpu" and matrix.numel() <= _SINGLE_THREAD_ENTRIES
    if not small or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def spectral_projection(
    matrix: torch.Tensor, bjorck_iterations: int = _DEFAULT_BJORCK_ITERATIONS
) -> torch.Tensor:
    """Returns a matrix close to `matrix` (orthonormalised) with `||result||_2 <= 1`.

    Steps, all in float64:

    1. Divide by `s0 = sqrt(||G||_inf)`, `G` the Gram matrix of the smaller
       side (`W^T W` or `W W^T`) and `||G||_inf` its largest absolute row
       sum. Since `||W||_2^2 = ||G||_2 <= ||G||_inf`, this is an upper bound
       of the spectral norm (all Bjorck needs to converge), it costs no SVD,
       and it equals 1 for a matrix with orthonormal columns (or rows), which
       is therefore a fixed point: projecting twice changes nothing beyond
       the margin of step 3.
    2. Run `bjorck_iterations` Bjorck steps (singular values move towards 1).
    3. Compute the exact largest singular value `s` and divide by
       `max(1, s * (1 + margin))`, with
       `margin = 1e-6 + 2 u sqrt(min(rows, cols))` where `u` is the unit
       roundoff of `matrix.dtype`. Casting to that dtype perturbs each entry
       by a relative `u` at most, i.e. by a matrix `E` with
       `||E||_2 <= ||E||_F <= u ||W||_F <= u sqrt(rank) ||W||_2`, which the
       margin absorbs. The cast result is re-checked in float64 and rescaled
       with a larger margin in the (unexpected) case it still exceeds 1.

    Args:
        matrix: A 2-D floating tensor.
        bjorck_iterations: Number of Bjorck steps, an integer `>= 0`
            (0 gives a plain spectral rescaling).

    Returns:
        A tensor of the same shape, dtype and device whose exact spectral norm
        (as computed in float64) is `<= 1`.

    Raises:
        FloatingPointError: `matrix` holds NaN or infinite values.
    """
    if matrix.ndim != 2:
        raise ValueError(f"Expected a 2-D matrix. Received shape {tuple(matrix.shape)}")
    dtype = matrix.dtype
    with torch.no_grad(), _threads_for(matrix):
        work = matrix.detach().double()
        if not bool(torch.isfinite(work).all()):
            raise FloatingPointError(
                "The kernel holds NaN or infinite values; it cannot be projected "
                "onto the spectral-norm ball (the training has diverged)."
            )
        gram = work.T @ work if work.shape[0] >= work.shape[1] else work @ work.T
        s0 = math.sqrt(float(gram.abs().sum(dim=1).max()))
        if s0 == 0.0:
            return matrix.detach().clone()
        work = work / s0
        work = _bjorck(work, bjorck_iterations)
        unit_roundoff = torch.finfo(dtype).eps / 2
        margin = _BASE_MARGIN + 2 * unit_roundoff * math.sqrt(min(matrix.shape))
        for _ in range(8):
            s = _spectral_norm(work)
            divisor = max(1.0, s * (1.0 + margin))
            candidate = (work / divisor).to(dtype)
            if _spectral_norm(candidate) <= 1.0:
                return candidate
            margin *= 10.0
    raise FloatingPointError("Could not bring the kernel's spectral norm to <= 1.")


def _pair(value, name: str) -> tuple[int, int]:
    """Normalises an int or a pair of ints (each >= 1) to a tuple of two ints."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise DPConfigError(
                f"Expected {name} to be an integer or a pair of integers. "
                f"Received: {name}={value!r}"
            )
        return (check_int(value[0], name), check_int(value[1], name))
    v = check_int(value, name)
    return (v, v)


class _SpectralMixin(DPLayer):
    """Bounds and projection shared by the spectral layers (kernel as a 2-D matrix)."""

    kernel: keras.Variable
    bjorck_iterations: int

    def _kernel_matrix_shape(self) -> tuple[int, int]:
        shape = tuple(self.kernel.shape)
        return (math.prod(shape[:-1]), shape[-1])

    def project(self) -> None:
        """Re-orthonormalises the kernel and rescales it to spectral norm `<= 1`.

        See `spectral_projection`.
        """
        with torch.no_grad():
            value = self.kernel.value
            matrix = value.reshape(self._kernel_matrix_shape())
            projected = spectral_projection(matrix, self.bjorck_iterations)
            self.kernel.assign(projected.reshape(value.shape))

    def propagate_inputs(self, input_bound: float) -> float:
        """Returns `input_bound`: the layer is linear with operator norm `<= 1`."""
        return float(input_bound)

    def backpropagate_inputs(self, input_bound: float, gradient_bound: float) -> float:
        """Returns `gradient_bound`: the transpose also has operator norm `<= 1`."""
        return float(gradient_bound)

    def backpropagate_params(self, input_bound: float, gradient_bound: float) -> float:
        """Returns `input_bound * gradient_bound` (see the class docstring)."""
        return float(input_bound) * float(gradient_bound)


@keras.saving.register_keras_serializable(package="torchdp_keras")
class DP_SpectralDense(keras.layers.Layer, _SpectralMixin):
    """A dense layer `y = x @ W` (no bias) with `||W||_2 <= 1`.

    The kernel `W` has shape `(d, units)` and acts on the last axis, so a
    3-D input `(B, T, d)` is transformed position by position. Add a bias
    with the separate `DP_AddBias` layer.

    Bounds (for `||x|| <= X`, output gradient `g` with `||g|| <= G`, and any
    kernel `project()` leaves, i.e. `||W||_2 <= 1`):

    - `propagate_inputs(X) = X`: `||x W||_F <= ||x||_F ||W||_2` (for a 3-D
      example, `x` is the `(T, d)` matrix of its positions).
    - `backpropagate_inputs(X, G) = G`: the input gradient is `g W^T` and
      `||W^T||_2 = ||W||_2 <= 1`.
    - `backpropagate_params(X, G) = X * G`: the kernel gradient of one example
      is `x^T g = sum_t x_t g_t^T` (one term for a 2-D input). Its Frobenius
      norm is at most `sum_t ||x_t|| ||g_t|| <= sqrt(sum_t ||x_t||^2)
      sqrt(sum_t ||g_t||^2) = ||x|| ||g||` by the triangle inequality and
      Cauchy-Schwarz, and it equals `||x|| ||g||` for a 2-D input (a rank-one
      matrix), so the bound is tight.

    Args:
        units: Number of output features, an integer `>= 1`.
        kernel_initializer: Keras initializer of the kernel (projected once
            when the layer is built).
        bjorck_iterations: Bjorck steps per projection, an integer `>= 0`.
        use_bias: deel-lipdp's argument: only False (add a bias with
            `DP_AddBias`).
        nm_coef: deel-lipdp's noise multiplier coefficient ("per-layer"
            strategy), a finite number `> 0`.
        **kwargs: Passed to `keras.layers.Layer`.

    Raises:
        DPConfigError: `units` or `bjorck_iterations` is out of range.
    """

    def __init__(
        self,
        units: int,
        kernel_initializer="orthogonal",
        bjorck_iterations: int = _DEFAULT_BJORCK_ITERATIONS,
        *,
        use_bias: bool = False,
        nm_coef: float = 1.0,
        **kwargs,
    ) -> None:
        check_no_bias(use_bias, "DP_SpectralDense")
        super().__init__(**kwargs)
        self.nm_coef = check_nm_coef(nm_coef)
        self.units = check_int(units, "units")
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bjorck_iterations = check_int(bjorck_iterations, "bjorck_iterations", minimum=0)

    def build(self, input_shape) -> None:
        in_features = input_shape[-1]
        if in_features is None:
            raise DPConfigError(
                f"DP_SpectralDense needs a known last input dimension. "
                f"Received: input_shape={tuple(input_shape)}"
            )
        self.kernel = self.add_weight(
            name="kernel",
            shape=(int(in_features), self.units),
            initializer=self.kernel_initializer,
            trainable=True,
        )
        self.project()

    def call(self, inputs):
        return ops.matmul(inputs, self.kernel)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "units": self.units,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bjorck_iterations": self.bjorck_iterations,
                "nm_coef": self.nm_coef,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="torchdp_keras")
class DP_SpectralConv2D(keras.layers.Layer, _SpectralMixin):
    """A 2-D convolution (channels_last, no bias) that is 1-Lipschitz.

    `y = conv2d(x, K) / sqrt(m)` with `m = ceil(kh / sh) * ceil(kw / sw)` and
    the kernel `K` of shape `(kh, kw, cin, filters)` kept so that its
    reshaped matrix `K_mat` of shape `(kh * kw * cin, filters)` has
    `||K_mat||_2 <= 1` (see `spectral_projection`).

    Proof sketch: write the convolution as `P(x) K_mat`, with `P(x)` the
    `(positions, kh * kw * cin)` im2col matrix of the patches (zero padding
    contributes zeros). Along one axis an input pixel lies in at most
    `ceil(k / s)` windows, so it appears in at most `m` patches and
    `||P(x)||_F^2 <= m ||x||^2`. For `||x|| <= X`, output gradient `g` with
    `||g|| <= G`, and any kernel `project()` leaves:

    - `propagate_inputs(X) = X`: `||y|| <= ||P(x)||_F ||K_mat||_2 / sqrt(m)
      <= ||x||`.
    - `backpropagate_inputs(X, G) = G`: the map is linear with operator norm
      `<= 1` (previous line), and so is its transpose.
    - `backpropagate_params(X, G) = X * G`: the kernel gradient is
      `P(x)^T g / sqrt(m)`, of Frobenius norm
      `<= ||P(x)||_F ||g||_F / sqrt(m) <= ||x|| ||g||`.

    Args:
        filters: Number of output channels, an integer `>= 1`.
        kernel_size: An integer or a pair `(kh, kw)` of integers `>= 1`.
        strides: An integer or a pair `(sh, sw)` of integers `>= 1`.
        padding: `"same"` or `"valid"`.
        kernel_initializer: Keras initializer of the kernel (projected once
            when the layer is built).
        bjorck_iterations: Bjorck steps per projection, an integer `>= 0`.
        dilation_rate: Only 1 (or `(1, 1)`) is supported.
        use_bias: deel-lipdp's argument: only False (add a bias with
            `DP_AddBias`).
        nm_coef: deel-lipdp's noise multiplier coefficient ("per-layer"
            strategy), a finite number `> 0`.
        **kwargs: Passed to `keras.layers.Layer`.

    Raises:
        DPConfigError: an argument is out of range, or a dilation is requested.
    """

    def __init__(
        self,
        filters: int,
        kernel_size,
        strides=(1, 1),
        padding: str = "same",
        kernel_initializer="orthogonal",
        bjorck_iterations: int = _DEFAULT_BJORCK_ITERATIONS,
        dilation_rate=(1, 1),
        *,
        use_bias: bool = False,
        nm_coef: float = 1.0,
        **kwargs,
    ) -> None:
        check_no_bias(use_bias, "DP_SpectralConv2D")
        super().__init__(**kwargs)
        self.nm_coef = check_nm_coef(nm_coef)
        self.filters = check_int(filters, "filters")
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.strides = _pair(strides, "strides")
        if not isinstance(padding, str) or padding.lower() not in ("same", "valid"):
            raise DPConfigError(
                f'Expected padding to be "same" or "valid". Received: padding={padding!r}'
            )
        self.padding = padding.lower()
        if _pair(dilation_rate, "dilation_rate") != (1, 1):
            raise DPConfigError(
                f"DP_SpectralConv2D does not support dilation (the 1-Lipschitz "
                f"scaling assumes contiguous windows). Expected dilation_rate=1. "
                f"Received: dilation_rate={dilation_rate!r}"
            )
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bjorck_iterations = check_int(bjorck_iterations, "bjorck_iterations", minimum=0)
        kh, kw = self.kernel_size
        sh, sw = self.strides
        #: The largest number of output positions one input pixel contributes to.
        self.overlap = math.ceil(kh / sh) * math.ceil(kw / sw)
        self._scale = 1.0 / math.sqrt(self.overlap)

    def build(self, input_shape) -> None:
        if len(input_shape) != 4 or input_shape[-1] is None:
            raise DPConfigError(
                f"DP_SpectralConv2D expects inputs (batch, height, width, channels) "
                f"with known channels. Received: input_shape={tuple(input_shape)}"
            )
        self.kernel = self.add_weight(
            name="kernel",
            shape=(*self.kernel_size, int(input_shape[-1]), self.filters),
            initializer=self.kernel_initializer,
            trainable=True,
        )
        self.project()

    def call(self, inputs):
        y = ops.conv(
            inputs,
            self.kernel,
            strides=self.strides,
            padding=self.padding,
            data_format="channels_last",
        )
        return y * self._scale

    def compute_output_shape(self, input_shape):
        def out(size, k, s):
            if size is None:
                return None
            if self.padding == "same":
                return -(-size // s)
            return (size - k) // s + 1

        return (
            input_shape[0],
            out(input_shape[1], self.kernel_size[0], self.strides[0]),
            out(input_shape[2], self.kernel_size[1], self.strides[1]),
            self.filters,
        )

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "kernel_size": self.kernel_size,
                "strides": self.strides,
                "padding": self.padding,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bjorck_iterations": self.bjorck_iterations,
                "nm_coef": self.nm_coef,
            }
        )
        return config
