"""PRV accounting: numerical composition of privacy random variables (numpy/scipy only).

The privacy random variable (PRV) of one DP-SGD step is the privacy loss
`Y = log(mu(X) / mu_0(X))` with `X ~ mu`, where `mu_0 = N(0, sigma^2)` and
`mu = (1 - q) N(0, sigma^2) + q N(1, sigma^2)` (Poisson sampling with rate `q`,
Gaussian noise of std `sigma` relative to the clipping norm, add/remove
adjacency; the same PRV as `prv_accountant.PoissonSubsampledGaussianMechanism`,
the "remove" pair that dominates DP-SGD). For a history of `N_j` steps of
events `(sigma_j, q_j)`, the composed loss is `S = sum of independent copies`
and the mechanism is (epsilon, delta)-DP with
`delta(epsilon) = E[(1 - exp(epsilon - S))_+]`.

The algorithm follows Gopi, Lee and Wutschitz 2021 ("Numerical composition of
differential privacy"), with the same mesh and error guarantees as the
`prv_accountant` package, but a faster and more robust implementation:

1. Truncation. Each `Y_j` is restricted to `[a_j, b_j]`, exact quantiles of its
   closed-form distribution, leaving a mass `tau_j` outside; by a coupling the
   composition changes delta by at most `delta_trunc = sum_j N_j tau_j`.
2. Mean-preserving discretisation on the mesh
   `dt = eps_error / sqrt(N / 2 * log(12 / delta_error))` (cell masses from the
   mixture CDF in float64 with no cancellation in the tails, and the grid
   shifted so that the discrete and continuous means agree). By Hoeffding the
   discretised sum stays within `h = eps_error` of the continuous one except
   with probability `delta_h = exp(-2 h^2 / (N dt^2)) = delta_error / 12`
   per side.
3. Exponential tilting. The discrete PRVs are tilted by `exp(theta y)`, with
   `theta` the exponent of the Chernoff bound on `delta(e)` at the requested
   delta, so that the composed tail around epsilon carries most of the tilted
   mass: float64 then resolves delta with relative (not absolute) precision,
   which keeps small deltas (1e-10 ... 1e-50) accurate. The computed pmf is
   tilted back exactly (`log E[exp(theta S)]` is known).
4. Composition in the Fourier domain on an FFT-friendly length
   (`scipy.fft.next_fast_len`): one `rfft` per distinct event, the `N_j`
   self-compositions as the pointwise power `exp(N_j log F_j)` (only where it
   does not underflow), different events multiplied (exact heterogeneous
   composition), one `irfft`.
5. The window of the circular convolution comes from Chernoff bounds computed
   from the (tilted) discrete distributions themselves (block cumulant
   generating functions plus Hoeffding's lemma inside each block), so the mass
   outside it, `tau` per side, is certified rather than guessed. At a point
   `e`, that mass and the floating-point noise of the FFT (propagated from the
   per-coefficient rounding through the powers, by Parseval, with a safety
   factor of 8) cost at most `gamma(e) * (2 tau + noise)` in delta, where
   `gamma(e) = E[exp(theta S)] exp(-theta e)`.
6. Epsilon bounds: with `slack = delta_h + delta_trunc + gamma * (2 tau +
   noise)`, the upper bound solves `delta_computed(e) = delta - slack` and adds
   `h`; the lower bound solves `delta_computed(e) = delta + slack` and
   subtracts `h`; the estimate solves `delta_computed(e) = delta`. The total
   slack must fit in `delta_error` (the package uses `delta - delta_error`
   for its upper bound), so the bounds are at least as tight as the package's.

Accuracy. With a fixed `eps_error` the bracket `upper - lower` is about
`2 * eps_error`. The default (`eps_error=None`) is relative: a coarse pass
(`eps_error` 5% of a quick RDP bound) finds the estimate, then passes with the
mesh that `max(ABS_ERROR, REL_ERROR * epsilon)` needs run until the certified
bracket fits in it (at most four passes; each result is valid, the tightest is
kept). A one-step history is not composed at all (no FFT, no rounding noise).
For the other neighbouring relations (`pairs.MixturePair`) every direction is
computed the same way and the largest epsilon reported; a direction whose upper
bound is below another's lower bound is not refined.

If the numerical composition fails (an exception, non-finite or inconsistent
bounds, a domain too large for memory, or a delta so small that floating-point
noise dominates), it is retried with a wider domain and then, as a last
resort, the accountant warns and reports the (looser, still valid) upper bound
of the RDP accountant for the same history.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings

import numpy as np
from scipy import fft as sp_fft
from scipy import integrate, optimize, special

from torchdp_keras._validation import check_positive
from torchdp_keras.accounting import pairs as _pairs
from torchdp_keras.accounting.base import Accountant, check_delta
from torchdp_keras.errors import DPConfigError

__all__ = ["ABS_ERROR", "REL_ERROR", "PRVAccountant"]

# The default accuracy: the reported upper bound is at most about max(ABS_ERROR,
# REL_ERROR * epsilon) above the true epsilon (see `PRVAccountant`).
REL_ERROR = 0.01
ABS_ERROR = 0.001
# Fraction of that accuracy aimed at when sizing the mesh (the bracket comes out a little
# wider than 2 * eps_error).
_SAFETY = 0.9

# Largest FFT length (float64 points) attempted before giving up on the PRV path.
_MAX_POINTS = 2**25
# exp() of anything below this is 0 in float64 (with a margin).
_LOG_UNDERFLOW = -760.0
# Chernoff exponents tried when sizing the composed window.
_LAMBDAS = np.geomspace(1e-4, 1e5, 97)
_EPS64 = float(np.finfo(np.float64).eps)


class _PRVFailure(ArithmeticError):
    """The numerical composition could not certify its bounds."""


class _TooManyPoints(_PRVFailure):
    """The mesh needs `points` (> `_MAX_POINTS`) points: a coarser mesh would fit."""

    def __init__(self, what: str, points: int) -> None:
        super().__init__(f"the {what} privacy loss needs {points} points")
        self.points = points


# -- the PRV of one step ---------------------------------------------------------------------
def _log_1mq(q: float) -> float:
    return math.log1p(-q) if q < 1 else -math.inf


def _loss(x, sigma: float, q: float):
    """Privacy loss `log(1 - q + q exp((2x - 1) / (2 sigma^2)))` at the noise value x."""
    return np.logaddexp(_log_1mq(q), math.log(q) + (2.0 * np.asarray(x) - 1.0) / (2 * sigma**2))


def _x_of_loss(t: np.ndarray, sigma: float, q: float) -> np.ndarray:
    """Inverse of `_loss`: the noise value whose privacy loss is `t` (-inf at the bottom)."""
    if q == 1:
        z = t
    else:
        # exp(t) - (1 - q) = (1 - q) expm1(r) with r = t - log(1 - q) >= 0; no cancellation.
        r = t - math.log1p(-q)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_expm1 = np.where(
                r > 1.0, r + np.log1p(-np.exp(-np.maximum(r, 1.0))), np.log(np.expm1(r))
            )
        log_expm1 = np.where(r > 0, log_expm1, -np.inf)
        z = math.log1p(-q) - math.log(q) + log_expm1
    return sigma**2 * z + 0.5


def _cdf_x(x: np.ndarray, sigma: float, q: float) -> np.ndarray:
    """P(X <= x) under the mixture (accurate in the lower tail)."""
    return (1 - q) * special.ndtr(x / sigma) + q * special.ndtr((x - 1) / sigma)


def _sf_x(x: np.ndarray, sigma: float, q: float) -> np.ndarray:
    """P(X > x) under the mixture (accurate in the upper tail)."""
    return (1 - q) * special.ndtr(-x / sigma) + q * special.ndtr((1 - x) / sigma)


def _log_cdf_x(x: float, sigma: float, q: float) -> float:
    low = _log_1mq(q) + special.log_ndtr(x / sigma)
    return float(np.logaddexp(low, math.log(q) + special.log_ndtr((x - 1) / sigma)))


def _log_sf_x(x: float, sigma: float, q: float) -> float:
    low = _log_1mq(q) + special.log_ndtr(-x / sigma)
    return float(np.logaddexp(low, math.log(q) + special.log_ndtr((1 - x) / sigma)))


def _solve_bracketed(fun, lo: float, hi: float) -> float:
    """Root of an increasing or decreasing `fun` known to lie in [lo, hi] (up to rounding)."""
    pad = 1e-9 * (1.0 + abs(lo) + abs(hi))
    lo, hi = lo - pad, hi + pad
    flo, fhi = fun(lo), fun(hi)
    if flo == 0:
        return lo
    if fhi == 0:
        return hi
    if not (math.isfinite(flo) and math.isfinite(fhi)) or (flo > 0) == (fhi > 0):
        raise _PRVFailure("could not bracket a quantile of the privacy loss")
    return float(optimize.brentq(fun, lo, hi, xtol=1e-13, rtol=4 * _EPS64, maxiter=200))


@dataclasses.dataclass
class _Lattice:
    """A distribution on a lattice: `pmf[k]` sits at `offset + (k - centre) * dt`."""

    pmf: np.ndarray
    centre: int
    offset: float

    def lowest(self, dt: float) -> float:
        return self.offset - self.centre * dt

    def highest(self, dt: float) -> float:
        return self.offset + (len(self.pmf) - 1 - self.centre) * dt


def _discretise(
    sigma: float, q: float, dt: float, tail_mass: float
) -> tuple[_Lattice, float, float]:
    """Mean-preserving cell-centred discretisation of one step's PRV.

    Drops the mass `tail_mass` (half on each side) outside the discretised range and
    renormalises. Returns the lattice distribution, the mass actually dropped, and a
    bound on the difference between its mean and the continuous truncated mean.
    """
    half = 0.5 * tail_mass
    u0 = -float(special.ndtri(half))  # standard-normal upper quantile of `half`
    log_half = math.log(half)
    x_lo = _solve_bracketed(
        lambda x: _log_cdf_x(x, sigma, q) - log_half, -sigma * u0, -sigma * u0 + 1
    )
    x_hi = _solve_bracketed(lambda x: _log_sf_x(x, sigma, q) - log_half, sigma * u0, sigma * u0 + 1)
    a = float(_loss(x_lo, sigma, q))
    b = float(_loss(x_hi, sigma, q))
    n = max(1, math.ceil((b - a) / dt))
    if n > _MAX_POINTS:
        raise _TooManyPoints("discretised", n)

    edges = a + dt * np.arange(n + 1, dtype=np.float64)
    x = _x_of_loss(edges, sigma, q)
    x_med = _solve_bracketed(lambda v: _log_cdf_x(v, sigma, q) - _log_sf_x(v, sigma, q), 0.0, 1.0)
    pmf, outside = _cell_masses(
        x, x_med, lambda v: _cdf_x(v, sigma, q), lambda v: _sf_x(v, sigma, q)
    )

    # Continuous mean of the truncated PRV (integral over the noise value) and the shift that
    # makes the discrete mean equal to it.
    lo_int = max(float(x[0]), -40.0 * sigma - 1.0)
    hi_int = min(float(x[-1]), 40.0 * sigma + 2.0)
    norm = 1.0 / (sigma * math.sqrt(2 * math.pi))

    def integrand(v):
        zero, one = v / sigma, (v - 1) / sigma
        density = norm * ((1 - q) * math.exp(-0.5 * zero**2) + q * math.exp(-0.5 * one**2))
        return float(_loss(v, sigma, q)) * density

    points = [p for p in (0.0, 0.5, 1.0) if lo_int < p < hi_int]
    return _mean_preserving(pmf, outside, a, b, dt, integrand, lo_int, hi_int, points)


def _cell_masses(x: np.ndarray, x_med: float, cdf, sf) -> tuple[np.ndarray, float]:
    """Masses of the cells between the edges `x` (renormalised) and the mass outside them.

    From the CDF below the median `x_med` and the survival function above it: no
    catastrophic cancellation in either tail.
    """
    n = len(x) - 1
    split = int(np.clip(np.searchsorted(x, x_med), 0, n))
    pmf = np.empty(n, dtype=np.float64)
    pmf[:split] = np.diff(cdf(x[: split + 1]))
    pmf[split:] = -np.diff(sf(x[split:]))
    np.maximum(pmf, 0.0, out=pmf)
    outside = float(cdf(x[:1])[0] + sf(x[-1:])[0])
    inside = float(pmf.sum())
    if not (inside > 0.5 and abs(inside + outside - 1.0) < 1e-9):
        raise _PRVFailure("the discretised privacy loss does not have unit mass")
    pmf /= inside
    return pmf, outside


def _mean_preserving(
    pmf: np.ndarray,
    outside: float,
    a: float,
    b: float,
    dt: float,
    integrand,
    lo_int,
    hi_int,
    points,
) -> tuple[_Lattice, float, float]:
    """The lattice of `pmf` on cells `a + k dt`, shifted so that its mean is the continuous one.

    The continuous mean of the truncated loss is `integrand`'s integral over the noise
    value; returns the lattice, the mass outside, and a bound on the mean's error.
    """
    n = len(pmf)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", integrate.IntegrationWarning)
        integral, abserr = integrate.quad(
            integrand, lo_int, hi_int, points=points or None, epsabs=0.0, epsrel=1e-13, limit=500
        )
    mean_c = integral / (1.0 - outside)
    mean_index = float(pmf @ np.arange(n, dtype=np.float64))  # mean is a + (that + 1/2) dt
    shift = mean_c - (a + (mean_index + 0.5) * dt)
    mean_error = abserr / (1.0 - outside) + 8 * _EPS64 * (abs(a) + abs(b) + 1.0)
    if not (math.isfinite(shift) and abs(shift) <= dt):
        raise _PRVFailure("the discrete mean differs from the continuous mean")
    centre = int(np.clip(round(mean_index), 0, n - 1))
    lattice = _Lattice(pmf=pmf, centre=centre, offset=a + (centre + 0.5) * dt + shift)
    return lattice, outside, mean_error


def _discretise_pair(pair, dt: float, tail_mass: float) -> tuple[_Lattice, float, float]:
    """`_discretise` for the privacy loss of a `pairs.MixturePair` (other neighbouring
    relations, groups): the same truncation, mean-preserving discretisation and guarantees,
    with the pair's mixture CDFs and a bisection for the inverse of its increasing loss."""
    sigma = pair.sigma
    half = 0.5 * tail_mass
    u0 = -float(special.ndtri(half))
    log_half = math.log(half)
    p_lo, p_hi = float(pair.p_mu.min()), float(pair.p_mu.max())
    x_lo = _solve_bracketed(
        lambda x: pair.log_cdf(x) - log_half, p_lo - sigma * u0 - 0.5, p_hi - sigma * u0 + 0.5
    )
    x_hi = _solve_bracketed(
        lambda x: pair.log_sf(x) - log_half, p_lo + sigma * u0 - 0.5, p_hi + sigma * u0 + 0.5
    )
    a = float(pair.loss(x_lo))
    b = float(pair.loss(x_hi))
    n = max(1, math.ceil((b - a) / dt))
    if n > _MAX_POINTS:
        raise _TooManyPoints("discretised", n)

    edges = a + dt * np.arange(n + 1, dtype=np.float64)
    x = pair.x_of_loss(edges, x_lo, x_hi)  # the last edge may be clipped to x_hi
    x[0] = x_lo
    x_med = _solve_bracketed(lambda v: pair.log_cdf(v) - pair.log_sf(v), p_lo - 1.0, p_hi + 1.0)
    pmf, outside = _cell_masses(x, x_med, pair.cdf, pair.sf)

    lo_int = max(float(x[0]), p_lo - 40.0 * sigma - 1.0)
    hi_int = min(float(x[-1]), p_hi + 40.0 * sigma + 1.0)

    def integrand(v):
        return float(pair.loss(v) * math.exp(float(pair.log_pdf(v))))

    means = np.unique(np.concatenate([pair.p_mu, pair.q_mu, 0.5 * pair.p_mu, 0.5 * pair.q_mu]))
    points = [float(p) for p in means if lo_int < p < hi_int]
    return _mean_preserving(pmf, outside, a, b, dt, integrand, lo_int, hi_int, points)


