"""One step's privacy loss on a lattice, three ways (numpy/scipy only).

The accountants compose the privacy loss `L(x) = log(P(x) / Q(x))`, `x ~ P`, of a
dominating pair `(P, Q)` of one step (`pairs.RemovePair`, `pairs.MixturePair`;
`L` is increasing in x). An FFT composes distributions on a lattice, so each
step's loss is first put on one, in one of three ways:

* `mean_preserving` (Gopi, Lee and Wutschitz 2021): cell masses at cell
  centres, the lattice shifted so that the discrete and continuous means
  agree. Neither an upper nor a lower bound by itself: the caller adds a
  Hoeffding margin, which grows as `sqrt(steps) * dt`.
* `connect_the_dots` (Doroshenko, Ghazi, Kamath, Kumar and Manurangsi 2022,
  "Connect the dots: tighter discrete approximations of privacy loss
  distributions"): the loss mass between two lattice points `t_k < t_(k+1)` is
  split between them so that both the P-mass and the Q-mass (`E_P[exp(-L)]`) of
  the cell are kept. Its hockey-stick curve is the chord interpolation (in
  `exp(epsilon)`) of the true convex curve through the lattice points, so the
  lattice pair **dominates** the step: composed, it gives upper bounds on
  delta(epsilon) with no margin at all, and its error shrinks as `dt^2`. On
  nested lattices (`dt` halved, same origin) the finer pair is dominated by the
  coarser one, so the upper bounds decrease as the lattice is refined.
* `merged_cells`: the output space is cut into cells whose losses lie within
  `dt / 2` of a lattice point, and each cell is merged into one outcome (a
  post-processing, so the merged pair is **dominated** by the step), whose
  loss `log(P(cell) / Q(cell))` is then rounded down onto a lattice (shifted by
  the offset that loses the least). Composed, it gives lower bounds on delta
  (and epsilon) with no margin.

Masses are differences of the mixtures' CDFs below their medians and of their
survival functions above them (no catastrophic cancellation in the tails); the
floating-point error of every difference is bounded and, where it matters,
moved to the conservative side (up in `connect_the_dots`, down in
`merged_cells`).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Protocol

import numpy as np
from scipy import integrate, optimize, special

__all__ = [
    "MAX_POINTS",
    "Lattice",
    "PRVFailure",
    "TooManyPoints",
    "connect_the_dots",
    "loss_range",
    "mean_preserving",
    "merged_cells",
]

# Largest lattice (float64 points) attempted, for one step or for the composition.
MAX_POINTS = 2**25
_EPS64 = float(np.finfo(np.float64).eps)
# Rounding of one CDF value (scipy's ndtr is accurate to a few ulp), with a margin.
_CDF_ULPS = 16 * _EPS64


class PRVFailure(ArithmeticError):
    """The numerical composition could not certify its bounds."""


class TooManyPoints(PRVFailure):
    """The mesh needs `points` (> `MAX_POINTS`) points: a coarser mesh would fit."""

    def __init__(self, what: str, points: int) -> None:
        super().__init__(f"the {what} privacy loss needs {points} points")
        self.points = points


class Pair(Protocol):
    """What the discretisations read of a dominating pair (see `pairs`)."""

    sigma: float

    @property
    def span(self) -> tuple[float, float]: ...

    def loss(self, x) -> np.ndarray: ...

    def x_of_loss(self, t, lo: float, hi: float) -> np.ndarray: ...

    def log_pdf(self, x, which: str = "p") -> np.ndarray: ...

    def cdf(self, x, which: str = "p") -> np.ndarray: ...

    def sf(self, x, which: str = "p") -> np.ndarray: ...

    def tails(self, x: float, which: str = "p") -> tuple[float, float]: ...

    def log_cdf(self, x: float) -> float: ...

    def log_sf(self, x: float) -> float: ...


@dataclasses.dataclass
class Lattice:
    """A distribution on a lattice: `pmf[k]` sits at `offset + (k - centre) * dt`."""

    pmf: np.ndarray
    centre: int
    offset: float

    def lowest(self, dt: float) -> float:
        return self.offset - self.centre * dt

    def highest(self, dt: float) -> float:
        return self.offset + (len(self.pmf) - 1 - self.centre) * dt

    @classmethod
    def at(cls, pmf: np.ndarray, first: float, dt: float) -> Lattice:
        """`pmf[k]` at `first + k * dt`, centred on its mean index."""
        centre = int(
            np.clip(round(float(pmf @ np.arange(len(pmf), dtype=np.float64))), 0, len(pmf) - 1)
        )
        return cls(pmf=pmf, centre=centre, offset=first + centre * dt)


def solve_bracketed(fun, lo: float, hi: float) -> float:
    """Root of an increasing or decreasing `fun` known to lie in [lo, hi] (up to rounding)."""
    pad = 1e-9 * (1.0 + abs(lo) + abs(hi))
    lo, hi = lo - pad, hi + pad
    flo, fhi = fun(lo), fun(hi)
    if flo == 0:
        return lo
    if fhi == 0:
        return hi
    if not (math.isfinite(flo) and math.isfinite(fhi)) or (flo > 0) == (fhi > 0):
        raise PRVFailure("could not bracket a quantile of the privacy loss")
    return float(optimize.brentq(fun, lo, hi, xtol=1e-13, rtol=4 * _EPS64, maxiter=200))


def _tail_points(pair: Pair, tail_mass: float) -> tuple[float, float]:
    """The noise values below and above which P has mass `tail_mass / 2` each."""
    half = 0.5 * tail_mass
    u0 = -float(special.ndtri(half))  # standard-normal upper quantile of `half`
    log_half = math.log(half)
    low, high = pair.span
    sigma = pair.sigma
    x_lo = solve_bracketed(
        lambda x: pair.log_cdf(x) - log_half, low - sigma * u0 - 1.0, high - sigma * u0 + 1.0
    )
    x_hi = solve_bracketed(
        lambda x: pair.log_sf(x) - log_half, low + sigma * u0 - 1.0, high + sigma * u0 + 1.0
    )
    return x_lo, x_hi


def loss_range(pair: Pair, tail_mass: float) -> tuple[float, float]:
    """The losses at the noise values that leave P-mass `tail_mass / 2` on either side."""
    x_lo, x_hi = _tail_points(pair, tail_mass)
    return float(pair.loss(x_lo)), float(pair.loss(x_hi))


def _median(pair: Pair, which: str) -> float:
    low, high = pair.span
    reach = 10.0 * pair.sigma + 1.0
    return solve_bracketed(
        lambda v: float(pair.cdf(v, which) - pair.sf(v, which)), low - reach, high + reach
    )


def _cell_masses(pair: Pair, x: np.ndarray, which: str) -> tuple[np.ndarray, np.ndarray]:
    """Masses (under P or Q) of the cells between the edges `x`, and a bound on their
    rounding errors. From the CDF below the median and the survival function above it."""
    n = len(x) - 1
    split = int(np.clip(np.searchsorted(x, _median(pair, which)), 0, n))
    low = pair.cdf(x[: split + 1], which)
    high = pair.sf(x[split:], which)
    masses = np.concatenate([np.diff(low), -np.diff(high)])
    error = _CDF_ULPS * np.concatenate([low[:-1] + low[1:], high[:-1] + high[1:]])
    return np.maximum(masses, 0.0), error


def _check_points(n: int) -> None:
    if n > MAX_POINTS:
        raise TooManyPoints("discretised", n)


# -- Gopi, Lee and Wutschitz: mean-preserving --------------------------------------------------
def mean_preserving(pair: Pair, dt: float, tail_mass: float) -> tuple[Lattice, float, float]:
    """Cell-centred discretisation on cells `a + k dt`, shifted to keep the mean.

    Drops the mass `tail_mass` (half on each side) outside the range and renormalises.
    Returns the lattice distribution, the mass actually dropped, and a bound on the
    difference between its mean and the continuous truncated mean.
    """
    x_lo, x_hi = _tail_points(pair, tail_mass)
    a = float(pair.loss(x_lo))
    b = float(pair.loss(x_hi))
    n = max(1, math.ceil((b - a) / dt))
    _check_points(n)
    x = pair.x_of_loss(a + dt * np.arange(n + 1, dtype=np.float64), x_lo, x_hi)
    x[0] = x_lo
    pmf, _ = _cell_masses(pair, x, "p")
    outside = float(pair.cdf(x[:1])[0] + pair.sf(x[-1:])[0])
    inside = float(pmf.sum())
    if not (inside > 0.5 and abs(inside + outside - 1.0) < 1e-9):
        raise PRVFailure("the discretised privacy loss does not have unit mass")
    pmf /= inside

    # The continuous mean of the truncated loss (an integral over the noise value) and the
    # shift that makes the discrete mean equal to it.
    low, high = pair.span
    lo_int = max(float(x[0]), low - 40.0 * pair.sigma - 1.0)
    hi_int = min(float(x[-1]), high + 40.0 * pair.sigma + 1.0)

    def integrand(v):
        return float(pair.loss(v) * math.exp(float(pair.log_pdf(v))))

    points = [p for p in (low, 0.5 * (low + high), high, 0.0) if lo_int < p < hi_int]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", integrate.IntegrationWarning)
        integral, abserr = integrate.quad(
            integrand,
            lo_int,
            hi_int,
            points=sorted(set(points)) or None,
            epsabs=0.0,
            epsrel=1e-13,
            limit=500,
        )
    mean_c = integral / (1.0 - outside)
    mean_index = float(pmf @ np.arange(n, dtype=np.float64))  # mean is a + (that + 1/2) dt
    shift = mean_c - (a + (mean_index + 0.5) * dt)
    mean_error = abserr / (1.0 - outside) + 8 * _EPS64 * (abs(a) + abs(b) + 1.0)
    if not (math.isfinite(shift) and abs(shift) <= dt):
        raise PRVFailure("the discrete mean differs from the continuous mean")
    centre = int(np.clip(round(mean_index), 0, n - 1))
    lattice = Lattice(pmf=pmf, centre=centre, offset=a + (centre + 0.5) * dt + shift)
    return lattice, outside, mean_error


# -- connect the dots: a dominating lattice pair -----------------------------------------------
def connect_the_dots(pair: Pair, dt: float, tail_mass: float) -> tuple[Lattice, float]:
    """The dominating lattice pair on the points `k * dt` (see the module docstring).

    The loss is truncated to `[L(x_lo), L(x_hi)]`, `x_lo` and `x_hi` leaving P-mass
    `tail_mass / 2` each side (dropped and renormalised: the caller charges it to delta by
    a coupling). Returns the lattice distribution (the P-masses of the points) and the mass
    dropped.
    """
    x_lo, x_hi = _tail_points(pair, tail_mass)
    a = float(pair.loss(x_lo))
    b = float(pair.loss(x_hi))
    k0 = math.floor(a / dt)
    k1 = max(math.ceil(b / dt), k0 + 1)
    _check_points(k1 - k0 + 1)
    t = dt * np.arange(k0, k1 + 1, dtype=np.float64)
    x = np.maximum.accumulate(pair.x_of_loss(t, x_lo, x_hi))
    x[0], x[-1] = x_lo, x_hi
    p_mass, p_err = _cell_masses(pair, x, "p")
    q_mass, q_err = _cell_masses(pair, x, "q")
    outside = float(pair.cdf(x[:1])[0] + pair.sf(x[-1:])[0])

    # Cell k lies between t_k and t_(k+1): P-mass `hi` goes up, `p - hi` down, with
    # p = lo + hi and Q-mass lo exp(-t_k) + hi exp(-t_(k+1)) = q, i.e.
    # hi = (p - exp(t_k) q) / (1 - exp(-dt)). Its rounding error is added (more mass up is
    # pessimistic: a larger loss).
    t_low = t[:-1]
    big = t_low > 700.0
    scale = np.exp(np.minimum(t_low, 700.0))
    excess = p_mass - scale * q_mass
    error = p_err + scale * q_err + 4 * _EPS64 * scale * q_mass
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = (excess + error) / (p_mass * -math.expm1(-dt))
    frac = np.where(big | ~np.isfinite(frac), 1.0, np.clip(frac, 0.0, 1.0))
    up = p_mass * frac
    pmf = np.zeros(len(t))
    pmf[:-1] += p_mass - up
    pmf[1:] += up
    inside = float(p_mass.sum())
    if not (inside > 0.5 and abs(inside + outside - 1.0) < 1e-9):
        raise PRVFailure("the discretised privacy loss does not have unit mass")
    pmf /= inside
    return Lattice.at(pmf, float(t[0]), dt), outside


# -- merged cells: a dominated lattice pair ----------------------------------------------------
# Most parts the walk of `merged_cells` solves one at a time (a Python loop).
MAX_EXACT_CELLS = 2**14


def merged_cells(
    pair: Pair, dt: float, tail_mass: float, budget: float = 0.0
) -> tuple[Lattice, float]:
    """The dominated lattice pair of a step (see the module docstring).

    The noise values are cut into intervals, each merged into one outcome (a
    post-processing, so the pair of the intervals' masses is dominated by the step), whose
    loss `log(P(part) / Q(part))` is then rounded *down* onto the lattice `t_0 + j dt`:

    * the bottom part: the noise values below the pile-up of loss at the bottom, if any
      (`_bottom_edge`); its loss is `t_0` (which fixes the lattice);
    * from there up, a walk: each part starts where the last ended and ends where its
      loss is exactly the first lattice point above its start (a root of the difference
      of the two CDFs), so rounding loses nothing;
    * above the point where it costs at most `budget / 2` in mean loss, cells centred on
      the lattice points, each rounded down (vectorised).

    Args:
        pair: the dominating pair of the step.
        dt: the lattice spacing.
        tail_mass: sizes the range of losses laid out (nothing is truncated).
        budget: the mean loss per step the centred cells may lose; 0 walks all the way
            (up to `MAX_EXACT_CELLS` parts).

    Returns:
        The lattice distribution and the mean loss that rounding down lost (`E[loss of
        the part - its lattice value]`), which sizes `dt`.
    """
    x_lo, x_hi = _tail_points(pair, tail_mass)
    a = float(pair.loss(x_lo))
    b = float(pair.loss(x_hi))
    x_bottom = _bottom_edge(pair, a, b, dt, x_lo, x_hi)
    p_bottom = float(pair.cdf(np.array([x_bottom]))[0])
    q_bottom = float(pair.cdf(np.array([x_bottom]), "q")[0])
    if not (p_bottom > 0 and q_bottom > 0):
        raise PRVFailure("the bottom of the merged privacy loss has no mass")
    t0 = math.log(p_bottom) - math.log(q_bottom)
    t0 -= 2 * _CDF_ULPS + 4 * _EPS64 * (1.0 + abs(t0))  # rounded down: never above its loss
    n = max(1, math.ceil((b - t0) / dt)) + 1
    if 8 * n > MAX_POINTS:  # 2n noise values and a dozen arrays of n: bounded memory
        raise TooManyPoints("merged", 8 * n)

    # Noise values at the losses t0 + k dt / 2: the lattice points (even k) and the edges
    # of the centred cells j = 1 .. n - 1 (odd k; cell j has index j - 1 below), which lie
    # between the losses t_j -+ dt / 2.
    halves = t0 + 0.5 * dt * np.arange(2 * n + 1, dtype=np.float64)
    x_half = np.maximum(np.maximum.accumulate(pair.x_of_loss(halves, x_lo, x_hi)), x_bottom)
    x = x_half[1::2].copy()
    x[-1] = np.inf
    pc, pe = _cell_masses(pair, x, "p")
    qc, qe = _cell_masses(pair, x, "q")
    value, index = _round_down(pc, qc, pe, qe, t0, dt, n)
    lost_centred = pc * (value - (t0 + index * dt))
    suffix = np.cumsum(lost_centred[::-1])[::-1]
    fine_enough = np.flatnonzero(suffix <= 0.5 * budget)
    # The walk covers the noise values from x_bottom to x[first]; centred cells after.
    first = int(fine_enough[0]) if len(fine_enough) else n - 1

    pmf = np.zeros(n)
    pmf[0] = p_bottom
    walk = _Walk(pair, t0, dt, x_half[0::2][:n])  # the points t_0 .. t_(n-1) of pmf
    parts, (p_rest, q_rest, pe_rest, qe_rest) = walk.run(x_bottom, float(x[first]))
    for j, mass in parts:
        pmf[j] += mass
    lost = 0.0
    if p_rest > 0:  # the end of the walk that no lattice point fits: rounded down
        value_rest, index_rest = _round_down(
            np.array([p_rest]),
            np.array([q_rest]),
            np.array([pe_rest]),
            np.array([qe_rest]),
            t0,
            dt,
            n,
        )
        pmf[int(index_rest[0])] += p_rest
        lost += p_rest * float(value_rest[0] - (t0 + index_rest[0] * dt))
    after = slice(first, None)
    np.add.at(pmf, index[after], pc[after])
    lost += float(lost_centred[after].sum())
    total = float(pmf.sum())
    if not abs(total - 1.0) < 1e-9:
        raise PRVFailure("the merged privacy loss does not have unit mass")
    pmf /= total
    return Lattice.at(pmf, t0, dt), lost / total


class _Walk:
    """The exact parts of `merged_cells`: P-mass with loss exactly on the lattice.

    `points[j]` is the noise value whose loss is the lattice point `t0 + j dt`.
    """

    def __init__(self, pair: Pair, t0: float, dt: float, points: np.ndarray) -> None:
        self.pair, self.t0, self.dt = pair, t0, dt
        self.points = points
        self.medians = {which: _median(pair, which) for which in ("p", "q")}

    def _tails(self, x: float) -> tuple:
        """`(cdf, sf)` of P and of Q at x."""
        if x == math.inf:
            return (1.0, 0.0), (1.0, 0.0)
        return self.pair.tails(x, "p"), self.pair.tails(x, "q")

    def _mass(self, lo: tuple, hi: tuple, lo_x: float, hi_x: float, which: int) -> tuple:
        """Mass between two points from their `_tails` (0: P, 1: Q), and its rounding error:
        differences of CDFs below the median, of survival functions above it."""
        median = self.medians["pq"[which]]
        low, high = lo[which], hi[which]
        if hi_x <= median:
            return high[0] - low[0], _CDF_ULPS * (high[0] + low[0])
        if lo_x >= median:
            return low[1] - high[1], _CDF_ULPS * (high[1] + low[1])
        return 1.0 - low[0] - high[1], _CDF_ULPS * (1.0 + low[0] + high[1])

    def _excess(self, x_l: float, tails_l: tuple, x: float, scale: float) -> float:
        """`P - exp(t) Q` of `(x_l, x]`, minus its rounding error (never above the truth)."""
        tails = self._tails(x)
        p, p_err = self._mass(tails_l, tails, x_l, x, 0)
        q, q_err = self._mass(tails_l, tails, x_l, x, 1)
        return p - scale * q - p_err - scale * q_err - 4 * _EPS64 * (p + scale * q)

    def _excess_at(self, x: float, x_l: float, tails_l: tuple, scale: float) -> float:
        return self._excess(x_l, tails_l, x, scale)

    def run(self, start: float, stop: float) -> tuple[list, tuple]:
        """Parts from `start` to `stop`: `[(lattice index, P-mass)]` and the
        `(p, q, p error, q error)` masses of what is left before `stop`."""
        pair, t0, dt, points = self.pair, self.t0, self.dt, self.points
        parts: list[tuple[int, float]] = []
        x_l, tails_l = start, self._tails(start)
        last = len(points) - 1
        for _ in range(MAX_EXACT_CELLS):
            if not x_l < stop:
                break
            j = max(1, math.ceil((float(pair.loss(x_l)) - t0) / dt))
            t = t0 + j * dt
            if t > 700.0 or j > last:
                break
            scale = math.exp(t)
            if not self._excess(x_l, tails_l, stop, scale) > 0:
                break  # not enough above t_j to lift what starts at x_l: left over
            # The part ends where its loss is t_j: past the point of loss t_j, within the
            # first lattice point (2, 4, 8, ... above) where the excess is positive.
            x_t = min(max(float(points[j]), x_l), stop)
            if self._excess(x_l, tails_l, x_t, scale) > 0:
                x_r = x_t
            else:
                reach, x_hi = 2, stop
                while j + reach <= last and float(points[j + reach]) < stop:
                    if self._excess(x_l, tails_l, float(points[j + reach]), scale) > 0:
                        x_hi = float(points[j + reach])
                        break
                    x_t = float(points[j + reach])
                    reach *= 2
                step = pair.sigma
                while x_hi == math.inf:  # beyond the last lattice point: a finite bracket
                    candidate = x_t + step
                    if self._excess(x_l, tails_l, candidate, scale) > 0:
                        x_hi = candidate
                    else:
                        x_t, step = candidate, 2 * step
                x_r = float(
                    optimize.brentq(
                        self._excess_at,
                        x_t,
                        x_hi,
                        args=(x_l, tails_l, scale),
                        xtol=1e-15,
                        rtol=4 * _EPS64,
                        maxiter=200,
                    )
                )
                # brentq returns a point within tolerance of the root: step to where the
                # (safe) excess is positive, so that the part's loss is at least t_j.
                step = 1e-15 + 4 * _EPS64 * abs(x_r)
                while not self._excess(x_l, tails_l, x_r, scale) > 0 and x_r < x_hi:
                    x_r = min(x_hi, x_r + step)
                    step *= 2
            tails_r = self._tails(x_r)
            p, _ = self._mass(tails_l, tails_r, x_l, x_r, 0)
            parts.append((j, p))
            x_l, tails_l = x_r, tails_r
        tails_stop = self._tails(stop)
        p, p_err = self._mass(tails_l, tails_stop, x_l, stop, 0)
        q, q_err = self._mass(tails_l, tails_stop, x_l, stop, 1)
        return parts, (max(p, 0.0), max(q, 0.0), p_err, q_err)


def _bottom_edge(pair: Pair, a: float, b: float, dt: float, x_lo: float, x_hi: float) -> float:
    """Where the bottom part of `merged_cells` ends: above the pile-up of loss at the
    bottom, if any (where the loss's mass per cell of `dt` falls by more than half from
    one cell to the next, the recursion above could not lift the cells below to their
    lattice points), and at least `dt / 2` above the lowest loss."""
    count = int(min(4096, max(2, math.ceil((b - a) / dt))))
    x = pair.x_of_loss(a + dt * np.arange(count + 1, dtype=np.float64), x_lo, x_hi)
    x = np.concatenate([[-np.inf], np.maximum.accumulate(x)[1:]])
    mass, _ = _cell_masses(pair, x, "p")
    steady = np.flatnonzero(mass[1:] >= 0.5 * mass[:-1])
    cells = int(steady[0]) + 1 if len(steady) else count
    loss = a + 0.5 * dt if cells <= 1 else a + cells * dt
    return float(pair.x_of_loss(np.array([loss]), x_lo, x_hi)[0])


def _round_down(p, q, pe, qe, t0: float, dt: float, points: int) -> tuple[np.ndarray, np.ndarray]:
    """The merged losses of parts with masses `p`, `q` (errors `pe`, `qe`), lowered by
    their rounding errors (to t0 at the least: every part lies above the bottom part), and
    the indices of the lattice points `t0 + j dt` at or below them (`0 <= j < points`; a
    part with Q-mass 0 goes to the top point)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        value = np.log(p) - np.log(q)
        value -= pe / p + qe / q + 4 * _EPS64 * (1.0 + np.abs(value))
    # Every part lies above x_bottom, where the loss is at least t0: a value below t0 is
    # the error margin swamping a tiny (or cancelled) mass, and t0 is still safe.
    value = np.maximum(value, t0)
    top = t0 + (points - 1) * dt
    value = np.where(np.isnan(value), t0, np.minimum(value, top))
    index = np.floor((value - t0) / dt).astype(np.int64)
    index -= (t0 + index * dt > value).astype(np.int64)  # rounding of the division
    index = np.clip(index, 0, points - 1)
    return np.maximum(value, t0 + index * dt), index
