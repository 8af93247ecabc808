"""Privacy auditing: epsilon lower bounds, and audits of real DP training runs.

The bounds are checked three ways: against independent computations (scipy's
exact binomial intervals, the one-run p-value written out term by term), on
simulated mechanisms whose privacy is known exactly (randomized response,
Laplace and Gaussian mechanisms: the lower bound stays below their epsilon,
and the failure rate of a nearly tight audit stays below 1 - confidence), and
on mechanisms far outside a claim (flagged). The training tests audit
`DPSequential` runs: correct DP-SGD is not flagged, DP-SGD without noise or
without clipping, against the epsilon a correct run would claim, is.
"""

import dataclasses
import math

import keras
import numpy as np
import pytest
import scipy.optimize
import scipy.special
import scipy.stats
import torch

import torchdp_keras as tdk
from torchdp_keras.accounting import PRVAccountant
from torchdp_keras.auditing import (
    AuditResult,
    TrainingAuditReport,
    audit_dp_training,
    clopper_pearson_interval,
    epsilon_lower_bound_from_counts,
    epsilon_lower_bound_from_scores,
    make_canaries,
    one_run_audit,
    one_run_epsilon_lower_bound,
    one_run_p_value,
    per_example_losses,
)
from torchdp_keras.errors import DPConfigError, DPError

DELTA = 1e-5


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Trains the tiny models on one thread: on a busy machine, more only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- reference computations, written independently of the package ---------------------
def gaussian_delta(epsilon, mu):
    """Exact delta(epsilon) of the Gaussian mechanism N(0, 1) vs N(mu, 1) (Balle-Wang)."""
    norm = scipy.stats.norm
    return norm.cdf(-epsilon / mu + mu / 2) - math.exp(epsilon) * norm.cdf(-epsilon / mu - mu / 2)


def gaussian_mu(epsilon, delta):
    """The shift mu at which N(0, 1) vs N(mu, 1) is exactly (epsilon, delta)-DP."""
    return scipy.optimize.brentq(lambda mu: gaussian_delta(epsilon, mu) - delta, 1e-3, 50.0)


def reference_p_value(m, r, v, epsilon, delta):
    """The one-run p-value, term by term: f(v) + 2 m delta max_i (f(v - i) - f(v)) / i."""
    q = math.exp(epsilon) / (1 + math.exp(epsilon))

    def f(k):  # P[Binomial(r, q) >= k]
        return 1.0 if k <= 0 else float(scipy.stats.binom.sf(k - 1, r, q))

    slope = max(((f(v - i) - f(v)) / i for i in range(1, m + 1)), default=0.0)
    return min(1.0, f(v) + 2 * m * delta * slope)


def prv_epsilon(sigma, q, steps, delta=DELTA):
    accountant = PRVAccountant()
    accountant.compose(sigma, q, steps)
    return accountant.get_epsilon(delta)


# -- Clopper-Pearson ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "k,n,confidence",
    [(0, 10, 0.95), (7, 10, 0.95), (10, 10, 0.95), (3, 50, 0.9), (480, 1000, 0.99), (1, 1, 0.5)],
)
def test_clopper_pearson_matches_scipy_exact_interval(k, n, confidence):
    expected = scipy.stats.binomtest(k, n).proportion_ci(confidence, method="exact")
    low, high = clopper_pearson_interval(k, n, confidence)
    assert low == pytest.approx(expected.low, abs=1e-12)
    assert high == pytest.approx(expected.high, abs=1e-12)
    assert 0.0 <= low <= k / n <= high <= 1.0


@pytest.mark.parametrize("p", [0.02, 0.3, 0.5, 0.9])
def test_clopper_pearson_exact_coverage(p):
    n, confidence = 40, 0.9
    coverage = 0.0
    for k in range(n + 1):
        low, high = clopper_pearson_interval(k, n, confidence)
        if low <= p <= high:
            coverage += scipy.stats.binom.pmf(k, n, p)
    assert coverage >= confidence


# -- many-run audit from counts ----------------------------------------------------------------
@pytest.mark.parametrize(
    "tp,fn,fp,tn,delta,confidence",
    [
        (95, 5, 5, 95, 0.0, 0.95),
        (990, 10, 30, 970, 1e-5, 0.95),
        (60, 40, 2, 98, 0.0, 0.99),
        (100, 0, 50, 50, 0.01, 0.9),  # only TNR <= e^eps FNR + delta has signal
    ],
)
def test_counts_bound_matches_hand_computation(tp, fn, fp, tn, delta, confidence):
    # Each one-sided bound fails with (1 - confidence) / 2: the ends of the
    # two-sided exact interval at level `confidence`.
    tpr_low = scipy.stats.binomtest(tp, tp + fn).proportion_ci(confidence, method="exact").low
    fpr_high = scipy.stats.binomtest(fp, fp + tn).proportion_ci(confidence, method="exact").high
    candidates = [0.0]
    if tpr_low > delta:
        candidates.append(math.log((tpr_low - delta) / fpr_high))
    if 1 - fpr_high > delta:
        candidates.append(math.log((1 - fpr_high - delta) / (1 - tpr_low)))
    bound = epsilon_lower_bound_from_counts(tp, fn, fp, tn, delta=delta, confidence=confidence)
    assert bound == pytest.approx(max(candidates), rel=1e-9)


