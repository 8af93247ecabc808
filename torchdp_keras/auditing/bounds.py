"""Empirical lower bounds on epsilon from membership tests (numpy and scipy only).

A privacy audit runs a membership test against a DP mechanism and turns its
success into a statistical *lower* bound on epsilon: if the mechanism were
(epsilon, delta)-DP with a smaller epsilon, a test this successful would have
been too unlikely. Every bound here holds with probability at least
`confidence` over the randomness of the mechanism (training) and of the
canaries' inclusion: a returned value above the epsilon an implementation
claims is evidence that the implementation (or its analysis) is broken. The
bounds are never estimates of the true epsilon, only lower bounds of it.

Two settings are covered:

* **Many runs** (Jagielski et al. 2020, Nasr et al. 2021): the mechanism is run
  independently on a dataset with the canary (`tp`, `fn`: the test said
  member, non-member) and without it (`fp`, `tn`).
  `epsilon_lower_bound_from_counts` and `epsilon_lower_bound_from_scores`.
* **One run** (Steinke, Nasr and Jagielski 2023, "Privacy Auditing with One (1)
  Training Run", NeurIPS 2023, arXiv:2305.08846): `m` canaries, each included
  independently with probability 1/2 in a single run, and an auditor who
  guesses the inclusion of some of them. `one_run_p_value`,
  `one_run_epsilon_lower_bound` and `one_run_audit`.

Nothing here imports torch or keras: the statistics run on the host, on
counts or on numpy arrays of scores.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence

import numpy as np
import scipy.special
import scipy.stats

from torchdp_keras.errors import DPConfigError

__all__ = [
    "AuditResult",
    "clopper_pearson_interval",
    "epsilon_lower_bound_from_counts",
    "epsilon_lower_bound_from_scores",
    "one_run_audit",
    "one_run_epsilon_lower_bound",
    "one_run_p_value",
]

# Thresholds per direction of the default grid of `epsilon_lower_bound_from_scores`.
DEFAULT_THRESHOLDS_PER_DIRECTION = 10
# Bisection of the one-run bound: relative width at which it stops.
_BISECTION_RTOL = 1e-9
_BISECTION_MAX_ITERATIONS = 200


# -- argument checks ------------------------------------------------------------------
def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_count(value, name: str, minimum: int = 0) -> int:
    if not _is_int(value) or value < minimum:
        raise DPConfigError(
            f"Expected {name} to be an integer >= {minimum}. Received: {name}={value!r}"
        )
    return int(value)


def _check_confidence(confidence) -> float:
    if not _is_real(confidence) or not 0 < confidence < 1:
        raise DPConfigError(f"Expected confidence in (0, 1). Received: confidence={confidence!r}")
    return float(confidence)


def _check_delta(delta) -> float:
    if not _is_real(delta) or not 0 <= delta < 1:
        raise DPConfigError(f"Expected delta in [0, 1). Received: delta={delta!r}")
    return float(delta)


def _check_epsilon(epsilon) -> float:
    if not _is_real(epsilon) or math.isnan(epsilon) or epsilon < 0:
        raise DPConfigError(f"Expected epsilon >= 0. Received: epsilon={epsilon!r}")
    return float(epsilon)


def _check_scores(scores, name: str) -> np.ndarray:
    try:
        array = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise DPConfigError(
            f"Expected {name} to be a 1-D array of numbers. Received: {name} of type "
            f"{type(scores).__name__}"
        ) from error
    if array.ndim != 1:
        raise DPConfigError(
            f"Expected {name} to be a 1-D array. Received: {name} of shape {array.shape}"
        )
    if np.isnan(array).any():
        raise DPConfigError(
            f"Expected {name} without NaN. Received: {name} with "
            f"{int(np.isnan(array).sum())} NaN values"
        )
    return array


# -- Clopper-Pearson --------------------------------------------------------------------
def _cp_lower(successes: int, trials: int, alpha: float) -> float:
    """One-sided lower Clopper-Pearson bound: P[p < bound] <= alpha."""
    if successes == 0:
        return 0.0
    return float(scipy.stats.beta.ppf(alpha, successes, trials - successes + 1))


def _cp_upper(successes: int, trials: int, alpha: float) -> float:
    """One-sided upper Clopper-Pearson bound: P[p > bound] <= alpha."""
    if successes == trials:
        return 1.0
    return float(scipy.stats.beta.isf(alpha, successes + 1, trials - successes))


def clopper_pearson_interval(
    successes: int, trials: int, confidence: float = 0.95
) -> tuple[float, float]:
    """Exact (Clopper-Pearson) two-sided confidence interval of a binomial proportion.

    Guarantee: for `successes ~ Binomial(trials, p)`, the interval contains
    `p` with probability at least `confidence`, for every `p`; each end fails
    with probability at most `(1 - confidence) / 2`, so each end alone is a
    one-sided bound at confidence `1 - (1 - confidence) / 2`.

    Args:
        successes: Number of successes, an integer in `[0, trials]`.
        trials: Number of trials, an integer >= 1.
        confidence: The coverage, in (0, 1).

    Returns:
        `(low, high)` with `0 <= low <= high <= 1`; `low == 0` when
        `successes == 0` and `high == 1` when `successes == trials`.

    Raises:
        DPConfigError: an argument is out of range.

    Example:
        >>> low, high = clopper_pearson_interval(7, 10, confidence=0.95)
        >>> round(low, 4), round(high, 4)
        (0.3475, 0.9333)
    """
    trials = _check_count(trials, "trials", minimum=1)
    successes = _check_count(successes, "successes")
    if successes > trials:
        raise DPConfigError(
            f"Expected successes <= trials. Received: successes={successes}, trials={trials}"
        )
    alpha = (1.0 - _check_confidence(confidence)) / 2.0
    return _cp_lower(successes, trials, alpha), _cp_upper(successes, trials, alpha)


# -- many-run audit ----------------------------------------------------------------------
def _epsilon_from_rate_bounds(tpr_low: float, fpr_high: float, delta: float) -> float:
    """Largest epsilon both DP inequalities exclude, given TPR >= tpr_low, FPR <= fpr_high."""
    best = 0.0
    # TPR <= e^eps FPR + delta.
    if tpr_low > delta and fpr_high > 0:
        best = max(best, math.log(tpr_low - delta) - math.log(fpr_high))
    # TNR <= e^eps FNR + delta, with TNR >= 1 - fpr_high and FNR <= 1 - tpr_low.
    tnr_low, fnr_high = 1.0 - fpr_high, 1.0 - tpr_low
    if tnr_low > delta and fnr_high > 0:
        best = max(best, math.log(tnr_low - delta) - math.log(fnr_high))
    return best


def epsilon_lower_bound_from_counts(
    tp: int, fn: int, fp: int, tn: int, *, delta: float = 0.0, confidence: float = 0.95
) -> float:
    """Lower bound on epsilon from a membership test's confusion matrix (many runs).

    Setting: the mechanism was run `tp + fn` times independently on a dataset
    with the canary and `fp + tn` times on the same dataset without it; after
    each run one fixed test (one threshold, chosen before seeing these runs)
    said "member" or "non-member". An (epsilon, delta)-DP mechanism satisfies,
    for the true rates of that test,

        TPR <= e^epsilon * FPR + delta   and   TNR <= e^epsilon * FNR + delta.

    Clopper-Pearson bounds give, with probability at least `confidence`
    together, `TPR >= TPR_low` and `FPR <= FPR_high` (one-sided bounds, each
    at failure probability `(1 - confidence) / 2`); then `TNR >= 1 - FPR_high`
    and `FNR <= 1 - TPR_low` on the same event, so both inequalities can be
    used at no extra cost. The result is

        max(0, log((TPR_low - delta) / FPR_high),
               log((1 - FPR_high - delta) / (1 - TPR_low))),

    a term counting only where its numerator is positive.

    Guarantee: with probability >= `confidence` over the randomness of the
    runs, the true epsilon (at this `delta`) is at least the returned value.

    Args:
        tp: Runs with the canary that the test called members.
        fn: Runs with the canary called non-members.
        fp: Runs without the canary called members.
        tn: Runs without the canary called non-members.
        delta: The delta of the DP claim being audited, in [0, 1).
        confidence: In (0, 1).

    Returns:
        The bound, >= 0 and finite (0.0 when the counts show no signal).

    Raises:
        DPConfigError: a count is negative or not an integer, there is no run
            with (or no run without) the canary, or `delta`/`confidence` is out
            of range.

    Example:
        >>> round(epsilon_lower_bound_from_counts(95, 5, 5, 95), 3)
        2.062
        >>> epsilon_lower_bound_from_counts(50, 50, 50, 50)
        0.0
    """
    tp, fn = _check_count(tp, "tp"), _check_count(fn, "fn")
    fp, tn = _check_count(fp, "fp"), _check_count(tn, "tn")
    delta = _check_delta(delta)
    alpha = 1.0 - _check_confidence(confidence)
    if tp + fn == 0:
        raise DPConfigError(
            f"Expected at least one run with the canary (tp + fn >= 1). Received: tp={tp}, fn={fn}"
        )
    if fp + tn == 0:
        raise DPConfigError(
            "Expected at least one run without the canary (fp + tn >= 1). "
            f"Received: fp={fp}, tn={tn}"
        )
    tpr_low = _cp_lower(tp, tp + fn, alpha / 2.0)
    fpr_high = _cp_upper(fp, fp + tn, alpha / 2.0)
    return _epsilon_from_rate_bounds(tpr_low, fpr_high, delta)


def _rank_grid(n: int, per_direction: int) -> np.ndarray:
    """Ranks 1..ceil(n/2), geometrically spaced, at most `per_direction` of them."""
    top = max(1, math.ceil(n / 2))
    return np.unique(np.round(np.geomspace(1, top, per_direction)).astype(np.int64))


def _order_statistic_bounds(
    positives: np.ndarray, negatives: np.ndarray, ranks: np.ndarray, alpha: float, delta: float
) -> float:
    """Best epsilon of the tests "member iff score > k-th largest negative score".

    At the threshold t = X_(k), the k-th largest of the n negative scores, the
    false-positive rate P[S_neg > X_(k)] is stochastically dominated by
    Beta(k, n - k + 1) for every score distribution (ties included), so its
    upper bound at failure probability `alpha` is that Beta's upper quantile
    (the Clopper-Pearson bound for k - 1 successes). The threshold depends
    on the negatives only, so, given them, the number of positives above it
    is Binomial(n_pos, TPR) and its Clopper-Pearson lower bound holds.
    """
    n_neg, n_pos = len(negatives), len(positives)
    descending = np.sort(negatives)[::-1]
    sorted_pos = np.sort(positives)
    best = 0.0
    for k in ranks:
        threshold = descending[k - 1]
        fpr_high = float(scipy.stats.beta.isf(alpha, k, n_neg - k + 1))
        above = n_pos - int(np.searchsorted(sorted_pos, threshold, side="right"))
        tpr_low = _cp_lower(above, n_pos, alpha)
        if tpr_low > delta:
            best = max(best, math.log(tpr_low - delta) - math.log(fpr_high))
    return best


def epsilon_lower_bound_from_scores(
    scores_in: Sequence[float] | np.ndarray,
    scores_out: Sequence[float] | np.ndarray,
    *,
    delta: float = 0.0,
    confidence: float = 0.95,
    thresholds: Sequence[float] | np.ndarray | int | None = None,
) -> float:
    """Lower bound on epsilon from membership scores of many independent runs.

    `scores_in[i]` is the attack's score after the i-th run with the canary,
    `scores_out[j]` after the j-th run without it (all runs independent; a
    higher score means "member"). Several thresholds are tried on the same
    data and the best bound is returned; the confidence is split between them
    (Bonferroni), so the maximum keeps the stated guarantee.

    * `thresholds` a sequence: fixed thresholds, chosen before seeing these
      scores ("member" iff score >= t). Each gets confidence
      `1 - (1 - confidence) / len(thresholds)` in
      `epsilon_lower_bound_from_counts` (both DP inequalities).
    * `thresholds` None (default, `DEFAULT_THRESHOLDS_PER_DIRECTION` = 10) or
      an int K: a data-driven grid that remains valid. For
      `TPR <= e^eps FPR + delta`, the thresholds are the k-th largest
      out-scores, for K geometrically spaced ranks k in [1, n_out / 2]
      ("member" iff score > threshold); the false-positive rate at such a
      threshold is bounded through the exact distribution of order
      statistics, and the true-positive rate by Clopper-Pearson on the
      in-scores (independent of the threshold). The mirror image (thresholds
      at the k-th smallest in-scores) serves `TNR <= e^eps FNR + delta`.
      The 2K tests share the failure probability equally, so the correction
      is a factor 2K (20 by default), not the number of scores.

    Guarantee: with probability >= `confidence` over the randomness of the
    runs, the true epsilon (at this `delta`) is at least the returned value.
    This needs the runs (hence `scores_in` and `scores_out`) to be
    independent; scores of several canaries of one run are not (use
    `one_run_audit` for those).

    Args:
        scores_in: Scores of the runs with the canary (1-D, at least one).
        scores_out: Scores of the runs without it (1-D, at least one).
        delta: The delta of the audited claim, in [0, 1).
        confidence: In (0, 1).
        thresholds: None, an int >= 1 or a non-empty sequence of numbers (above).

    Returns:
        The bound, >= 0 and finite (0.0 when the scores show no signal).

    Raises:
        DPConfigError: empty or non-1-D scores, NaN scores or thresholds, or an
            argument out of range.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> scores_out = rng.laplace(0.0, 1.0, 1000)
        >>> scores_in = rng.laplace(4.0, 1.0, 1000)  # a 4-DP Laplace mechanism
        >>> 0 < epsilon_lower_bound_from_scores(scores_in, scores_out) <= 4
        True
    """
    scores_in = _check_scores(scores_in, "scores_in")
    scores_out = _check_scores(scores_out, "scores_out")
    delta = _check_delta(delta)
    alpha = 1.0 - _check_confidence(confidence)
    if scores_in.size == 0 or scores_out.size == 0:
        raise DPConfigError(
            "Expected at least one score with and one without the canary. Received: "
            f"len(scores_in)={scores_in.size}, len(scores_out)={scores_out.size}"
        )
    if thresholds is None or _is_int(thresholds):
        per_direction = (
            DEFAULT_THRESHOLDS_PER_DIRECTION
            if thresholds is None
            else _check_count(thresholds, "thresholds", minimum=1)
        )
        ranks_out = _rank_grid(scores_out.size, per_direction)
        ranks_in = _rank_grid(scores_in.size, per_direction)
        share = alpha / (2 * (len(ranks_out) + len(ranks_in)))
        forward = _order_statistic_bounds(scores_in, scores_out, ranks_out, share, delta)
        backward = _order_statistic_bounds(-scores_out, -scores_in, ranks_in, share, delta)
        return max(forward, backward)
    grid = _check_scores(thresholds, "thresholds")
    if grid.size == 0:
        raise DPConfigError("Expected at least one threshold. Received: thresholds=[]")
    per_threshold = 1.0 - alpha / grid.size
    sorted_in, sorted_out = np.sort(scores_in), np.sort(scores_out)
    best = 0.0
    for t in grid:
        tp = scores_in.size - int(np.searchsorted(sorted_in, t, side="left"))
        fp = scores_out.size - int(np.searchsorted(sorted_out, t, side="left"))
        best = max(
            best,
            epsilon_lower_bound_from_counts(
                tp,
                scores_in.size - tp,
                fp,
                scores_out.size - fp,
                delta=delta,
                confidence=per_threshold,
            ),
        )
    return best


# -- one-run audit (Steinke, Nasr and Jagielski 2023) -------------------------------------
def _one_run_p_value(r: int, v: int, epsilon: float, delta: float, m: int) -> float:
    q = float(scipy.special.expit(epsilon))  # e^eps / (1 + e^eps)
    tail = float(scipy.stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if delta == 0.0 or v == 0:
        return min(1.0, tail)
    # max over i in 1..v of P[v - i <= Binomial(r, q) < v] / i, summing the pmf
    # downwards from v - 1 (no cancellation between two tails).
    below = np.cumsum(scipy.stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))
    slope = float(np.max(below / np.arange(1, v + 1)))
    return min(1.0, tail + 2.0 * m * delta * slope)


def _check_one_run_counts(num_guesses, num_correct, num_canaries, delta) -> tuple[int, int, int]:
    r = _check_count(num_guesses, "num_guesses")
    v = _check_count(num_correct, "num_correct")
    if v > r:
        raise DPConfigError(
            f"Expected num_correct <= num_guesses. Received: num_correct={v}, num_guesses={r}"
        )
    if num_canaries is None:
        if delta > 0:
            raise DPConfigError(
                "Expected num_canaries (the number m of canaries, each included with "
                "probability 1/2) with delta > 0: the delta term of the bound is "
                f"2 * m * delta. Received: num_canaries=None, delta={delta!r}"
            )
        return r, v, r
    m = _check_count(num_canaries, "num_canaries", minimum=1)
    if m < r:
        raise DPConfigError(
            f"Expected num_guesses <= num_canaries. Received: num_guesses={r}, num_canaries={m}"
        )
    return r, v, m


def one_run_p_value(
    num_guesses: int,
    num_correct: int,
    epsilon: float,
    *,
    num_canaries: int | None = None,
    delta: float = 0.0,
) -> float:
    """P-value of "the mechanism is (epsilon, delta)-DP" after a one-run audit.

    Steinke, Nasr and Jagielski (2023): `m` canaries are each included
    independently with probability 1/2 in one run; from the output, the
    auditor guesses the inclusion of `r` of them (abstaining on the others)
    and `v` guesses are right. If the mechanism is (epsilon, delta)-DP (with
    respect to adding or removing one canary), then for every v,

        P[W >= v] <= f(v) + 2 m delta max_{i = 1..v} (f(v - i) - f(v)) / i,

    where W is the number correct and f(v) = P[Binomial(r, p) >= v] with
    p = e^epsilon / (1 + e^epsilon); for delta = 0 this is the stochastic
    dominance of W by Binomial(r, p). This returns that right-hand side,
    capped at 1.

    What is implemented, exactly: the paper's main theorem in its
    approximate-DP form, computed as in the p-value procedure of its
    appendix. The paper takes the maximum over i = 1..m; for i >= v,
    f(v - i) = 1, so the terms with i > v are smaller than the one at i = v
    and the maximum over i = 1..v is the same number. The delta term uses
    the number m of canaries (not r): every canary, guessed or not, can
    spend its delta. With delta = 0 the bound is the plain binomial tail.

    Args:
        num_guesses: r, the number of guesses (abstentions excluded).
        num_correct: v, the number of correct guesses, <= r.
        epsilon: The epsilon of the null hypothesis, >= 0.
        num_canaries: m >= r; required when `delta > 0`.
        delta: The delta of the null hypothesis, in [0, 1).

    Returns:
        The p-value in [0, 1]; 1.0 when `num_correct == 0`.

    Raises:
        DPConfigError: an argument is out of range, or `delta > 0` without
            `num_canaries`.

    Example:
        >>> round(one_run_p_value(100, 100, 3.0), 4)  # p^100, p = e^3 / (1 + e^3)
        0.0078
    """
    delta = _check_delta(delta)
    epsilon = _check_epsilon(epsilon)
    r, v, m = _check_one_run_counts(num_guesses, num_correct, num_canaries, delta)
    return _one_run_p_value(r, v, epsilon, delta, m)


def one_run_epsilon_lower_bound(
    num_guesses: int,
    num_correct: int,
    *,
    num_canaries: int | None = None,
    delta: float = 0.0,
    confidence: float = 0.95,
) -> float:
    """Lower bound on epsilon from one training run (Steinke, Nasr and Jagielski 2023).

    Returns the largest epsilon whose (epsilon, delta)-DP hypothesis is
    rejected at level `1 - confidence` by `one_run_p_value`, found by
    bisection (to a relative precision of 1e-9, returning the end that is
    rejected). The returned value is always one that is rejected, so the
    guarantee does not depend on the p-value being monotone in epsilon.

    Guarantee: if the `r` guesses were made from the output of one run in
    which each of the `m` canaries was included independently with
    probability 1/2 (the numbers of "in" and "out" guesses fixed in
    advance), then with probability >= `confidence` over that inclusion and
    the training randomness, the true epsilon (at this `delta`) is at least
    the returned value.

    Edge cases: 0 guesses, or no correct guess, give 0.0. Even when all `r`
    guesses are right the bound is finite (for delta = 0 it is
    `logit((1 - confidence) ** (1 / r))`, growing like log(r)): one run with
    r guesses cannot prove more. With `delta > 0` the bound is smaller, the
    more so the larger `2 * m * delta`.

    Args:
        num_guesses: r >= 0.
        num_correct: v in [0, r].
        num_canaries: m >= r; required when `delta > 0`.
        delta: The delta of the audited claim, in [0, 1).
        confidence: In (0, 1).

    Returns:
        The bound, >= 0 and finite.

    Raises:
        DPConfigError: an argument is out of range, or `delta > 0` without
            `num_canaries`.

    Example:
        >>> round(one_run_epsilon_lower_bound(100, 100), 3)  # logit(0.05 ** 0.01)
        3.493
        >>> one_run_epsilon_lower_bound(100, 50)
        0.0
    """
    delta = _check_delta(delta)
    alpha = 1.0 - _check_confidence(confidence)
    r, v, m = _check_one_run_counts(num_guesses, num_correct, num_canaries, delta)
    if v == 0 or _one_run_p_value(r, v, 0.0, delta, m) > alpha:
        return 0.0
    low, high = 0.0, 1.0
    while _one_run_p_value(r, v, high, delta, m) <= alpha:
        low, high = high, 2.0 * high
    for _ in range(_BISECTION_MAX_ITERATIONS):
        if high - low <= _BISECTION_RTOL * high:
            break
        middle = 0.5 * (low + high)
        if _one_run_p_value(r, v, middle, delta, m) <= alpha:
            low = middle
        else:
            high = middle
    return low


@dataclasses.dataclass(frozen=True)
class AuditResult:
    """The outcome of a one-run audit.

    Attributes:
        epsilon_lower_bound: With probability >= `confidence`, the true
            epsilon (at `delta`) is at least this.
        num_guesses: r, guesses made (`num_positive_guesses + num_negative_guesses`).
        num_correct: v, guesses that were right.
        num_canaries: m, canaries audited.
        num_positive_guesses: Canaries guessed "in" (the highest scores).
        num_negative_guesses: Canaries guessed "out" (the lowest scores).
        delta: The delta of the audited claim.
        confidence: The confidence of the bound.
    """

    epsilon_lower_bound: float
    num_guesses: int
    num_correct: int
    num_canaries: int
    num_positive_guesses: int
    num_negative_guesses: int
    delta: float
    confidence: float

    @property
    def accuracy(self) -> float:
        """Fraction of the guesses that were right (nan without guesses)."""
        return self.num_correct / self.num_guesses if self.num_guesses else math.nan


def one_run_audit(
    scores: Sequence[float] | np.ndarray,
    included: Sequence[bool] | np.ndarray,
    *,
    num_positive_guesses: int,
    num_negative_guesses: int,
    delta: float = 0.0,
    confidence: float = 0.95,
) -> AuditResult:
    """One-run audit of canary scores (Steinke, Nasr and Jagielski 2023).

    The auditor guesses "in" for the `num_positive_guesses` canaries with the
    highest scores and "out" for the `num_negative_guesses` with the lowest,
    abstaining on the rest; ties are broken by position (lower index first
    among equal scores), which does not depend on the inclusion. The number
    of correct guesses goes into `one_run_epsilon_lower_bound` with
    `num_canaries = len(scores)`.

    Guarantee: if each canary was included independently with probability
    1/2 (`included`), the scores are computed from the trained model alone,
    and the two numbers of guesses were fixed before looking at the scores,
    then with probability >= `confidence` the true epsilon (at this `delta`)
    is at least `epsilon_lower_bound`. Trying several numbers of guesses and
    keeping the best bound needs the confidence split between the tries.

    Args:
        scores: m scores, one per canary; higher means "more likely included".
        included: m booleans (or 0/1): whether each canary was in the training set.
        num_positive_guesses: k_pos >= 0.
        num_negative_guesses: k_neg >= 0, with k_pos + k_neg <= m.
        delta: The delta of the audited claim, in [0, 1).
        confidence: In (0, 1).

    Returns:
        An `AuditResult`.

    Raises:
        DPConfigError: shapes differ, NaN scores, non-boolean `included`, or an
            argument out of range.

    Example:
        >>> included = np.arange(200) % 2 == 0
        >>> result = one_run_audit(included.astype(float), included,
        ...                        num_positive_guesses=50, num_negative_guesses=50)
        >>> result.num_correct, round(result.epsilon_lower_bound, 3)
        (100, 3.493)
    """
    scores = _check_scores(scores, "scores")
    membership = np.asarray(included)
    if membership.shape != scores.shape:
        raise DPConfigError(
            "Expected included to have the shape of scores. Received: "
            f"included of shape {membership.shape}, scores of shape {scores.shape}"
        )
    if membership.dtype != np.bool_:
        valid = np.isin(membership, (0, 1))
        if not valid.all():
            raise DPConfigError(
                "Expected included to hold booleans (or 0/1). Received: included with "
                f"values such as {membership[~valid][:5].tolist()}"
            )
        membership = membership.astype(bool)
    m = scores.size
    if m == 0:
        raise DPConfigError("Expected at least one canary. Received: scores=[]")
    k_pos = _check_count(num_positive_guesses, "num_positive_guesses")
    k_neg = _check_count(num_negative_guesses, "num_negative_guesses")
    if k_pos + k_neg > m:
        raise DPConfigError(
            "Expected num_positive_guesses + num_negative_guesses <= len(scores). Received: "
            f"num_positive_guesses={k_pos}, num_negative_guesses={k_neg}, len(scores)={m}"
        )
    # Stable sort of -scores: highest first, ties by index; "out" guesses are the
    # last k_neg positions (order[m:] is empty when k_neg == 0).
    order = np.argsort(-scores, kind="stable")
    correct = int(membership[order[:k_pos]].sum()) + int((~membership[order[m - k_neg :]]).sum())
    bound = one_run_epsilon_lower_bound(
        k_pos + k_neg, correct, num_canaries=m, delta=delta, confidence=confidence
    )
    return AuditResult(
        epsilon_lower_bound=bound,
        num_guesses=k_pos + k_neg,
        num_correct=correct,
        num_canaries=m,
        num_positive_guesses=k_pos,
        num_negative_guesses=k_neg,
        delta=float(delta),
        confidence=float(confidence),
    )
