"""The lattice pairs of one step against the exact hockey-stick curve (slow references).

`connect_the_dots` must dominate the step (its delta(epsilon) is never below the exact
one, once the truncated tail is added), `merged_cells` must be dominated by it (never
above), both must be close to it, and refining the lattice must tighten both. The exact
curve is integrated here from the mixtures' densities (scipy.stats), independently of
the package's CDF code.
"""

import math
import warnings

import numpy as np
import pytest
from scipy import optimize, special, stats

from torchdp_keras.accounting import discretise
from torchdp_keras.accounting.pairs import RemovePair, group_pair, replace_one_pair


def _components(kind, sigma, q):
    """(P's weights and means, Q's weights and means) of the step's pair, written out."""
    if kind == "remove":
        return ([1 - q, q], [0.0, 1.0]), ([1.0], [0.0])
    if kind == "replace_one":
        return ([1 - q, q], [0.0, 1.0]), ([1 - q, q], [0.0, -1.0])
    weights = [(1 - q) ** 2, 2 * q * (1 - q), q**2]  # groups of two: Binomial(2, q)
    if kind == "group_remove":
        return (weights, [0.0, 1.0, 2.0]), ([1.0], [0.0])
    assert kind == "group_add"
    return ([1.0], [0.0]), (weights, [0.0, -1.0, -2.0])


def _pair(kind, sigma, q):
    if kind == "remove":
        return RemovePair(sigma, q)
    if kind == "replace_one":
        return replace_one_pair(sigma, q)
    return group_pair(sigma, q, 2, kind.split("_")[1])


def exact_delta(kind, sigma, q, epsilon):
    """delta(epsilon) = P(x > x_e) - e^epsilon Q(x > x_e), x_e where the loss is epsilon
    (the loss is increasing in x), from scipy.stats."""
    (pw, pm), (qw, qm) = _components(kind, sigma, q)

    def log_density(x, weights, means):
        return special.logsumexp(stats.norm.logpdf(x, means, sigma), b=weights)

    def loss(x):
        return log_density(x, pw, pm) - log_density(x, qw, qm)

    lo, hi = -40.0 * sigma - 3, 40.0 * sigma + 3
    if loss(hi) <= epsilon:
        return 0.0
    x_e = lo if loss(lo) >= epsilon else optimize.brentq(lambda x: loss(x) - epsilon, lo, hi)
    above_p = float(np.dot(pw, stats.norm.sf(x_e, pm, sigma)))
    above_q = float(np.dot(qw, stats.norm.sf(x_e, qm, sigma)))
    return max(0.0, above_p - math.exp(epsilon) * above_q)


def lattice_delta(lattice, dt, epsilon):
    """delta(epsilon) of a lattice distribution of losses, term by term."""
    values = lattice.offset + (np.arange(len(lattice.pmf)) - lattice.centre) * dt
    above = values > epsilon
    return float(np.sum(lattice.pmf[above] * -np.expm1(epsilon - values[above])))


# (kind, sigma, q, a coarse and a fine lattice spacing for that loss's spread)
CASES = [
    ("remove", 1.0, 0.01, 1e-2, 1e-3),
    ("remove", 0.5, 1e-5, 1e-5, 2e-6),  # the loss piles up at its bottom, log(1 - q)
    ("remove", 0.5, 0.5, 1e-2, 1e-3),
    ("replace_one", 0.8, 0.05, 1e-2, 1e-3),
    ("group_remove", 1.0, 0.02, 1e-2, 1e-3),
    ("group_add", 1.0, 0.02, 1e-2, 1e-3),  # the loss piles up at its top
]
STEPS = [
    pytest.param(kind, sigma, q, dt, id=f"{kind}-{sigma}-{q}-{dt}")
    for kind, sigma, q, *dts in CASES
    for dt in dts
]