def test_counts_bound_known_value_and_no_signal():
    assert epsilon_lower_bound_from_counts(95, 5, 5, 95) == pytest.approx(2.0621, abs=1e-4)
    assert epsilon_lower_bound_from_counts(50, 50, 50, 50) == 0.0
    assert epsilon_lower_bound_from_counts(0, 100, 0, 100) == 0.0


def test_counts_bound_shrinks_with_delta_and_confidence():
    base = epsilon_lower_bound_from_counts(90, 10, 10, 90)
    assert epsilon_lower_bound_from_counts(90, 10, 10, 90, delta=0.05) < base
    assert epsilon_lower_bound_from_counts(90, 10, 10, 90, confidence=0.999) < base


@pytest.mark.parametrize("epsilon", [0.5, 2.0])
def test_counts_bound_rarely_exceeds_randomized_response_epsilon(epsilon):
    # Randomized response is exactly epsilon-DP with TPR = e^eps FPR: the
    # most favourable case for the audit. Over many simulated audits, the
    # bound exceeds epsilon at most as often as 1 - confidence allows.
    rng = np.random.default_rng(7)
    q, runs, trials = scipy.special.expit(epsilon), 500, 200
    tp = rng.binomial(runs, q, size=trials)
    fp = rng.binomial(runs, 1 - q, size=trials)
    bounds = np.array(
        [epsilon_lower_bound_from_counts(a, runs - a, b, runs - b) for a, b in zip(tp, fp)]
    )
    assert np.mean(bounds > epsilon) <= 0.05
    assert np.median(bounds) > 0.5 * epsilon  # and the audit is not vacuous


# -- many-run audit from scores ---------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("epsilon", [1.0, 3.0])
def test_scores_bound_below_gaussian_mechanism_epsilon(seed, epsilon):
    mu = gaussian_mu(epsilon, DELTA)
    assert gaussian_delta(epsilon, mu) == pytest.approx(DELTA, rel=1e-6)
    rng = np.random.default_rng(seed)
    scores_out = rng.standard_normal(3000)
    scores_in = mu + rng.standard_normal(3000)
    bound = epsilon_lower_bound_from_scores(scores_in, scores_out, delta=DELTA)
    assert 0.0 < bound <= epsilon


@pytest.mark.parametrize("seed", range(3))
def test_scores_bound_below_laplace_mechanism_epsilon(seed):
    epsilon = 2.0  # Laplace(0, 1) vs Laplace(2, 1): exactly 2-DP
    rng = np.random.default_rng(seed)
    scores_out = rng.laplace(0.0, 1.0, 3000)
    scores_in = rng.laplace(epsilon, 1.0, 3000)
    assert 0.5 < epsilon_lower_bound_from_scores(scores_in, scores_out) <= epsilon


@pytest.mark.parametrize("seed", range(3))
def test_scores_bound_flags_mechanism_far_outside_its_claim(seed):
    # Claimed (1, 1e-5)-DP, but the shift is 6 standard deviations.
    claimed_epsilon = 1.0
    assert gaussian_mu(claimed_epsilon, DELTA) < 1.0
    rng = np.random.default_rng(seed)
    scores_out = rng.standard_normal(2000)
    scores_in = 6.0 + rng.standard_normal(2000)
    bound = epsilon_lower_bound_from_scores(scores_in, scores_out, delta=DELTA)
    assert bound > 3 * claimed_epsilon


def test_scores_bound_without_signal_is_small():
    rng = np.random.default_rng(3)
    bound = epsilon_lower_bound_from_scores(rng.standard_normal(2000), rng.standard_normal(2000))
    assert bound < 0.2


def test_scores_bound_uses_both_dp_inequalities():
    # The mirrored tests (thresholds at low in-scores) are the forward tests of
    # the swapped, negated problem, so swapping gives the same bound ...
    rng = np.random.default_rng(4)
    scores_out = rng.standard_normal(2000)
    scores_in = 3.0 + rng.standard_normal(1500)
    forward = epsilon_lower_bound_from_scores(scores_in, scores_out)
    assert forward > 2.0
    assert epsilon_lower_bound_from_scores(-scores_out, -scores_in) == pytest.approx(forward)
    # ... and scores oriented the wrong way ("higher means member") show nothing.
    assert epsilon_lower_bound_from_scores(-scores_in, -scores_out) == 0.0


