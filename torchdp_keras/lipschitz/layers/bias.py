"""A norm-bounded bias, and centering (an orthogonal projection)."""

from __future__ import annotations

import math

import keras
import torch
from keras import ops

from torchdp_keras._validation import check_positive
from torchdp_keras.errors import DPConfigError
from torchdp_keras.lipschitz.layers.base import DPLayer, NormPreservingDPLayer, check_nm_coef

__all__ = ["DP_AddBias", "DP_LayerCentering"]

_BASE_MARGIN = 1e-6


@keras.saving.register_keras_serializable(package="torchdp_keras")
class DP_AddBias(keras.layers.Layer, DPLayer):
    """Adds a trainable vector `b` over the last axis: `y = x + b` (broadcast).

    `project()` rescales `b` so that `||b|| <= norm_max`. Let `p` be the
    number of positions `b` is added at: the product of the input dimensions
    other than the batch and the last one (1 for a 2-D input `(B, F)`). Then
    for `||x|| <= X`, output gradient `g` with `||g|| <= G`, and any `b` that
    `project()` leaves:

    - `propagate_inputs(X) = X + sqrt(p) * norm_max`: the added tensor
      `1_p (x) b` has norm `sqrt(p) ||b||`; triangle inequality.
    - `backpropagate_inputs(X, G) = G`: a translation; the Jacobian is `I`.
    - `backpropagate_params(X, G) = sqrt(p) * G`: the gradient w.r.t. `b` is
      `sum_t g_t` over the `p` positions, of norm `<= sum_t ||g_t|| <=
      sqrt(p) sqrt(sum_t ||g_t||^2) = sqrt(p) ||g||` (Cauchy-Schwarz).

    Args:
        norm_max: Largest L2 norm of `b`, a finite number `> 0`.
        nm_coef: deel-lipdp's noise multiplier coefficient ("per-layer"
            strategy), a finite number `> 0`.
        **kwargs: Passed to `keras.layers.Layer`.

    Raises:
        DPConfigError: `norm_max` is not a finite number `> 0`, or (when
            built) an input dimension other than the batch is unknown.
    """

    def __init__(self, norm_max: float, *, nm_coef: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.norm_max = check_positive(norm_max, "norm_max")
        self.nm_coef = check_nm_coef(nm_coef)
        self._positions: int | None = None

    def build(self, input_shape) -> None:
        if len(input_shape) < 2 or any(d is None for d in input_shape[1:]):
            raise DPConfigError(
                f"DP_AddBias needs every input dimension but the batch to be known "
                f"(its bounds depend on them). Received: input_shape={tuple(input_shape)}"
            )
        self._positions = int(math.prod(input_shape[1:-1]))
        self.bias = self.add_weight(
            name="bias", shape=(int(input_shape[-1]),), initializer="zeros", trainable=True
        )

    def call(self, inputs):
        return inputs + self.bias

    def compute_output_shape(self, input_shape):
        return input_shape

    def _sqrt_positions(self) -> float:
        if self._positions is None:
            raise ValueError(
                f"Layer {self.name!r} must be built before its bounds are computed: "
                f"they depend on the input shape."
            )
        return math.sqrt(self._positions)

    def project(self) -> None:
        """Rescales `b` to `||b|| <= norm_max` (unchanged if already inside).

        The rescaling divides by `||b|| (1 + margin) / norm_max` in float64,
        with `margin = 1e-6 + 2 u` (`u` the unit roundoff of the variable's
        dtype) so that the rounding of the cast, a relative `u` per entry,
        cannot push the norm back above `norm_max`; the result is re-checked.
        """
        with torch.no_grad():
            value = self.bias.value
            work = value.detach().double()
            if not bool(torch.isfinite(work).all()):
                raise FloatingPointError(
                    "The bias holds NaN or infinite values (the training has diverged)."
                )
            margin = _BASE_MARGIN + 2 * (torch.finfo(value.dtype).eps / 2)
            norm = float(torch.linalg.vector_norm(work))
            if norm <= self.norm_max:
                return
            for _ in range(8):
                candidate = (work * (self.norm_max / (norm * (1.0 + margin)))).to(value.dtype)
                if float(torch.linalg.vector_norm(candidate.double())) <= self.norm_max:
                    self.bias.assign(candidate)
                    return
                margin *= 10.0
        raise FloatingPointError("Could not bring the bias norm to <= norm_max.")

    def propagate_inputs(self, input_bound: float) -> float:
        """Returns `input_bound + sqrt(p) * norm_max`."""
        return float(input_bound) + self._sqrt_positions() * self.norm_max

    def backpropagate_inputs(self, input_bound: float, gradient_bound: float) -> float:
        """Returns `gradient_bound`: the Jacobian is the identity."""
        return float(gradient_bound)

    def backpropagate_params(self, input_bound: float, gradient_bound: float) -> float:
        """Returns `sqrt(p) * gradient_bound`."""
        return self._sqrt_positions() * float(gradient_bound)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"norm_max": self.norm_max, "nm_coef": self.nm_coef})
        return config


@keras.saving.register_keras_serializable(package="torchdp_keras")
class DP_LayerCentering(keras.layers.Layer, NormPreservingDPLayer):
    """Subtracts a per-example mean (deel-lipdp's `DP_LayerCentering`).

    For an image `(B, H, W, C)`: with `channelwise=True` (deel-lipdp's
    default) the mean over the channels of each pixel; with
    `pixelwise=True` the mean over the pixels of each channel; with neither,
    the mean over the whole example; both at once is refused (deel-lipdp
    raises too). Any other input `(B, ..., F)` is centred over all its axes
    but the batch. deel-lipdp centres such inputs over
    `range(rank - 1)`, which for `(B, F)` is the *batch* axis: each example
    would then depend on the others in its batch and its gradient on theirs,
    outside the bound; this port never mixes examples.

    Per example the map is `I - 1 1^T / n` on each averaged group, an
    orthogonal projection (symmetric, idempotent, norm `<= 1`), hence for
    `||x|| <= X` and output gradient `<= G`: `propagate_inputs(X) = X`,
    `backpropagate_inputs(X, G) = G`, `backpropagate_params = 0`.

    Args:
        pixelwise: Centre each channel over the pixels (images only).
        channelwise: Centre each pixel over the channels (images only).
        **kwargs: Passed to `keras.layers.Layer`.

    Raises:
        DPConfigError: `pixelwise` and `channelwise` both True, or deel-lipdp's
            `scale=True` (no scaling is allowed).
    """

    def __init__(self, pixelwise: bool = False, channelwise: bool = True, **kwargs) -> None:
        if kwargs.pop("scale", False):
            raise DPConfigError("Expected scale=False: DP_LayerCentering only centres.")
        kwargs.pop("center", None)
        if pixelwise and channelwise:
            raise DPConfigError(
                "Expected at most one of pixelwise and channelwise: both would average "
                "a single value. Received: pixelwise=True, channelwise=True"
            )
        super().__init__(**kwargs)
        self.pixelwise = bool(pixelwise)
        self.channelwise = bool(channelwise)

    def _axes(self, rank: int) -> tuple[int, ...]:
        if rank == 4 and self.channelwise:
            return (3,)
        if rank == 4 and self.pixelwise:
            return (1, 2)
        return tuple(range(1, rank))

    def call(self, inputs):
        axes = self._axes(len(inputs.shape))
        return inputs - ops.mean(inputs, axis=axes, keepdims=True)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"pixelwise": self.pixelwise, "channelwise": self.channelwise})
        return config

    def compute_output_shape(self, input_shape):
        return input_shape
