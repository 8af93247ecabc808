"""Property-based tests of the DP model constructors: every invalid DP argument gives a
`DPError` naming it, every valid one is stored normalised (oracles in `properties.py`).
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import assume, event, example, given
from properties import (  # noqa: F401
    HUGE_INT,
    INT64_MAX,
    MODEL_KINDS,
    VALID_DP,
    _arrays_in,
    _assert_clean_error,
    _build,
    _call,
    _int_at_least,
    _is_bool,
    _model_argument_errors,
    _nonnegative_float,
    _positive_float,
    _settings,
    corrupt,
    dp_arguments,
    positive_numpy,
)


# -- DP model constructors ---------------------------------------------------------------------
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