def test_scores_bound_with_fixed_thresholds_is_bonferroni_over_counts():
    rng = np.random.default_rng(5)
    scores_out = rng.standard_normal(500)
    scores_in = 2.0 + rng.standard_normal(500)
    thresholds = [0.5, 1.0, 2.0]
    expected = max(
        epsilon_lower_bound_from_counts(
            int((scores_in >= t).sum()),
            int((scores_in < t).sum()),
            int((scores_out >= t).sum()),
            int((scores_out < t).sum()),
            confidence=1 - 0.05 / len(thresholds),
        )
        for t in thresholds
    )
    bound = epsilon_lower_bound_from_scores(scores_in, scores_out, thresholds=thresholds)
    assert bound == pytest.approx(expected)
    assert bound > 0


@pytest.mark.parametrize("thresholds", [None, 1, 3, 25])
def test_scores_bound_grid_sizes(thresholds):
    rng = np.random.default_rng(6)
    scores_out = rng.laplace(0.0, 1.0, 1000)
    scores_in = rng.laplace(3.0, 1.0, 1000)
    bound = epsilon_lower_bound_from_scores(scores_in, scores_out, thresholds=thresholds)
    assert 0.0 < bound <= 3.0


# -- one-run audit: the p-value and the bound ----------------------------------------------------
@pytest.mark.parametrize(
    "m,r,v,epsilon,delta",
    [
        (100, 100, 80, 1.0, 0.0),
        (100, 100, 80, 1.0, 1e-4),
        (1000, 200, 170, 1.5, 1e-5),
        (50, 20, 20, 3.0, 1e-3),
        (30, 30, 0, 0.5, 1e-2),
        (500, 60, 31, 0.0, 1e-5),
    ],
)
def test_one_run_p_value_matches_term_by_term_formula(m, r, v, epsilon, delta):
    value = one_run_p_value(r, v, epsilon, num_canaries=m, delta=delta)
    assert value == pytest.approx(reference_p_value(m, r, v, epsilon, delta), rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("r,v,epsilon", [(100, 100, 3.0), (50, 40, 1.0), (10, 5, 0.0)])
def test_one_run_p_value_without_delta_is_binomial_tail(r, v, epsilon):
    expected = scipy.stats.binom.sf(v - 1, r, scipy.special.expit(epsilon))
    assert one_run_p_value(r, v, epsilon) == pytest.approx(expected, rel=1e-12)


def test_one_run_p_value_known_value():
    # p^100 with p = e^3 / (1 + e^3)
    assert one_run_p_value(100, 100, 3.0) == pytest.approx((math.e**3 / (1 + math.e**3)) ** 100)
    assert one_run_p_value(100, 0, 3.0) == 1.0


@pytest.mark.parametrize("r", [10, 100, 1000])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_one_run_perfect_guessing_gives_documented_value(r, confidence):
    expected = scipy.special.logit((1 - confidence) ** (1 / r))
    bound = one_run_epsilon_lower_bound(r, r, confidence=confidence)
    assert bound == pytest.approx(expected, rel=1e-7)


def test_one_run_documented_examples():
    assert round(one_run_epsilon_lower_bound(num_guesses=100, num_correct=100), 3) == 3.493
    assert one_run_epsilon_lower_bound(100, 50) == 0.0
    assert one_run_epsilon_lower_bound(0, 0) == 0.0


@pytest.mark.parametrize("delta,m", [(0.0, None), (1e-5, 1000), (1e-3, 200)])
def test_one_run_bound_is_monotone_in_correct_guesses(delta, m):
    r = 200
    bounds = [
        one_run_epsilon_lower_bound(r, v, num_canaries=m, delta=delta) for v in range(0, r + 1, 5)
    ]
    assert all(a <= b for a, b in zip(bounds, bounds[1:]))
    assert bounds[0] == 0.0 and bounds[len(bounds) // 2] == 0.0  # v <= r / 2: no evidence
    assert bounds[-1] > 3.0


def test_one_run_bound_shrinks_with_delta_and_confidence():
    base = one_run_epsilon_lower_bound(200, 180, num_canaries=1000)
    with_delta = one_run_epsilon_lower_bound(200, 180, num_canaries=1000, delta=1e-4)
    more_canaries = one_run_epsilon_lower_bound(200, 180, num_canaries=10000, delta=1e-4)
    surer = one_run_epsilon_lower_bound(200, 180, num_canaries=1000, confidence=0.999)
    assert more_canaries < with_delta < base
    assert surer < base


@pytest.mark.parametrize(
    "r,v,m,delta,confidence",
    [(100, 90, None, 0.0, 0.95), (1000, 700, 5000, 1e-5, 0.95), (40, 33, 40, 1e-3, 0.8)],
)
def test_one_run_bound_is_rejected_and_tight(r, v, m, delta, confidence):
    alpha = 1 - confidence
    bound = one_run_epsilon_lower_bound(r, v, num_canaries=m, delta=delta, confidence=confidence)
    assert bound > 0
    assert one_run_p_value(r, v, bound, num_canaries=m, delta=delta) <= alpha
    above = bound * (1 + 1e-6) + 1e-12
    assert one_run_p_value(r, v, above, num_canaries=m, delta=delta) > alpha


@pytest.mark.parametrize("epsilon", [0.5, 1.0, 2.0])
def test_one_run_bound_calibrated_on_randomized_response(epsilon):
    # Every canary's guess comes from eps-DP randomized response: W is exactly
    # Binomial(r, e^eps / (1 + e^eps)) and the audit is tight, so it exceeds
    # epsilon in about 1 - confidence of the runs, never much more.
    rng = np.random.default_rng(11)
    r, trials = 500, 200
    correct = rng.binomial(r, scipy.special.expit(epsilon), size=trials)
    bounds = np.array([one_run_epsilon_lower_bound(r, int(v)) for v in correct])
    assert np.sum(bounds > epsilon) <= 20  # mean <= 10 for a correct bound
    assert np.median(bounds) > 0.7 * epsilon


def test_one_run_audit_counts_guesses_and_breaks_ties_by_index():
    scores = np.array([5.0, 1.0, 1.0, 1.0, 0.0, 3.0])
    included = np.array([True, False, True, False, False, True])
    # "in": indices 0 and 5 (right, right); "out": the last two of the stable
    # order 0, 5, 1, 2, 3, 4, i.e. indices 3 and 4 (right, right).
    result = one_run_audit(scores, included, num_positive_guesses=2, num_negative_guesses=2)
    assert isinstance(result, AuditResult)
    assert (result.num_guesses, result.num_correct, result.num_canaries) == (4, 4, 6)
    assert result.accuracy == 1.0
    # Three "in" guesses: index 1 (first of the tied) is out, so one is wrong.
    result = one_run_audit(scores, included, num_positive_guesses=3, num_negative_guesses=0)
    assert result.num_correct == 2
    # 0/1 inclusion and zero guesses
    result = one_run_audit(
        scores, included.astype(int), num_positive_guesses=0, num_negative_guesses=0
    )
    assert result.epsilon_lower_bound == 0.0 and math.isnan(result.accuracy)


def test_one_run_audit_documented_example():
    included = np.arange(200) % 2 == 0
    result = one_run_audit(
        included.astype(float), included, num_positive_guesses=50, num_negative_guesses=50
    )
    assert result.num_correct == 100
    assert result.epsilon_lower_bound == pytest.approx(scipy.special.logit(0.05**0.01), rel=1e-7)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("epsilon", [1.0, 4.0])
def test_one_run_audit_below_gaussian_canaries_epsilon(seed, epsilon):
    # Each canary shifts its own score by mu: releasing all scores is exactly
    # (epsilon, delta)-DP with respect to adding or removing one canary.
    m = 2000
    mu = gaussian_mu(epsilon, DELTA)
    rng = np.random.default_rng(seed)
    included = rng.random(m) < 0.5
    scores = mu * included + rng.standard_normal(m)
    result = one_run_audit(
        scores, included, num_positive_guesses=100, num_negative_guesses=100, delta=DELTA
    )
    assert 0.0 < result.epsilon_lower_bound <= epsilon


@pytest.mark.parametrize("seed", range(3))
def test_one_run_audit_flags_mechanism_far_outside_its_claim(seed):
    claimed_epsilon, m = 1.0, 1000
    rng = np.random.default_rng(seed)
    included = rng.random(m) < 0.5
    scores = 8.0 * included + rng.standard_normal(m)  # claimed mu < 1, actual 8
    result = one_run_audit(
        scores, included, num_positive_guesses=100, num_negative_guesses=100, delta=DELTA
    )
    assert result.num_correct == 200
    assert result.epsilon_lower_bound > 3 * claimed_epsilon


# -- canaries and scores ---------------------------------------------------------------------------
@pytest.mark.parametrize("label_shape", ["sparse", "column", "one_hot"])
@pytest.mark.parametrize("kind", ["random_inputs", "mislabeled"])
def test_make_canaries_formats(kind, label_shape):
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(200, 4, 2)).astype("float32")
    classes = rng.integers(0, 5, size=200)
    y = {
        "sparse": classes,
        "column": classes[:, None],
        "one_hot": np.eye(5, dtype="float32")[classes],
    }[label_shape]
    x_canary, y_canary, keep = make_canaries(x, y, 50, kind=kind, seed=1)
    assert x_canary.shape == (50, 4, 2) and x_canary.dtype == x.dtype
    assert y_canary.shape == (50, *y.shape[1:]) and y_canary.dtype == y.dtype
    labels = y_canary.argmax(axis=1) if label_shape == "one_hot" else y_canary.reshape(-1)
    assert set(labels.tolist()) <= set(range(5))
    if kind == "random_inputs":
        np.testing.assert_array_equal(keep, np.arange(200))
        assert abs(x_canary.mean() - 3.0) < 0.5  # the data's coordinate statistics
    else:
        assert len(keep) == 150
        removed = np.setdiff1d(np.arange(200), keep)
        matches = [np.flatnonzero((x[removed] == row).all(axis=(1, 2))) for row in x_canary]
        assert all(len(match) == 1 for match in matches)  # every canary is a removed row
        own = classes[removed[[match[0] for match in matches]]]
        assert (labels != own).all()  # ... with a wrong label
    again = make_canaries(x, y, 50, kind=kind, seed=1)
    np.testing.assert_array_equal(again[0], x_canary)


def test_per_example_losses_match_keras():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 3)).astype("float32")
    y = rng.integers(0, 2, size=7)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    logits = model.predict(x, verbose=0)
    expected = keras.ops.convert_to_numpy(
        keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
    )
    for loss in (
        keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum"),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    ):
        model.compile("sgd", loss)
        np.testing.assert_allclose(per_example_losses(model, x, y), expected, rtol=1e-5)
    model.compile("sgd", "mse")
    np.testing.assert_allclose(
        per_example_losses(model, x, np.ones((7, 2))), ((logits - 1) ** 2).mean(axis=1), rtol=1e-5
    )


# -- audits of real DP training -------------------------------------------------------------------
# Orthogonal canaries: canary j is 100 times the basis vector of its own input
# coordinate, with a random label; the data only use the first few
# coordinates, and the model is linear, bias-free and starts at zero. So
# canary j's loss moves only through updates in which canary j was sampled
# (and through the noise): never trained on, it stays exactly log 2. Without
# noise, or without clipping, the trained canaries stand out; with correct
# DP-SGD they drown in the noise.
NUM_DATA, DATA_DIMS, NUM_CANARIES, SCALE = 100, 8, 300, 100.0
BATCH_SIZE, EPOCHS, LEARNING_RATE = 5, 3, 0.005
POSITIVE_GUESSES = 75  # a quarter of the canaries, all "in" guesses


def _orthogonal_task(seed=0):
    dims = DATA_DIMS + NUM_CANARIES
    rng = np.random.default_rng(seed)
    x = np.zeros((NUM_DATA, dims), "float32")
    x[:, :DATA_DIMS] = rng.standard_normal((NUM_DATA, DATA_DIMS))
    y = (x[:, 0] > 0).astype("int64")
    x_canary = np.zeros((NUM_CANARIES, dims), "float32")
    x_canary[np.arange(NUM_CANARIES), DATA_DIMS + np.arange(NUM_CANARIES)] = SCALE
    y_canary = rng.integers(0, 2, size=NUM_CANARIES)
    return x, y, (x_canary, y_canary)


def _builder(noise_multiplier, l2_norm_clip=1.0):
    def build():
        model = tdk.DPSequential(
            [
                keras.Input((DATA_DIMS + NUM_CANARIES,)),
                keras.layers.Dense(2, use_bias=False, kernel_initializer="zeros"),
            ],
            l2_norm_clip=l2_norm_clip,
            noise_multiplier=noise_multiplier,
            seed=0,
        )
        model.compile(
            keras.optimizers.SGD(LEARNING_RATE),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        return model

    return build


def _audit(noise_multiplier, l2_norm_clip=1.0, seed=0, **kwargs):
    x, y, canaries = _orthogonal_task()
    return audit_dp_training(
        _builder(noise_multiplier, l2_norm_clip),
        x,
        y,
        canaries=canaries,
        epochs=EPOCHS,
        batch_size=BATCH_SIZE,
        delta=DELTA,
        num_positive_guesses=POSITIVE_GUESSES,
        num_negative_guesses=0,
        seed=seed,
        **kwargs,
    )


def _epsilon_of_correct_run(report, noise_multiplier=1.0):
    """The epsilon correct DP-SGD (clip 1, this noise) reports for the run's q and steps."""
    return prv_epsilon(noise_multiplier, report.sampling_probability, report.dp_steps)


@pytest.mark.parametrize("seed", range(3))
def test_correct_dp_training_is_not_flagged(seed):
    report = _audit(noise_multiplier=1.0, seed=seed)
    assert isinstance(report, TrainingAuditReport)
    assert report.claimed_epsilon == report.model_epsilon
    assert math.isfinite(report.model_epsilon)
    assert report.model_epsilon == pytest.approx(_epsilon_of_correct_run(report), rel=1e-3)
    assert report.epsilon_lower_bound <= report.model_epsilon
    assert not report.flagged
    # bookkeeping of the report
    assert report.audit.num_canaries == NUM_CANARIES and report.audit.num_guesses == 75
    assert report.num_train_examples == NUM_DATA + int(report.included.sum())
    assert report.sampling_probability == pytest.approx(BATCH_SIZE / report.num_train_examples)
    assert report.dp_steps == report.model.dp_steps > 0
    assert report.scores.shape == (NUM_CANARIES,)


@pytest.mark.parametrize("canary_kind", ["random_inputs", "mislabeled"])
def test_correct_dp_training_with_made_canaries_is_not_flagged(canary_kind):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 16)).astype("float32")
    y = (x[:, :2].sum(axis=1) > 0).astype("int64")

    def build():
        model = tdk.DPSequential(
            [keras.Input((16,)), keras.layers.Dense(2)],
            l2_norm_clip=1.0,
            noise_multiplier=1.0,
            seed=0,
        )
        model.compile(
            keras.optimizers.SGD(0.5),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        return model

    report = audit_dp_training(
        build, x, y, num_canaries=100, epochs=2, batch_size=16, canary_kind=canary_kind, seed=0
    )
    assert report.audit.num_positive_guesses == report.audit.num_negative_guesses == 10
    assert 0.0 <= report.epsilon_lower_bound <= report.model_epsilon
    assert not report.flagged


# sigma = 1e-4 is beyond what the PRV accountant discretises: it falls back to RDP, with a warning.
@pytest.mark.filterwarnings("ignore:The PRV computation failed:RuntimeWarning")
@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize(
    "broken,noise_multiplier,l2_norm_clip",
    [
        ("no noise", 0.0, 1.0),
        # no clipping: the clip is never reached, and the noise std stays 1,
        # the std that correct clipping at 1 with noise_multiplier 1 adds.
        ("no clipping", 1e-4, 1e4),
    ],
)
def test_broken_dp_training_is_flagged(broken, noise_multiplier, l2_norm_clip, seed):
    report = _audit(noise_multiplier, l2_norm_clip, seed=seed)
    claim = _epsilon_of_correct_run(report)  # what correct DP-SGD would claim
    assert claim < 2.0
    assert report.epsilon_lower_bound > claim, broken
    assert dataclasses.replace(report, claimed_epsilon=claim).flagged
    # The model itself is honest about the missing noise: it claims nothing.
    assert report.model_epsilon > 1e3
    assert not report.flagged


def test_claimed_epsilon_argument_is_tested():
    report = _audit(noise_multiplier=0.0, claimed_epsilon=1.0)
    assert report.claimed_epsilon == 1.0 and math.isinf(report.model_epsilon)
    assert report.flagged


def test_audit_dp_training_with_a_score_function():
    def score_fn(model, x_canary, y_canary):
        logits = model.predict(x_canary, verbose=0)
        return (
            logits[np.arange(len(y_canary)), y_canary]
            - logits[np.arange(len(y_canary)), 1 - y_canary]
        )

    report = _audit(noise_multiplier=0.0, score_fn=score_fn)
    assert report.audit.num_correct == POSITIVE_GUESSES


# -- input validation ---------------------------------------------------------------------------
def _raises(function, *args, match, **kwargs):
    with pytest.raises(DPConfigError, match=match) as info:
        function(*args, **kwargs)
    assert isinstance(info.value, DPError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((11, 10), {}, r"successes <= trials.*successes=11, trials=10"),
        ((-1, 10), {}, r"successes=-1"),
        ((1.5, 10), {}, r"successes=1.5"),
        ((True, 10), {}, r"successes=True"),
        ((0, 0), {}, r"trials=0"),
        ((1, 10), {"confidence": 1.0}, r"confidence=1.0"),
        ((1, 10), {"confidence": float("nan")}, r"confidence=nan"),
        ((1, 10), {"confidence": "0.9"}, r"confidence='0.9'"),
    ],
)
def test_clopper_pearson_validation(args, kwargs, match):
    _raises(clopper_pearson_interval, *args, match=match, **kwargs)


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((-1, 5, 5, 5), {}, r"tp=-1"),
        ((1, 5.0, 5, 5), {}, r"fn=5.0"),
        ((1, 5, None, 5), {}, r"fp=None"),
        ((1, 5, 5, -2), {}, r"tn=-2"),
        ((0, 0, 5, 5), {}, r"tp \+ fn >= 1.*tp=0, fn=0"),
        ((5, 5, 0, 0), {}, r"fp \+ tn >= 1.*fp=0, tn=0"),
        ((5, 5, 5, 5), {"delta": 1.0}, r"delta=1.0"),
        ((5, 5, 5, 5), {"delta": -0.1}, r"delta=-0.1"),
        ((5, 5, 5, 5), {"confidence": 0}, r"confidence=0"),
    ],
)
def test_counts_validation(args, kwargs, match):
    _raises(epsilon_lower_bound_from_counts, *args, match=match, **kwargs)