def _epsilons(kind, sigma, q):
    """A spread of epsilons where delta is above about 1e-8."""
    grid = np.geomspace(1e-5, 12.0, 40)
    deltas = np.array([exact_delta(kind, sigma, q, e) for e in grid])
    top = grid[np.flatnonzero(deltas > 1e-8)[-1]]
    return [0.0, *np.geomspace(top / 200, top, 6)]


@pytest.mark.parametrize("kind,sigma,q,dt", STEPS)
def test_connect_the_dots_dominates_and_is_close(kind, sigma, q, dt):
    lattice, dropped = discretise.connect_the_dots(_pair(kind, sigma, q), dt, 1e-12)
    assert dropped <= 1e-12 * (1 + 1e-9)
    assert lattice.pmf.sum() == pytest.approx(1.0, abs=1e-12)
    for epsilon in _epsilons(kind, sigma, q):
        exact = exact_delta(kind, sigma, q, epsilon)
        ours = lattice_delta(lattice, dt, epsilon)
        assert ours + dropped >= exact - 1e-13 * (1 + exact)  # dominates
        # The chord through the lattice points lies below the curve's value at the lattice
        # point below epsilon: within one dt of the exact curve.
        assert ours <= exact_delta(kind, sigma, q, epsilon - dt) + 1e-12


@pytest.mark.parametrize("kind,sigma,q,dt", STEPS)
def test_merged_cells_are_dominated_and_close(kind, sigma, q, dt):
    lattice, lost = discretise.merged_cells(_pair(kind, sigma, q), dt, 1e-12)
    assert lattice.pmf.sum() == pytest.approx(1.0, abs=1e-12)
    assert 0.0 <= lost
    # Every part's lattice value is at most its loss: E_P[exp(-value)] >= Q's mass, 1.
    values = lattice.offset + (np.arange(len(lattice.pmf)) - lattice.centre) * dt
    assert float(lattice.pmf @ np.exp(-values)) >= 1.0 - 1e-12
    for epsilon in _epsilons(kind, sigma, q):
        exact = exact_delta(kind, sigma, q, epsilon)
        ours = lattice_delta(lattice, dt, epsilon)
        assert ours <= exact + 1e-13 * (1 + exact)  # dominated
        if kind in ("replace_one", "group_add"):
            # No pile-up at the bottom, so every part is at most about 2 dt wide: within
            # 3 dt of the exact curve. (A pile-up goes into one wider bottom part.)
            assert ours >= exact_delta(kind, sigma, q, epsilon + 3 * dt) - 1e-12


def test_the_walk_puts_a_pile_up_exactly_on_the_lattice():
    # sigma 0.5, q 1e-5: most of the mass is within 1e-6 of log(1 - q); cells centred on
    # the lattice would lose a large fraction of dt per step, the walk almost nothing.
    pair, dt = RemovePair(0.5, 1e-5), 4e-6
    _, lost_walk = discretise.merged_cells(pair, dt, 1e-12)
    _, lost_centred = discretise.merged_cells(pair, dt, 1e-12, budget=math.inf)
    assert lost_walk < 1e-4 * dt
    assert lost_centred > 100 * lost_walk


def test_nested_lattices_tighten_both_bounds():
    from torchdp_keras.accounting import prv

    events, delta = [(0.8, 0.02, 2000)], 1e-6
    uppers, lowers = [], []
    for dt in (2**-8, 2**-9, 2**-10):
        uppers.append(prv._compute_bounds(events, delta, dt, 1e-9, kind="upper")[2])
        lowers.append(prv._compute_bounds(events, delta, dt, 1e-9, kind="lower")[0])
    assert uppers[0] >= uppers[1] >= uppers[2] > lowers[2]
    assert lowers[0] <= lowers[1] + 1e-9 and lowers[1] <= lowers[2] + 1e-9
    # Connect-the-dots converges as dt^2: each halving removes most of the remaining gap.
    assert uppers[1] - uppers[2] < 0.5 * (uppers[0] - uppers[1])