def _tilt(dist: _Lattice, theta: float, dt: float) -> tuple[_Lattice, float]:
    """The exponentially tilted distribution `pmf * exp(theta * value) / Z` and `log Z`."""
    rel = np.arange(len(dist.pmf), dtype=np.float64) - dist.centre
    log_w = theta * dt * rel
    top = float(log_w[-1])
    weights = dist.pmf * np.exp(log_w - top)
    total = float(weights.sum())
    if not (total > 0 and math.isfinite(total)):
        raise _PRVFailure("could not tilt the discretised privacy loss")
    weights /= total
    mean_rel = float(weights @ rel)
    centre = int(np.clip(dist.centre + round(mean_rel), 0, len(weights) - 1))
    tilted = _Lattice(weights, centre, dist.offset + (centre - dist.centre) * dt)
    return tilted, math.log(total) + top + theta * dist.offset


def _blocks(dist: _Lattice, dt: float, block: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Block masses and means of `dist`, for upper bounds on its cumulant generating function.

    Returns `(values, log_masses, width)`: with Hoeffding's lemma inside each block,
    `log E[exp(l Y)] <= logsumexp(l * values + log_masses) + l^2 width^2 / 8`.
    """
    n = len(dist.pmf)
    block = max(1, min(block, n))
    nb = -(-n // block)
    mass = np.zeros(nb * block)
    mass[:n] = dist.pmf
    rel = np.zeros(nb * block)
    rel[:n] = np.arange(n, dtype=np.float64) - dist.centre
    grid = mass.reshape(nb, block)
    first = (grid * rel.reshape(nb, block)).sum(axis=1)
    mass = grid.sum(axis=1)
    keep = mass > 0
    values = dist.offset + dt * first[keep] / mass[keep]
    return values, np.log(mass[keep]), (block - 1) * dt


def _cgf_bound(blocks, counts, lambdas: np.ndarray) -> np.ndarray:
    """Upper bound on the cumulant generating function of the sum, at each lambda."""
    total = np.zeros(len(lambdas))
    for (values, log_mass, width), n_steps in zip(blocks, counts):
        out = np.empty(len(lambdas))
        step = max(1, 2_000_000 // max(1, len(values)))
        for i in range(0, len(lambdas), step):
            lam = lambdas[i : i + step, None]
            out[i : i + step] = special.logsumexp(lam * values[None, :] + log_mass, axis=1)
        total += n_steps * (out + lambdas**2 * width**2 / 8)
    return total


def _window(blocks, counts, tau: float, support: tuple[float, float]) -> tuple[float, float]:
    """Values `(lo, hi)` with P(S < lo) <= tau and P(S > hi) <= tau (Chernoff bounds)."""
    log_tau = math.log(tau)
    up = _cgf_bound(blocks, counts, _LAMBDAS)
    down = _cgf_bound(blocks, counts, -_LAMBDAS)
    with np.errstate(invalid="ignore", over="ignore"):
        hi = float(np.nanmin((up - log_tau) / _LAMBDAS))
        lo = float(np.nanmax((log_tau - down) / _LAMBDAS))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise _PRVFailure("could not bound the tails of the composed privacy loss")
    return max(lo, support[0]), min(hi, support[1])


def _compose(dists, counts, dt: float, lo: float, hi: float):
    """Circular FFT composition on a window covering [lo, hi].

    Returns `(pmf, first value, noise)` where `noise` bounds the floating-point error of
    any partial sum of `pmf` (propagated from the per-coefficient FFT rounding, amplified
    by the powers, with a safety factor of 8).
    """
    if len(dists) == 1 and counts[0] == 1:
        # One step: nothing to compose, and no FFT rounding (which, amplified by the tilt,
        # would dominate a tiny delta's slack as the mesh gets finer).
        return dists[0].pmf.copy(), dists[0].lowest(dt), 0.0
    base = sum(n * d.offset for d, n in zip(dists, counts))
    k_lo = math.floor((lo - base) / dt)
    k_hi = math.ceil((hi - base) / dt)
    m_min = k_hi - k_lo + 1
    if m_min > _MAX_POINTS:
        raise _TooManyPoints("composed", m_min)
    m = int(sp_fft.next_fast_len(max(m_min, 16), real=True))
    log2m = math.log2(m)

    n_freq = m // 2 + 1  # the length of rfft's output
    keep = np.arange(n_freq)
    log_mag = np.zeros(n_freq)
    phase = np.zeros(n_freq)
    rel_err = np.zeros(n_freq)
    for dist, n_steps in zip(dists, counts):
        size = len(dist.pmf)
        arr: np.ndarray
        if size <= m:  # index `centre` goes to position 0
            arr = np.zeros(m)
            arr[: size - dist.centre] = dist.pmf[dist.centre :]
            arr[m - dist.centre :] = dist.pmf[: dist.centre]
        else:  # the single-step range is wider than the window: fold it
            idx = (np.arange(size) - dist.centre) % m
            arr = np.bincount(idx, weights=dist.pmf, minlength=m)
        coef_err = _EPS64 * (2 * log2m + 8) * float(np.sqrt(dist.pmf @ dist.pmf))
        spec = sp_fft.rfft(arr, workers=-1)
        del arr
        values = spec[keep] / spec[0].real  # exact unit mass: G[0] = 1
        del spec
        with np.errstate(divide="ignore", over="ignore"):
            log_abs2 = np.log(values.real**2 + values.imag**2)
            rel_err += n_steps * coef_err * np.exp(-0.5 * log_abs2)
        log_mag += n_steps * 0.5 * log_abs2
        phase += n_steps * np.angle(values)
        alive = log_mag > _LOG_UNDERFLOW
        keep, log_mag, phase, rel_err = keep[alive], log_mag[alive], phase[alive], rel_err[alive]

    magnitude = np.exp(log_mag)
    spectrum = np.zeros(n_freq, dtype=np.complex128)
    spectrum[keep] = magnitude * (np.cos(phase) + 1j * np.sin(phase))
    pmf = sp_fft.irfft(spectrum, n=m, workers=-1)
    pmf = np.roll(pmf, -(k_lo % m))

    # Parseval: a partial sum of the output errs by at most the l2 norm of the spectrum error
    # (both halves of the Hermitian spectrum), plus the rounding of the inverse transform.
    rel_err += _EPS64 * (np.abs(log_mag) + np.abs(phase) + 8)
    weight = np.where((keep == 0) | (2 * keep == m), 1.0, 2.0)
    spectrum_err = math.sqrt(float(np.sum(weight * (magnitude * rel_err) ** 2)))
    spectrum_norm = math.sqrt(float(np.sum(weight * magnitude**2)))
    noise = 8 * (spectrum_err + _EPS64 * (log2m + 4) * spectrum_norm)
    return pmf, base + k_lo * dt, noise


class _Delta:
    """The delta curve of a composed lattice pmf, `delta(e) = sum_{t > e} p_t (1 - exp(e - t))`.

    `pmf` sits on the grid `t0 + i dt`. Only values to the right of a solution need to be
    accurate (the far left of `pmf` may be noise amplified by the tilt). `complete` says
    whether `pmf` holds all the mass; if not, solutions left of `t0` are refused (or
    reported as -inf for a lower bound).
    """

    def __init__(self, pmf: np.ndarray, t0: float, dt: float, complete: bool = True):
        self.pmf, self.t0, self.dt, self.complete = pmf, t0, dt, complete
        self.tail = np.cumsum(pmf[::-1])[::-1]  # mass at indices >= i
        self._start: int | None = None

    def _prepare(self, start: int) -> None:
        # delta(t_i) = tail[i] - exp(t_i - t_start) * weighted[i]; beyond 700 the weights of
        # exp(-(t - t_start)) underflow, so the slice stops there.
        stop = min(len(self.pmf), start + math.ceil(700.0 / self.dt))
        t_rel = self.dt * np.arange(stop - start, dtype=np.float64)
        weighted = np.cumsum((self.pmf[start:stop] * np.exp(-t_rel))[::-1])[::-1]
        self._start, self._t_rel, self._weighted = start, t_rel, weighted
        self._grid = self.tail[start:stop] - np.exp(t_rel) * weighted

    def solve(self, target: float, side: int) -> float:
        """Smallest e with delta(e) <= target; `side` picks the conservative end of a
        degenerate cell: +1 upper bound, -1 lower bound, 0 estimate."""
        if not target > 0:
            raise _PRVFailure("non-positive delta target")
        # The solution lies above t(2 target) - log 2 (there delta >= tail(t) / 2 >= target).
        above = np.flatnonzero(self.tail >= 2.0 * target)
        start = int(above[-1]) if len(above) else 0
        start = max(0, start - math.ceil(math.log(2.0) / self.dt) - 2)
        prepared = self._start
        if prepared is None or start < prepared:
            # One preparation serves the nearby targets of the bounds that follow.
            prepared = max(0, start - math.ceil(0.5 / self.dt))
            self._prepare(prepared)
        start = prepared
        grid = self._grid
        over = np.flatnonzero(grid > target)
        if len(over) == 0:
            if start != 0:
                raise _PRVFailure("the epsilon search left the accurate part of the window")
            if not self.tail[0] > target or (side < 0 and not self.complete):
                return -math.inf
            if not self.complete:
                raise _PRVFailure("the epsilon search left the representable part of the window")
            i, lo_cell, hi_cell = 0, -math.inf, 0.0
        else:
            i = int(over[-1]) + 1  # delta(e) = tail[i] - exp(e) weighted[i] on [t_(i-1), t_i)
            if i >= len(grid):
                raise _PRVFailure("the epsilon search left the composed window")
            lo_cell, hi_cell = self._t_rel[i - 1], self._t_rel[i]
        numerator = self.tail[start + i] - target
        denominator = self._weighted[i]
        if numerator > 0 and denominator > 0:
            e = min(max(math.log(numerator / denominator), lo_cell), hi_cell)
        elif side < 0 or not math.isfinite(lo_cell):
            e = lo_cell if side < 0 else hi_cell
        else:
            e = hi_cell if side > 0 else 0.5 * (lo_cell + hi_cell)
        return self.t0 + start * self.dt + e

    def delta_at(self, e: float) -> tuple[float, float]:
        """`(delta(e), tail)`: the curve at `e` and the mass right of `e` (its rounding scale)."""
        i = max(0, math.floor((e - self.t0) / self.dt) + 1)
        if i == 0 and not self.complete:
            raise _PRVFailure("the delta query left the representable part of the window")
        part = self.pmf[i:]
        t = self.t0 + self.dt * np.arange(i, i + len(part), dtype=np.float64)
        t = np.minimum(e - t, 0.0)
        value = float(part @ -np.expm1(t))
        return max(value, 0.0), float(np.abs(part).sum())


# Chernoff bound for delta itself: (1 - exp(e - s))_+ <= c(l) exp(l (s - e)) for l > 0.
_LOG_C = _LAMBDAS * np.log(_LAMBDAS) - (1 + _LAMBDAS) * np.log1p(_LAMBDAS)


def _tilted_bounds(dists, counts, dt, theta, tau, support, pad, delta, fixed, shift):
    """Bounds from one tilted composition: `(bounds or None, estimate, slack)`.

    `fixed` is the delta slack that does not depend on the tilt (Hoeffding, truncation),
    `shift` the epsilon slack. `slack` is the total delta slack of the upper bound; the
    bounds are None when it exceeds delta / 2 (floating-point noise dominates).
    """
    curve, gamma, kappa = _tilted_curve(dists, counts, dt, theta, tau, support, pad)
    # Rounding of the cumulative sums and of the exponentials (arguments below 700).
    sum_err = (4 * len(curve.pmf) + 1400) * _EPS64 * delta

    estimate = curve.solve(delta, 0)
    ref = max(estimate, -shift) if math.isfinite(estimate) else -shift
    slack_up = fixed + gamma(ref) * kappa + sum_err
    if not slack_up <= 0.5 * delta:
        return None, estimate, slack_up
    # delta(e) <= delta - slack_up at e = e_up >= ref, so the true delta(e_up + shift) <= delta.
    upper = max(curve.solve(delta - slack_up, +1), ref) + shift

    lower = -math.inf
    if math.isfinite(estimate):
        step = max(shift, curve.dt)
        ref = estimate - step
        for _ in range(8):
            slack_low = fixed + gamma(ref) * kappa + sum_err
            found = curve.solve(delta + slack_low, -1)
            if found > ref:
                lower = found - shift
                break
            step *= 4
            ref = found - step
    return (lower, estimate, upper), estimate, slack_up


def _tilted_curve(dists, counts, dt, theta, tau, support, pad):
    """The delta curve of one tilted composition, back in the original scale.

    Returns `(curve, gamma, kappa)`: at a point `e`, the mass outside the composed window
    and the floating-point noise of the FFT cost at most `gamma(e) * kappa` in delta(e).
    """
    tilted, log_c = [], 0.0
    for dist, n_steps in zip(dists, counts):
        t_dist, log_z = _tilt(dist, theta, dt)
        tilted.append(t_dist)
        log_c += n_steps * log_z  # log E[exp(theta S)]
    t_blocks = [_blocks(d, dt, _block_size(d, dt, sum(counts))) for d in tilted]
    lo, hi = _window(t_blocks, counts, tau, support)
    if pad:
        lo, hi = max(lo - pad * (hi - lo), support[0]), min(hi + pad * (hi - lo), support[1])
    pmf_t, t0, noise = _compose(tilted, counts, dt, lo, hi)
    if not (np.all(np.isfinite(pmf_t)) and abs(float(pmf_t.sum()) - 1.0) < 1e-8):
        raise _PRVFailure("the composed privacy loss does not have unit mass")
    # Mass outside the window (tau each side, wrapped around) and float noise, in the tilted
    # scale. At a point e > t they cost exp(-theta t) <= exp(-theta e) times E[exp(theta S)]
    # in the original scale: at most gamma(e) * kappa in delta(e).
    kappa = 2 * tau + noise

    def gamma(e: float) -> float:
        return math.exp(min(log_c - theta * e, 700.0))

    # Back to the original scale where it is representable (the far left is only noise).
    cut = 0
    if theta > 0:
        cut = min(max(0, math.ceil(((log_c - 650.0) / theta - t0) / dt)), len(pmf_t) - 1)
    t_cut = t0 + cut * dt
    scale = np.arange(len(pmf_t) - cut, dtype=np.float64)
    scale *= -theta * dt
    scale += log_c - theta * t_cut
    with np.errstate(under="ignore"):
        np.exp(scale, out=scale)
    scale *= pmf_t[cut:]
    del pmf_t
    return _Delta(scale, t_cut, dt, complete=cut == 0), gamma, kappa


def _block_size(dist: _Lattice, dt: float, n_total: int) -> int:
    """Blocks narrow enough that Hoeffding's lemma costs little in the Chernoff bounds."""
    rel = np.arange(len(dist.pmf), dtype=np.float64) - dist.centre
    mean = float(dist.pmf @ rel)
    std = dt * math.sqrt(max(float(dist.pmf @ (rel - mean) ** 2), 0.0))
    return max(1, int(min(math.sqrt(0.08 / n_total), 0.05 * std) / dt))


def _compute_bounds(
    events: list[tuple[float, float, int]],
    delta: float,
    eps_error: float,
    delta_error: float,
    attempt: int = 0,
    pair_of=None,
) -> tuple[float, float, float]:
    """(lower, estimate, upper) epsilon of a non-trivial grouped history, or `_PRVFailure`.

    `attempt > 0` gives every tail a 1000x smaller mass (a wider, more conservative
    domain) and pads the composed window by a quarter on each side. `pair_of(sigma, q)`,
    if given, returns the `pairs.MixturePair` whose privacy loss one step has (another
    neighbouring relation); None is the add/remove pair of the module docstring.
    """
    dists, counts, dt, support, fixed, shift, cgf = _prepare(
        events, eps_error, delta_error, attempt, pair_of
    )

    # 2. Tilt by the exponent of the Chernoff bound on delta(e) <= delta, so that the FFT
    # resolves the tail around epsilon with relative (not absolute) float64 precision. If
    # that tilt is too strong (epsilon far below its Chernoff estimate), retilt at the
    # estimate found.
    shrink = 1e-3**attempt
    with np.errstate(invalid="ignore", over="ignore"):
        guess = (cgf + _LOG_C - math.log(delta)) / _LAMBDAS
    index = int(np.nanargmin(guess))
    theta, log_ratio = float(_LAMBDAS[index]), float(-_LOG_C[index])
    bounds = None
    for _ in range(2):
        tau = shrink * min(1e-6, delta_error / (1e5 * delta * math.exp(min(log_ratio, 700.0))))
        found, estimate, slack = _tilted_bounds(
            dists, counts, dt, theta, tau, support, 0.25 * attempt, delta, fixed, shift
        )
        if found is not None and (bounds is None or found[2] < bounds[2]):
            bounds = found
        if found is not None and slack <= delta_error:
            break
        # The slack does not fit in delta_error: retilt at the estimate found (the tilt that
        # minimises gamma there), keeping the tighter of the two results.
        if not math.isfinite(estimate):
            theta, log_ratio = 0.0, 0.0
        else:
            with np.errstate(invalid="ignore", over="ignore"):
                exponents = np.concatenate([[0.0], cgf - _LAMBDAS * estimate])
            index = int(np.nanargmin(exponents))
            if index and float(_LAMBDAS[index - 1]) == theta:
                break
            theta = 0.0 if index == 0 else float(_LAMBDAS[index - 1])
            log_ratio = float(exponents[index]) - math.log(delta)
    if bounds is None:
        raise _PRVFailure(
            f"floating-point noise dominates at delta={delta:.3g} (numerical slack {slack:.3g})"
        )
    lower, estimate, upper = (max(0.0, v) for v in bounds)
    if not (math.isfinite(upper) and lower <= estimate <= upper):
        raise _PRVFailure(
            f"inconsistent bounds lower={lower!r}, estimate={estimate!r}, upper={upper!r}"
        )
    return lower, estimate, upper


def _prepare(events, eps_error: float, delta_error: float, attempt: int, pair_of=None):
    """Steps 1 of the module docstring: every event's PRV truncated and discretised.

    Returns `(dists, counts, dt, support, fixed, shift, cgf)`: the lattice distributions,
    their step counts, the mesh, the range of the composed loss, the delta slack that does
    not depend on the tilt (Hoeffding and truncation), the epsilon slack (Hoeffding and
    the discrete means) and an upper bound on the composed cumulant generating function
    at `_LAMBDAS`. `pair_of` as in `_compute_bounds`.
    """
    if delta_error < 1e-250:
        raise _PRVFailure(f"delta_error={delta_error:.3g} is too close to float64 underflow")
    counts = [n for _, _, n in events]
    n_total = sum(counts)
    dt = eps_error / math.sqrt(n_total / 2 * math.log(12 / delta_error))
    h = eps_error
    delta_h = math.exp(-2 * h**2 / (n_total * dt**2))  # one-sided Hoeffding: delta_error / 12
    shrink = 1e-3**attempt

    # 1. Truncate and discretise every event's PRV.
    dists, delta_trunc, h_mean = [], 0.0, 0.0
    for sigma, q, n_steps in events:
        tail_mass = shrink * delta_error / (16 * n_total)
        if pair_of is None:
            dist, dropped, mean_error = _discretise(sigma, q, dt, tail_mass)
        else:
            dist, dropped, mean_error = _discretise_pair(pair_of(sigma, q), dt, tail_mass)
        dists.append(dist)
        delta_trunc += n_steps * dropped
        h_mean += n_steps * mean_error
    support = (
        sum(n * d.lowest(dt) for d, n in zip(dists, counts)),
        sum(n * d.highest(dt) for d, n in zip(dists, counts)),
    )
    fixed = delta_h + delta_trunc
    blocks = [_blocks(d, dt, _block_size(d, dt, n_total)) for d in dists]
    cgf = _cgf_bound(blocks, counts, _LAMBDAS)
    return dists, counts, dt, support, fixed, h + h_mean, cgf


def _compute_delta(
    events: list[tuple[float, float, int]],
    epsilon: float,
    eps_error: float,
    delta_error: float,
    attempt: int = 0,
    pair_of=None,
) -> float:
    """Certified upper bound on the delta of a non-trivial grouped history at `epsilon`.

    The true delta(epsilon) is at most the composed curve at `epsilon - shift` plus the delta
    slack (Hoeffding, truncation, window and floating-point noise): the same argument as the
    upper bound on epsilon, read the other way. `pair_of` as in `_compute_bounds`. Raises
    `_PRVFailure`.
    """
    dists, counts, dt, support, fixed, shift, cgf = _prepare(
        events, eps_error, delta_error, attempt, pair_of
    )
    e = epsilon - shift
    # Tilt by the exponent of the Chernoff bound on delta(e) (none when it is trivial).
    with np.errstate(invalid="ignore", over="ignore"):
        log_bound = cgf + _LOG_C - _LAMBDAS * e
    index = int(np.nanargmin(log_bound))
    theta, log_gamma = 0.0, 0.0
    if log_bound[index] < 0:
        theta, log_gamma = float(_LAMBDAS[index]), float(cgf[index] - _LAMBDAS[index] * e)
    tau = 1e-3**attempt * min(1e-6, delta_error / (1e5 * math.exp(min(log_gamma, 700.0))))
    curve, gamma, kappa = _tilted_curve(dists, counts, dt, theta, tau, support, 0.25 * attempt)
    value, tail = curve.delta_at(e)
    sum_err = (4 * len(curve.pmf) + 1400) * _EPS64 * max(tail, value)
    bound = value + fixed + gamma(e) * kappa + sum_err
    if not math.isfinite(bound):
        raise _PRVFailure(f"non-finite delta bound {bound!r}")
    return min(1.0, bound)


def _relative_error(epsilon: float) -> float:
    """The accuracy the default (relative) mode aims at: 1% of epsilon, at least 0.001."""
    return max(ABS_ERROR, REL_ERROR * epsilon)


# Integer orders only: the binomial expansion is fast, and the result only sizes the mesh.
_SCALE_ORDERS = tuple(range(2, 65)) + (80, 96, 128, 256, 512, 1024)
_PAIR_SCALE_ORDERS = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)