@pytest.mark.parametrize(
    "scores_in,scores_out,kwargs,match",
    [
        (np.zeros((2, 2)), [0.0], {}, r"scores_in to be a 1-D array.*shape \(2, 2\)"),
        ([0.0], [0.0, float("nan")], {}, r"scores_out without NaN.*1 NaN"),
        ([], [0.0], {}, r"len\(scores_in\)=0"),
        ([0.0], ["a"], {}, r"scores_out to be a 1-D array of numbers"),
        ([0.0], [0.0], {"thresholds": 0}, r"thresholds=0"),
        ([0.0], [0.0], {"thresholds": []}, r"thresholds=\[\]"),
        ([0.0], [0.0], {"thresholds": [float("nan")]}, r"thresholds without NaN"),
        ([0.0], [0.0], {"thresholds": 0.5}, r"thresholds to be a 1-D array"),
        ([0.0], [0.0], {"delta": 2}, r"delta=2"),
        ([0.0], [0.0], {"confidence": -1}, r"confidence=-1"),
    ],
)
def test_scores_validation(scores_in, scores_out, kwargs, match):
    _raises(epsilon_lower_bound_from_scores, scores_in, scores_out, match=match, **kwargs)


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((10, 11, 1.0), {}, r"num_correct <= num_guesses.*num_correct=11, num_guesses=10"),
        ((-1, 0, 1.0), {}, r"num_guesses=-1"),
        ((10, 2.0, 1.0), {}, r"num_correct=2.0"),
        ((10, 5, -1.0), {}, r"epsilon=-1.0"),
        ((10, 5, float("nan")), {}, r"epsilon=nan"),
        ((10, 5, 1.0), {"delta": 1e-5}, r"num_canaries=None, delta=1e-05"),
        ((10, 5, 1.0), {"num_canaries": 5}, r"num_guesses=10, num_canaries=5"),
        ((10, 5, 1.0), {"num_canaries": 0}, r"num_canaries=0"),
        ((10, 5, 1.0), {"delta": 1.5, "num_canaries": 10}, r"delta=1.5"),
    ],
)
def test_one_run_p_value_validation(args, kwargs, match):
    _raises(one_run_p_value, *args, match=match, **kwargs)


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((10, 11), {}, r"num_correct=11, num_guesses=10"),
        ((10.0, 5), {}, r"num_guesses=10.0"),
        ((10, 5), {"delta": 1e-5}, r"num_canaries=None"),
        ((10, 5), {"num_canaries": 3}, r"num_canaries=3"),
        ((10, 5), {"confidence": 1}, r"confidence=1"),
        ((10, 5), {"delta": float("nan"), "num_canaries": 10}, r"delta=nan"),
    ],
)
def test_one_run_bound_validation(args, kwargs, match):
    _raises(one_run_epsilon_lower_bound, *args, match=match, **kwargs)


