"""Property-based tests of the public constructors, configs, loaders and accountants.

Every invalid input must give a `DPError` (also a `ValueError`) whose message
names the argument, never an exception from deep inside torch, numpy or the
float machinery (`RuntimeError`, `ZeroDivisionError`, `OverflowError`), never a
hang; every valid input must be stored as its normalised value; accountants
return epsilons that are never NaN and are monotone; a DP training step never
leaves non-finite weights.

Each property has an oracle written independently of the package's checks:
`_positive_float(value)` etc. say what the documented contract accepts.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from fractions import Fraction

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st
from keras import layers

import torchdp_keras as tdk
from torchdp_keras.accounting import (
    PRVAccountant,
    RDPAccountant,
    calibrate_noise_multiplier,
    compute_dp_sgd_privacy,
    compute_dp_sgd_privacy_statement,
    get_privacy_budget,
)
from torchdp_keras.data import PoissonSampler, PrivateDataLoader, padded_size
from torchdp_keras.data.loader import POISSON_BATCH_KEY
from torchdp_keras.errors import DPError

INT64_MAX = 2**63 - 1
HUGE_INT = 10**400  # a Python int beyond float range: float(HUGE_INT) raises OverflowError
PRV_EPS_ERROR = 0.01  # PRVAccountant's default eps_error


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


@pytest.mark.parametrize("kind", MODEL_KINDS)
@_settings(max_examples=60)
@given(dp=dp_arguments)
@example(dp={**VALID_DP, "l2_norm_clip": HUGE_INT})  # float() overflow, was an OverflowError
@example(dp={**VALID_DP, "noise_multiplier": HUGE_INT})
@example(dp={**VALID_DP, "l2_norm_clip": Fraction(1, HUGE_INT)})  # float() is 0.0
@example(dp={**VALID_DP, "secure_mode": True, "seed": 0})
@example(dp={**VALID_DP, "seed": HUGE_INT, "num_microbatches": HUGE_INT})  # valid
def test_dp_model_constructors_accept_valid_and_refuse_invalid_arguments(kind, dp):
    assume(not _arrays_in(dp))
    bad = _model_argument_errors(kind, dp)
    event("invalid" if bad else "valid")
    model, error = _call(_build, kind, **dp)
    if bad:
        assert error is not None, f"accepted invalid {sorted(bad)}: {dp!r}"
        _assert_clean_error(error, bad)
        return
    assert error is None, f"refused valid arguments {dp!r}: {error!r}"
    if kind == "Model" and dp["l2_norm_clip"] is None:
        assert model.l2_norm_clip is None and model.noise_multiplier is None
    else:
        assert type(model.l2_norm_clip) is float
        assert model.l2_norm_clip == float(dp["l2_norm_clip"]) > 0
        assert type(model.noise_multiplier) is float
        assert model.noise_multiplier == float(dp["noise_multiplier"]) >= 0
        mb = dp["num_microbatches"]
        assert model.num_microbatches == (None if mb is None else int(mb))
    assert model.clipping_mode == dp["clipping_mode"]
    assert model.secure_mode is dp["secure_mode"]
    seed = dp["seed"]
    assert model.dp_settings.seed == (None if seed is None else int(seed))


@pytest.mark.parametrize("kind", ("DPSequential", "make_private"))
@pytest.mark.parametrize(
    "clipping_mode", [np.array(["auto"]), np.array(["auto", "fast"])], ids=["1-elem", "2-elem"]
)
def test_clipping_mode_array_is_refused(kind, clipping_mode):
    _, error = _call(
        _build, kind, l2_norm_clip=1.0, noise_multiplier=1.0, clipping_mode=clipping_mode
    )
    assert error is not None
    _assert_clean_error(error, {"clipping_mode"})


# -- DPKerasConfig ------------------------------------------------------------------------------
def _config_fields(noise_multiplier):
    return corrupt(
        {
            "epsilon": st.floats(1e-3, 1e3) | st.just(math.inf) | st.integers(1, 10),
            "delta": st.floats(1e-12, 0.5) | st.fractions(Fraction(1, 10**9), Fraction(1, 2)),
            "clipping_norm": st.floats(1e-30, 1e30) | positive_numpy,
            "batch_size": st.integers(1, 64),
            "gradient_accumulation_steps": st.integers(1, 4),
            "train_steps": st.integers(1, 10**6),
            "train_size": st.integers(256, 1000) | st.integers(256, 2**70),
            "poisson_sampling_in_fit": st.booleans(),
            "noise_multiplier": noise_multiplier,
            "rescale_to_unit_norm": st.booleans(),
            "microbatch_size": st.none() | st.integers(1, 64) | st.integers(1, 2**40),
            "seed": st.none() | st.integers(0, INT64_MAX) | st.integers(0, INT64_MAX).map(np.int64),
            "secure_mode": st.booleans(),
        }
    )


def _config_errors(f) -> set[str]:
    bad = set()
    eps = f["epsilon"]
    if not (_real(eps) and not math.isnan(_as_float(eps)) and eps > 0):
        bad.add("epsilon")
    if not _delta_ok(f["delta"]):
        bad.add("delta")
    if _positive_float(f["clipping_norm"]) is None:
        bad.add("clipping_norm")
    ints = ("batch_size", "gradient_accumulation_steps", "train_steps", "train_size")
    for name in ints:
        if not _int_at_least(f[name], 1):
            bad.add(name)
    if not bad.intersection(ints) and (
        f["batch_size"] * f["gradient_accumulation_steps"] > f["train_size"]
    ):
        bad.update({"batch_size", "train_size"})
    for name in ("poisson_sampling_in_fit", "rescale_to_unit_norm", "secure_mode"):
        if not _is_bool(f[name]):
            bad.add(name)
    mb = f["microbatch_size"]
    if mb is not None and not _int_at_least(mb, 1):
        bad.add("microbatch_size")
    elif mb is not None and _int_at_least(f["batch_size"], 1) and mb > f["batch_size"]:
        bad.add("microbatch_size")  # JAX Privacy: a microbatch is a slice of one batch
    seed = f["seed"]
    if seed is not None and not _int_at_least(seed, 0, INT64_MAX):
        bad.add("seed")
    if f["secure_mode"] is True and seed is not None:
        bad.update({"secure_mode", "seed"})
    sigma = f["noise_multiplier"]
    if sigma is not None and _nonnegative_float(sigma) is None:
        bad.add("noise_multiplier")
    return bad


def _check_valid_config(config, f):
    assert config.l2_norm_clip == float(f["clipping_norm"]) > 0
    assert config.effective_batch_size == f["batch_size"] * f["gradient_accumulation_steps"]
    assert 0 <= config.sampling_probability <= 1
    assert tdk.DPKerasConfig.from_dict(config.to_dict()) == config


VALID_CONFIG = dict(
    epsilon=3.0,
    delta=1e-5,
    clipping_norm=1.0,
    batch_size=10,
    gradient_accumulation_steps=1,
    train_steps=100,
    train_size=1000,
    poisson_sampling_in_fit=False,
    noise_multiplier=None,
    rescale_to_unit_norm=True,
    microbatch_size=None,
    seed=None,
    secure_mode=False,
)

invalid_sigma = st.one_of(
    special_floats.filter(lambda v: not (math.isfinite(v) and v >= 0)),
    st.floats(max_value=-1e-300),
    st.sampled_from(["1.0", True, HUGE_INT, -1, np.float32("nan"), [1.0]]),
)


@_settings(max_examples=150)
@given(f=_config_fields(noise_multiplier=st.one_of(st.none(), st.none(), st.none(), invalid_sigma)))
@example(f={**VALID_CONFIG, "epsilon": HUGE_INT})  # valid (an infinite budget as a float)
@example(f={**VALID_CONFIG, "epsilon": -HUGE_INT})
@example(f={**VALID_CONFIG, "clipping_norm": HUGE_INT})
@example(f={**VALID_CONFIG, "noise_multiplier": HUGE_INT})
@example(f={**VALID_CONFIG, "delta": Fraction(1, HUGE_INT)})  # float() is 0.0
@example(f={**VALID_CONFIG, "seed": INT64_MAX + 1})
@example(f={**VALID_CONFIG, "train_size": HUGE_INT, "train_steps": HUGE_INT})  # valid
def test_dp_keras_config_refuses_invalid_fields(f):
    # noise_multiplier is None or invalid here, so no accountant runs (see the next test).
    assert set(f) == {field.name for field in dataclasses.fields(tdk.DPKerasConfig)}
    bad = _config_errors(f)
    event("invalid" if bad else "valid")
    config, error = _call(tdk.DPKerasConfig, **f)
    if bad:
        assert error is not None, f"accepted invalid {sorted(bad)}: {f!r}"
        _assert_clean_error(error, bad)
    else:
        assert error is None, f"refused a valid config {f!r}: {error!r}"
        _check_valid_config(config, f)


@_settings(max_examples=8)
@given(
    epsilon=st.floats(0.05, 30) | st.just(math.inf),
    delta=st.floats(1e-9, 1e-3),
    sigma=st.floats(0.5, 20) | st.just(0.0),
    batch_size=st.integers(1, 50),
    train_size=st.integers(50, 5000),
    train_steps=st.integers(1, 100),
)
def test_dp_keras_config_with_noise_multiplier_checks_the_budget(
    epsilon, delta, sigma, batch_size, train_size, train_steps
):
    fields = dict(
        epsilon=epsilon,
        delta=delta,
        clipping_norm=1.0,
        batch_size=batch_size,
        gradient_accumulation_steps=1,
        train_steps=train_steps,
        train_size=train_size,
        noise_multiplier=sigma,
    )
    config, error = _call(tdk.DPKerasConfig, **fields)
    probe = tdk.DPKerasConfig(**{**fields, "noise_multiplier": None})
    spent = probe.planned_epsilon(sigma)
    assert not math.isnan(spent) and spent >= 0
    if spent <= epsilon:
        assert error is None, error
        assert config.noise_multiplier == sigma
        _check_valid_config(config, fields)
    else:
        _assert_clean_error(error, {"noise_multiplier"})


@_settings(max_examples=40)
@given(
    kind=st.sampled_from(["make_private", "PrivateKerasModel"]),
    extra=st.fixed_dictionaries(
        {},
        optional={
            "l2_norm_clip": anything,
            "noise_multiplier": anything,
            "num_microbatches": anything,
            "seed": anything,
            "secure_mode": st.just(True) | st.booleans(),
        },
    ),
    config=st.sampled_from(["config", None, "junk", 3.0]),
)
def test_make_private_config_and_explicit_settings_do_not_mix(kind, extra, config):
    real = tdk.DPKerasConfig(
        epsilon=8.0, delta=1e-5, clipping_norm=1.0, batch_size=10,
        gradient_accumulation_steps=1, train_steps=5, train_size=100,
        noise_multiplier=2.0,  # explicit: no calibration (cheap)
    )  # fmt: skip
    given_config = real if config == "config" else config
    extra = {k: v for k, v in extra.items() if not (k == "secure_mode" and v is False)}
    assume(not isinstance(extra.get("l2_norm_clip"), np.ndarray))
    model, error = _call(_build, kind, config=given_config, **extra)
    clashing = {k for k, v in extra.items() if v is not None}
    if config == "config":
        if clashing:
            _assert_clean_error(error, clashing)
        else:
            assert error is None, error
            assert model.l2_norm_clip == 1.0 and model.noise_multiplier == 2.0
    elif config is None:
        dp = {
            "l2_norm_clip": None, "noise_multiplier": None, "num_microbatches": None,
            "seed": None, "secure_mode": False, "clipping_mode": "auto", "use_xla": False,
            **extra,
        }  # fmt: skip
        bad = _model_argument_errors("make_private", dp)
        if bad:
            _assert_clean_error(error, bad)
        else:
            assert error is None, error
    else:
        _assert_clean_error(error, {"config"} | clashing)


@pytest.mark.parametrize("secure_mode", [0, "", None])
def test_make_private_with_config_refuses_non_bool_secure_mode(secure_mode):
    config = tdk.DPKerasConfig(
        epsilon=8.0, delta=1e-5, clipping_norm=1.0, batch_size=10,
        gradient_accumulation_steps=1, train_steps=5, train_size=100, noise_multiplier=2.0,
    )  # fmt: skip
    _, error = _call(_build, "make_private", config=config, secure_mode=secure_mode)
    assert error is not None
    _assert_clean_error(error, {"secure_mode"})


# -- PoissonSampler and PrivateDataLoader ------------------------------------------------------
def _sampler_errors(n, expected, seed, secure_mode) -> set[str]:
    bad = set()
    if not _int_at_least(n, 1):
        bad.add("num_examples")
    if not _int_at_least(expected, 1):
        bad.add("expected_batch_size")
    if not bad and expected > n:
        bad.update({"expected_batch_size", "num_examples"})
    if seed is not None and not _int_at_least(seed, 0):
        bad.add("seed")
    if not _is_bool(secure_mode):
        bad.add("secure_mode")
    elif secure_mode and seed is not None:
        bad.update({"secure_mode", "seed"})
    return bad


@_settings(max_examples=150)
@given(
    n=maybe(st.integers(64, 2**70) | st.integers(1, 64), weight=5),
    expected=maybe(st.integers(1, 64), weight=5),
    seed=maybe(st.none() | st.integers(0, HUGE_INT), weight=5),
    secure_mode=maybe(st.just(False), junk=anything | st.just(True), weight=5),
)
def test_poisson_sampler_refuses_invalid_arguments(n, expected, seed, secure_mode):
    bad = _sampler_errors(n, expected, seed, secure_mode)
    event("invalid" if bad else "valid")
    sampler, error = _call(PoissonSampler, n, expected, seed=seed, secure_mode=secure_mode)
    if bad:
        assert error is not None, f"accepted invalid {sorted(bad)}"
        _assert_clean_error(error, bad)
    else:
        assert error is None, error
        assert sampler.num_examples == n and sampler.expected_batch_size == expected
        assert sampler.sampling_probability == expected / n
        assert 0 < sampler.sampling_probability <= 1


def _check_draw(indices, n):
    assert indices.ndim == 1 and np.issubdtype(indices.dtype, np.integer)
    assert len(np.unique(indices)) == len(indices), "repeated indices"
    assert np.all(np.diff(indices) > 0), "not sorted"
    assert len(indices) == 0 or (indices[0] >= 0 and indices[-1] < n), "out of range"


@_settings(max_examples=40)
@given(
    n=st.integers(1, 3000),
    data=st.data(),
    seed=st.integers(0, 2**64) | st.just(HUGE_INT),
    epoch=st.integers(0, 5),
    step=st.integers(0, 10**6),
)
def test_poisson_draws_are_unique_in_range_and_reproducible(n, data, seed, epoch, step):
    expected = data.draw(st.integers(1, n), label="expected")
    sampler = PoissonSampler(n, expected, seed=seed)
    draw = sampler.sample(epoch, step)
    _check_draw(draw, n)
    again = PoissonSampler(n, expected, seed=seed).sample(epoch, step)
    np.testing.assert_array_equal(draw, again)
    if expected == n:
        np.testing.assert_array_equal(draw, np.arange(n))  # q == 1 takes everything
    secure = PoissonSampler(n, expected, secure_mode=True).sample(epoch, step)
    _check_draw(secure, n)


def _loader_errors(rows, label_rows, batch_size, accumulation, steps, seed, secure_mode):
    bad = set()
    if label_rows is not None and label_rows != rows:
        bad.add("label_df")
    if not _int_at_least(batch_size, 1):
        bad.add("batch_size")
    if not _int_at_least(accumulation, 1):
        bad.add("gradient_accumulation_steps")
    if rows == 0 and "label_df" not in bad:
        bad.update({"num_examples", "feature_df"})
    if not bad and batch_size * accumulation > rows:
        bad.add("batch_size")  # "expected_batch_size <= num_examples"
    if steps is not None and not _int_at_least(steps, 1):
        bad.add("steps_per_epoch")
    bad |= _sampler_errors(max(rows, 1), 1, seed, secure_mode) - {"num_examples"}
    return bad


@_settings(max_examples=80)
@given(
    rows=st.integers(36, 120) | st.integers(0, 35),
    label_rows=st.sampled_from([None, None, "same", "other"]),
    batch_size=maybe(st.integers(1, 12), weight=6),
    accumulation=maybe(st.integers(1, 3), weight=6),
    steps=maybe(st.none() | st.integers(1, 4), weight=6),
    seed=maybe(st.none() | st.integers(0, 2**64), weight=6),
    secure_mode=maybe(st.just(False), weight=6),
)
def test_private_data_loader_batches(
    rows, label_rows, batch_size, accumulation, steps, seed, secure_mode
):
    label_rows = {"same": rows, "other": rows + 1}.get(label_rows)
    x = np.arange(rows, dtype="float32").reshape(rows, 1)
    y = None if label_rows is None else np.arange(label_rows)
    bad = _loader_errors(rows, label_rows, batch_size, accumulation, steps, seed, secure_mode)
    event("invalid" if bad else "valid")

    def make():
        return PrivateDataLoader(
            x, y, batch_size, seed=seed, gradient_accumulation_steps=accumulation,
            steps_per_epoch=steps, secure_mode=secure_mode,
        )  # fmt: skip

    loader, error = _call(make)
    if bad:
        assert error is not None, f"accepted invalid {sorted(bad)}"
        _assert_clean_error(error, bad)
        return
    assert error is None, error
    assert loader.sampling_probability == batch_size * accumulation / rows
    assert len(loader) == loader.updates_per_epoch * accumulation
    twin = make() if seed is not None else None
    for update in range(min(loader.updates_per_epoch, 3)):
        seen = []
        for part in range(accumulation):
            batch = loader[update * accumulation + part][POISSON_BATCH_KEY]
            mask = batch["mask"]
            real = mask == 1
            assert set(np.unique(mask)) <= {0.0, 1.0}
            assert np.all(real[: real.sum()]), "padding is not at the end"
            assert len(mask) == padded_size(int(real.sum()), batch_size, rows)
            indices = batch["x"][real, 0].astype(int)
            seen.append(indices)
            np.testing.assert_array_equal(batch["x"][~real, 0], 0.0)  # padding repeats row 0
            if y is not None:
                np.testing.assert_array_equal(batch["y"][real], indices)
            if twin is not None:
                other = twin[update * accumulation + part][POISSON_BATCH_KEY]
                for key in batch:
                    np.testing.assert_array_equal(batch[key], other[key])
        _check_draw(np.concatenate(seen), rows)  # the update's draw, split in order


# -- accountants -------------------------------------------------------------------------------
def _accountant(kind):
    return PRVAccountant() if kind == "prv" else RDPAccountant()


def _epsilon(kind, sigma, q, steps, delta):
    acc = _accountant(kind)
    acc.compose(sigma, q, steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # PRV's documented RDP fallback
        return acc.get_epsilon(delta)


def _event_errors(sigma, q, steps) -> set[str]:
    bad = set()
    if _nonnegative_float(sigma) is None:
        bad.add("noise_multiplier")
    if not _probability(q):
        bad.add("sampling_probability")
    if not _int_at_least(steps, 0):
        bad.add("steps")
    return bad


# Steps that keep the PRV cheap, plus counts so large that it falls back to RDP at once.
cheap_steps = st.integers(0, 60) | st.sampled_from([10**18, 10**300, HUGE_INT])
valid_sigma = st.floats(0, 1e300) | special_floats.filter(lambda v: v >= 0 and v < math.inf)
valid_q = st.floats(0, 1) | st.sampled_from([0.0, 5e-324, 1e-300, 0.3, 1.0, Fraction(1, 3)])


@pytest.mark.parametrize("kind", ["rdp", "prv"])
@_settings(max_examples=30)
@given(
    sigma=maybe(valid_sigma, weight=6),
    q=maybe(valid_q, weight=6),
    steps=maybe(cheap_steps, weight=6),
    delta=maybe(st.floats(1e-12, 0.5) | st.sampled_from([5e-324, 1e-300, 0.999]), weight=6),
)
# Each was a crash or a hang before (ZeroDivisionError, OverflowError, an endless series).
@example(sigma=1e-300, q=0.5, steps=10, delta=1e-5)  # sigma^2 underflows
@example(sigma=1e-160, q=0.3, steps=10, delta=1e-5)  # the RDP series terms overflow
@example(sigma=1e300, q=0.5, steps=10, delta=1e-5)  # sigma^2 overflows: z0 was NaN
@example(sigma=1e-20, q=5e-324, steps=10, delta=1e-5)  # 1/q overflows
@example(sigma=1.0, q=0.01, steps=HUGE_INT, delta=1e-5)  # steps beyond float range
@example(sigma=HUGE_INT, q=0.01, steps=1, delta=1e-5)
@example(sigma=1.0, q=0.01, steps=1, delta=HUGE_INT)
@example(sigma=1.0, q=0.01, steps=1, delta=Fraction(1, HUGE_INT))
def test_accountant_epsilon_is_never_nan_and_errors_are_clean(kind, sigma, q, steps, delta):
    # Large sigma with q = 1/2 makes the RDP series converge very slowly (seconds, not a bug).
    # (Above 1.3e154, sigma^2 overflows and the full-batch value 0 is used: fast again.)
    assume(not (_real(sigma) and 100 < _as_float(sigma) < 1e154 and _real(q) and 0.4 < q < 0.6))
    if kind == "prv":  # keep the PRV cheap: small sigmas need many more points
        assume(not (_real(sigma) and 1e-3 < _as_float(sigma) < 0.3 and _integral(steps)))
    acc = _accountant(kind)
    bad = _event_errors(sigma, q, steps)
    event("invalid" if bad or not _delta_ok(delta) else "valid")
    _, error = _call(acc.compose, sigma, q, steps)
    if bad:
        assert error is not None, f"accepted invalid {sorted(bad)}"
        _assert_clean_error(error, bad)
        return
    assert error is None, error
    assert acc.steps == steps
    eps, error = _call(acc.get_epsilon, delta)
    if not _delta_ok(delta):
        _assert_clean_error(error, {"delta"})
        return
    assert error is None, error
    assert isinstance(eps, float) and not math.isnan(eps) and eps >= 0
    spends = _as_float(q) > 0 and steps > 0
    if not spends:
        assert eps == 0.0
    elif sigma == 0:
        assert eps == math.inf  # documented: no noise, no privacy
    elif sigma >= 1e-3 and steps <= 10**6:
        assert math.isfinite(eps)


@pytest.mark.parametrize("kind", ["rdp", "prv"])
@_settings(max_examples=6)
@given(
    sigmas=st.lists(st.floats(0.6, 6), min_size=2, max_size=2),
    q=st.floats(1e-3, 0.2),
    steps=st.lists(st.integers(1, 120), min_size=2, max_size=2),
    delta=st.floats(1e-8, 1e-4),
)
def test_epsilon_is_monotone_in_steps_and_noise(kind, sigmas, q, steps, delta):
    low_sigma, high_sigma = sorted(sigmas)
    few, many = sorted(steps)
    # PRV returns an upper bound at most ~2 * eps_error above the true epsilon (documented:
    # "a little more" when float64 noise is accounted), so monotonicity holds up to that.
    tol = 3 * PRV_EPS_ERROR if kind == "prv" else 1e-9
    eps = {
        (s, n): _epsilon(kind, s, q, n, delta) for s in (low_sigma, high_sigma) for n in (few, many)
    }
    for (s, n), value in eps.items():
        assert math.isfinite(value) and value >= 0, (s, n, value)
    for s in (low_sigma, high_sigma):
        assert eps[(s, few)] <= eps[(s, many)] * (1 + 1e-12) + tol, (s, eps)
    for n in (few, many):
        assert eps[(high_sigma, n)] <= eps[(low_sigma, n)] * (1 + 1e-12) + tol, (n, eps)


@_settings(max_examples=6)
@given(sigma=st.floats(0.6, 6), q=st.floats(1e-3, 0.2), steps=st.integers(1, 120))
def test_prv_bounds_bracket_the_estimate_and_respect_rdp(sigma, q, steps):
    acc = PRVAccountant()
    acc.compose(sigma, q, steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lower, estimate, upper = acc.get_epsilon_bounds(1e-6)
    assert 0 <= lower <= estimate <= upper
    assert upper - lower <= 4 * PRV_EPS_ERROR + 1e-9  # documented: about 2 * eps_error
    # Both are upper bounds on the same epsilon, RDP the looser one (up to PRV's error).
    assert upper <= _epsilon("rdp", sigma, q, steps, 1e-6) + 2 * PRV_EPS_ERROR


@_settings(max_examples=40)
@given(
    eps_error=maybe(st.floats(1e-3, 1.0)),
    delta_error=maybe(st.none() | st.floats(1e-12, 0.999)),
    orders=maybe(st.none() | st.lists(st.floats(1.01, 512), min_size=1, max_size=4)),
    conversion=maybe(st.sampled_from(["improved", "classic"])),
)
@example(eps_error=HUGE_INT, delta_error=HUGE_INT, orders=[HUGE_INT], conversion="classic")
@example(eps_error=0.01, delta_error=None, orders=5, conversion="improved")
@example(eps_error=0.01, delta_error=None, orders=["a"], conversion="improved")
def test_accountant_constructors(eps_error, delta_error, orders, conversion):
    prv, error = _call(PRVAccountant, eps_error=eps_error, delta_error=delta_error)
    bad = set()
    if _positive_float(eps_error) is None:
        bad.add("eps_error")
    if delta_error is not None and not _delta_ok(delta_error):
        bad.add("delta_error")
    if bad:
        _assert_clean_error(error, bad)
    else:
        assert error is None, error
        assert prv.eps_error == float(eps_error)
    rdp, error = _call(RDPAccountant, orders=orders, conversion=conversion)
    bad = set()
    if conversion not in ("improved", "classic") or not isinstance(conversion, str):
        bad.add("conversion")
    valid_orders = orders is None or (
        isinstance(orders, list) and all(_real(a) and 1 < _as_float(a) < math.inf for a in orders)
    )
    if not valid_orders:
        bad.add("orders")
    if bad:
        if error is None:  # a str/ndarray of numbers is iterable: orders may then be valid
            assert bad == {"orders"} and all(o > 1 for o in rdp.orders)
        else:
            _assert_clean_error(error, bad)
    else:
        assert error is None, error
        assert rdp.conversion == conversion


@pytest.mark.parametrize("kind", ["rdp", "prv"])
@_settings(max_examples=40)
@given(
    history=st.one_of(
        st.lists(
            st.tuples(maybe(st.floats(0.5, 5)), maybe(st.floats(0, 1)), maybe(st.integers(0, 9))),
            max_size=3,
        ).map(lambda events: [list(e) for e in events]),
        anything,
        st.lists(anything, max_size=3),
    ),
    version=maybe(st.just(1)),
    other_kind=st.booleans(),
)
@example(history=None, version=1, other_kind=False)
@example(history=[[1.0, 0.1]], version=1, other_kind=False)
@example(history=[[HUGE_INT, 0.1, 1]], version=1, other_kind=False)
def test_load_state_dict_refuses_malformed_states(kind, history, version, other_kind):
    acc = _accountant(kind)
    name = ("prv" if kind == "rdp" else "rdp") if other_kind else kind
    state = {"accountant": name, "version": version, "history": history}
    _, error = _call(acc.load_state_dict, state)
    events_ok = isinstance(history, list) and all(
        isinstance(e, (list, tuple)) and len(e) == 3 and not _event_errors(*e) for e in history
    )
    if other_kind or version != 1 or not events_ok:
        assert error is not None
        names = {"accountant", "version", "history", "state"}
        names |= {"noise_multiplier", "sampling_probability", "steps"}
        _assert_clean_error(error, names)
    else:
        assert error is None, error
        assert acc.history == [(float(s), float(q), int(n)) for s, q, n in history]
        eps = acc.get_epsilon(1e-5) if kind == "rdp" else None
        assert eps is None or (not math.isnan(eps) and eps >= 0)


@_settings(max_examples=12)
@given(
    target_epsilon=maybe(st.floats(0.2, 50) | st.just(math.inf)),
    target_delta=maybe(st.floats(1e-10, 1e-3)),
    q=maybe(st.floats(1e-4, 1) | st.just(0.0)),
    steps=maybe(st.integers(0, 1000)),
    accountant=maybe(st.just("rdp")),
    tolerance=maybe(st.floats(0.005, 0.1)),
)
@example(
    target_epsilon=HUGE_INT, target_delta=1e-5, q=0.01, steps=10, accountant="rdp", tolerance=0.01
)
@example(
    target_epsilon=1.0, target_delta=HUGE_INT, q=0.01, steps=10, accountant="rdp", tolerance=0.01
)
@example(
    target_epsilon=1.0, target_delta=1e-5, q=0.01, steps=10, accountant="rdp", tolerance=HUGE_INT
)
def test_calibrate_noise_multiplier(target_epsilon, target_delta, q, steps, accountant, tolerance):
    sigma, error = _call(
        calibrate_noise_multiplier, target_epsilon, target_delta, q, steps, accountant,
        tolerance=tolerance,
    )  # fmt: skip
    bad = set()
    if not (
        _real(target_epsilon) and not math.isnan(_as_float(target_epsilon)) and target_epsilon > 0
    ):
        bad.add("target_epsilon")
    if not _delta_ok(target_delta):
        bad.add("delta")
    bad |= _event_errors(1.0, q, steps)
    if _positive_float(tolerance) is None:
        bad.add("tolerance")
    if not (isinstance(accountant, str) and accountant in ("prv", "rdp")):
        bad.add("accountant")
    if bad:
        _assert_clean_error(error, bad)
        return
    if error is not None:  # no sigma up to 1e6 reaches a tiny budget: a clean refusal
        _assert_clean_error(error, {"target_epsilon"})
        return
    assert isinstance(sigma, float) and math.isfinite(sigma) and sigma >= 0
    if math.isinf(_as_float(target_epsilon)) or q == 0 or steps == 0:
        assert sigma == 0.0
        return
    assert _epsilon("rdp", sigma, q, steps, target_delta) <= target_epsilon
    if sigma > 1e-5:  # the smallest within the tolerance
        smaller = sigma / (1 + tolerance) ** 1.01
        assert _epsilon("rdp", smaller, q, steps, target_delta) > target_epsilon


def _run_errors(n, batch_size, epochs, names) -> set[str]:
    n_name, batch_name, epochs_name = names
    bad = set()
    if not _int_at_least(n, 1):
        bad.add(n_name)
    if not _int_at_least(batch_size, 1):
        bad.add(batch_name)
    if _positive_float(epochs) is None:
        bad.add(epochs_name)
    if not bad and batch_size > n:
        bad.update({batch_name, n_name})
    if not bad:
        finite = False
        for steps in (lambda: epochs * n / batch_size, lambda: epochs * (n / batch_size)):
            try:
                finite = finite or math.isfinite(steps())
            except OverflowError:
                pass
        if not finite:
            bad.update({n_name, epochs_name})
    return bad


@_settings(max_examples=60)
@given(
    n=maybe(st.integers(1, 10**9) | st.just(HUGE_INT)),
    batch_size=maybe(st.integers(1, 1000)),
    epochs=maybe(st.floats(1e-3, 100) | st.just(1e308)),
    sigma=maybe(st.floats(0.6, 1e3) | st.just(0.0)),
    delta=maybe(st.floats(1e-12, 0.5)),
)
@example(n=HUGE_INT, batch_size=10, epochs=1.0, sigma=1.0, delta=1e-5)  # was OverflowError
@example(n=1000, batch_size=10, epochs=1e308, sigma=1.0, delta=1e-5)
@example(n=HUGE_INT, batch_size=10**399, epochs=1e-3, sigma=1.0, delta=1e-5)  # valid: 10 steps
@example(n=1000, batch_size=10, epochs=HUGE_INT, sigma=1.0, delta=1e-5)
@example(n=1000, batch_size=10, epochs=1.0, sigma=1e-300, delta=1e-5)  # eps inf, not a crash
@example(n=0, batch_size=10, epochs=1.0, sigma=1.0, delta=1e-5)  # names sample_size
def test_compute_dp_sgd_privacy_and_get_privacy_budget(n, batch_size, epochs, sigma, delta):
    bad = _run_errors(n, batch_size, epochs, ("n", "batch_size", "epochs"))
    if not bad and _nonnegative_float(sigma) is None:
        bad.add("noise_multiplier")
    if not bad and not _delta_ok(delta):
        bad.add("delta")
    result, error = _call(compute_dp_sgd_privacy, n, batch_size, sigma, epochs, delta)
    if bad:
        _assert_clean_error(error, bad)
    else:
        assert error is None, error
        eps, order = result
        assert not math.isnan(eps) and eps >= 0 and order > 1
    budget_bad = _run_errors(n, batch_size, epochs, ("sample_size", "batch_size", "num_epochs"))
    if not budget_bad and _nonnegative_float(sigma) is None:
        budget_bad.add("noise_multiplier")
    if not budget_bad and not _delta_ok(delta):
        budget_bad.add("delta")
    eps, error = _call(get_privacy_budget, n, batch_size, epochs, sigma, delta, accountant="rdp")
    if budget_bad:
        _assert_clean_error(error, budget_bad)
    else:
        assert error is None, error
        assert not math.isnan(eps) and eps >= 0


@_settings(max_examples=25)
@given(
    n=maybe(st.integers(50, 2000)),
    batch_size=maybe(st.integers(10, 50)),
    epochs=maybe(st.floats(0.01, 1)),
    sigma=maybe(st.floats(0.8, 10)),
    delta=maybe(st.floats(1e-9, 1e-4)),
    used_microbatching=maybe(st.booleans()),
    max_examples_per_user=maybe(st.none() | st.integers(1, 10) | st.just(HUGE_INT)),
)
@example(
    n=100, batch_size=10, epochs=1.0, sigma="1.5", delta=1e-5,  # was silently float("1.5")
    used_microbatching=True, max_examples_per_user=None,
)  # fmt: skip
@example(
    n=100, batch_size=10, epochs=1.0, sigma=None, delta=1e-5,  # was float(None)'s TypeError
    used_microbatching=True, max_examples_per_user=None,
)  # fmt: skip
@example(
    n=100, batch_size=10, epochs=1.0, sigma=1.0, delta=1e-5,
    used_microbatching="no", max_examples_per_user=None,  # was truthy: sigma halved
)  # fmt: skip
@example(
    n=100, batch_size=10, epochs=1.0, sigma=1.0, delta=1e-5,
    used_microbatching=False, max_examples_per_user=0,  # was silently "no bound"
)  # fmt: skip
@example(
    n=100, batch_size=10, epochs=1.0, sigma=1.0, delta=1e-5,
    used_microbatching=False, max_examples_per_user=HUGE_INT,  # was OverflowError
)  # fmt: skip
@example(
    n=0, batch_size=10, epochs=1.0, sigma=1.0, delta=1e-5,  # names number_of_examples
    used_microbatching=False, max_examples_per_user=None,
)  # fmt: skip
def test_privacy_statement(
    n, batch_size, epochs, sigma, delta, used_microbatching, max_examples_per_user
):
    names = ("number_of_examples", "batch_size", "num_epochs")
    bad = _run_errors(n, batch_size, epochs, names)
    if not bad:  # the accounting of a valid run is kept cheap
        assume(math.ceil(epochs * n / batch_size) <= 200)
    if not bad and not _delta_ok(delta):
        bad.add("delta")
    if not bad and _nonnegative_float(sigma) is None:
        bad.add("noise_multiplier")
    if not _is_bool(used_microbatching):
        bad.add("used_microbatching")
    k = max_examples_per_user
    if k is not None and not _int_at_least(k, 1):
        bad.add("max_examples_per_user")
    text, error = _call(
        compute_dp_sgd_privacy_statement, n, batch_size, epochs, sigma, delta,
        used_microbatching=used_microbatching, max_examples_per_user=k,
    )  # fmt: skip
    if bad:
        _assert_clean_error(error, bad)
        return
    assert error is None, error
    assert isinstance(text, str) and "nan" not in text.lower().replace("nanos", "")
    assert ("User-level DP" in text) == (k is not None)


# -- a DP training step never leaves non-finite weights ---------------------------------------
def _tiny_model(l2_norm_clip, noise_multiplier, clipping_mode, num_microbatches, lr):
    model = tdk.DPSequential(
        [keras.Input((8,)), layers.Dense(4, activation="tanh"), layers.Dense(3), layers.Dense(1)],
        l2_norm_clip=l2_norm_clip,
        noise_multiplier=noise_multiplier,
        num_microbatches=num_microbatches,
        clipping_mode=clipping_mode,
        seed=0,
    )
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    return model


def _all_weights_finite(model) -> bool:
    return all(np.all(np.isfinite(keras.ops.convert_to_numpy(w))) for w in model.weights)


@_settings(max_examples=10)
@given(
    l2_norm_clip=st.floats(1e-6, 1e6),
    noise_multiplier=st.floats(0, 1e3),
    batch=st.integers(1, 12),
    scale=st.sampled_from([1.0, 1e3, 1e10, 1e20, 1e30, 1e38]),
    poison=st.lists(
        st.tuples(
            st.integers(0, 11), st.integers(0, 8), st.sampled_from([np.nan, np.inf, -np.inf])
        ),
        max_size=3,
    ),
    clipping_mode=st.sampled_from(["auto", "vmap"]),
    per_microbatch=st.booleans(),
    lr=st.sampled_from([1e-3, 0.1]),
)
def test_one_dp_step_keeps_weights_finite(
    l2_norm_clip, noise_multiplier, batch, scale, poison, clipping_mode, per_microbatch, lr
):
    model = _tiny_model(
        l2_norm_clip, noise_multiplier, clipping_mode, 1 if per_microbatch else None, lr
    )
    rng = np.random.default_rng(batch)
    x = (rng.normal(size=(batch, 8)) * scale).astype("float32")
    y = rng.normal(size=(batch, 1)).astype("float32")
    for row, col, value in poison:
        if col == 8:
            y[row % batch, 0] = value
        else:
            x[row % batch, col] = value
    assert _all_weights_finite(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train_on_batch(x, y)
    assert _all_weights_finite(model), (l2_norm_clip, noise_multiplier, scale, poison)


@pytest.mark.parametrize("clip,sigma", [(1e30, 1e10), (1e20, 1e19), (3e19, 1.2e19)])
def test_noise_std_beyond_float32_is_refused(clip, sigma):
    # A finite std above float32's range would make the noise inf: refused up front.
    with pytest.raises(DPError, match="noise_multiplier \\* l2_norm_clip"):
        _tiny_model(clip, sigma, "auto", None, 1e-3)


@pytest.mark.parametrize("clip,sigma", [(1e18, 1e18), (1e30, 1e-6)])
def test_noise_std_at_the_limit_keeps_weights_finite(clip, sigma):
    model = _tiny_model(clip, sigma, "auto", None, 1e-3)
    x = np.ones((4, 8), dtype="float32")
    y = np.zeros((4, 1), dtype="float32")
    error = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model.train_on_batch(x, y)
        except DPError as caught:  # a clean refusal would also satisfy the property
            error = caught
    assert error is not None or _all_weights_finite(model)
