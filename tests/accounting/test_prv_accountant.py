"""PRV accountant: published values, PLD and closed forms, bounds, edge cases, fallback."""

import json
import math
import warnings

import numpy as np
import pytest
from scipy import optimize, special

from torchdp_keras.accounting import discretise
from torchdp_keras.accounting import prv as prv_module
from torchdp_keras.accounting.prv import PRVAccountant
from torchdp_keras.accounting.rdp import RDPAccountant
from torchdp_keras.errors import DPConfigError


def prv_bounds(events, delta, **kwargs):
    acc = PRVAccountant(**kwargs)
    for sigma, q, steps in events:
        acc.compose(sigma, q, steps)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to RDP in the normal regime
        return acc.get_epsilon_bounds(delta)


def pld_epsilon(events, delta):
    dp_accounting = pytest.importorskip("dp_accounting")
    from dp_accounting.pld import pld_privacy_accountant

    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    for sigma, q, steps in events:
        acc.compose(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
        )
    return acc.get_epsilon(delta)


def gaussian_epsilon(mu, delta):
    """Exact epsilon of the mu-GDP Gaussian mechanism (Balle and Wang 2018)."""

    def excess(eps):
        return (
            special.ndtr(-eps / mu + mu / 2)
            - math.exp(eps) * special.ndtr(-eps / mu - mu / 2)
            - delta
        )

    return optimize.brentq(excess, 0.0, 10 * mu + 10 * mu**2 + 50, xtol=1e-14)


# -- published values -------------------------------------------------------------------------
def test_opacus_published_value():
    # Opacus (prv accountant): sigma 1.5, q 0.04, 2250 steps, delta 1e-5 -> 6.7774;
    # dp_accounting's PLD gives 6.7688 there. Opacus's eps_error: 0.01 (fixed).
    acc = PRVAccountant(eps_error=0.01)
    acc.compose(noise_multiplier=1.5, sampling_probability=0.04, steps=2250)
    assert acc.get_epsilon(1e-5) == pytest.approx(6.7774, abs=0.02)
    lower, estimate, upper = acc.get_epsilon_bounds(1e-5)
    assert lower <= 6.7688 <= upper
    assert estimate == pytest.approx(6.7688, abs=0.01)
    assert upper == acc.get_epsilon(1e-5)


def test_prv_accountant_package_value_at_100k_steps():
    # prv_accountant 0.2.0 on this history (eps_error 0.01, delta_error 1e-9) reports
    # (18.8996, 18.9103, 18.9209) in ~30 s.
    lower, estimate, upper = prv_bounds([(0.8, 5e-3, 100_000)], 1e-6, eps_error=0.01)
    assert upper <= 18.9209 + 0.01
    assert estimate == pytest.approx(18.9103, abs=2e-3)
    assert lower <= estimate <= upper


def test_prv_accountant_package_heterogeneous():
    package = pytest.importorskip("prv_accountant")
    events = [(1.0, 0.02, 300), (2.0, 0.1, 100)]
    prvs = [package.PoissonSubsampledGaussianMechanism(q, sigma) for sigma, q, _ in events]
    steps = [n for _, _, n in events]
    reference = package.PRVAccountant(
        prvs=prvs, max_self_compositions=steps, eps_error=0.01, delta_error=1e-8
    ).compute_epsilon(delta=1e-5, num_self_compositions=steps)
    lower, estimate, upper = prv_bounds(events, 1e-5, eps_error=0.01)
    assert estimate == pytest.approx(reference[1], abs=2e-3)
    assert upper <= reference[2] + 1e-3


# -- against dp_accounting's PLD -----------------------------------------------------------------
@pytest.mark.parametrize(
    "q, sigma, steps, delta",
    [
        (0.01, 1.0, 1000, 1e-5),
        (0.1, 0.8, 100, 1e-5),
        (0.001, 1.0, 10000, 1e-6),
        (0.5, 2.0, 50, 1e-3),
        (1.0, 1.0, 10, 1e-5),
        (0.2, 5.0, 1000, 1e-7),
        (0.05, 1.2, 1, 1e-5),
        (0.01, 1.0, 1000, 1e-10),
        (1e-4, 0.8, 10, 1e-9),  # a spike and a thin tail: hard for the FFT
    ],
)
def test_agrees_with_pld(q, sigma, steps, delta):
    expected = pld_epsilon([(sigma, q, steps)], delta)
    lower, estimate, upper = prv_bounds([(sigma, q, steps)], delta)
    assert estimate == pytest.approx(expected, abs=0.01) or estimate == pytest.approx(
        expected, rel=0.02
    )
    # PLD's pessimistic estimate is above the true epsilon, hence above our lower bound.
    assert lower <= expected + 1e-9


def test_heterogeneous_history_agrees_with_pld():
    events = [(1.0, 0.01, 1000), (2.0, 0.05, 500), (0.7, 0.002, 3000)]
    expected = pld_epsilon(events, 1e-5)
    lower, estimate, upper = prv_bounds(events, 1e-5)
    assert estimate == pytest.approx(expected, abs=0.01)
    assert lower <= expected + 1e-9


