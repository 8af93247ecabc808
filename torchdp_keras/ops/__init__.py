"""Tensor operations of the DP step: clipping, summing and noising."""

from torchdp_keras.ops.clip_noise import (
    CLIP_SAFETY_MARGIN,
    add_gaussian_noise,
    clip_factors,
    clipped_sum,
    per_unit_squared_norms,
)

__all__ = [
    "CLIP_SAFETY_MARGIN",
    "add_gaussian_noise",
    "clip_factors",
    "clipped_sum",
    "per_unit_squared_norms",
]
