"""Tensor operations of the DP step: clipping, summing and noising.

`clip_noise` holds the plain-torch building blocks; `fused` the fused ops,
served by the `csrc/` kernels when they are built and by pure torch otherwise.
"""

from torchdp_keras.ops.clip_noise import (
    CLIP_SAFETY_MARGIN,
    add_gaussian_noise,
    clip_factors,
    clipped_sum,
    per_unit_squared_norms,
)
from torchdp_keras.ops.fused import (
    add_noise_and_scale_,
    add_secure_noise_and_scale_,
    clip_and_noise,
    clipped_sum_and_norms,
    extension_info,
)

__all__ = [
    "CLIP_SAFETY_MARGIN",
    "add_gaussian_noise",
    "add_noise_and_scale_",
    "add_secure_noise_and_scale_",
    "clip_and_noise",
    "clipped_sum_and_norms",
    "extension_info",
    "clip_factors",
    "clipped_sum",
    "per_unit_squared_norms",
]