# -- against closed forms (q = 1: the Gaussian mechanism, mu^2 = sum steps / sigma^2) ----------
@pytest.mark.parametrize(
    "events, delta",
    [
        ([(1.0, 1.0, 1)], 1e-5),
        ([(3.0, 1.0, 50)], 1e-6),
        ([(2.0, 1.0, 10), (5.0, 1.0, 100), (1.5, 1.0, 3)], 1e-5),
        ([(10.0, 1.0, 100)], 1e-20),
    ],
)
def test_bounds_contain_exact_gaussian_epsilon(events, delta):
    mu = math.sqrt(sum(n / sigma**2 for sigma, _, n in events))
    exact = gaussian_epsilon(mu, delta)
    lower, estimate, upper = prv_bounds(events, delta)
    assert lower <= exact <= upper
    assert estimate == pytest.approx(exact, abs=0.01)


# -- bounds ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("eps_error", [0.01, 0.05])
@pytest.mark.parametrize("q, sigma, steps", [(0.01, 1.1, 2000), (0.04, 1.5, 2250)])
def test_bounds_are_ordered_and_about_two_eps_error_wide(q, sigma, steps, eps_error):
    lower, estimate, upper = prv_bounds([(sigma, q, steps)], 1e-5, eps_error=eps_error)
    assert lower <= estimate <= upper
    assert upper - lower <= 2.2 * eps_error
    assert upper - lower >= 2 * eps_error * 0.99


def test_epsilon_decreases_when_sigma_increases():
    eps = [prv_bounds([(sigma, 0.02, 500)], 1e-5)[2] for sigma in (0.7, 0.9, 1.2, 2.0, 4.0)]
    assert all(a > b for a, b in zip(eps, eps[1:]))


def test_small_delta_does_not_fall_back():
    # The package fails at small delta; the tilted composition resolves it.
    lower, estimate, upper = prv_bounds([(1.0, 0.01, 10000)], 1e-20)
    rdp = RDPAccountant()
    rdp.compose(1.0, 0.01, 10000)
    assert 0 < lower <= estimate <= upper < rdp.get_epsilon(1e-20)


# -- edge cases -------------------------------------------------------------------------------
def test_edge_cases():
    acc = PRVAccountant()
    assert acc.get_epsilon(1e-5) == 0.0
    assert acc.get_epsilon_bounds(1e-5) == (0.0, 0.0, 0.0)
    acc.compose(1.0, 0.0, 100)  # q = 0 costs nothing
    acc.compose(1.0, 0.5, 0)  # no steps
    assert acc.get_epsilon(1e-5) == 0.0
    assert acc.get_epsilon_bounds(1e-5) == (0.0, 0.0, 0.0)
    acc.compose(1.0, 0.01, 10)
    assert 0 < acc.get_epsilon(1e-5) < math.inf
    acc.compose(0.0, 0.01, 1)  # no noise: no privacy
    assert acc.get_epsilon(1e-5) == math.inf
    assert acc.get_epsilon_bounds(1e-5) == (math.inf, math.inf, math.inf)


def test_large_delta_gives_zero():
    assert prv_bounds([(1.1, 0.01, 100)], 0.99) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("delta", [0, 1, -1e-5, 1.5, math.nan, True, "1e-5"])
def test_bad_delta(delta):
    acc = PRVAccountant()
    acc.compose(1.0, 0.01, 10)
    with pytest.raises(DPConfigError, match="delta"):
        acc.get_epsilon_bounds(delta)
    with pytest.raises(DPConfigError, match="delta"):
        acc.get_epsilon(delta)


def test_delta_error_must_be_below_delta():
    acc = PRVAccountant(delta_error=1e-5)
    acc.compose(1.0, 0.01, 10)
    with pytest.raises(DPConfigError, match="delta_error"):
        acc.get_epsilon(1e-6)