def test_too_many_points_is_reported_with_the_count():
    with pytest.raises(discretise.TooManyPoints, match="needs") as info:
        discretise.connect_the_dots(RemovePair(1.0, 0.01), 1e-9, 1e-12)
    assert info.value.points > discretise.MAX_POINTS


@pytest.mark.parametrize(
    "pair,dt",
    [
        (group_pair(0.1, 1e-9, 2, "remove"), 0.1),  # the walk reaches the last lattice point
        (replace_one_pair(0.05, 0.01), 1e-3),  # masses cancelled to rounding noise
        (RemovePair(0.05, 0.9), 1e-3),
        (group_pair(1.0, 1e-9, 2, "add"), 1e-3),
    ],
)
def test_merged_cells_survive_edge_masses(pair, dt):
    # Found by review: an index past the lattice, and parts whose rounding error swamps
    # their mass (both made the lower bound silently 0). Such a part lies above the bottom
    # part, so the lattice's first value is still below its loss.
    lattice, lost = discretise.merged_cells(pair, dt, 1e-12)
    assert lattice.pmf.sum() == pytest.approx(1.0, abs=1e-12) and lost >= 0.0


@pytest.mark.parametrize("q", [0.1, 0.001])
def test_one_step_of_a_group_is_bracketed_without_falling_back(q):
    # The add direction's loss piles up at its top: a strong tilt used to push the solution
    # out of the window (RDP fallback: 19.23 for an exact 17.57 at q = 0.1).
    from torchdp_keras.accounting import PRVAccountant

    sigma, delta = 0.5, 1e-6
    exact = 0.0
    for kind in ("group_remove", "group_add"):
        if exact_delta(kind, sigma, q, 0.0) > delta:
            exact = max(
                exact,
                optimize.brentq(
                    lambda e, kind=kind: exact_delta(kind, sigma, q, e) - delta, 0.0, 60.0
                ),
            )
    acc = PRVAccountant(group_size=2)
    acc.compose(sigma, q, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lower, _, upper = acc.get_epsilon_bounds(delta)
    assert lower <= exact <= upper <= exact + max(0.001, 0.01 * exact)


@pytest.mark.parametrize(
    "pair",
    [
        replace_one_pair(0.5, 1e-5),
        replace_one_pair(2.0, 0.3),
        group_pair(1.0, 0.01, 8, "remove"),
        group_pair(1.0, 0.01, 8, "add"),
        group_pair(0.7, 0.5, 3, "remove"),
    ],
    ids=["replace_tiny_q", "replace", "group8_remove", "group8_add", "group3_q_half"],
)
def test_x_of_loss_inverts_the_loss(pair):
    # Reference: the loss written out from the mixtures' densities, inverted point by point
    # with brentq; beyond the loss at the ends, the ends themselves.
    p_w, p_mu = np.exp(pair.p_logw), pair.p_mu
    q_w, q_mu = np.exp(pair.q_logw), pair.q_mu

    def loss(x):
        p = np.sum(p_w * stats.norm.pdf(x, p_mu, pair.sigma))
        q = np.sum(q_w * stats.norm.pdf(x, q_mu, pair.sigma))
        return math.log(p) - math.log(q)

    lo, hi = -6.0 * pair.sigma - 2.0, 6.0 * pair.sigma + 2.0
    a, b = loss(lo), loss(hi)
    t = np.concatenate([[a - 1.0, a], np.linspace(a, b, 41)[1:-1], [b, b + 1.0]])
    found = pair.x_of_loss(t, lo, hi)
    assert found[0] == lo and found[-1] == hi
    for value, x in zip(t[2:-2], found[2:-2]):
        expected = optimize.brentq(lambda y, v=value: loss(y) - v, lo, hi, xtol=1e-15, rtol=1e-15)
        assert x == pytest.approx(expected, rel=1e-9, abs=1e-11)
