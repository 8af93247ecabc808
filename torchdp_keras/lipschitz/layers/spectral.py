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

__all__ = [
    "DP_SpectralConv2D",
    "DP_SpectralDense",
    "certified_spectral_bound",
    "spectral_projection",
]

_DEFAULT_BJORCK_ITERATIONS = 15
_BASE_MARGIN = 1e-6


def _gram(matrix: torch.Tensor) -> torch.Tensor:
    """The Gram matrix of the smaller side: `W^T W` or `W W^T`."""
    return matrix.T @ matrix if matrix.shape[0] >= matrix.shape[1] else matrix @ matrix.T


def _bjorck_step(matrix: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """One Bjorck step `W <- W (1.5 I - 0.5 W^T W)` from the Gram matrix of the smaller side.

    It maps every singular value `s` to `1.5 s - 0.5 s^3`, which converges to
    1 from any `s` in `(0, sqrt(3))` and stays below 1 on the way.
    """
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    factor = 1.5 * eye - 0.5 * gram
    return matrix @ factor if matrix.shape[0] >= matrix.shape[1] else factor @ matrix


def certified_spectral_bound(matrix: torch.Tensor) -> float:
    """An upper bound of `||matrix||_2`, guaranteed despite rounding, in float64.

    `||W||_2^2 = ||G||_2 <= ||G||_inf` (largest absolute row sum) for the Gram
    matrix `G` of the smaller side, computed in float64. The float64 product
    differs from the exact `G` by at most `gamma |W|^T |W|` entrywise
    (`gamma = k u / (1 - k u)`, `k` the inner dimension, `u = 2^-53`), whose
    row sums are the entries of `|W|^T (|W| 1)`: that term is added. The
    bound is tight (about `1 + ||G - I||_inf / 2`) for a matrix with nearly
    orthonormal columns or rows, which is what the projection produces; it
    costs one Gram product and no SVD.
    """
    work = matrix.detach().double()
    if work.shape[0] < work.shape[1]:
        work = work.T
    inner = work.shape[0]
    gram = work.T @ work
    unit = torch.finfo(torch.float64).eps / 2
    gamma = inner * unit / (1 - inner * unit)
    magnitude = work.abs()
    rounding = magnitude.T @ (magnitude @ torch.ones(work.shape[1], dtype=work.dtype))
    rows = gram.abs().sum(dim=1) + gamma * rounding
    # The row sums above are themselves rounded: a relative 1e-12 covers them.
    return math.sqrt(float(rows.max()) * (1 + 1e-12))


# Below this many entries the projection's dozens of tiny kernels run faster on
# one thread: on a busy CPU every parallel region of an intra-op pool waits for
# a time slice (measured here: 480 ms vs 0.4 ms for 15 Bjorck steps of a
# 144 x 16 kernel with the other core loaded).
_SINGLE_THREAD_ENTRIES = 1 << 17

_CONVERGED = 1e-2
"""Bjorck stops once `||G - I||_inf <= _CONVERGED`: singular values within 0.5% of 1.

Orthonormality only makes the network gradient-norm preserving, which helps
training; the privacy bounds need `||W||_2 <= 1` alone, which the certified
rescaling guarantees whatever the tolerance.
"""


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

    A matrix within twice the tolerance below of orthonormal and certified
    `<= 1` is returned unchanged (projection is idempotent). Otherwise:

    1. Divide by `s0 = sqrt(||G||_inf)`, `G` the Gram matrix of the smaller
       side and `||G||_inf` its largest absolute row sum (an upper bound of
       the squared spectral norm, up to rounding: all Bjorck needs to
       converge is a spectral norm below `sqrt(3)`).
    2. Bjorck steps in the matrix's precision (float32 for float32 weights),
       at most `bjorck_iterations`, stopping once `||G - I||_inf <= 1e-2`:
       a kernel projected at the previous training step and moved by one
       update needs one or two, not fifteen.
    3. Certify: `b = certified_spectral_bound(result)`, an upper bound that
       holds despite rounding (float64 Gram plus its error term); if
       `b > 1`, divide by `b (1 + margin)` with `margin = 1e-6 + 2 u
       sqrt(min(rows, cols))`, `u` the unit roundoff of `matrix.dtype`, which
       absorbs the rounding of that division and cast (a relative `u` per
       entry: `||E||_2 <= u sqrt(rank) ||W||_2`). A result certified `<= 1`
       in the weights' own dtype is returned as it is.

    No SVD is computed: a 1568 x 1024 kernel takes one or two float32 Gram
    products and one float64 one per step.

    Args:
        matrix: A 2-D floating tensor.
        bjorck_iterations: Most Bjorck steps, an integer `>= 0` (0 gives a
            plain rescaling by the certified bound).

    Returns:
        A tensor of the same shape, dtype and device whose spectral norm is
        certified `<= 1`.

    Raises:
        FloatingPointError: `matrix` holds NaN or infinite values.
    """
    if matrix.ndim != 2:
        raise ValueError(f"Expected a 2-D matrix. Received shape {tuple(matrix.shape)}")
    dtype = matrix.dtype
    with torch.no_grad(), _threads_for(matrix):
        work_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        work = matrix.detach().to(work_dtype)
        if not bool(torch.isfinite(work).all()):
            raise FloatingPointError(
                "The kernel holds NaN or infinite values; it cannot be projected "
                "onto the spectral-norm ball (the training has diverged)."
            )
        gram = _gram(work)
        s0 = math.sqrt(float(gram.abs().sum(dim=1).max()))
        if s0 == 0.0:
            return matrix.detach().clone()
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        if (
            bjorck_iterations
            and float((gram - eye).abs().sum(dim=1).max()) <= 2 * _CONVERGED
            and certified_spectral_bound(work) <= 1.0
        ):
            # Already projected (and not moved since beyond the tolerance):
            # returned unchanged, so that projecting twice changes nothing.
            return matrix.detach().clone()
        if bjorck_iterations:
            work = work / s0
            gram = gram / (s0 * s0)
            for step in range(bjorck_iterations):
                error = float((gram - eye).abs().sum(dim=1).max())
                if error <= _CONVERGED:
                    break
                work = _bjorck_step(work, gram)
                # A step maps s^2 = 1 + d to 1 - 0.75 d^2 + 0.25 d^3, and
                # |d| <= ||G - I||_inf: stop without another Gram product when
                # that already meets the tolerance.
                if 0.75 * error**2 + 0.25 * error**3 <= _CONVERGED / 2:
                    break
                if step + 1 < bjorck_iterations:
                    gram = _gram(work)
        bound = certified_spectral_bound(work)
        if bound <= 1.0 and work.dtype == dtype:
            return work  # certified as it is: no rounding follows
        # Dividing by b (1 + margin) and rounding to `dtype` perturbs each entry
        # by a relative u at most: ||E||_2 <= ||E||_F <= u sqrt(rank) ||W / d||_2,
        # so the result's norm is <= (1 + u sqrt(rank)) / (1 + margin) < 1.
        unit_roundoff = torch.finfo(dtype).eps / 2
        margin = _BASE_MARGIN + 2 * unit_roundoff * math.sqrt(min(matrix.shape))
        return (work.double() / max(1.0, bound * (1.0 + margin))).to(dtype)


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
