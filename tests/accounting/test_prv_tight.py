"""PRV accountant at every scale: the default upper bound is within 1% (or 0.001) of the
exact epsilon and never below it; get_delta; calibration to 1%.

"Exact" comes from dp_accounting's PLD accountant at a fine value discretisation: its
pessimistic estimate is an upper bound of the truth, its optimistic one a lower bound.
Bigger grids (all the corners, 10^6 steps) run in benches/bench_accountants.py.
"""

import math
import warnings

import pytest
from scipy import optimize, special

from torchdp_keras.accounting import PRVAccountant, RDPAccountant, calibrate_noise_multiplier
from torchdp_keras.errors import DPConfigError

dp_accounting = pytest.importorskip("dp_accounting")
from dp_accounting.pld import privacy_loss_distribution  # noqa: E402


def pld(q, sigma, steps, interval, pessimistic):
    return privacy_loss_distribution.from_gaussian_mechanism(
        sigma,
        pessimistic_estimate=pessimistic,
        value_discretization_interval=interval,
        sampling_prob=q,
    ).self_compose(steps)


def truth(q, sigma, steps, delta, interval=1e-4):
    """(certified lower, certified upper) epsilon from dp_accounting's PLD."""
    return tuple(
        pld(q, sigma, steps, interval, pessimistic).get_epsilon_for_delta(delta)
        for pessimistic in (False, True)
    )


def ours(q, sigma, steps, delta):
    acc = PRVAccountant()
    acc.compose(sigma, q, steps)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RDP fallback
        return acc.get_epsilon_bounds(delta)


# (q, sigma, steps, delta, PLD interval): a representative subset of the bench grid.
GRID = [
    (4e-5, 1.2, 500_000, 1e-5, 1e-5),  # TF Privacy's get_privacy_budget seed case
    (1e-5, 0.5, 1, 1e-10, 1e-4),  # one step: no FFT, so no rounding noise in the slack
    (1e-5, 20.0, 1000, 1e-3, 1e-5),
    (0.5, 0.5, 1, 1e-5, 1e-4),
    (0.5, 20.0, 1, 1e-10, 1e-4),
    (0.5, 20.0, 1000, 1e-10, 1e-4),
    (0.5, 2.0, 100, 1e-3, 1e-4),
    (0.01, 1.0, 10_000, 1e-10, 1e-4),
    (0.04, 1.5, 2250, 1e-5, 1e-4),  # Opacus's published case
    (256 / 60000, 1.1, 3516, 1e-5, 1e-4),
]


@pytest.mark.parametrize("q,sigma,steps,delta,interval", GRID)
def test_upper_bound_is_within_one_percent_of_the_exact_epsilon(q, sigma, steps, delta, interval):
    true_low, true_high = truth(q, sigma, steps, delta, interval)
    lower, estimate, upper = ours(q, sigma, steps, delta)
    assert upper >= true_low  # never below the truth
    assert upper <= max(1.01 * true_high, true_high + 0.001)
    assert lower <= true_high


def test_one_step_against_quadrature():
    # One step: delta(eps) = E_mu[(1 - exp(eps - Y))_+] by direct integration over x.
    q, sigma, delta = 0.1, 1.0, 1e-5

    def delta_of(eps):
        # Y(x) > eps  <=>  x > x_eps; then the integrand splits into the two Gaussians.
        x_eps = sigma**2 * math.log((math.exp(eps) - (1 - q)) / q) + 0.5
        mu_tail = (1 - q) * special.ndtr(-x_eps / sigma) + q * special.ndtr((1 - x_eps) / sigma)
        return mu_tail - math.exp(eps) * special.ndtr(-x_eps / sigma) - delta

    exact = optimize.brentq(delta_of, 1e-9, 20, xtol=1e-13)
    lower, _, upper = ours(q, sigma, 1, delta)
    assert lower <= exact <= upper <= max(1.01 * exact, exact + 0.001)


def test_fixed_eps_error_is_still_available():
    acc = PRVAccountant(eps_error=0.05)
    acc.compose(1.2, 4e-5, 500_000)
    lower, _, upper = acc.get_epsilon_bounds(1e-5)
    assert 0.09 < upper - lower <= 0.11  # about 2 * eps_error


def test_get_delta_is_a_certified_upper_bound_and_inverts_get_epsilon():
    acc = PRVAccountant()
    acc.compose(1.5, 0.04, 2250)
    epsilon = acc.get_epsilon(1e-5)
    lower, _, _ = acc.get_epsilon_bounds(1e-5)
    # At the reported epsilon, delta is at most the target; at the lower bound, at least.
    assert acc.get_delta(epsilon) <= 1e-5 * 1.01
    assert acc.get_delta(lower) >= 1e-5
    # dp_accounting's optimistic PLD is a lower bound of the true delta.
    optimistic = pld(0.04, 1.5, 2250, 1e-4, False)
    for eps in (2.0, 6.0, 8.0):
        assert acc.get_delta(eps) >= optimistic.get_delta_for_epsilon(eps)


def test_get_delta_edge_cases_and_validation():
    for acc in (PRVAccountant(), RDPAccountant()):
        assert acc.get_delta(1.0) == 0.0  # empty history
        acc.compose(1.0, 0.01, 100)
        assert acc.get_delta(math.inf) == 0.0
        assert 0 < acc.get_delta(0.5) <= 1
        with pytest.raises(DPConfigError, match=r"Expected epsilon >= 0. Received: epsilon=-1"):
            acc.get_delta(-1)
        with pytest.raises(DPConfigError, match="epsilon"):
            acc.get_delta("1")
        acc.compose(0.0, 0.01, 1)
        assert acc.get_delta(5.0) == 1.0


def test_rdp_get_delta_inverts_get_epsilon():
    acc = RDPAccountant()
    acc.compose(1.1, 0.01, 1000)
    epsilon = acc.get_epsilon(1e-5)
    assert acc.get_delta(epsilon) == pytest.approx(1e-5, rel=1e-6)
    acc.compose_pure_dp(0.1)
    assert acc.get_delta(acc.get_epsilon(1e-5)) == pytest.approx(1e-5, rel=1e-6)


@pytest.mark.parametrize(
    "target,delta,q,steps",
    [
        (2.0, 1e-5, 256 / 60000, 3516),  # Opacus make_private_with_epsilon (MNIST, 15 epochs)
        (0.5, 1e-6, 0.001, 20_000),
        (8.0, 1e-5, 0.004, 10_000),
    ],
)
def test_calibration_hits_the_target_within_one_percent(target, delta, q, steps):
    sigma = calibrate_noise_multiplier(target, delta, q, steps)
    acc = PRVAccountant()
    acc.compose(sigma, q, steps)
    assert 0.99 * target <= acc.get_epsilon(delta) <= target


@pytest.mark.parametrize("kwargs", [{"neighboring": "replace_one"}, {"group_size": 3}])
def test_relative_accuracy_for_the_other_pairs(kwargs):
    acc = PRVAccountant(**kwargs)
    acc.compose(1.0, 0.01, 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RDP fallback
        lower, estimate, upper = acc.get_epsilon_bounds(1e-6)
        assert lower <= estimate <= upper
        assert upper - lower <= max(0.001, 0.01 * lower)
        # get_delta (every direction) is consistent with the bracket.
        assert acc.get_delta(0.97 * lower) > 1e-6 >= 0.0
        assert acc.get_delta(upper) <= 1.01e-6