@pytest.mark.parametrize("value", [-1, 0, 0.0, math.nan, math.inf, True, "0.01"])
def test_bad_eps_error(value):
    with pytest.raises(DPConfigError, match="eps_error") as info:
        PRVAccountant(eps_error=value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("value", [-1, 0, 1, 2.0, math.nan, math.inf, False, "1e-9"])
def test_bad_delta_error(value):
    with pytest.raises(DPConfigError, match="delta_error") as info:
        PRVAccountant(delta_error=value)
    assert repr(value) in str(info.value)


def test_eps_error_message():
    with pytest.raises(
        DPConfigError, match=r"Expected eps_error > 0 and finite. Received: eps_error=-1"
    ):
        PRVAccountant(eps_error=-1)


# -- state ---------------------------------------------------------------------------------------
def test_state_dict_round_trip():
    acc = PRVAccountant()
    acc.compose(1.0, 0.01, 500)
    acc.compose(2.0, 0.05, 100)
    acc.compose(1.0, 0.01, 200)
    state = json.loads(json.dumps(acc.state_dict()))
    restored = PRVAccountant()
    restored.load_state_dict(state)
    assert restored.history == acc.history
    assert restored.steps == 800
    assert restored.get_epsilon(1e-5) == acc.get_epsilon(1e-5)
    assert restored.get_epsilon_bounds(1e-5) == acc.get_epsilon_bounds(1e-5)


def test_loading_an_rdp_state_is_refused():
    rdp = RDPAccountant()
    rdp.compose(1.0, 0.01, 100)
    acc = PRVAccountant()
    with pytest.raises(DPConfigError, match="rdp"):
        acc.load_state_dict(rdp.state_dict())
    assert acc.steps == 0


# -- fallback --------------------------------------------------------------------------------
def rdp_epsilon(events, delta):
    rdp = RDPAccountant()
    for sigma, q, steps in events:
        rdp.compose(sigma, q, steps)
    return rdp.get_epsilon(delta)


def test_fallback_to_rdp_when_the_prv_computation_raises(monkeypatch):
    def broken(*args, **kwargs):
        raise OverflowError("simulated overflow")

    monkeypatch.setattr(prv_module, "_compute_bounds", broken)
    events = [(1.0, 0.01, 500), (2.0, 0.05, 100)]
    acc = PRVAccountant()
    for event in events:
        acc.compose(*event)
    with pytest.warns(RuntimeWarning, match="PRV computation failed.*simulated overflow.*RDP"):
        eps = acc.get_epsilon(1e-5)
    assert eps == rdp_epsilon(events, 1e-5)
    with pytest.warns(RuntimeWarning, match="PRV computation failed"):
        assert acc.get_epsilon_bounds(1e-5) == (0.0, eps, eps)


@pytest.mark.parametrize("bad", [(math.nan, 1.0, 2.0), (3.0, 2.0, 1.0), (1.0, 2.0, math.inf)])
def test_fallback_on_inconsistent_bounds(monkeypatch, bad):
    monkeypatch.setattr(prv_module, "_compute_bounds", lambda *args, **kwargs: bad)
    acc = PRVAccountant()
    acc.compose(1.0, 0.01, 500)
    with pytest.warns(RuntimeWarning, match="PRV computation failed"):
        assert acc.get_epsilon(1e-5) == rdp_epsilon([(1.0, 0.01, 500)], 1e-5)


def test_a_lattice_too_large_for_memory_starts_coarser(monkeypatch):
    # The relative mode sizes its lattice for the accuracy; when that lattice needs more
    # points than allowed it composes a coarser one: a looser bound, still valid.
    exact = PRVAccountant()
    exact.compose(1.0, 0.01, 500)
    reference = exact.get_epsilon(1e-5)
    monkeypatch.setattr(discretise, "MAX_POINTS", 1000)
    acc = PRVAccountant()
    acc.compose(1.0, 0.01, 500)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eps = acc.get_epsilon(1e-5)
    assert reference <= eps < rdp_epsilon([(1.0, 0.01, 500)], 1e-5)


@pytest.mark.parametrize("eps_error", [None, 0.01])
def test_fallback_when_the_domain_does_not_fit(monkeypatch, eps_error):
    # The real detection path: even the coarsest lattice needs more points than allowed.
    monkeypatch.setattr(discretise, "MAX_POINTS", 4)
    acc = PRVAccountant(eps_error=eps_error)
    acc.compose(1.0, 0.01, 500)
    with pytest.warns(RuntimeWarning, match="PRV computation failed.*points"):
        eps = acc.get_epsilon(1e-5)
    assert eps == rdp_epsilon([(1.0, 0.01, 500)], 1e-5)


def test_retry_with_a_wider_domain(monkeypatch):
    calls = []
    original = prv_module._compute_bounds

    def first_fails(events, delta, eps_error, delta_error, attempt=0, **kwargs):
        calls.append(attempt)
        if attempt == 0:
            raise prv_module._PRVFailure("simulated")
        return original(events, delta, eps_error, delta_error, attempt, **kwargs)

    monkeypatch.setattr(prv_module, "_compute_bounds", first_fails)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        acc = PRVAccountant(eps_error=0.01)
        acc.compose(1.5, 0.04, 2250)
        lower, estimate, upper = acc.get_epsilon_bounds(1e-5)
    assert calls == [0, 1]
    assert lower <= 6.7688 <= upper
    assert upper - lower <= 2.2 * 0.01


def test_results_are_cached_and_deterministic():
    acc = PRVAccountant()
    acc.compose(1.0, 0.02, 300)
    first = acc.get_epsilon_bounds(1e-5)
    assert acc.get_epsilon_bounds(1e-5) == first
    fresh = PRVAccountant()
    fresh.compose(1.0, 0.02, 300)
    assert fresh.get_epsilon_bounds(1e-5) == first
    assert np.all(np.isfinite(first))