@pytest.mark.parametrize(
    "scores,included,kwargs,match",
    [
        ([1.0, 2.0], [True], {}, r"included to have the shape of scores.*\(1,\).*\(2,\)"),
        ([1.0, 2.0], [0, 2], {}, r"booleans.*\[2\]"),
        ([1.0, 2.0], ["a", "b"], {}, r"booleans.*'a'"),
        ([1.0, float("nan")], [0, 1], {}, r"scores without NaN"),
        ([], [], {}, r"at least one canary"),
        ([1.0, 2.0], [0, 1], {"num_positive_guesses": -1}, r"num_positive_guesses=-1"),
        ([1.0, 2.0], [0, 1], {"num_negative_guesses": 0.5}, r"num_negative_guesses=0.5"),
        (
            [1.0, 2.0],
            [0, 1],
            {"num_positive_guesses": 2, "num_negative_guesses": 1},
            r"num_positive_guesses=2, num_negative_guesses=1, len\(scores\)=2",
        ),
        ([1.0, 2.0], [0, 1], {"delta": -1.0}, r"delta=-1.0"),
    ],
)
def test_one_run_audit_validation(scores, included, kwargs, match):
    kwargs = {"num_positive_guesses": 1, "num_negative_guesses": 0, **kwargs}
    _raises(one_run_audit, scores, included, match=match, **kwargs)