def _rdp(events, orders=None, neighboring: str = "add_or_remove", group_size: int = 1):
    """An RDP accountant holding `events` (an upper bound for sizing and for the fallback)."""
    from torchdp_keras.accounting.rdp import RDPAccountant

    rdp = RDPAccountant(orders=orders, neighboring=neighboring, group_size=group_size)
    for sigma, q, n in events:
        rdp.compose(sigma, q, n)
    return rdp


def _group_pair(sigma: float, q: float, k: int, direction: str):
    return _pairs.group_pair(sigma, q, k, direction)


# -- the accountant --------------------------------------------------------------------------
class PRVAccountant(Accountant):
    """Tight DP-SGD accountant: numerical composition of privacy random variables.

    Accounts the Poisson-subsampled Gaussian mechanism (add/remove adjacency
    by default) with the algorithm of Gopi, Lee and Wutschitz 2021: the PRVs of
    the steps are discretised on a mesh fine enough for an `eps_error` guarantee
    and composed with FFTs; histories with several different `(sigma, q)` events
    are composed exactly (not approximated). By default the accuracy is relative
    (a coarse pass, then the mesh that 1% of its estimate needs). See the module
    docstring for the error analysis.

    Args:
        eps_error: None (default): relative accuracy, the bounds satisfy
            `upper - lower <= max(ABS_ERROR, REL_ERROR * lower)` (0.001 or 1%),
            so the reported upper bound is within that of the true epsilon.
            A number: a fixed absolute error, `upper - lower` about
            `2 * eps_error` (cost ~ 1/eps_error).
        delta_error: The allowed error in delta; None (default) means
            `1e-3 * delta` at each query. Must be smaller than the queried delta.
        neighboring: "add_or_remove" (default) or "replace_one"; see
            `torchdp_keras.accounting.pairs` for the pair accounted and its references.
        group_size: k >= 1 (at most 64, add_or_remove only): the guarantee for adding or
            removing k examples at once (one user's), by the Binomial(k, q) mixture pair.

    Guarantee: `get_epsilon(delta)` is the upper bound, never below the true
    epsilon of the composed history at `delta`. By default it is at most
    `max(0.001, 1%)` above it (certified by the lower bound, after at most four
    passes; if float64 noise keeps the bracket wider, e.g. a few steps at tiny q
    and delta, the tightest bracket found is reported, still valid); with a fixed
    `eps_error` at most about `2 * eps_error` above it. `get_delta(epsilon)` is a
    certified upper bound on delta, with the same accuracy in epsilon. Edge cases: 0.0 for an empty
    history or `q = 0`, inf if some step had `noise_multiplier = 0`. If the
    numerical composition fails (an epsilon so large, typically hundreds, that
    the mesh needs more than 2**25 points, or float64 noise dominating delta),
    a warning is issued and the RDP accountant's upper bound (looser, still
    valid) is reported instead.

    Cost: about `width / dt` points, `width` the spread of the composed loss and
    `dt` proportional to the accuracy over `sqrt(steps)` (e.g. 0.5 s for 100,000
    steps at q=0.005, sigma=0.8, delta=1e-6 with `eps_error=0.01`, where
    `prv_accountant` takes ~30 s; about 0.7 s for TF Privacy's 500,000 steps at
    q=4e-5, epsilon 0.086, to 1%; `benches/bench_accountants.py` has the grid).

    Example:
        >>> acc = PRVAccountant()
        >>> acc.compose(noise_multiplier=1.5, sampling_probability=0.04, steps=2250)
        >>> round(acc.get_epsilon(1e-5), 1)  # Opacus reports 6.78 (PRV), PLD 6.77
        6.8
        >>> lower, estimate, upper = acc.get_epsilon_bounds(1e-5)
        >>> lower <= estimate <= upper
        True
    """

    name = "prv"

    def __init__(
        self,
        eps_error: float | None = None,
        delta_error: float | None = None,
        *,
        neighboring: str = "add_or_remove",
        group_size: int = 1,
    ) -> None:
        super().__init__(neighboring=neighboring, group_size=group_size)
        if eps_error is not None:
            eps_error = check_positive(eps_error, "eps_error")
        self.eps_error = eps_error
        if delta_error is not None:
            delta_error = check_positive(delta_error, "delta_error")
            if delta_error >= 1:
                raise DPConfigError(
                    f"Expected 0 < delta_error < 1. Received: delta_error={delta_error!r}"
                )
        self.delta_error = delta_error
        self._cache: dict[tuple, tuple[float, float, float]] = {}

    def get_epsilon_bounds(self, delta: float) -> tuple[float, float, float]:
        """`(lower, estimate, upper)` bounds on the epsilon of the history at `delta`.

        `lower <= true epsilon <= upper`. Returns `(0.0, 0.0, 0.0)` for an empty
        history and `(inf, inf, inf)` when some step had no noise. After a failed
        numerical composition (see the class docstring) it returns
        `(0.0, eps_rdp, eps_rdp)` with a warning.

        Raises:
            DPConfigError: `delta` is not in (0, 1), or `delta_error >= delta`.
        """
        delta = check_delta(delta)
        events = self._grouped_history()
        if not events:
            return 0.0, 0.0, 0.0
        if any(sigma == 0 for sigma, _, _ in events):
            return math.inf, math.inf, math.inf
        return self._bounds(events, delta)

    def _epsilon(self, events, delta):
        return self._bounds(events, delta)[2]

    def _bounds(self, events, delta) -> tuple[float, float, float]:
        delta_error = 1e-3 * delta if self.delta_error is None else self.delta_error
        if delta_error >= delta:
            raise DPConfigError(
                "Expected delta_error < delta. "
                f"Received: delta_error={delta_error!r}, delta={delta!r}"
            )
        key = (tuple(events), delta, self.eps_error, delta_error)
        if key in self._cache:
            return self._cache[key]
        failures: list[str] = []
        result: tuple[float, float, float] | None = None
        scale = None
        if self.eps_error is None:
            scale = self._rdp_of(events, self._sizing_orders()).get_epsilon(delta)
        for pair_of in self._pair_functions():
            # Each direction of the relation: the true epsilon is the largest of theirs.
            if scale is None:
                found = self._attempts(
                    events, delta, self.eps_error, delta_error, failures, pair_of
                )
            else:
                # Only the largest epsilon needs the accuracy: a direction whose upper bound
                # is below the lower bound found so far is not refined.
                floor = 0.0 if result is None else result[0]
                found = self._relative_bounds(
                    events, delta, delta_error, failures, pair_of, scale, floor
                )
            if found is None:
                result = None
                break
            result = found if result is None else tuple(max(a, b) for a, b in zip(result, found))
        if result is None:  # not cached: every such query warns
            return self._rdp_fallback(events, delta, failures)
        if len(self._cache) >= 16:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = result
        return result

    def _pair_functions(self) -> list:
        """One `pair_of` per direction to compose: None is the add/remove pair of one example."""
        if self.neighboring == "replace_one":  # symmetric: one direction
            return [functools.partial(_pairs.replace_one_pair)]
        if self.group_size == 1:  # the remove direction dominates (module docstring)
            return [None]
        return [
            functools.partial(_group_pair, k=self.group_size, direction=direction)
            for direction in ("remove", "add")
        ]

    def _rdp_of(self, events, orders=None):
        """An RDP accountant for the same relation holding `events`."""
        return _rdp(events, orders, self.neighboring, self.group_size)

    def _sizing_orders(self) -> tuple:
        """RDP orders for the quick bound that sizes the first mesh (few for the pairs,
        whose RDP is a quadrature per order)."""
        if self.neighboring == "add_or_remove" and self.group_size == 1:
            return _SCALE_ORDERS
        return _PAIR_SCALE_ORDERS

    @staticmethod
    def _attempts(events, delta, eps_error, delta_error, failures, pair_of=None, sizes=None):
        """The bounds at a fixed `eps_error` (retried once with a wider domain), or None.

        The point counts of meshes that were too large are appended to `sizes`."""
        for attempt in (0, 1):
            try:
                if pair_of is None:
                    bounds = _compute_bounds(events, delta, eps_error, delta_error, attempt)
                else:
                    bounds = _compute_bounds(
                        events, delta, eps_error, delta_error, attempt, pair_of=pair_of
                    )
            except Exception as err:  # any failure: retry, then the RDP bound (still valid)
                failures.append(f"{type(err).__name__}: {err}")
                if isinstance(err, _TooManyPoints) and sizes is not None and attempt == 0:
                    sizes.append(err.points)
                continue
            if all(math.isfinite(v) for v in bounds) and bounds[0] <= bounds[1] <= bounds[2]:
                lower, estimate, upper = bounds
                return float(lower), float(estimate), float(upper)
            failures.append(f"inconsistent bounds {bounds!r}")
        return None

    def _relative_bounds(self, events, delta, delta_error, failures, pair_of, scale, floor):
        """Bounds with `upper - lower <= max(ABS_ERROR, REL_ERROR * lower)` (certified).

        A coarse first pass (its `eps_error` sized from `scale`, a quick RDP bound, so that
        it costs a few percent of the second) finds the estimate; the second pass uses the
        mesh that accuracy needs, and a third refines if the slack came out larger than
        planned. Each pass is a certified result, the tightest is kept; a refinement that
        fails keeps the coarser (valid) bounds. A direction whose upper bound is at most
        `floor` (the lower bound of another direction, which decides the maximum) stops
        there; one above it aims at the accuracy of the larger of the two.
        """
        eps_error = max(0.02, 0.05 * scale) if math.isfinite(scale) else 0.02
        best = None
        for _ in range(4):
            sizes: list[int] = []
            found = self._attempts(events, delta, eps_error, delta_error, failures, pair_of, sizes)
            if found is None and best is not None and sizes:
                # The mesh that accuracy needs is too large: the finest that fits (the number
                # of points goes as 1 / eps_error) gives the tightest bracket within reach.
                eps_error *= 1.25 * max(sizes) / _MAX_POINTS
                found = self._attempts(events, delta, eps_error, delta_error, failures, pair_of)
                if found is not None and found[2] < best[2]:
                    best = found
                break
            if found is None:
                break
            if best is None or found[2] < best[2]:
                best = found
            lower, estimate, upper = found
            # Certified: the true epsilon is at least `lower`, so `upper` is within the
            # accuracy of it when the whole bracket is.
            if upper <= floor or upper - lower <= _relative_error(max(lower, floor)):
                break
            # Sized on the estimate (a coarse pass may leave lower at 0), at least 4x finer.
            aim = _relative_error(max(estimate, floor))
            eps_error *= min(0.25, _SAFETY * aim / (upper - lower))
        return best

    # -- delta -------------------------------------------------------------------------------
    def _delta(self, events, epsilon):
        """Certified upper bound on delta at `epsilon`; in the default (relative) mode the
        mesh is sized for an epsilon accuracy of `max(ABS_ERROR, REL_ERROR * epsilon)`.
        With several directions (groups) the largest of their deltas."""
        eps_error = self.eps_error
        if eps_error is None:
            eps_error = 0.5 * _SAFETY * _relative_error(epsilon)
        rdp_delta = self._rdp_of(events, self._sizing_orders()).get_delta(epsilon)
        failures: list[str] = []
        worst = 0.0
        for pair_of in self._pair_functions():
            scale, best = rdp_delta, math.inf
            for _ in range(3):
                delta_error = 1e-3 * scale if self.delta_error is None else self.delta_error
                found = None
                for attempt in (0, 1):
                    try:
                        found = _compute_delta(
                            events, epsilon, eps_error, delta_error, attempt, pair_of
                        )
                        break
                    except Exception as err:  # any failure: retry, then the RDP bound
                        failures.append(f"{type(err).__name__}: {err}")
                if found is None:
                    break
                best = min(best, found)
                # delta_error only sets the accuracy: refine when it was sized for a larger
                # delta.
                if self.delta_error is not None or found >= 0.1 * scale or found == 0:
                    break
                scale = found
            if not math.isfinite(best):
                worst = math.inf
                break
            worst = max(worst, best)
        if math.isfinite(worst):
            return worst
        warnings.warn(
            "The PRV computation failed ("
            + "; ".join(failures)
            + f"); reporting the RDP upper bound delta={rdp_delta:.6g} instead (looser, "
            "still valid).",
            RuntimeWarning,
            stacklevel=3,
        )
        return rdp_delta

    def _rdp_fallback(self, events, delta, failures) -> tuple[float, float, float]:
        eps = float(self._rdp_of(events).get_epsilon(delta))
        warnings.warn(
            "The PRV computation failed ("
            + "; ".join(failures)
            + f"); reporting the RDP upper bound epsilon={eps:.6g} instead (looser, still valid).",
            RuntimeWarning,
            stacklevel=4,
        )
        return 0.0, eps, eps
