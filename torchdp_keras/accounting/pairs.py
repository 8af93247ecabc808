"""Dominating pairs of one DP-SGD step for other neighbouring relations (numpy/scipy only).

One step of the Poisson-subsampled Gaussian mechanism (rate q, noise std sigma
relative to the clipping norm C) is accounted by a pair of one-dimensional
Gaussian mixtures `(P, Q)`: for every pair of neighbouring data sets, the
hockey-stick divergences of the step's output distributions are at most those
of `(P, Q)` (a *dominating pair*, Zhu, Dong and Wang 2022, "Optimal accounting
of differential privacy via characteristic function", Definition 7). Pairs of
dominating pairs compose (their Theorem 10), so the accountants compose the
privacy losses `log(P/Q)(X)`, `X ~ P`.

* ``add_or_remove``, one example: `P = (1-q) N(0, sigma^2) + q N(1, sigma^2)`,
  `Q = N(0, sigma^2)` (the pair `prv.py` and `rdp.py` use directly).
* ``add_or_remove`` of a *group* of `k` examples (one user's examples): each
  of the k examples is in the batch independently with probability q, so the
  number J of them in the batch is Binomial(k, q) and their clipped sum has
  norm at most `J C`. Removal: `P = sum_j Binom(k, q)(j) N(j, sigma^2)`,
  `Q = N(0, sigma^2)`; addition: the reverse pair `(Q, P)`, written below as
  `(N(0), sum_j Binom(k, q)(j) N(-j))` (mirror image, same divergences), and
  both directions are composed and the larger epsilon is reported. This is
  the tight group-privacy pair of Schuchardt, Stoian, Arnold and Guennemann
  2024 ("Unified mechanism-specific amplification by subsampling and group
  privacy amplification", NeurIPS; Poisson subsampling, Gaussian base
  mechanism, group size k), and the mixture-of-Gaussians mechanism of
  Choquette-Choo, Ganesh, Steinke and Thakurta 2024 (arXiv 2310.15526), which
  `dp_accounting.MixtureOfGaussiansDpEvent` implements. For the Renyi
  divergence of the removal direction at integer orders it can be checked in
  two lines: with `v_S` the clipped sum of a subset S of the user's examples,
  `E_Q[(P/Q)^alpha] = E_{S_1..S_alpha} exp(sum_{a<b} <v_{S_a}, v_{S_b}> / sigma^2)`
  over independent Poisson subsets, and `<v_{S_a}, v_{S_b}> <= |S_a| |S_b| C^2`
  (Cauchy-Schwarz), with equality when all gradients are the same unit vector:
  the aligned one-dimensional pair above.
* ``replace_one`` (one example replaced by another, each of norm <= C; the
  replaced slot is in the batch with probability q):
  `P = (1-q) N(0) + q N(1)`, `Q = (1-q) N(0) + q N(-1)` (the two gradients
  antipodal: the sum changes by 2C when the slot is sampled). This is the pair
  of `dp_accounting`'s `NeighboringRelation.REPLACE_ONE` for the
  Poisson-subsampled Gaussian (`privacy_loss_mechanism.GaussianPrivacyLoss`
  with `AdjacencyType.REPLACE`), and of Zhu, Dong and Wang 2022, Section 5.
  It is symmetric (`Q(x) = P(-x)`), so one direction suffices. At q = 1 it is
  the Gaussian mechanism with sensitivity 2.

All these privacy losses `L(x) = log(P(x) / Q(x))` are increasing in x, which
the PRV discretisation relies on.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np
from scipy import special

from torchdp_keras.errors import DPConfigError

NEIGHBORING = ("add_or_remove", "replace_one")
# Largest group accounted exactly (the mixture has group_size + 1 components).
MAX_GROUP_SIZE = 64


def check_neighboring(neighboring) -> str:
    """Returns `neighboring` if it is one of `NEIGHBORING`, else raises `DPConfigError`."""
    if not isinstance(neighboring, str) or neighboring not in NEIGHBORING:
        raise DPConfigError(
            f"Expected neighboring in {NEIGHBORING}. Received: neighboring={neighboring!r}"
        )
    return neighboring


def check_group_size(group_size, neighboring: str = "add_or_remove") -> int:
    """Returns `group_size` as an int >= 1, or raises `DPConfigError`."""
    if (
        not isinstance(group_size, numbers.Integral)
        or isinstance(group_size, bool)
        or not 1 <= int(group_size) <= MAX_GROUP_SIZE
    ):
        raise DPConfigError(
            f"Expected group_size to be an integer in [1, {MAX_GROUP_SIZE}]. "
            f"Received: group_size={group_size!r}"
        )
    if int(group_size) > 1 and neighboring != "add_or_remove":
        raise DPConfigError(
            "Expected group_size=1 with neighboring='replace_one' (groups are only "
            f"supported with add_or_remove). Received: group_size={group_size!r}"
        )
    return int(group_size)


_EPS64 = float(np.finfo(np.float64).eps)


def _lse(a: np.ndarray) -> np.ndarray:
    """logsumexp over the last axis (without scipy's per-call overhead)."""
    top = np.max(a, axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.sum(np.exp(a - top), axis=-1)) + top[..., 0]


def _log_binomial_weights(k: int, q: float) -> np.ndarray:
    j = np.arange(k + 1, dtype=np.float64)
    log_binom = special.gammaln(k + 1) - special.gammaln(j + 1) - special.gammaln(k - j + 1)
    with np.errstate(divide="ignore", invalid="ignore"):  # 0 * -inf where np.where discards
        log_q = math.log(q) if q > 0 else -math.inf
        log_1mq = math.log1p(-q) if q < 1 else -math.inf
        return log_binom + np.where(j > 0, j * log_q, 0.0) + np.where(j < k, (k - j) * log_1mq, 0.0)


@dataclasses.dataclass(frozen=True)
class MixturePair:
    """`P = sum_i exp(p_logw[i]) N(p_mu[i], sigma^2)`, `Q` likewise; `log(P/Q)` increasing."""

    sigma: float
    p_logw: np.ndarray
    p_mu: np.ndarray
    q_logw: np.ndarray
    q_mu: np.ndarray

    @property
    def span(self) -> tuple[float, float]:
        """The smallest and largest mean of either mixture."""
        means = np.concatenate([self.p_mu, self.q_mu])
        return float(means.min()), float(means.max())

    def _exponents(self, x, logw, mu) -> np.ndarray:
        # log(w_i) + (2 mu_i x - mu_i^2) / (2 sigma^2), one column per component
        x = np.asarray(x, dtype=np.float64)[..., None]
        return logw + (2.0 * mu * x - mu * mu) / (2.0 * self.sigma**2)

    def _log_ratio_part(self, x, logw, mu) -> np.ndarray:
        # log sum_i w_i exp((2 mu_i x - mu_i^2) / (2 sigma^2)) = log(mixture(x) / N(0)(x)).
        return _lse(self._exponents(x, logw, mu))

    def loss(self, x) -> np.ndarray:
        """The privacy loss `log(P(x) / Q(x))`."""
        return self._log_ratio_part(x, self.p_logw, self.p_mu) - self._log_ratio_part(
            x, self.q_logw, self.q_mu
        )

    def log_pdf(self, x, which: str = "p") -> np.ndarray:
        logw, mu = self._mixture(which)
        x = np.asarray(x, dtype=np.float64)[..., None]
        z = (x - mu) / self.sigma
        return _lse(logw - 0.5 * z * z) - math.log(self.sigma * math.sqrt(2 * math.pi))

    def _part_and_slope(self, x: np.ndarray, logw, mu) -> tuple[np.ndarray, np.ndarray]:
        # `_log_ratio_part` and its derivative in x (the softmax-weighted mean / sigma^2).
        z = self._exponents(x, logw, mu)
        top = np.max(z, axis=-1, keepdims=True)
        top = np.where(np.isfinite(top), top, 0.0)
        weights = np.exp(z - top)
        total = np.sum(weights, axis=-1)
        with np.errstate(divide="ignore"):
            return np.log(total) + top[..., 0], (weights @ mu) / (total * self.sigma**2)

    def x_of_loss(self, t: np.ndarray, lo: float, hi: float) -> np.ndarray:
        """The noise value in `[lo, hi]` whose privacy loss is `t` (clipped).

        The loss on a grid of 4097 noise values brackets each root; then Newton's method
        inside a bracket that every evaluation narrows (a bisection step wherever Newton's
        would leave it), to a relative step of 4e-16 or a loss within its rounding of `t`:
        the loss is smooth and increasing, so this takes a few evaluations where bisection
        from `[lo, hi]` takes ~55.
        """
        t = np.asarray(t, dtype=np.float64)
        shape, t = t.shape, t.ravel()
        grid = np.linspace(float(lo), float(hi), 4097)
        index = np.searchsorted(np.maximum.accumulate(self.loss(grid)), t, side="left")
        # loss(grid[index - 1]) < t <= loss(grid[index]); t beyond the ends: lo or hi
        a = grid[np.clip(index - 1, 0, len(grid) - 1)]
        b = grid[np.clip(index, 0, len(grid) - 1)]
        x = 0.5 * (a + b)
        active = np.flatnonzero(a < b)  # the roots not yet found
        for _ in range(200):
            if len(active) == 0:
                break
            xa, ta = x[active], t[active]
            part_p, slope_p = self._part_and_slope(xa, self.p_logw, self.p_mu)
            part_q, slope_q = self._part_and_slope(xa, self.q_logw, self.q_mu)
            f = (part_p - part_q) - ta
            below = f < 0
            aa = np.where(below, xa, a[active])
            ba = np.where(below, b[active], xa)
            slope = slope_p - slope_q
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                newton = xa - f / slope
            tol = 4e-16 * (2.0 * np.abs(xa) + 1e-300)
            # found: f at its rounding level, or a step or bracket below `tol`
            rounding = 4 * _EPS64 * (np.abs(part_p) + np.abs(part_q) + np.abs(ta))
            found = (np.abs(f) <= rounding) | (np.abs(newton - xa) <= tol) | (ba - aa <= tol)
            # strictly inside: a rounding-limited Newton step that bounces between the
            # bracket's ends bisects instead
            inside = np.isfinite(newton) & (slope > 0) & (newton > aa) & (newton < ba)
            x[active] = np.where(found, xa, np.where(inside, newton, 0.5 * (aa + ba)))
            a[active], b[active] = aa, ba
            active = active[~found]
        return x.reshape(shape)

    def _mixture(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        return (self.p_logw, self.p_mu) if which == "p" else (self.q_logw, self.q_mu)

    def cdf(self, x, which: str = "p") -> np.ndarray:
        """P(X <= x) for X ~ P (or Q: `which="q"`), accurate in the lower tail."""
        logw, mu = self._mixture(which)
        x = np.asarray(x, dtype=np.float64)[..., None]
        return np.sum(np.exp(logw) * special.ndtr((x - mu) / self.sigma), axis=-1)

    def sf(self, x, which: str = "p") -> np.ndarray:
        """P(X > x) for X ~ P (or Q: `which="q"`), accurate in the upper tail."""
        logw, mu = self._mixture(which)
        x = np.asarray(x, dtype=np.float64)[..., None]
        return np.sum(np.exp(logw) * special.ndtr((mu - x) / self.sigma), axis=-1)

    def tails(self, x: float, which: str = "p") -> tuple[float, float]:
        """`(cdf, sf)` at one point, each computed directly (pure Python: fast for scalars)."""
        logw, mu = self._mixture(which)
        scale = self.sigma * math.sqrt(2.0)
        low = high = 0.0
        for lw, m in zip(logw.tolist(), mu.tolist()):
            w = math.exp(lw)
            low += w * 0.5 * math.erfc((m - x) / scale)
            high += w * 0.5 * math.erfc((x - m) / scale)
        return low, high

    def log_cdf(self, x: float) -> float:
        return float(
            special.logsumexp(self.p_logw + special.log_ndtr((x - self.p_mu) / self.sigma))
        )

    def log_sf(self, x: float) -> float:
        return float(
            special.logsumexp(self.p_logw + special.log_ndtr((self.p_mu - x) / self.sigma))
        )

    def renyi(self, alpha: float) -> float:
        """`D_alpha(P || Q) = log(int P^alpha Q^(1-alpha)) / (alpha - 1)`, by quadrature.

        The log-integrand is located on a coarse grid, then integrated by the trapezoidal
        rule on a grid fine enough for its curvature (the integrand is smooth and decays
        like a Gaussian; the rule's error is far below float64 resolution of the result).
        """
        alpha = float(alpha)
        low, high = self.span
        width = max(abs(low), abs(high), high - low)
        sigma = self.sigma

        def log_f(x):
            return alpha * self.log_pdf(x, "p") + (1.0 - alpha) * self.log_pdf(x, "q")

        lo = low - alpha * width - 40.0 * sigma
        hi = high + alpha * width + 40.0 * sigma
        coarse_h = min(sigma / 4.0, (hi - lo) / 64.0)
        n_coarse = min(int(math.ceil((hi - lo) / coarse_h)) + 1, 2_000_001)
        xs = np.linspace(lo, hi, n_coarse)
        values = log_f(xs)
        top = float(np.max(values))
        if not math.isfinite(top):
            return math.inf
        alive = np.flatnonzero(values > top - 80.0)
        step = xs[1] - xs[0]
        a = float(xs[max(alive[0] - 2, 0)]) - step
        b = float(xs[min(alive[-1] + 2, len(xs) - 1)]) + step
        h = min(sigma / 64.0, sigma * sigma / (16.0 * max(width, 1e-12) * math.sqrt(alpha)))
        n_fine = int(min(max(math.ceil((b - a) / h), 64), 4_000_000)) + 1
        fine = np.linspace(a, b, n_fine)
        logs = log_f(fine)
        top = float(np.max(logs))
        weights = np.exp(logs - top)
        integral = float(np.sum(weights) - 0.5 * (weights[0] + weights[-1])) * (fine[1] - fine[0])
        return (top + math.log(integral)) / (alpha - 1.0)


@dataclasses.dataclass(frozen=True)
class RemovePair:
    """The add/remove pair of one example, `((1-q) N(0) + q N(1), N(0))`, noise std sigma.

    The same pair as `group_pair(sigma, q, 1, "remove")`, with closed forms for the loss's
    inverse and the mixture's tails (the accountants' default, so the fast one).
    """

    sigma: float
    q: float

    @property
    def span(self) -> tuple[float, float]:
        return 0.0, 1.0

    def _log_1mq(self) -> float:
        return math.log1p(-self.q) if self.q < 1 else -math.inf

    def loss(self, x) -> np.ndarray:
        """`log(1 - q + q exp((2x - 1) / (2 sigma^2)))`."""
        x = np.asarray(x, dtype=np.float64)
        return np.logaddexp(
            self._log_1mq(), math.log(self.q) + (2.0 * x - 1.0) / (2 * self.sigma**2)
        )

    def x_of_loss(self, t, lo: float, hi: float) -> np.ndarray:
        """The noise value whose loss is `t`, clipped to `[lo, hi]` (no cancellation)."""
        t = np.asarray(t, dtype=np.float64)
        if self.q == 1:
            z = t
        else:
            # exp(t) - (1 - q) = (1 - q) expm1(r) with r = t - log(1 - q) >= 0.
            r = t - math.log1p(-self.q)
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                log_expm1 = np.where(
                    r > 1.0, r + np.log1p(-np.exp(-np.maximum(r, 1.0))), np.log(np.expm1(r))
                )
            log_expm1 = np.where(r > 0, log_expm1, -np.inf)
            z = math.log1p(-self.q) - math.log(self.q) + log_expm1
        return np.clip(self.sigma**2 * z + 0.5, lo, hi)

    def log_pdf(self, x, which: str = "p") -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        base = -0.5 * (x / self.sigma) ** 2 - math.log(self.sigma * math.sqrt(2 * math.pi))
        if which != "p":
            return base
        one = -0.5 * ((x - 1.0) / self.sigma) ** 2 - math.log(self.sigma * math.sqrt(2 * math.pi))
        return np.logaddexp(self._log_1mq() + base, math.log(self.q) + one)

    def cdf(self, x, which: str = "p") -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        zero = special.ndtr(x / self.sigma)
        if which != "p":
            return zero
        return (1 - self.q) * zero + self.q * special.ndtr((x - 1) / self.sigma)

    def sf(self, x, which: str = "p") -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        zero = special.ndtr(-x / self.sigma)
        if which != "p":
            return zero
        return (1 - self.q) * zero + self.q * special.ndtr((1 - x) / self.sigma)

    def tails(self, x: float, which: str = "p") -> tuple[float, float]:
        """`(cdf, sf)` at one point, each computed directly (pure Python: fast for scalars)."""
        scale = self.sigma * math.sqrt(2.0)
        low, high = 0.5 * math.erfc(-x / scale), 0.5 * math.erfc(x / scale)
        if which != "p":
            return low, high
        low1, high1 = 0.5 * math.erfc((1.0 - x) / scale), 0.5 * math.erfc((x - 1.0) / scale)
        return (1 - self.q) * low + self.q * low1, (1 - self.q) * high + self.q * high1

    def log_cdf(self, x: float) -> float:
        low = self._log_1mq() + special.log_ndtr(x / self.sigma)
        return float(np.logaddexp(low, math.log(self.q) + special.log_ndtr((x - 1) / self.sigma)))

    def log_sf(self, x: float) -> float:
        low = self._log_1mq() + special.log_ndtr(-x / self.sigma)
        return float(np.logaddexp(low, math.log(self.q) + special.log_ndtr((1 - x) / self.sigma)))


def subsampled_gaussian_pair(sigma: float, q: float, neighboring: str, direction: str = "remove"):
    """The dominating pair of one step (see the module docstring).

    Args:
        sigma: noise multiplier > 0.
        q: sampling probability in (0, 1].
        neighboring: "add_or_remove" or "replace_one".
        direction: for add_or_remove, "remove" (`P` the data set with the example) or
            "add"; ignored for replace_one (symmetric).
    """
    return (
        group_pair(sigma, q, 1, direction)
        if neighboring == "add_or_remove"
        else (replace_one_pair(sigma, q))
    )


def replace_one_pair(sigma: float, q: float) -> MixturePair:
    """`((1-q) N(0) + q N(1), (1-q) N(0) + q N(-1))`, noise std sigma."""
    log_q = math.log(q)
    log_1mq = math.log1p(-q) if q < 1 else -math.inf
    logw = np.array([log_1mq, log_q])
    return MixturePair(sigma, logw, np.array([0.0, 1.0]), logw.copy(), np.array([0.0, -1.0]))


def group_pair(sigma: float, q: float, k: int, direction: str = "remove") -> MixturePair:
    """The pair of adding or removing a group of `k` examples (one user's), noise std sigma.

    "remove": `(sum_j Binom(k, q)(j) N(j), N(0))`; "add": `(N(0), sum_j Binom(k, q)(j) N(-j))`.
    """
    logw = _log_binomial_weights(int(k), q)
    keep = np.isfinite(logw)
    shifts = np.arange(k + 1, dtype=np.float64)[keep]
    logw = logw[keep]
    zero_w, zero_mu = np.zeros(1), np.zeros(1)
    if direction == "remove":
        return MixturePair(sigma, logw, shifts, zero_w, zero_mu)
    if direction == "add":
        return MixturePair(sigma, zero_w, zero_mu, logw, -shifts)
    raise ValueError(f"unknown direction {direction!r}")


def pair_rdp(sigma: float, q: float, orders, neighboring: str, group_size: int = 1) -> np.ndarray:
    """RDP per order of one step under `neighboring` (and groups of `group_size`).

    The maximum of both directions' Renyi divergences (one for replace_one, symmetric).
    """
    alphas = [float(a) for a in orders]
    if neighboring == "replace_one":
        pair = replace_one_pair(sigma, q)
        return np.array([pair.renyi(a) for a in alphas])
    remove = group_pair(sigma, q, group_size, "remove")
    add = group_pair(sigma, q, group_size, "add")
    return np.array([max(remove.renyi(a), add.renyi(a)) for a in alphas])
