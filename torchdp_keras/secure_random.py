"""Cryptographically secure random numbers for `secure_mode=True` (numpy only).

Everything here draws its randomness from the operating system's CSPRNG
(`os.urandom`, i.e. `getrandom(2)` on Linux), never from a seedable generator:
nobody who sees the code, the model file or earlier outputs can predict the
next draw, and nothing can be reproduced. That is the point of secure mode;
use a seed (and the ordinary generators) for reproducible experiments.

Gaussian noise additionally resists the floating-point attacks on naive
samplers (Mironov 2012 for the Laplace mechanism; Jin et al. 2021 for
Box-Muller and polar Gaussians): one sampled double takes only some values
in a neighbourhood, and which values it can take can reveal the un-noised
number. Following Holohan and Braghin (2021), as Opacus's secure mode does,
each noise value is the sum of 4 independent Box-Muller normals scaled by
1/2 (the sum of 4 has variance 4), which closes those gaps.

Guarantee: `secure_gaussian(size, std)` returns i.i.d. N(0, std^2) values
(float64), `secure_uniform` i.i.d. uniform values on (0, 1) with 53 random
bits each, and `secure_poisson_sample(n, q)` a subset of `range(n)` that holds
each index independently with probability q (to 2^-53).

Example:
    >>> noise = secure_gaussian(1000, std=2.0)
    >>> noise.shape
    (1000,)
"""

from __future__ import annotations

import math
import os

import numpy as np

__all__ = [
    "GAUSSIAN_TERMS",
    "secure_gaussian",
    "secure_poisson_sample",
    "secure_standard_normal",
    "secure_uniform",
]

# Normals summed per noise value (Holohan and Braghin 2021; Opacus uses 4 too).
GAUSSIAN_TERMS = 4
# Random bytes fetched from the OS per call (getrandom returns at most 32 MiB).
_URANDOM_CHUNK = 1 << 24


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0:
        raise ValueError(f"Expected size to be an int >= 0. Received: size={size!r}")
    return int(size)


def _random_words(count: int) -> np.ndarray:
    """`count` uint64 words from the OS CSPRNG."""
    nbytes = 8 * count
    parts = [os.urandom(min(_URANDOM_CHUNK, nbytes - i)) for i in range(0, nbytes, _URANDOM_CHUNK)]
    return np.frombuffer(b"".join(parts), dtype=np.uint64, count=count)


def secure_uniform(size: int) -> np.ndarray:
    """`size` i.i.d. uniform float64 values in the open interval (0, 1).

    Each value is `(k + 1/2) / 2^53` for a uniform 53-bit integer `k` from
    the OS CSPRNG, so 0 and 1 never occur (the logarithm of Box-Muller is
    always finite).

    Example:
        >>> u = secure_uniform(4)
        >>> bool(((u > 0) & (u < 1)).all())
        True
    """
    size = _check_size(size)
    k = _random_words(size) >> np.uint64(11)
    return (k.astype(np.float64) + 0.5) * (2.0**-53)


def secure_standard_normal(size: int) -> np.ndarray:
    """`size` i.i.d. N(0, 1) float64 values (Box-Muller on `secure_uniform`)."""
    size = _check_size(size)
    pairs = (size + 1) // 2
    u = secure_uniform(2 * pairs)
    radius = np.sqrt(-2.0 * np.log(u[:pairs]))
    angle = (2.0 * math.pi) * u[pairs:]
    out = np.empty(2 * pairs, dtype=np.float64)
    out[:pairs] = radius * np.cos(angle)
    out[pairs:] = radius * np.sin(angle)
    return out[:size]


def secure_gaussian(size: int, std: float) -> np.ndarray:
    """`size` i.i.d. N(0, std^2) float64 values, resistant to floating-point attacks.

    Args:
        size: Number of values.
        std: Standard deviation, >= 0 (0 returns zeros without drawing).

    Returns:
        `(sum of GAUSSIAN_TERMS standard normals) * std / sqrt(GAUSSIAN_TERMS)`.
    """
    size = _check_size(size)
    std = float(std)
    if not math.isfinite(std) or std < 0:
        raise ValueError(f"Expected std >= 0 and finite. Received: std={std!r}")
    if std == 0.0:
        return np.zeros(size, dtype=np.float64)
    total = secure_standard_normal(size)
    for _ in range(GAUSSIAN_TERMS - 1):
        total += secure_standard_normal(size)
    total *= std / math.sqrt(GAUSSIAN_TERMS)
    return total


def secure_poisson_sample(num_examples: int, sampling_probability: float) -> np.ndarray:
    """Sorted indices of `range(num_examples)`, each kept with probability q.

    Example:
        >>> batch = secure_poisson_sample(1000, 0.05)  # about 50 sorted indices
    """
    num_examples = _check_size(num_examples)
    q = float(sampling_probability)
    if not 0.0 <= q <= 1.0:
        raise ValueError(
            f"Expected sampling_probability in [0, 1]. Received: sampling_probability={q!r}"
        )
    return np.flatnonzero(secure_uniform(num_examples) < q)
