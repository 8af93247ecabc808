"""PRV accounting: numerical composition of privacy random variables (numpy/scipy only).

The privacy random variable (PRV) of one DP-SGD step is the privacy loss
`Y = log(P(X) / Q(X))` with `X ~ P` for a dominating pair `(P, Q)` of the step:
by default `P = (1 - q) N(0, sigma^2) + q N(1, sigma^2)`, `Q = N(0, sigma^2)`
(Poisson sampling with rate `q`, Gaussian noise of std `sigma` relative to the
clipping norm, add/remove adjacency; the "remove" pair, which dominates DP-SGD;
`pairs` has the others). For a history of `N_j` steps of events `(sigma_j, q_j)`
the composed loss is `S = sum of independent copies` and the mechanism is
(epsilon, delta)-DP with `delta(epsilon) = E[(1 - exp(epsilon - S))_+]`.

Two algorithms share the composition below.

**Default (relative accuracy): dominating and dominated lattice pairs.**
Each step's loss is put on the lattice `k * dt` by connect-the-dots
(`discretise.connect_the_dots`, Doroshenko et al. 2022): a lattice pair that
*dominates* the step, so its composition gives an upper bound on delta(epsilon)
with no margin (only the truncated tails and the numerical slack below are
added). Its error shrinks as `dt^2`, so `dt` does not have to shrink with the
number of steps. The lattice starts from the `dt` that the requested accuracy
needs by a variance estimate, and is halved (nested lattices: the upper bound
can only decrease) until the last halving moved it by less than half the
accuracy. When that first halving raises the bound instead (the numerical
slack below, which grows with the number of points, outweighs the lattice's
error: a few steps at a tiny q and delta), coarser lattices are tried while
they lower it. `get_epsilon_bounds` also composes the *dominated* pair of
merged cells (`discretise.merged_cells`) for a certified lower bound, on a
lattice refined until its rounding loses less than a quarter of the accuracy;
where the FFT's noise keeps that bound further than the accuracy from the
upper one, the merged cells are also composed by direct convolution (exact to
a relative rounding, no noise floor; within a budget of multiply-adds).

**Fixed `eps_error` (as the `prv_accountant` package and Opacus):** Gopi, Lee
and Wutschitz 2021 ("Numerical composition of differential privacy"): the
mean-preserving discretisation on the mesh
`dt = eps_error / sqrt(N / 2 * log(12 / delta_error))`; by Hoeffding the
discretised sum stays within `h = eps_error` of the continuous one except with
probability `delta_error / 12` per side, so the bounds carry that margin
(`upper - lower` about `2 * eps_error`).

The composition, common to both:

1. Truncation. Each loss is restricted to `[a_j, b_j]`, exact quantiles of its
   closed-form distribution, leaving a mass `tau_j` outside; by a coupling the
   composition changes delta by at most `delta_trunc = sum_j N_j tau_j` (the
   merged cells truncate nothing).
2. Exponential tilting. The lattice distributions are tilted by
   `exp(theta y)`, with `theta` the exponent of the Chernoff bound on
   `delta(e)` at the requested delta, so that the composed tail around epsilon
   carries most of the tilted mass: float64 then resolves delta with relative
   (not absolute) precision, which keeps small deltas (1e-10 ... 1e-50)
   accurate. The computed pmf is tilted back exactly.
3. Composition in the Fourier domain on an FFT-friendly length
   (`scipy.fft.next_fast_len`): one `rfft` per distinct event, the `N_j`
   self-compositions as the pointwise power `exp(N_j log F_j)` (only where it
   does not underflow), different events multiplied (exact heterogeneous
   composition), one `irfft`.
4. The window of the circular convolution comes from Chernoff bounds computed
   from the (tilted) lattice distributions themselves (block cumulant
   generating functions plus Hoeffding's lemma inside each block), so the mass
   outside it, `tau` per side, is certified rather than guessed. At a point
   `e`, that mass and the floating-point noise of the FFT (propagated from the
   per-coefficient rounding through the powers, by Parseval, with a safety
   factor of 8) cost at most `gamma(e) * (2 tau + noise)` in delta, where
   `gamma(e) = E[exp(theta S)] exp(-theta e)`.
5. Epsilon bounds: with `slack = delta_trunc + gamma * (2 tau + noise)` (plus
   the Hoeffding terms in the fixed mode), the upper bound solves
   `delta_computed(e) = delta - slack` (and adds `h`); the lower bound solves
   `delta_computed(e) = delta + slack` (and subtracts `h`); the estimate solves
   `delta_computed(e) = delta`. The total slack must fit in `delta_error`.

A one-step history is not composed at all (no FFT, no rounding noise). For the
other neighbouring relations (`pairs.MixturePair`) every direction is computed
the same way and the largest epsilon reported.

If the numerical composition fails (an exception, non-finite or inconsistent
bounds, a domain too large for memory, or a delta so small that floating-point
noise dominates), it is retried with a wider domain and then, as a last
resort, the accountant warns and reports the (looser, still valid) upper bound
of the RDP accountant for the same history.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
from scipy import fft as sp_fft

from torchdp_keras._validation import check_positive
from torchdp_keras.accounting import discretise as _discretise
from torchdp_keras.accounting import pairs as _pairs
from torchdp_keras.accounting.base import Accountant, check_delta
from torchdp_keras.accounting.discretise import Lattice as _Lattice
from torchdp_keras.accounting.discretise import PRVFailure as _PRVFailure
from torchdp_keras.accounting.discretise import TooManyPoints as _TooManyPoints
from torchdp_keras.errors import DPConfigError

__all__ = ["ABS_ERROR", "REL_ERROR", "PRVAccountant"]

# The default accuracy: the reported upper bound is at most about max(ABS_ERROR,
# REL_ERROR * epsilon) above the true epsilon (see `PRVAccountant`).
REL_ERROR = 0.01
ABS_ERROR = 0.001
# Fraction of that accuracy aimed at when sizing a mesh.
_SAFETY = 0.9

# exp() of anything below this is 0 in float64 (with a margin).
_LOG_UNDERFLOW = -760.0
# Chernoff exponents tried when sizing the composed window.
_LAMBDAS = np.geomspace(1e-4, 1e5, 97)
_EPS64 = float(np.finfo(np.float64).eps)


# -- composition of lattice distributions ------------------------------------------------------
def _tilt(dist: _Lattice, theta: float, dt: float) -> tuple[_Lattice, float]:
    """The exponentially tilted distribution `pmf * exp(theta * value) / Z` and `log Z`."""
    rel = np.arange(len(dist.pmf), dtype=np.float64) - dist.centre
    log_w = theta * dt * rel
    alive = dist.pmf > 0  # normalised at the largest weight that carries mass
    top = float(np.max(log_w[alive])) if np.any(alive) else float(log_w[-1])
    with np.errstate(over="ignore"):
        weights = dist.pmf * np.exp(np.minimum(log_w - top, 0.0))
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
            # logsumexp over each row, in place (scipy's copies the chunk several times)
            rows = lambdas[i : i + step, None] * values[None, :]
            rows += log_mass
            top = rows.max(axis=1, keepdims=True)
            rows -= top
            np.exp(rows, out=rows)
            out[i : i + step] = np.log(rows.sum(axis=1)) + top[:, 0]
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
    if m_min > _discretise.MAX_POINTS:
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


# Multiply-adds allowed for a direct composition (a few tenths of a second with numpy's
# convolution).
_DIRECT_MAX_OPS = 1e9


def _curve_rounding(points: int, scale: float) -> float:
    """Bound on the rounding of `_Delta`'s cumulative sums and exponentials (arguments
    below 700) over `points` entries, at a delta of about `scale`."""
    return (4 * points + 1400) * _EPS64 * scale


class _OverBudget(Exception):
    """A direct composition would take more than `_DIRECT_MAX_OPS`."""


def _direct_lower(dists, counts, dt: float, delta: float) -> float | None:
    """Lower bound on epsilon by direct convolution (no FFT), or None if too costly.

    For the dominated (merged-cell) pair when few steps are composed at a tiny delta: the
    FFT's noise, amplified by the tilt, then costs more than the lattice. Every term is
    non-negative, so a convolution is exact to a relative `(length + 2) * eps` per entry
    (accumulated over the products), with no absolute noise floor and no tilt. Entries
    below `1e-12 * delta` are dropped at the ends of each product: that only lowers the
    composed pmf entrywise, hence its delta curve, so the solution stays a lower bound.
    """
    floor = 1e-12 * delta
    ops = 0.0

    def trim(pmf: np.ndarray, first: int) -> tuple[np.ndarray, int]:
        kept = np.flatnonzero(pmf >= floor)
        if len(kept) == 0:
            return pmf[:0], first
        return pmf[kept[0] : kept[-1] + 1], first + int(kept[0])

    def product(a, b):
        # (pmf, first index, relative error) of the convolution of two such triples
        nonlocal ops
        ops += float(len(a[0])) * len(b[0])
        if ops > _DIRECT_MAX_OPS:
            raise _OverBudget
        pmf, first = trim(np.convolve(a[0], b[0]), a[1] + b[1])
        return pmf, first, a[2] + b[2] + (min(len(a[0]), len(b[0])) + 2) * _EPS64

    total = None
    t_base = 0.0  # the lattice value of index 0 of every factor, summed
    try:
        for dist, n_steps in zip(dists, counts):
            t_base += n_steps * dist.lowest(dt)
            pmf, first = trim(np.asarray(dist.pmf, dtype=np.float64), 0)
            power, base, n = None, (pmf, first, 0.0), n_steps
            while n:  # binary powering
                if n & 1:
                    power = base if power is None else product(power, base)
                n >>= 1
                if n:
                    base = product(base, base)
            total = power if total is None else product(total, power)
    except _OverBudget:
        return None
    assert total is not None
    pmf, first, rel = total
    if len(pmf) == 0:
        return 0.0
    curve = _Delta(pmf, t_base + first * dt, dt)
    # The computed curve is at most (1 + rel) times the lattice pair's (plus the rounding of
    # the curve's own sums): where it exceeds that target, the true delta exceeds `delta`.
    sum_err = _curve_rounding(len(pmf), delta)
    try:
        return max(0.0, curve.solve(delta * (1 + rel) + sum_err, -1))
    except _PRVFailure:
        return None


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
    """Bounds from one tilted composition: `(bounds or None, estimate, slack, window)`.

    `fixed` is the delta slack that does not depend on the tilt (Hoeffding, truncation),
    `shift` the epsilon slack. `slack` is the total delta slack of the upper bound, and
    `window` the part of it that the mass outside the composed window costs; the bounds are
    None when the slack exceeds delta / 2 (floating-point noise dominates).
    """
    curve, gamma, kappa = _tilted_curve(dists, counts, dt, theta, tau, support, pad)
    # Rounding of the cumulative sums and of the exponentials (arguments below 700).
    sum_err = _curve_rounding(len(curve.pmf), delta)

    estimate = curve.solve(delta, 0)
    ref = max(estimate, -shift) if math.isfinite(estimate) else -shift
    slack_up = fixed + gamma(ref) * kappa + sum_err
    window = gamma(ref) * 2 * tau
    if not slack_up <= 0.5 * delta:
        return None, estimate, slack_up, window
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
    return (lower, estimate, upper), estimate, slack_up, window


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


# -- bounds from one set of lattice distributions ----------------------------------------------
def _support_and_cgf(dists, counts, dt) -> tuple[tuple[float, float], np.ndarray]:
    """The range of the composed loss and an upper bound on its cumulant generating
    function at `_LAMBDAS`."""
    n_total = sum(counts)
    support = (
        sum(n * d.lowest(dt) for d, n in zip(dists, counts)),
        sum(n * d.highest(dt) for d, n in zip(dists, counts)),
    )
    blocks = [_blocks(d, dt, _block_size(d, dt, n_total)) for d in dists]
    return support, _cgf_bound(blocks, counts, _LAMBDAS)


def _bounds_of(dists, counts, dt, delta, delta_error, fixed, shift, attempt):
    """(lower, estimate, upper) epsilon of the composed lattice distributions at `delta`.

    `fixed` is the delta slack that does not depend on the tilt (truncation, Hoeffding),
    `shift` the epsilon slack; `attempt > 0` pads the composed window by a quarter on each
    side and certifies 1000x smaller window tails.
    """
    support, cgf = _support_and_cgf(dists, counts, dt)

    # Tilt by the exponent of the Chernoff bound on delta(e) <= delta, so that the FFT
    # resolves the tail around epsilon with relative (not absolute) float64 precision. If
    # that tilt is too strong (epsilon far below its Chernoff estimate), retilt at the
    # estimate found.
    shrink = 1e-3**attempt
    with np.errstate(invalid="ignore", over="ignore"):
        guess = (cgf + _LOG_C - math.log(delta)) / _LAMBDAS
    index = int(np.nanargmin(guess))
    theta, log_ratio = float(_LAMBDAS[index]), float(-_LOG_C[index])
    bounds = None
    slack = math.inf
    failure: _PRVFailure | None = None
    narrow = 1.0  # the window's tails: made smaller when they dominate the slack
    for _ in range(4):
        tau = (
            narrow
            * shrink
            * min(1e-6, delta_error / (1e5 * delta * math.exp(min(log_ratio, 700.0))))
        )
        try:
            found, estimate, slack, window = _tilted_bounds(
                dists, counts, dt, theta, tau, support, 0.25 * attempt, delta, fixed, shift
            )
        except _TooManyPoints:
            raise
        except _PRVFailure as err:
            # Typically a tilt so strong that the solution left the representable part of
            # the window (a loss that piles up at its top): a weaker one.
            failure = err
            if theta == 0.0:
                break
            theta = theta / 100.0 if theta > 1e-2 else 0.0
            continue
        if found is not None and (bounds is None or found[2] < bounds[2]):
            bounds = found
        if found is not None and slack <= delta_error:
            break
        if window > 0.5 * slack and narrow == 1.0:
            # The Chernoff estimate of the tilted tails was loose: a wider window (its
            # width grows as log(1 / tau) only) at the same tilt.
            narrow = 1e-8
            continue
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
        if failure is not None and not math.isfinite(slack):
            raise failure
        raise _PRVFailure(
            f"floating-point noise dominates at delta={delta:.3g} (numerical slack {slack:.3g})"
        )
    lower, estimate, upper = (max(0.0, v) for v in bounds)
    if not (math.isfinite(upper) and lower <= estimate <= upper):
        raise _PRVFailure(
            f"inconsistent bounds lower={lower!r}, estimate={estimate!r}, upper={upper!r}"
        )
    return lower, estimate, upper


def _tail_mass(delta_error: float, n_total: int, attempt: int) -> float:
    return 1e-3**attempt * delta_error / (16 * n_total)


def _prepare(events, kind: str, mesh: float, delta_error: float, attempt: int, pair_of, budget=0.0):
    """Every event's loss on the lattice of `kind`.

    Returns `(dists, counts, dt, fixed, shift)`: the lattice distributions, their step
    counts, the lattice spacing, the delta slack that does not depend on the tilt
    (truncation, and Hoeffding for "hoeffding") and the epsilon slack (Hoeffding and the
    discrete means; 0 for the lattice pairs, which bound the truth without a margin).
    `budget` is the mean loss per step that the rounding of "lower" may lose.
    """
    if delta_error < 1e-250:
        raise _PRVFailure(f"delta_error={delta_error:.3g} is too close to float64 underflow")
    counts = [n for _, _, n in events]
    n_total = sum(counts)
    tail_mass = _tail_mass(delta_error, n_total, attempt)
    dists, dropped_total, shift, fixed = [], 0.0, 0.0, 0.0
    if kind == "hoeffding":
        eps_error = mesh
        dt = eps_error / math.sqrt(n_total / 2 * math.log(12 / delta_error))
        # One-sided Hoeffding: the discretised sum stays within eps_error of the continuous
        # one except with probability delta_error / 12.
        fixed = math.exp(-2 * eps_error**2 / (n_total * dt**2))
        shift = eps_error
    else:
        dt = mesh
    for sigma, q, n_steps in events:
        pair = pair_of(sigma, q)
        if kind == "hoeffding":
            dist, dropped, mean_error = _discretise.mean_preserving(pair, dt, tail_mass)
            shift += n_steps * mean_error
        elif kind == "upper":
            dist, dropped = _discretise.connect_the_dots(pair, dt, tail_mass)
        else:
            dist, _ = _discretise.merged_cells(pair, dt, tail_mass, budget)
            dropped = 0.0  # nothing truncated
        dists.append(dist)
        dropped_total += n_steps * dropped
    return dists, counts, dt, fixed + dropped_total, shift


def _compute_bounds(
    events: list[tuple[float, float, int]],
    delta: float,
    mesh: float,
    delta_error: float,
    attempt: int = 0,
    pair_of=_pairs.RemovePair,
    kind: str = "hoeffding",
    budget: float = 0.0,
) -> tuple[float, float, float]:
    """(lower, estimate, upper) epsilon of a non-trivial grouped history, or `_PRVFailure`.

    `kind` and `mesh` as in `_prepare`; for "upper" only the estimate and the upper bound
    are bounds of the truth, for "lower" only the lower bound. `attempt > 0` gives every
    tail a 1000x smaller mass (a wider, more conservative domain). `pair_of(sigma, q)`
    returns the dominating pair of one step (`pairs`); `budget` as in `_prepare`.
    """
    dists, counts, dt, fixed, shift = _prepare(
        events, kind, mesh, delta_error, attempt, pair_of, budget
    )
    return _bounds_of(dists, counts, dt, delta, delta_error, fixed, shift, attempt)


def _compute_delta(
    events: list[tuple[float, float, int]],
    epsilon: float,
    mesh: float,
    delta_error: float,
    attempt: int = 0,
    pair_of=_pairs.RemovePair,
    kind: str = "upper",
) -> float:
    """Certified upper bound on the delta of a non-trivial grouped history at `epsilon`.

    The true delta(epsilon) is at most the composed curve at `epsilon - shift` plus the delta
    slack (truncation, window and floating-point noise, and Hoeffding for "hoeffding"): the
    argument of the upper bound on epsilon, read the other way. Raises `_PRVFailure`.
    """
    dists, counts, dt, fixed, shift = _prepare(events, kind, mesh, delta_error, attempt, pair_of)
    support, cgf = _support_and_cgf(dists, counts, dt)
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
    sum_err = _curve_rounding(len(curve.pmf), max(tail, value))
    bound = value + fixed + gamma(e) * kappa + sum_err
    if not math.isfinite(bound):
        raise _PRVFailure(f"non-finite delta bound {bound!r}")
    return min(1.0, bound)


def _initial_mesh(events, delta: float, target: float, pair_of, delta_error: float) -> float:
    """A power of two `dt` for which connect-the-dots is expected within `target` / 8.

    Connect-the-dots raises each step's mean loss by at most `dt^2 / 8` and its variance
    by at most `dt^2 / 4`; the composed epsilon (about mean + z std, `z^2 = 2 log(1 /
    delta)`) then moves by about `dt^2 (N + z sqrt(N) / s) / 8`, `s` the std of one step's
    loss (from a coarse lattice). The refinement checks the actual change.
    """
    counts = [n for _, _, n in events]
    n_total = sum(counts)
    tail_mass = _tail_mass(delta_error, n_total, 0)
    variance = 0.0
    for sigma, q, n_steps in events:
        pair = pair_of(sigma, q)
        low, high = _discretise.loss_range(pair, tail_mass)
        coarse = max(high - low, 1e-12) / min(4096, _discretise.MAX_POINTS // 2)
        dist, _ = _discretise.connect_the_dots(pair, coarse, tail_mass)
        rel = np.arange(len(dist.pmf), dtype=np.float64)
        mean = float(dist.pmf @ rel)
        variance += n_steps * coarse**2 * max(float(dist.pmf @ (rel - mean) ** 2), 0.0)
    s = math.sqrt(variance / n_total)
    z = math.sqrt(2 * math.log(1 / delta))
    spread = n_total + (z * math.sqrt(n_total) / s if s > 0 else 0.0)
    dt = math.sqrt(target / spread)
    return 2.0 ** math.floor(math.log2(dt))


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


# -- the accountant --------------------------------------------------------------------------
class PRVAccountant(Accountant):
    """Tight DP-SGD accountant: numerical composition of privacy random variables.

    Accounts the Poisson-subsampled Gaussian mechanism (add/remove adjacency by
    default): each step's privacy loss is put on a lattice and the steps are
    composed with FFTs; histories with several different `(sigma, q)` events
    are composed exactly (not approximated). By default the accuracy is
    relative: the steps are replaced by a lattice pair that dominates them
    (connect-the-dots), on a lattice refined until the bound has converged to
    within 1% (or 0.001). With a fixed `eps_error` it is the algorithm of Gopi,
    Lee and Wutschitz 2021 (as the `prv_accountant` package and Opacus). See the
    module docstring for the error analysis.

    Args:
        eps_error: None (default): relative accuracy, the upper bound is within
            about `max(ABS_ERROR, REL_ERROR * epsilon)` (0.001 or 1%) of the
            true epsilon. A number: a fixed absolute error, `upper - lower`
            about `2 * eps_error` (cost ~ 1/eps_error).
        delta_error: The allowed error in delta; None (default) means
            `1e-3 * delta` at each query. Must be smaller than the queried delta.
        neighboring: "add_or_remove" (default) or "replace_one"; see
            `torchdp_keras.accounting.pairs` for the pair accounted and its references.
        group_size: k >= 1 (at most 64, add_or_remove only): the guarantee for adding or
            removing k examples at once (one user's), by the Binomial(k, q) mixture pair.

    Guarantee: `get_epsilon(delta)` is an upper bound, never below the true
    epsilon of the composed history at `delta` (a dominating pair, certified
    truncation and floating-point slack). By default it is within 1% (or
    0.001) of it: the lattice is halved until the bound moves by less than half
    that (the error of connect-the-dots shrinks as the square of the spacing);
    `get_epsilon_bounds` also returns a certified lower bound (a dominated
    pair), so `upper - lower` certifies the accuracy actually reached (for
    `neighboring="replace_one"` at q <= 1e-3, sigma <= 1 and many steps that
    lower bound can stay well below: merged cells cost first order in the
    spacing). With a fixed `eps_error` the upper bound is at most about
    `2 * eps_error` above the truth. `get_delta(epsilon)` is a certified upper bound on delta.
    Edge cases: 0.0 for an empty history or `q = 0`, inf if some step had
    `noise_multiplier = 0`. If the numerical composition fails (an epsilon so
    large that even a coarse lattice needs more than 2**25 points, or float64
    noise dominating delta), a warning is issued and the RDP accountant's upper
    bound (looser, still valid) is reported instead.

    Cost: about `width / dt` points, `width` the spread of the composed loss;
    by default `dt` is about `sqrt(accuracy / (steps + z sqrt(steps) / s))`
    (`s` the spread of one step's loss, `z^2 = 2 log(1 / delta)`): 0.03 s for
    TF Privacy's 500,000 steps at q=4e-5 (epsilon 0.086, to 1%), under 1 s at
    10^6 steps; `benches/bench_accountants.py` has the grid.

    Example:
        >>> acc = PRVAccountant()
        >>> acc.compose(noise_multiplier=1.5, sampling_probability=0.04, steps=2250)
        >>> round(acc.get_epsilon(1e-5), 2)  # Opacus reports 6.78 (PRV), dp_accounting 6.77
        6.77
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

        `lower <= true epsilon <= upper`, both certified. Returns `(0.0, 0.0, 0.0)` for
        an empty history and `(inf, inf, inf)` when some step had no noise. After a
        failed numerical composition (see the class docstring) it returns
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
        return self._bounds(events, delta, with_lower=True)

    def _epsilon(self, events, delta):
        return self._bounds(events, delta, with_lower=False)[2]

    def _bounds(self, events, delta, with_lower: bool) -> tuple[float, float, float]:
        """The bounds of every direction of the relation, combined (the true epsilon is the
        largest of theirs). Without `with_lower`, the default mode skips the lower bound
        (reported as 0.0)."""
        delta_error = 1e-3 * delta if self.delta_error is None else self.delta_error
        if delta_error >= delta:
            raise DPConfigError(
                "Expected delta_error < delta. "
                f"Received: delta_error={delta_error!r}, delta={delta!r}"
            )
        key = (tuple(events), delta, self.eps_error, delta_error)
        for cached in (key + (True,), key + (with_lower,)):
            if cached in self._cache:
                return self._cache[cached]
        failures: list[str] = []
        result: tuple[float, float, float] | None = None
        scale = None
        if self.eps_error is None:
            scale = self._rdp_of(events, self._sizing_orders()).get_epsilon(delta)
        if scale is None:
            for pair_of in self._pair_functions():
                found = self._attempts(
                    events, delta, self.eps_error, delta_error, failures, pair_of, "hoeffding"
                )
                if found is None:
                    result = None
                    break
                result = found if result is None else tuple(map(max, zip(result, found)))
        else:
            result = self._relative_bounds(events, delta, delta_error, failures, scale, with_lower)
        if result is None:  # not cached: every such query warns
            return self._rdp_fallback(events, delta, failures)
        if len(self._cache) >= 16:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key + (with_lower,)] = result
        return result

    def _pair_functions(self) -> list:
        """One `pair_of(sigma, q)` per direction to compose (the dominating pair of a step)."""
        if self.neighboring == "replace_one":  # symmetric: one direction
            return [_pairs.replace_one_pair]
        if self.group_size == 1:  # the remove direction dominates (module docstring)
            return [_pairs.RemovePair]
        return [
            functools.partial(_pairs.group_pair, k=self.group_size, direction=direction)
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
    def _attempts(
        events, delta, mesh, delta_error, failures, pair_of, kind, sizes=None, budget=0.0
    ):
        """The bounds of `kind` at `mesh` (retried once with a wider domain), or None.

        The point counts of meshes that were too large are appended to `sizes`."""
        for attempt in (0, 1):
            try:
                bounds = _compute_bounds(
                    events,
                    delta,
                    mesh,
                    delta_error,
                    attempt,
                    pair_of=pair_of,
                    kind=kind,
                    budget=budget,
                )
            except Exception as err:  # any failure: retry, then the RDP bound (still valid)
                failures.append(f"{type(err).__name__}: {err}")
                if isinstance(err, _TooManyPoints):
                    if sizes is not None:
                        sizes.append(err.points)
                    return None  # a wider domain would not fit either
                continue
            if all(math.isfinite(v) for v in bounds) and bounds[0] <= bounds[1] <= bounds[2]:
                lower, estimate, upper = bounds
                return float(lower), float(estimate), float(upper)
            failures.append(f"inconsistent bounds {bounds!r}")
        return None

    def _relative_bounds(self, events, delta, delta_error, failures, scale, with_lower):
        """`(lower, estimate, upper)` in the default mode (lower 0.0 without `with_lower`),
        or None if the numerical composition failed.

        Every direction's upper bound (`_relative_upper`); the largest is the bound of the
        relation, and the lower bound of that direction is a lower bound of it.
        """
        found = []
        for pair_of in self._pair_functions():
            upper = self._relative_upper(events, delta, delta_error, failures, pair_of, scale)
            if upper is None:
                return None
            found.append((upper, pair_of))
        (estimate, upper, dt, target), pair_of = max(found, key=lambda item: item[0][1])
        estimate = max(item[0][0] for item in found)
        lower = 0.0
        if with_lower:
            lower = self._merged_lower(
                events, delta, delta_error, failures, pair_of, dt, target, upper
            )
        return lower, min(max(estimate, lower), upper), upper

    def _relative_upper(self, events, delta, delta_error, failures, pair_of, scale):
        """`(estimate, upper, dt, target)` of one direction, or None if it failed.

        Connect-the-dots on the lattice `_initial_mesh` sizes (from `scale`, a quick RDP
        bound), halved until a halving moves the bound by at most half the accuracy
        `target` (each pass is a certified upper bound; the finer lattices can only lower
        it). A lattice too large for memory keeps the finest bound that fitted, or starts
        coarser. `dt` is the last lattice's spacing.
        """
        target = _SAFETY * _relative_error(scale)
        try:
            dt = 2 * _initial_mesh(events, delta, target, pair_of, delta_error)
        except Exception as err:  # e.g. overflow at extreme sigma: the RDP bound (valid)
            failures.append(f"{type(err).__name__}: {err}")
            return None
        best, previous, best_dt = None, None, dt
        retries = 0
        passes = 0  # the passes that gave a bound
        noisier = False  # a finer pass gave a larger bound: float64 noise, not the lattice
        for _ in range(12):
            sizes: list[int] = []
            found = self._attempts(
                events, delta, dt, delta_error, failures, pair_of, "upper", sizes
            )
            if found is None:
                if best is None and sizes:  # too fine from the start: coarser
                    dt *= 2.0 ** math.ceil(math.log2(1.25 * max(sizes) / _discretise.MAX_POINTS))
                    continue
                if best is None and not sizes and retries < 2 and "left the" in failures[-1]:
                    # A numerical failure on the coarsest mesh (e.g. a loss piled up at its
                    # top, out of the tilted window): a finer one may pass.
                    retries += 1
                    dt /= 4
                    continue
                break
            passes += 1
            if best is None or found[2] < best[2]:
                best, best_dt = found, dt
            target = _SAFETY * _relative_error(found[1])
            if previous is not None and previous - found[2] <= 0.5 * target:
                noisier = found[2] > previous
                break
            previous = found[2]
            dt /= 2
        if best is None:
            return None
        if noisier and passes == 2:
            # The first halving raised the bound: the numerical slack (FFT noise amplified
            # by the tilt, which grows with the number of points) outweighs the lattice's
            # error there, as for a few steps at tiny q and delta. Coarser lattices, while
            # they lower the bound (each is a certified upper bound).
            dt = best_dt
            for _ in range(8):
                dt *= 2
                found = self._attempts(events, delta, dt, delta_error, failures, pair_of, "upper")
                if found is None or found[2] >= best[2]:
                    break
                best, best_dt = found, dt
            target = _SAFETY * _relative_error(best[1])
        return best[1], best[2], best_dt, target

    def _merged_lower(
        self, events, delta, delta_error, failures, pair_of, dt, target, upper
    ) -> float:
        """Certified lower bound from merged cells (0.0 if it cannot be computed).

        The rounding of merged cells may lose `target / (4 steps)` per step; if it loses
        more, the lattice is refined once (to the spacing that `dt^2` scaling predicts).
        If the bound is then further than the accuracy below `upper` (merging costs first
        order in `dt` when few steps are composed), the lattice is refined by 4, at most
        twice, while that helps. A pass whose FFT bound is not within the accuracy also
        tries the direct convolution (`_direct_lower`), free of the FFT's noise.
        """
        counts = [n for _, _, n in events]
        n_total = sum(counts)
        tail_mass = _tail_mass(delta_error, n_total, 0)
        budget = 0.25 * target / n_total
        best = 0.0
        refined = False
        for _ in range(4):
            try:
                made = [
                    _discretise.merged_cells(pair_of(sigma, q), dt, tail_mass, budget)
                    for sigma, q, _ in events
                ]
            except Exception as err:  # too many points or a numerical failure
                failures.append(f"{type(err).__name__}: {err}")
                break
            lost = sum(n * loss for (_, loss), n in zip(made, counts))
            if not refined and lost > 0.25 * target:
                refined = True
                dt *= max(0.05, min(0.5, 0.8 * math.sqrt(0.25 * target / lost)))
                continue
            refined = True
            dists = [dist for dist, _ in made]
            lows = []
            for attempt in (0, 1):
                try:
                    lows.append(
                        _bounds_of(dists, counts, dt, delta, delta_error, 0.0, 0.0, attempt)[0]
                    )
                    break
                except Exception as err:  # retry with a wider window
                    failures.append(f"{type(err).__name__}: {err}")
            if not lows or upper - lows[0] > _relative_error(lows[0]):
                # Not certified to the accuracy: float64 noise may be the cause, which
                # direct convolution does not have (None when too costly).
                direct = _direct_lower(dists, counts, dt, delta)
                if direct is not None:
                    lows.append(direct)
            if not lows:
                break
            low = max(lows)
            gain = low - best
            best = max(best, low)
            if upper - best <= _relative_error(best):
                break
            if gain < 0.25 * (upper - best + gain):
                break  # limited by something else (float64 noise): refining does not help
            dt /= 4
        return best

    # -- delta -------------------------------------------------------------------------------
    def _delta(self, events, epsilon):
        """Certified upper bound on delta at `epsilon`; in the default (relative) mode on the
        lattices sized for an epsilon accuracy of `max(ABS_ERROR, REL_ERROR * epsilon)` (the
        smaller of two nested ones). With several directions (groups) the largest of their
        deltas."""
        rdp_delta = self._rdp_of(events, self._sizing_orders()).get_delta(epsilon)
        failures: list[str] = []
        worst = 0.0
        for pair_of in self._pair_functions():
            scale, best = rdp_delta, math.inf
            for _ in range(3):
                delta_error = 1e-3 * scale if self.delta_error is None else self.delta_error
                found = self._delta_attempts(events, epsilon, delta_error, failures, pair_of)
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

    def _delta_attempts(self, events, epsilon, delta_error, failures, pair_of):
        """The smallest certified delta of the mode's lattices (None if all failed)."""
        if self.eps_error is not None:
            meshes, kind = [self.eps_error], "hoeffding"
        else:
            reference = max(delta_error * 1e3, 1e-300)
            target = _SAFETY * _relative_error(epsilon)
            try:
                dt = _initial_mesh(events, min(reference, 0.5), target, pair_of, delta_error)
            except Exception as err:  # the RDP bound (valid)
                failures.append(f"{type(err).__name__}: {err}")
                return None
            meshes, kind = [2 * dt, dt], "upper"
        best = None
        for mesh in meshes:
            for attempt in (0, 1):
                try:
                    found = _compute_delta(
                        events, epsilon, mesh, delta_error, attempt, pair_of, kind
                    )
                except Exception as err:  # any failure: retry, then the RDP bound
                    failures.append(f"{type(err).__name__}: {err}")
                    continue
                best = found if best is None else min(best, found)
                break
        return best

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