@pytest.mark.parametrize(
    "x,y,num_canaries,kwargs,match",
    [
        (np.zeros((10, 2)), np.arange(10) % 2, 3, {"kind": "gradient"}, r"kind='gradient'"),
        (np.zeros((10, 2)), np.arange(9) % 2, 3, {}, r"x of shape \(10, 2\), y of shape \(9,\)"),
        (np.zeros((0, 2)), np.zeros(0), 3, {}, r"non-zero number of rows"),
        (np.zeros((10, 2)), np.arange(10) % 2, 0, {}, r"num_canaries=0"),
        (np.zeros((10, 2)), np.arange(10) % 2, 11, {"kind": "mislabeled"}, r"num_canaries=11"),
        (np.zeros((10, 2)), np.full(10, 0.5), 3, {}, r"integer class labels"),
        (np.zeros((10, 2)), np.zeros(10), 3, {}, r"at least 2 classes.*num_classes=1"),
        (np.zeros((10, 2)), np.arange(10) % 3, 3, {"num_classes": 2}, r"num_classes=2"),
        (np.zeros((10, 2)), np.arange(10) % 2, 3, {"num_classes": 1}, r"num_classes=1"),
        (
            np.zeros((10, 2)),
            np.eye(3)[np.arange(10) % 3],
            3,
            {"num_classes": 4},
            r"3 columns.*num_classes=4",
        ),
        (np.zeros((10, 2)), np.ones((10, 3)), 3, {}, r"y of shape \(10, 3\)"),
        (np.zeros((10, 2)), np.arange(10) % 2, 3, {"seed": -1}, r"seed=-1"),
        (np.zeros((10, 2)), np.arange(10) % 2, 3, {"seed": "a"}, r"seed='a'"),
    ],
)
def test_make_canaries_validation(x, y, num_canaries, kwargs, match):
    _raises(make_canaries, x, y, num_canaries, match=match, **kwargs)


