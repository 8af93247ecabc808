"""Renyi-DP accounting of the Poisson-subsampled Gaussian mechanism.

The RDP of one step at order alpha is `log(A_alpha) / (alpha - 1)` with
`A_alpha = E_{z ~ mu_0}[(mu(z) / mu_0(z))^alpha]`, where `mu_0 = N(0, sigma^2)` and
`mu = (1 - q) mu_0 + q N(1, sigma^2)` (Mironov, Talwar and Zhang 2019, "Renyi
Differential Privacy of the Sampled Gaussian Mechanism"):

* integer alpha: the binomial expansion
  `A_alpha = sum_k C(alpha, k) (1-q)^(alpha-k) q^k exp((k^2 - k) / (2 sigma^2))`;
* fractional alpha: the two convergent series of their Section 3.3, split at
  `z0 = sigma^2 log(1/q - 1) + 1/2`, summed until the terms fall below e^-30.

RDP composes additively over steps, so heterogeneous histories are exact.
Conversion to (epsilon, delta):

* ``"improved"`` (default; Balle et al. 2020, "Hypothesis Testing Interpretations
  and Renyi Differential Privacy", Theorem 21):
  `eps = rdp + log((alpha-1)/alpha) - (log(delta) + log(alpha)) / (alpha - 1)`;
* ``"classic"`` (Mironov 2017): `eps = rdp + log(1/delta) / (alpha - 1)`, which
  reproduces older reports such as TF Privacy's MNIST tutorial (1.18).

Both are upper bounds on the true epsilon; the minimum over the orders is
reported together with the order that attains it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import special

from torchdp_keras._validation import to_float
from torchdp_keras.accounting.base import Accountant, check_delta, check_epsilon
from torchdp_keras.errors import DPConfigError

DEFAULT_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [80, 96, 128, 256, 512, 1024]
)

CONVERSIONS = ("improved", "classic")


def _log_add(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    hi, lo = max(a, b), min(a, b)
    return hi + math.log1p(math.exp(lo - hi))


def _log_sub(a: float, b: float) -> float:
    """log(exp(a) - exp(b)) for a >= b."""
    if b == -math.inf:
        return a
    if b >= a:
        return -math.inf if b == a else math.nan
    return a + math.log1p(-math.exp(b - a))


def _log_erfc(x: float) -> float:
    return float(special.log_ndtr(-x * math.sqrt(2.0)) + math.log(2.0))


def _log_a_integer(q: float, sigma: float, alpha: int) -> float:
    k = np.arange(alpha + 1, dtype=np.float64)
    log_binom = special.gammaln(alpha + 1) - special.gammaln(k + 1) - special.gammaln(alpha - k + 1)
    log_terms = (
        log_binom
        + k * math.log(q)
        + (alpha - k) * math.log1p(-q)
        + (k * k - k) / (2.0 * sigma * sigma)
    )
    return float(special.logsumexp(log_terms))


def _log_a_fractional(q: float, sigma: float, alpha: float) -> float:
    # log(1/q - 1) written so that it does not overflow for tiny q.
    z0 = sigma * sigma * (math.log1p(-q) - math.log(q)) + 0.5
    log_pos = [-math.inf, -math.inf]  # the two series, positive and negative parts
    log_neg = [-math.inf, -math.inf]
    i = 0
    while True:
        coef = special.binom(alpha, i)
        log_coef = math.log(abs(coef))
        j = alpha - i
        # First series: terms in q^i (1-q)^(alpha-i), tail of the mixture below z0.
        s0 = (
            log_coef
            + i * math.log(q)
            + j * math.log1p(-q)
            + (i * i - i) / (2.0 * sigma * sigma)
            + math.log(0.5)
            + _log_erfc((i - z0) / (math.sqrt(2.0) * sigma))
        )
        # Second series: terms in q^(alpha-i) (1-q)^i, tail above z0.
        s1 = (
            log_coef
            + j * math.log(q)
            + i * math.log1p(-q)
            + (j * j - j) / (2.0 * sigma * sigma)
            + math.log(0.5)
            + _log_erfc((z0 - j) / (math.sqrt(2.0) * sigma))
        )
        if math.isnan(s0) or math.isnan(s1) or max(s0, s1) == math.inf:
            return math.inf  # sigma^2 so small that the terms overflow: A_alpha is beyond float64
        target = log_pos if coef > 0 else log_neg
        target[0] = _log_add(target[0], s0)
        target[1] = _log_add(target[1], s1)
        i += 1
        if max(s0, s1) < -30 and i > alpha:
            break
    a0 = _log_sub(log_pos[0], log_neg[0])
    a1 = _log_sub(log_pos[1], log_neg[1])
    return _log_add(a0, a1)


def subsampled_gaussian_rdp(
    sampling_probability: float, noise_multiplier: float, orders: Sequence[float]
) -> np.ndarray:
    """RDP of one step of the Poisson-subsampled Gaussian mechanism, per order.

    Args:
        sampling_probability: q in [0, 1].
        noise_multiplier: sigma >= 0.
        orders: RDP orders alpha > 1 (integer or fractional).

    Returns:
        An array of RDP values, one per order (inf when sigma == 0 < q, or when sigma is
        so small, below about 1e-154, that sigma^2 underflows or the series overflows).

    Example:
        >>> round(float(subsampled_gaussian_rdp(1.0, 1.0, [2.0])[0]), 6)
        1.0
    """
    q, sigma = float(sampling_probability), float(noise_multiplier)
    alphas = np.asarray(orders, dtype=np.float64)
    if q == 0:
        return np.zeros_like(alphas)
    if sigma * sigma == 0:  # sigma == 0, or so small that sigma^2 underflows: no noise
        return np.full_like(alphas, np.inf)
    if q == 1.0 or math.isinf(sigma * sigma):  # the full-batch value (0.0 if sigma^2 overflows)
        return alphas / (2.0 * sigma * sigma)
    out = np.empty_like(alphas)
    for idx, alpha in enumerate(alphas):
        if float(alpha).is_integer():
            log_a = _log_a_integer(q, sigma, int(alpha))
        else:
            log_a = _log_a_fractional(q, sigma, float(alpha))
        out[idx] = log_a / (alpha - 1.0)
    return out


def step_rdp(
    sampling_probability: float,
    noise_multiplier: float,
    orders: Sequence[float],
    neighboring: str = "add_or_remove",
    group_size: int = 1,
) -> np.ndarray:
    """RDP of one Poisson-subsampled Gaussian step under a neighbouring relation, per order.

    * add_or_remove, one example: `subsampled_gaussian_rdp` (exact series);
    * replace_one: `D_alpha(P || Q)` of the pair `((1-q) N(0) + q N(1), (1-q) N(0) + q N(-1))`
      (symmetric), by quadrature;
    * add_or_remove of a group of k examples: the larger of `D_alpha(P || Q)` and
      `D_alpha(Q || P)` for `P = sum_j Binom(k, q)(j) N(j)`, `Q = N(0)`, by quadrature.

    See `torchdp_keras.accounting.pairs` for the pairs and their references.

    Example:
        >>> rdp = step_rdp(1.0, 1.0, [2.0], neighboring="replace_one")  # sensitivity 2
        >>> round(float(rdp[0]), 6)
        4.0
    """
    from torchdp_keras.accounting.pairs import check_group_size, check_neighboring, pair_rdp

    neighboring = check_neighboring(neighboring)
    k = check_group_size(group_size, neighboring)
    q, sigma = float(sampling_probability), float(noise_multiplier)
    alphas = np.asarray(orders, dtype=np.float64)
    if neighboring == "add_or_remove" and k == 1:
        return subsampled_gaussian_rdp(q, sigma, orders)
    if q == 0:
        return np.zeros_like(alphas)
    if sigma * sigma == 0:
        return np.full_like(alphas, np.inf)
    sensitivity = 2.0 if neighboring == "replace_one" else float(k)
    if q == 1.0 or sigma > 1e100:  # the Gaussian mechanism (an upper bound when q < 1)
        return alphas * sensitivity**2 / (2.0 * sigma * sigma)
    return pair_rdp(sigma, q, alphas, neighboring, k)


def rdp_to_epsilon(
    rdp: np.ndarray, orders: Sequence[float], delta: float, conversion: str = "improved"
) -> tuple[float, float]:
    """Converts an RDP curve to (epsilon, optimal order) at `delta`.

    Args:
        rdp: Total RDP per order.
        orders: The orders of `rdp`.
        delta: Target delta in (0, 1).
        conversion: "improved" (Balle et al. 2020) or "classic" (Mironov 2017).

    Returns:
        `(epsilon, order)`; epsilon is never negative.
    """
    delta = check_delta(delta)
    if conversion not in CONVERSIONS:
        raise DPConfigError(
            f"Expected conversion in {CONVERSIONS}. Received: conversion={conversion!r}"
        )
    alphas = np.asarray(orders, dtype=np.float64)
    rdp = np.asarray(rdp, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        if conversion == "classic":
            eps = rdp + math.log(1.0 / delta) / (alphas - 1.0)
        else:
            eps = (
                rdp
                + np.log((alphas - 1.0) / alphas)
                - (math.log(delta) + np.log(alphas)) / (alphas - 1.0)
            )
    eps = np.where(np.isnan(eps), np.inf, eps)
    best = int(np.argmin(eps))
    return max(0.0, float(eps[best])), float(alphas[best])


def rdp_to_delta(
    rdp: np.ndarray, orders: Sequence[float], epsilon: float, conversion: str = "improved"
) -> tuple[float, float]:
    """Converts an RDP curve to (delta, optimal order) at `epsilon`: the inverse of
    `rdp_to_epsilon`, per order, minimised over the orders.

    * improved: `log(delta) = (alpha-1) (rdp + log((alpha-1)/alpha) - eps) - log(alpha)`;
    * classic: `log(delta) = (alpha-1) (rdp - eps)`.

    Args:
        rdp: Total RDP per order.
        orders: The orders of `rdp`.
        epsilon: Target epsilon >= 0.
        conversion: "improved" (Balle et al. 2020) or "classic" (Mironov 2017).

    Returns:
        `(delta, order)`; delta is at most 1.
    """
    if conversion not in CONVERSIONS:
        raise DPConfigError(
            f"Expected conversion in {CONVERSIONS}. Received: conversion={conversion!r}"
        )
    eps = to_float(epsilon)
    if not eps >= 0:
        raise DPConfigError(f"Expected epsilon >= 0. Received: epsilon={epsilon!r}")
    alphas = np.asarray(orders, dtype=np.float64)
    rdp = np.asarray(rdp, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if conversion == "classic":
            log_delta = (alphas - 1.0) * (rdp - eps)
        else:
            log_delta = (alphas - 1.0) * (rdp + np.log((alphas - 1.0) / alphas) - eps) - np.log(
                alphas
            )
    log_delta = np.where(np.isnan(log_delta), np.inf, log_delta)
    best = int(np.argmin(log_delta))
    return min(1.0, math.exp(min(0.0, float(log_delta[best])))), float(alphas[best])


def _check_orders(orders) -> tuple[float, ...]:
    try:
        values = tuple(to_float(a) for a in orders)
    except (TypeError, ValueError):
        values = ()
    if not values or any(not math.isfinite(a) or a <= 1 for a in values):
        raise DPConfigError(f"Expected RDP orders > 1. Received: orders={orders!r}")
    return values


def _check_pure_epsilon(epsilon) -> float:
    value = (
        to_float(epsilon)
        if isinstance(epsilon, (int, float)) and not isinstance(epsilon, bool)
        else math.nan
    )
    if not math.isfinite(value) or value <= 0:
        raise DPConfigError(f"Expected epsilon > 0 and finite. Received: epsilon={epsilon!r}")
    return value


class RDPAccountant(Accountant):
    """Renyi-DP accountant for DP-SGD (Poisson sampling, Gaussian noise).

    Args:
        orders: RDP orders to optimise over (default: 1.1 ... 10.9 by 0.1,
            11 ... 63, 80, 96, 128, 256, 512, 1024).
        conversion: "improved" (default, Balle et al. 2020) or "classic"
            (`eps = rdp + log(1/delta)/(alpha-1)`, as in older reports).
        neighboring: "add_or_remove" (default) or "replace_one"; see
            `torchdp_keras.accounting.pairs` for the pair accounted and its references.
        group_size: k >= 1 (at most 64, add_or_remove only): the guarantee for adding or
            removing k examples at once (one user's), by the Binomial(k, q) mixture pair.

    Guarantee: `get_epsilon(delta)` is an upper bound on the epsilon of the
    composed history; it is looser than the PRV accountant's.

    Example:
        >>> acc = RDPAccountant(conversion="classic")
        >>> acc.compose(noise_multiplier=1.3, sampling_probability=250 / 60000, steps=3600)
        >>> round(acc.get_epsilon(1e-5), 2)
        1.18
    """

    name = "rdp"

    def __init__(
        self,
        orders: Sequence[float] | None = None,
        conversion: str = "improved",
        *,
        neighboring: str = "add_or_remove",
        group_size: int = 1,
    ):
        super().__init__(neighboring=neighboring, group_size=group_size)
        if conversion not in CONVERSIONS:
            raise DPConfigError(
                f"Expected conversion in {CONVERSIONS}. Received: conversion={conversion!r}"
            )
        self.orders = _check_orders(DEFAULT_ORDERS if orders is None else orders)
        self.conversion = conversion
        self._pure: dict[float, int] = {}
        self._pair_cache: dict[tuple[float, float], np.ndarray] = {}

    def compose_pure_dp(self, epsilon: float, count: int = 1) -> None:
        """Adds `count` pure epsilon-DP mechanisms (a sparse-vector-technique release).

        Their RDP at order alpha is `min(epsilon, alpha epsilon^2 / 2)`: an
        epsilon-DP mechanism is (alpha, epsilon)-RDP for every alpha (Mironov
        2017, Proposition 3) and epsilon^2/2-zCDP (Bun and Steinke 2016,
        Proposition 1.4), i.e. (alpha, alpha epsilon^2 / 2)-RDP.

        Raises:
            DPConfigError: `epsilon` is not a finite number > 0, or `count` not
                an integer >= 0.
        """
        epsilon = _check_pure_epsilon(epsilon)
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise DPConfigError(f"Expected count to be an integer >= 0. Received: count={count!r}")
        if count:
            self._pure[epsilon] = self._pure.get(epsilon, 0) + count

    @property
    def pure_dp_history(self) -> list[tuple[float, int]]:
        """The composed pure-DP mechanisms `(epsilon, count)`."""
        return sorted(self._pure.items())

    def get_rdp(self) -> np.ndarray:
        """The total RDP of the history, one value per order."""
        total = np.zeros(len(self.orders))
        orders = np.asarray(self.orders, dtype=np.float64)
        for epsilon, count in self._pure.items():
            total = total + count * np.minimum(epsilon, orders * epsilon**2 / 2)
        for sigma, q, n in self._grouped_history():
            rdp = self._step_rdp(sigma, q)
            with np.errstate(invalid="ignore", over="ignore"):  # n may be beyond float range
                total = total + np.where(rdp == 0, 0.0, to_float(n) * rdp)
        return total

    def _step_rdp(self, sigma: float, q: float) -> np.ndarray:
        """RDP of one step under the accountant's neighbouring relation, per order."""
        if self.neighboring == "add_or_remove" and self.group_size == 1:
            return subsampled_gaussian_rdp(q, sigma, self.orders)
        key = (sigma, q)
        if key not in self._pair_cache:
            self._pair_cache[key] = step_rdp(
                q, sigma, self.orders, self.neighboring, self.group_size
            )
        return self._pair_cache[key]

    def get_epsilon_and_order(self, delta: float) -> tuple[float, float]:
        """`(epsilon, optimal_order)` at `delta`; `(0.0, nan)` for an empty history."""
        delta = check_delta(delta)
        events = self._grouped_history()
        if not events and not self._pure:
            return 0.0, math.nan
        return rdp_to_epsilon(self.get_rdp(), self.orders, delta, self.conversion)

    def get_epsilon(self, delta: float) -> float:
        """The epsilon of everything composed so far (pure-DP mechanisms included)."""
        if not self._pure:
            return super().get_epsilon(delta)
        delta = check_delta(delta)
        if any(sigma == 0 for sigma, _, _ in self._grouped_history()):
            return math.inf
        return float(self.get_epsilon_and_order(delta)[0])

    def get_delta(self, epsilon: float) -> float:
        """The delta at `epsilon` of everything composed so far (pure-DP mechanisms
        included), by the same conversion as `get_epsilon` (`rdp_to_delta`)."""
        if not self._pure:
            return super().get_delta(epsilon)
        epsilon = check_epsilon(epsilon)
        if any(sigma == 0 for sigma, _, _ in self._grouped_history()):
            return 1.0
        return rdp_to_delta(self.get_rdp(), self.orders, epsilon, self.conversion)[0]

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self._pure:
            state["pure_dp"] = [[epsilon, count] for epsilon, count in self.pure_dp_history]
        return state

    def load_state_dict(self, state: dict) -> None:
        pure = state.get("pure_dp", []) if isinstance(state, dict) else []
        super().load_state_dict(
            {k: v for k, v in state.items() if k != "pure_dp"} if isinstance(state, dict) else state
        )
        if not isinstance(pure, (list, tuple)) or not all(
            isinstance(item, (list, tuple)) and len(item) == 2 for item in pure
        ):
            raise DPConfigError(
                f"Expected pure_dp to be a list of [epsilon, count]. Received: pure_dp={pure!r}"
            )
        self._pure = {}
        for epsilon, count in pure:
            self.compose_pure_dp(epsilon, count)

    def _epsilon(self, events, delta):
        return self.get_epsilon_and_order(delta)[0]

    def _delta(self, events, epsilon):
        return rdp_to_delta(self.get_rdp(), self.orders, epsilon, self.conversion)[0]
