"""Argument checks shared by every public entry point.

Each check returns the normalised value or raises `DPConfigError` with a
message that names the argument and the value it received, in the Keras style:
``Expected l2_norm_clip > 0. Received: l2_norm_clip=-1``.
"""

from __future__ import annotations

import math
import numbers

from torchdp_keras.errors import DPConfigError


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def to_float(value) -> float:
    """`float(value)` of a real number; +-inf if it is too large for a float (e.g. 10**400)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def check_positive(value, name: str) -> float:
    """Returns `value` as a float; it must be a finite number > 0."""
    number = to_float(value) if _is_real(value) else math.nan
    if not math.isfinite(number) or number <= 0:
        raise DPConfigError(f"Expected {name} > 0 and finite. Received: {name}={value!r}")
    return number


def check_int(value, name: str, minimum: int = 1) -> int:
    """Returns `value` as an int; it must be an integer >= `minimum`."""
    if not _is_int(value) or value < minimum:
        raise DPConfigError(
            f"Expected {name} to be an integer >= {minimum}. Received: {name}={value!r}"
        )
    return int(value)


def check_l2_norm_clip(value, name: str = "l2_norm_clip") -> float:
    """Returns `value` as a float; it must be a finite number > 0."""
    if not _is_real(value):
        raise DPConfigError(
            f"Expected {name} to be a number > 0. Received: {name}={value!r} "
            f"of type {type(value).__name__}"
        )
    number = to_float(value)
    if not math.isfinite(number) or number <= 0:
        raise DPConfigError(f"Expected {name} > 0 and finite. Received: {name}={value!r}")
    return number


def check_noise_multiplier(value, name: str = "noise_multiplier") -> float:
    """Returns `value` as a float; it must be a finite number >= 0."""
    if not _is_real(value):
        raise DPConfigError(
            f"Expected {name} to be a number >= 0. Received: {name}={value!r} "
            f"of type {type(value).__name__}"
        )
    number = to_float(value)
    if not math.isfinite(number) or number < 0:
        raise DPConfigError(f"Expected {name} >= 0 and finite. Received: {name}={value!r}")
    return number


def check_optional_positive_int(value, name: str) -> int | None:
    """Returns `value` as an int (or None); it must be an integer >= 1."""
    if value is None:
        return None
    if not _is_int(value):
        raise DPConfigError(
            f"Expected {name} to be None or an integer >= 1. "
            f"Received: {name}={value!r} of type {type(value).__name__}"
        )
    if value < 1:
        raise DPConfigError(f"Expected {name} >= 1. Received: {name}={value!r}")
    return int(value)


def check_seed(value, name: str = "seed") -> int | None:
    """Returns `value` as an int (or None); it must be an integer >= 0."""
    if value is None:
        return None
    if not _is_int(value):
        raise DPConfigError(
            f"Expected {name} to be None or an integer >= 0. "
            f"Received: {name}={value!r} of type {type(value).__name__}"
        )
    if value < 0:
        raise DPConfigError(f"Expected {name} >= 0. Received: {name}={value!r}")
    return int(value)


def check_bool(value, name: str) -> bool:
    """Returns `value`; it must be a bool."""
    if not isinstance(value, bool):
        raise DPConfigError(f"Expected {name} to be True or False. Received: {name}={value!r}")
    return value


def check_secure_mode(secure_mode, seed) -> bool:
    """Returns `secure_mode` (a bool); a seed contradicts it.

    Secure mode draws noise and samples from the OS CSPRNG so that nobody can
    predict or reproduce them; a fixed seed would make both reproducible by
    anyone who reads it.
    """
    secure_mode = check_bool(secure_mode, "secure_mode")
    if secure_mode and seed is not None:
        raise DPConfigError(
            "Expected seed=None with secure_mode=True: secure mode draws noise and "
            "samples from the operating system's CSPRNG, which cannot be seeded. "
            f"Received: seed={seed!r}, secure_mode=True"
        )
    return secure_mode


def units_per_batch(batch_size: int, num_microbatches: int | None) -> int:
    """Returns the number of clipping units (examples or microbatches).

    Args:
        batch_size: The number of examples in the batch.
        num_microbatches: None (every example is a unit) or the number of
            contiguous groups the batch is split into.

    Raises:
        DPConfigError: the batch does not split into `num_microbatches`
            groups of equal size.
    """
    if num_microbatches is None:
        return batch_size
    if batch_size % num_microbatches != 0:
        raise DPConfigError(
            f"Expected the batch size to be divisible by num_microbatches. "
            f"Received: batch_size={batch_size}, "
            f"num_microbatches={num_microbatches}. Use a batch size that is a "
            f"multiple of num_microbatches (with fit(), also make the number "
            f"of examples a multiple of batch_size so that the last batch is "
            f"not smaller), or num_microbatches=None."
        )
    return num_microbatches
