"""Property-based tests of the accountants: epsilon is never NaN, errors are clean, epsilon is
monotone in steps and noise, PRV bounds bracket the estimate, calibration hits its target.
"""

from __future__ import annotations

import math
import warnings
from fractions import Fraction

import pytest
from hypothesis import assume, event, example, given
from hypothesis import strategies as st
from properties import (  # noqa: F401
    HUGE_INT,
    _as_float,
    _assert_clean_error,
    _call,
    _delta_ok,
    _int_at_least,
    _integral,
    _is_bool,
    _nonnegative_float,
    _positive_float,
    _probability,
    _real,
    _settings,
    anything,
    maybe,
    prv_error,
    special_floats,
)

from torchdp_keras.accounting import (
    PRVAccountant,
    RDPAccountant,
    calibrate_noise_multiplier,
    compute_dp_sgd_privacy,
    compute_dp_sgd_privacy_statement,
    get_privacy_budget,
)


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
    eps = {
        (s, n): _epsilon(kind, s, q, n, delta) for s in (low_sigma, high_sigma) for n in (few, many)
    }
    # PRV returns an upper bound at most about prv_error(epsilon) above the true epsilon, so
    # monotonicity holds up to that.
    tol = 1.1 * prv_error(max(eps.values())) if kind == "prv" else 1e-9
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
    # Documented: upper - lower <= prv_error(lower) (certified accuracy).
    assert upper - lower <= prv_error(lower) + 1e-9
    # Both are upper bounds on the same epsilon, RDP the looser one (up to PRV's error).
    rdp = _epsilon("rdp", sigma, q, steps, 1e-6)
    assert upper <= rdp + prv_error(rdp)


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
