"""Property-based tests of `DPKerasConfig` and `make_private` with a config: invalid fields
are refused by name, the calibrated noise keeps the budget (oracles in `properties.py`).
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import assume, event, example, given
from hypothesis import strategies as st
from properties import (  # noqa: F401
    HUGE_INT,
    INT64_MAX,
    _as_float,
    _assert_clean_error,
    _build,
    _call,
    _delta_ok,
    _int_at_least,
    _is_bool,
    _model_argument_errors,
    _nonnegative_float,
    _positive_float,
    _real,
    _settings,
    anything,
    corrupt,
    positive_numpy,
    special_floats,
)

import torchdp_keras as tdk


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
