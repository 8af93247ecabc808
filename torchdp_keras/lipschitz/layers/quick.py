"""deel-lipdp's "quick" layers: Keras-style dense and convolution layers whose kernel
is re-projected after every optimizer step, under deel-lipdp's names and arguments.

In deel-lipdp, `DP_SpectralDense` re-orthonormalises its kernel inside every
forward pass (deel-lip's reparametrisation) and the "quick" layers instead
put the constraint on the kernel after each update. Every spectral layer of
this port already works the quick way (`project()` after the step, with a
warm-started, certified projection), so these are the spectral layers with
deel-lipdp's signatures, plus the Frobenius-normalised dense layer.
"""

from __future__ import annotations

import math

import keras
import torch

from torchdp_keras.errors import DPConfigError
from torchdp_keras.lipschitz.layers.spectral import (
    _DEFAULT_BJORCK_ITERATIONS,
    DP_SpectralConv2D,
    DP_SpectralDense,
)

__all__ = ["DP_QuickFrobeniusDense", "DP_QuickSpectralConv2D", "DP_QuickSpectralDense"]


def _no_activation(kwargs: dict, layer: str) -> None:
    """Refuses the Keras Dense/Conv2D arguments the bounds of a linear map exclude."""
    activation = kwargs.pop("activation", None)
    if activation not in (None, "linear"):
        raise DPConfigError(
            f"Expected activation=None for {layer}: add the activation as its own DP layer "
            f"(DP_GroupSort, DP_ReLU). Received: activation={activation!r}"
        )
    for name in ("kernel_constraint", "kernel_regularizer"):
        if kwargs.pop(name, None) is not None:
            raise DPConfigError(
                f"Expected {name}=None for {layer}: the layer keeps its kernel on the "
                "spectral-norm ball itself."
            )


@keras.saving.register_keras_serializable(package="torchdp_keras")
class DP_QuickSpectralDense(DP_SpectralDense):
    """deel-lipdp's `DP_QuickSpectralDense(units, nm_coef=1)`: `DP_SpectralDense`.

    An orthogonally initialised kernel (deel-lipdp forces it), no bias, kept
    at spectral norm `<= 1` (orthonormalised) after every step; the bounds
    are `DP_SpectralDense`'s.
    """

    def __init__(self, units: int, *, nm_coef: float = 1.0, use_bias: bool = False, **kwargs):
        _no_activation(kwargs, "DP_QuickSpectralDense")
        kwargs["kernel_initializer"] = "orthogonal"
        super().__init__(units, use_bias=use_bias, nm_coef=nm_coef, **kwargs)


@keras.saving.register_keras_serializable(package="torchdp_keras")
class DP_QuickSpectralConv2D(DP_SpectralConv2D):
    """deel-lipdp's `DP_QuickSpectralConv2D(filters, kernel_size, nm_coef=1, orthogonal=True)`.

    `DP_SpectralConv2D` with deel-lipdp's arguments: `orthogonal=True`
    orthonormalises the reshaped kernel after every step (Bjorck),
    `orthogonal=False` only rescales it onto the spectral-norm ball. The
    convolution's own Lipschitz factor is `DP_SpectralConv2D`'s (sound for
    any input size; deel-lip's stride-1 factor depends on the input size).
    """

    def __init__(
        self,
        filters: int,
        kernel_size,
        *,
        nm_coef: float = 1.0,
        orthogonal: bool = True,
        use_bias: bool = False,
        **kwargs,
    ):
        _no_activation(kwargs, "DP_QuickSpectralConv2D")
        kwargs["kernel_initializer"] = "orthogonal"
        kwargs.setdefault("bjorck_iterations", _DEFAULT_BJORCK_ITERATIONS if orthogonal else 0)
        super().__init__(filters, kernel_size, use_bias=use_bias, nm_coef=nm_coef, **kwargs)
        self.orthogonal = bool(orthogonal)

    def get_config(self) -> dict:
        config = super().get_config()
        config["orthogonal"] = self.orthogonal
        config.pop("kernel_initializer", None)
        return config


@keras.saving.register_keras_serializable(package="torchdp_keras")
class DP_QuickFrobeniusDense(DP_SpectralDense):
    """deel-lipdp's `DP_QuickFrobeniusDense(units, nm_coef=1)`: kernel Frobenius norm `<= 1`.

    After every step the kernel is divided by `max(1, ||W||_F (1 + margin))`,
    which is `O(d * units)` instead of the spectral projection's Gram
    products. `||W||_2 <= ||W||_F <= 1`, so `DP_SpectralDense`'s bounds hold;
    the layer is much more contractive (an orthonormal `d x units` kernel has
    `||W||_F = sqrt(units)`).
    """

    def __init__(self, units: int, *, nm_coef: float = 1.0, use_bias: bool = False, **kwargs):
        _no_activation(kwargs, "DP_QuickFrobeniusDense")
        super().__init__(units, use_bias=use_bias, nm_coef=nm_coef, **kwargs)

    def project(self) -> None:
        """Rescales the kernel to Frobenius norm `<= 1`.

        The norm is computed in float64 and the divisor enlarged by a margin
        of `1e-6 + 2 u sqrt(entries)` (`u` the unit roundoff of the kernel's
        dtype), which covers the rounding of the division and the cast.
        """
        with torch.no_grad():
            value = self.kernel.value
            norm = float(torch.linalg.vector_norm(value.detach().double()))
            if not math.isfinite(norm):
                raise FloatingPointError(
                    "The kernel holds NaN or infinite values (the training has diverged)."
                )
            unit = torch.finfo(value.dtype).eps / 2
            divisor = norm * (1.0 + 1e-6 + 2 * unit * math.sqrt(value.numel()))
            if divisor > 1.0:
                self.kernel.assign((value.double() / divisor).to(value.dtype))
