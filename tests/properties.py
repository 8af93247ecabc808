"""Strategies and oracles of the property-based tests (hypothesis), shared by subject.

Each property has an oracle written independently of the package's checks:
`_positive_float(value)` etc. say what the documented contract accepts. Every invalid
input must give a `DPError` (also a `ValueError`) whose message names the argument,
never an exception from deep inside torch, numpy or the float machinery, never a hang.
"""

from __future__ import annotations

import math
import numbers
import warnings
from fractions import Fraction

import keras
import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from keras import layers

import torchdp_keras as tdk
from torchdp_keras.errors import DPError

INT64_MAX = 2**63 - 1
HUGE_INT = 10**400  # a Python int beyond float range: float(HUGE_INT) raises OverflowError


def prv_error(epsilon: float) -> float:
    """PRVAccountant's default accuracy at `epsilon`: max(0.001, 1% of epsilon)."""
    return max(0.001, 0.01 * epsilon)


def _settings(max_examples: int):
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.filter_too_much,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,  # conftest's autouse seeding fixture
        ],
    )


# -- arbitrary values ------------------------------------------------------------------------
special_floats = st.sampled_from(
    [math.nan, math.inf, -math.inf, 0.0, -0.0, 5e-324, 1e-300, 1e-160, 1e308, -1.0, 1.0]
)
numpy_scalars = st.one_of(
    st.floats(width=32).map(np.float32),
    st.floats().map(np.float64),
    st.floats(width=16).map(np.float16),
    st.integers(-(2**63), INT64_MAX).map(np.int64),
    st.integers(0, 2**64 - 1).map(np.uint64),
    st.integers(-128, 127).map(np.int8),
    st.booleans().map(np.bool_),
    st.sampled_from(["auto", "1.0"]).map(np.str_),
)
anything = st.one_of(
    st.floats(),  # includes nan, +-inf, -0.0, subnormals and 1e308
    special_floats,
    st.integers(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([HUGE_INT, -HUGE_INT, INT64_MAX, INT64_MAX + 1, 2**64, 0, 1, -1]),
    st.booleans(),
    st.none(),
    st.text(max_size=4),
    st.sampled_from(["1", "1.0", "nan", "auto", "fast", "vmap", "AUTO", ""]),
    numpy_scalars,
    st.fractions(max_denominator=1000),
    st.sampled_from([Fraction(1, HUGE_INT), Fraction(HUGE_INT, 3), complex(1, 0), b"1"]),
    st.decimals(allow_nan=False, allow_infinity=False, places=2),
    st.sampled_from([[1.0], (2,), {"a": 1}, np.array([1.0]), np.array(2.0), object()]),
)


def maybe(valid, junk=anything, weight: int = 3):
    """Mostly valid values (`weight` to 1), sometimes junk."""
    # (st.one_of(valid, valid, junk) would not do: one_of drops repeated strategies.)
    return st.sampled_from([False] + [True] * weight).flatmap(lambda ok: valid if ok else junk)


@st.composite
def corrupt(draw, valid: dict, junk=anything, secure_mode_key="secure_mode"):
    """Valid values for every key, then junk in a few (often none) of them.

    Without junk, `secure_mode=True` comes only with `seed=None` (their one valid pairing).
    """
    values = {key: draw(strategy) for key, strategy in valid.items()}
    if values.get(secure_mode_key) is True:
        values["seed"] = None
    for key in draw(st.lists(st.sampled_from(sorted(valid)), max_size=3, unique=True)):
        values[key] = draw(junk)
    return values


positive_numpy = st.one_of(
    st.floats(1e-3, 1e3).map(np.float32),
    st.floats(1e-3, 1e3).map(np.float64),
    st.integers(1, 100).map(np.int64),
)


# -- oracles -----------------------------------------------------------------------------------
def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _integral(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _as_float(value) -> float:
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _positive_float(value):
    """The normalised float of a valid `l2_norm_clip`-like value (> 0, finite), else None."""
    if _real(value) and math.isfinite(_as_float(value)) and _as_float(value) > 0:
        return float(value)
    return None


def _nonnegative_float(value):
    """The normalised float of a valid `noise_multiplier` (>= 0, finite), else None."""
    if _real(value) and math.isfinite(_as_float(value)) and _as_float(value) >= 0:
        return float(value)
    return None


def _int_at_least(value, minimum: int, maximum: float = math.inf) -> bool:
    return _integral(value) and minimum <= value <= maximum


def _is_bool(value) -> bool:
    return isinstance(value, bool)


def _probability(value) -> bool:
    return _real(value) and 0 <= _as_float(value) <= 1 and 0 <= value <= 1


def _delta_ok(value) -> bool:
    return _real(value) and 0 < _as_float(value) < 1


def _assert_clean_error(error: BaseException, names) -> None:
    """`error` is a DPError/ValueError whose message names one of the invalid arguments."""
    assert isinstance(error, DPError), f"{type(error).__name__} is not a DPError: {error}"
    assert isinstance(error, (ValueError, TypeError)), type(error).__mro__
    message = str(error)
    assert message, "empty error message"
    assert any(name in message for name in names), (
        f"message does not name any of {sorted(names)}: {message}"
    )


def _call(fn, *args, **kwargs):
    """`(result, None)` or `(None, error)`; anything that is not an Exception propagates."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PRV's fallback warning, keras's input warnings
        try:
            return fn(*args, **kwargs), None
        except Exception as error:  # noqa: BLE001 - the property is about the type
            return None, error


# -- DP model constructors ---------------------------------------------------------------------
def _stack():
    return [keras.Input((4,)), layers.Dense(2)]


def _build(kind, **dp):
    if kind == "DPSequential":
        return tdk.DPSequential(_stack(), **dp)
    inputs = keras.Input((4,))
    outputs = layers.Dense(2)(inputs)
    if kind == "DPModel":
        return tdk.DPModel(inputs=inputs, outputs=outputs, **dp)
    if kind == "Model":
        return tdk.Model(inputs=inputs, outputs=outputs, **dp)
    base = keras.Model(inputs=inputs, outputs=outputs)
    if kind == "PrivateKerasModel":
        return tdk.PrivateKerasModel(base, **dp)
    dp.pop("use_xla", None)  # make_private has no use_xla
    return tdk.make_private(base, **dp)


VALID_DP = dict(
    l2_norm_clip=1.0,
    noise_multiplier=1.0,
    num_microbatches=None,
    seed=None,
    clipping_mode="auto",
    secure_mode=False,
    use_xla=False,
)
MODEL_KINDS = ("DPSequential", "DPModel", "Model", "PrivateKerasModel", "make_private")

dp_arguments = corrupt(
    {
        "l2_norm_clip": st.floats(1e-30, 1e30) | st.integers(1, 10**6) | positive_numpy,
        "noise_multiplier": st.floats(0, 1e30) | st.integers(0, 100) | positive_numpy,
        "num_microbatches": st.none() | st.integers(1, 2**70),
        "seed": st.none() | st.integers(0, 2**70) | st.integers(0, INT64_MAX).map(np.int64),
        "clipping_mode": st.sampled_from(["auto", "fast", "vmap", np.str_("vmap")]),
        "secure_mode": st.booleans(),
        "use_xla": st.just(False),  # True would try torch.compile at the first step
    }
)


def _model_argument_errors(kind, dp) -> set[str]:
    """Names of the arguments the DP model constructors must refuse."""
    bad = set()
    from_optimizer = (
        kind == "Model" and dp["l2_norm_clip"] is None and dp["noise_multiplier"] is None
    )
    if from_optimizer:
        if dp["num_microbatches"] is not None:
            bad.add("num_microbatches")
    else:
        if _positive_float(dp["l2_norm_clip"]) is None:
            bad.add("l2_norm_clip")
        if _nonnegative_float(dp["noise_multiplier"]) is None:
            bad.add("noise_multiplier")
        if (
            not bad
            and _positive_float(dp["l2_norm_clip"]) * _nonnegative_float(dp["noise_multiplier"])
            > 1e36
        ):  # the float32 noise would overflow
            bad.update({"l2_norm_clip", "noise_multiplier"})
        mb = dp["num_microbatches"]
        if mb is not None and not _int_at_least(mb, 1):
            bad.add("num_microbatches")
    if kind != "make_private" and not _is_bool(dp["use_xla"]):
        bad.add("use_xla")
    seed = dp["seed"]
    if seed is not None and not _int_at_least(seed, 0):
        bad.add("seed")
    if not (
        isinstance(dp["clipping_mode"], str) and dp["clipping_mode"] in ("auto", "fast", "vmap")
    ):
        bad.add("clipping_mode")
    if not _is_bool(dp["secure_mode"]):
        bad.add("secure_mode")
    elif dp["secure_mode"] and seed is not None:
        bad.update({"secure_mode", "seed"})
    return bad


def _arrays_in(dp) -> bool:
    return isinstance(dp["clipping_mode"], np.ndarray)