def test_per_example_losses_validation():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    x, y = np.zeros((4, 3), "float32"), np.zeros(4, "int64")
    _raises(per_example_losses, model, x, y, match=r"single loss.*loss=None")
    model.compile("sgd", "mse")
    _raises(per_example_losses, model, x, y, batch_size=0, match=r"batch_size=0")


def _tiny_builder():
    model = tdk.DPSequential(
        [keras.Input((4,)), keras.layers.Dense(2)], l2_norm_clip=1.0, noise_multiplier=1.0
    )
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _plain_builder():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"build_model": None}, r"build_model=None"),
        ({"epochs": 0}, r"epochs=0"),
        ({"batch_size": 1.5}, r"batch_size=1.5"),
        ({"delta": 0.0}, r"delta=0.0"),
        ({"delta": 1}, r"delta=1"),
        ({"confidence": 1.0}, r"confidence=1.0"),
        ({"claimed_epsilon": -1.0}, r"claimed_epsilon=-1.0"),
        ({"claimed_epsilon": float("nan")}, r"claimed_epsilon=nan"),
        ({"seed": -3}, r"seed=-3"),
        ({"y": np.zeros(5, "int64")}, r"x of shape \(20, 4\), y of shape \(5,\)"),
        ({"num_canaries": 0}, r"num_canaries=0"),
        ({"canary_kind": "images"}, r"kind='images'"),
        ({"canaries": np.zeros((3, 4))}, r"canaries=\(x_canary, y_canary\)"),
        ({"canaries": (np.zeros((3, 4)), np.zeros(2))}, r"shape \(3, 4\).*shape \(2,\)"),
        ({"canaries": (np.zeros((3, 5)), np.zeros(3))}, r"x_canary of shape \(3, 5\)"),
        ({"num_positive_guesses": -1}, r"num_positive_guesses=-1"),
        ({"num_negative_guesses": 2.0}, r"num_negative_guesses=2.0"),
        (
            {"num_positive_guesses": 8, "num_negative_guesses": 3},
            r"num_positive_guesses=8, num_negative_guesses=3, num_canaries=10",
        ),
        ({"build_model": _plain_builder}, r"torchdp_keras DP model.*Sequential"),
        ({"score_fn": lambda model, x, y: np.zeros(3)}, r"10 scores.*3 scores"),
    ],
)
def test_audit_dp_training_validation(kwargs, match):
    rng = np.random.default_rng(0)
    arguments = {
        "build_model": _tiny_builder,
        "x": rng.standard_normal((20, 4)).astype("float32"),
        "y": np.arange(20) % 2,
        "num_canaries": 10,
        "epochs": 1,
        "batch_size": 4,
        "seed": 0,
        **kwargs,
    }
    _raises(audit_dp_training, match=match, **arguments)
