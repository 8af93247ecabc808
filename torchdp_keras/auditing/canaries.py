"""Auditing a DP training run with canaries, in one run (Steinke, Nasr and Jagielski 2023).

`audit_dp_training` makes `m` canaries, puts each into the training set
independently with probability 1/2, trains the DP model once with Poisson
sampling, scores every canary with the trained model (by default minus its
loss: memorised canaries have low loss), and runs `one_run_audit` on the
scores. The report puts the empirical lower bound next to the epsilon the
run claims (`model.get_epsilon(delta)` unless a claimed epsilon is given):
a lower bound above the claim (`flagged`) means the implementation, or the
analysis behind the claim, is broken.

What the audit can and cannot say: a lower bound is sound whatever the model
and the canaries, but it is only as strong as the membership test. Canaries
the model can memorise and an attack that sees them (here, black-box losses
of the final model) make the test strong; a lower bound well below the
claimed epsilon is the normal outcome for correct DP training and proves
nothing about tightness.

keras and torch are imported when the functions run, not on import of
`torchdp_keras.auditing`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable

import numpy as np

from torchdp_keras.auditing.bounds import AuditResult, one_run_audit
from torchdp_keras.errors import DPConfigError

__all__ = ["TrainingAuditReport", "audit_dp_training", "make_canaries", "per_example_losses"]

CANARY_KINDS = ("random_inputs", "mislabeled")


def _check_int(value, name: str, minimum: int) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise DPConfigError(
            f"Expected {name} to be an integer >= {minimum}. Received: {name}={value!r}"
        )
    return int(value)


def _check_seed(seed, name: str = "seed"):
    if seed is None or isinstance(seed, np.random.Generator):
        return seed
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
        raise DPConfigError(
            f"Expected {name} to be None or an integer >= 0. Received: {name}={seed!r}"
        )
    return int(seed)


def _label_format(y: np.ndarray, num_classes: int | None) -> tuple[str, int]:
    """("sparse" | "one_hot", number of classes) of classification labels."""
    if y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1):
        flat = y.reshape(-1)
        if (
            not np.issubdtype(flat.dtype, np.number)
            or np.issubdtype(flat.dtype, np.complexfloating)
            or not np.all(np.isfinite(flat))
            or not np.all(flat == np.round(flat))
            or flat.min() < 0
        ):
            raise DPConfigError(
                "Expected integer class labels (or one-hot rows) in y to make canaries; "
                "for other targets pass canaries=(x_canary, y_canary) and a score_fn. "
                f"Received: y of dtype {y.dtype} with values such as {flat[:3].tolist()}"
            )
        if num_classes is not None and flat.max() >= num_classes:
            raise DPConfigError(
                f"Expected labels in [0, num_classes). Received: num_classes={num_classes} "
                f"and a label {int(flat.max())} in y"
            )
        classes = int(flat.max()) + 1 if num_classes is None else num_classes
        return "sparse", classes
    if (
        y.ndim == 2
        and np.issubdtype(y.dtype, np.number)
        and np.allclose(y.sum(axis=1), 1.0)
        and ((y == 0) | (y == 1)).all()
    ):
        if num_classes is not None and num_classes != y.shape[1]:
            raise DPConfigError(
                f"Expected num_classes to match the {y.shape[1]} columns of one-hot y. "
                f"Received: num_classes={num_classes}"
            )
        return "one_hot", y.shape[1]
    raise DPConfigError(
        "Expected integer class labels or one-hot rows in y to make canaries; for other "
        "targets pass canaries=(x_canary, y_canary) and a score_fn. "
        f"Received: y of shape {y.shape}"
    )


def _format_labels(labels: np.ndarray, like: np.ndarray, kind: str, classes: int) -> np.ndarray:
    if kind == "one_hot":
        return np.eye(classes, dtype=like.dtype)[labels]
    return labels.astype(like.dtype).reshape((-1, *like.shape[1:]))


def make_canaries(
    x: np.ndarray,
    y: np.ndarray,
    num_canaries: int,
    *,
    kind: str = "random_inputs",
    num_classes: int | None = None,
    seed: int | np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Canaries for a classification dataset, and the rows of `x` they leave behind.

    * `"random_inputs"`: inputs drawn independently, coordinate by coordinate,
      from a normal distribution with the mean and standard deviation of that
      coordinate in `x` (the standard deviation floored at 1e-3), each with a
      uniformly random label. Nothing like them is in the data, so a model
      only fits them by memorising them: the strongest canaries for a
      black-box audit. The whole of `x` stays for training.
    * `"mislabeled"`: `num_canaries` rows of `x` drawn without replacement,
      each given a uniformly random label different from its own; those rows
      leave the training data (so only the canary version can be in it).

    Args:
        x: Training inputs, a numpy array of shape `(n, ...)`.
        y: Integer labels of shape `(n,)` or `(n, 1)`, or one-hot rows `(n, k)`.
        num_canaries: m >= 1 (for `"mislabeled"`, at most n).
        kind: `"random_inputs"` or `"mislabeled"`.
        num_classes: Number of classes; default: from `y`.
        seed: Seed or numpy `Generator` of the canaries.

    Returns:
        `(x_canary, y_canary, keep)`: m canaries in the formats of `x` and
        `y`, and the indices of the rows of `x` that remain training data.

    Raises:
        DPConfigError: unknown `kind`, empty or mismatched `x` and `y`, labels
            that are not classes (or not below `num_classes`), a bad `seed`,
            or too many canaries.

    Example:
        >>> x, y = np.zeros((100, 4), "float32"), np.arange(100) % 3
        >>> xc, yc, keep = make_canaries(x, y, 10, seed=0)
        >>> xc.shape, yc.shape, len(keep)
        ((10, 4), (10,), 100)
    """
    if kind not in CANARY_KINDS:
        raise DPConfigError(f"Expected kind in {CANARY_KINDS}. Received: kind={kind!r}")
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim == 0 or y.ndim == 0 or len(x) != len(y) or len(x) == 0:
        raise DPConfigError(
            "Expected x and y with the same, non-zero number of rows. Received: x of shape "
            f"{x.shape}, y of shape {y.shape}"
        )
    m = _check_int(num_canaries, "num_canaries", 1)
    seed = _check_seed(seed)
    if num_classes is not None:
        num_classes = _check_int(num_classes, "num_classes", 2)
    label_kind, classes = _label_format(y, num_classes)
    if classes < 2:
        raise DPConfigError(
            f"Expected at least 2 classes for random labels. Received: num_classes={classes}"
        )
    rng = np.random.default_rng(seed)
    if kind == "random_inputs":
        flat = x.reshape(len(x), -1).astype(np.float64)
        mean, std = flat.mean(axis=0), np.maximum(flat.std(axis=0), 1e-3)
        inputs = (mean + std * rng.standard_normal((m, flat.shape[1]))).astype(x.dtype)
        labels = rng.integers(0, classes, size=m)
        inputs = inputs.reshape((m, *x.shape[1:]))
        return inputs, _format_labels(labels, y, label_kind, classes), np.arange(len(x))
    if m > len(x):
        raise DPConfigError(
            "Expected num_canaries <= len(x) for mislabeled canaries. Received: "
            f"num_canaries={m}, len(x)={len(x)}"
        )
    chosen = rng.choice(len(x), size=m, replace=False)
    own = y[chosen].argmax(axis=1) if label_kind == "one_hot" else y[chosen].reshape(-1)
    labels = (own.astype(np.int64) + rng.integers(1, classes, size=m)) % classes
    keep = np.setdiff1d(np.arange(len(x)), chosen)
    return x[chosen], _format_labels(labels, y, label_kind, classes), keep


def per_example_losses(model, x, y, *, batch_size: int = 256) -> np.ndarray:
    """Loss of every example under the model's compiled loss, unreduced.

    The loss given to `compile` (a `keras.losses.Loss`, a loss function or
    its name) is applied without reduction; any axes beyond the first are
    averaged, as Keras's reduction would.

    Args:
        model: A compiled single-output Keras model.
        x: Inputs.
        y: Targets.
        batch_size: Batch size of the forward passes.

    Returns:
        A float64 array of shape `(len(x),)`.

    Raises:
        DPConfigError: the model has no loss, or several (multi-output models
            need a `score_fn` of their own), or `batch_size` is not an
            integer >= 1.

    Example:
        >>> import keras
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        >>> per_example_losses(model, np.zeros((5, 3), "float32"), np.zeros(5, "int64")).shape
        (5,)
    """
    import keras

    batch_size = _check_int(batch_size, "batch_size", 1)
    loss = getattr(model, "loss", None)
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    if loss is None or not callable(loss):
        raise DPConfigError(
            "Expected a model compiled with a single loss to score canaries by their loss "
            f"(or pass score_fn). Received: loss={loss!r}"
        )
    y_pred = model.predict(x, batch_size=batch_size, verbose=0)
    if not isinstance(y_pred, np.ndarray):
        raise DPConfigError(
            "Expected a single-output model to score canaries by their loss (or pass "
            f"score_fn). Received outputs of type {type(y_pred).__name__}"
        )
    dtype = getattr(loss, "dtype", None) or keras.config.floatx()
    y_true_t = keras.ops.convert_to_tensor(np.asarray(y))
    y_pred_t = keras.ops.convert_to_tensor(y_pred, dtype=dtype)
    if isinstance(loss, keras.losses.Loss):
        values = loss.call(y_true_t, y_pred_t)  # unreduced, whatever its reduction
    else:
        values = loss(y_true_t, y_pred_t)
    values = np.asarray(keras.ops.convert_to_numpy(values), dtype=np.float64)
    values = values.reshape(len(y_pred), -1).mean(axis=1)
    return values


@dataclasses.dataclass(frozen=True)
class TrainingAuditReport:
    """The outcome of `audit_dp_training`.

    Attributes:
        audit: The one-run audit (`AuditResult`) of the canaries' scores.
        claimed_epsilon: The epsilon the run claims at `delta`: the one given
            to `audit_dp_training`, else `model.get_epsilon(delta)`.
        model_epsilon: What `model.get_epsilon(delta)` reported (inf when the
            run was not private at all, e.g. `noise_multiplier=0`).
        delta: The delta of both epsilons.
        scores: The canaries' scores (higher: more likely a member).
        included: Whether each canary was in the training set.
        num_train_examples: Training-set size, included canaries counted.
        sampling_probability: The Poisson sampling rate q of the run
            (`batch_size / num_train_examples`), as accounted.
        dp_steps: DP updates the model took (`model.dp_steps`).
        model: The trained model.
    """

    audit: AuditResult
    claimed_epsilon: float
    model_epsilon: float
    delta: float
    scores: np.ndarray = dataclasses.field(repr=False, compare=False)
    included: np.ndarray = dataclasses.field(repr=False, compare=False)
    num_train_examples: int = 0
    sampling_probability: float = math.nan
    dp_steps: int = 0
    model: object = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def epsilon_lower_bound(self) -> float:
        """The empirical lower bound (holds with probability >= the audit's confidence)."""
        return self.audit.epsilon_lower_bound

    @property
    def flagged(self) -> bool:
        """True when the lower bound exceeds the claimed epsilon: the claim is refuted.

        A correct implementation is flagged with probability at most
        `1 - confidence`. A run that claims nothing (`claimed_epsilon` inf,
        as `model.get_epsilon` reports for `noise_multiplier=0`) is never
        flagged: pass the epsilon it should have met as `claimed_epsilon`.
        """
        return self.epsilon_lower_bound > self.claimed_epsilon


def _concat_rows(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(p) for p in parts], axis=0)


def audit_dp_training(
    build_model: Callable[[], object],
    x: np.ndarray,
    y: np.ndarray,
    *,
    num_canaries: int = 1000,
    epochs: int = 10,
    batch_size: int = 64,
    delta: float = 1e-5,
    confidence: float = 0.95,
    canary_kind: str = "random_inputs",
    canaries: tuple[np.ndarray, np.ndarray] | None = None,
    num_classes: int | None = None,
    num_positive_guesses: int | None = None,
    num_negative_guesses: int | None = None,
    claimed_epsilon: float | None = None,
    score_fn: Callable[[object, np.ndarray, np.ndarray], np.ndarray] | None = None,
    seed: int | np.random.Generator | None = None,
    verbose: int = 0,
) -> TrainingAuditReport:
    """Trains a DP model once with canaries and audits it (one-run audit).

    Steps: make `num_canaries` canaries (`make_canaries`, or the given
    `canaries`); include each in the training set independently with
    probability 1/2; train `build_model()` on the result with
    `fit(PrivateDataLoader(x_train, y_train, batch_size), epochs=epochs,
    target_delta=delta)` (Poisson sampling, as the accountant assumes);
    score every canary with `score_fn(model, x_canary, y_canary)` (default:
    minus its loss, `per_example_losses`); guess "in" for the
    `num_positive_guesses` highest scores and "out" for the
    `num_negative_guesses` lowest, and bound epsilon with `one_run_audit`.

    Guarantee: if the training is (eps, `delta`)-DP with respect to adding or
    removing one example, then with probability >= `confidence` over the
    canaries' inclusion and the training, the report's
    `epsilon_lower_bound` is at most eps; so `flagged` (lower bound above the
    claimed epsilon) happens with probability at most `1 - confidence` for a
    correct implementation whose claim is right.

    Args:
        build_model: Returns a fresh, compiled torchdp_keras DP model (for
            example a `DPSequential` with `l2_norm_clip` and
            `noise_multiplier`); called once.
        x: Training inputs (numpy array), without canaries.
        y: Training labels: integer classes or one-hot rows (any targets
            when `canaries` and `score_fn` are given).
        num_canaries: m, when the canaries are made here (ignored with `canaries`).
        epochs: Training epochs.
        batch_size: Expected batch size of the Poisson sampler.
        delta: The delta of the claimed and of the audited epsilon, in (0, 1).
        confidence: Confidence of the lower bound, in (0, 1).
        canary_kind: `"random_inputs"` (default) or `"mislabeled"`, see
            `make_canaries`.
        canaries: Optional `(x_canary, y_canary)` to use instead.
        num_classes: Number of classes of the random labels (default: from `y`).
        num_positive_guesses: k_pos; default m // 10. Fix it before
            training: choosing it after seeing the scores voids the guarantee.
        num_negative_guesses: k_neg; default m // 10.
        claimed_epsilon: The epsilon to test; default `model.get_epsilon(delta)`
            after training (inf if the run had no noise).
        score_fn: `(model, x_canary, y_canary) -> (m,)` scores, higher meaning
            "more likely a member"; it must use the trained model only, never
            the inclusion.
        seed: Seed (int >= 0 or numpy `Generator`) of the canaries, of their
            inclusion and of the sampler;
            the model's own noise is seeded by `build_model` (e.g.
            `DPSequential(..., seed=...)`).
        verbose: Passed to `fit`.

    Returns:
        A `TrainingAuditReport`.

    Raises:
        DPConfigError: an argument is out of range, `x` and `y` (or the two
            parts of `canaries`) differ in rows, canaries are not shaped like
            the data, `score_fn` returns the wrong number of scores, or
            `build_model` returns something that is not a torchdp_keras DP
            model.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> x = rng.normal(size=(1000, 20)).astype("float32")
        >>> y = (x[:, 0] > 0).astype("int64")
        >>> def build():
        ...     model = torchdp_keras.DPSequential(
        ...         [keras.Input((20,)), keras.layers.Dense(10)],
        ...         l2_norm_clip=1.0, noise_multiplier=1.0, seed=0)
        ...     model.compile(keras.optimizers.SGD(0.5),
        ...                   keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        ...     return model
        >>> report = audit_dp_training(build, x, y, num_canaries=500, epochs=2, seed=0)
        >>> report.flagged
        False
    """
    from torchdp_keras.data import PrivateDataLoader

    if not callable(build_model):
        raise DPConfigError(
            f"Expected build_model to be a function returning a compiled DP model. "
            f"Received: build_model={build_model!r}"
        )
    epochs = _check_int(epochs, "epochs", 1)
    batch_size = _check_int(batch_size, "batch_size", 1)
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not 0 < delta < 1:
        raise DPConfigError(f"Expected delta in (0, 1). Received: delta={delta!r}")
    if claimed_epsilon is not None and (
        isinstance(claimed_epsilon, bool)
        or not isinstance(claimed_epsilon, numbers.Real)
        or math.isnan(claimed_epsilon)
        or claimed_epsilon < 0
    ):
        raise DPConfigError(
            "Expected claimed_epsilon >= 0 (or None). "
            f"Received: claimed_epsilon={claimed_epsilon!r}"
        )
    if (
        isinstance(confidence, bool)
        or not isinstance(confidence, numbers.Real)
        or not 0 < confidence < 1
    ):
        raise DPConfigError(f"Expected confidence in (0, 1). Received: confidence={confidence!r}")
    seed = _check_seed(seed)
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim == 0 or y.ndim == 0 or len(x) != len(y):
        raise DPConfigError(
            "Expected x and y with the same number of rows. Received: x of shape "
            f"{x.shape}, y of shape {y.shape}"
        )
    rng = np.random.default_rng(seed)
    if canaries is None:
        x_canary, y_canary, keep = make_canaries(
            x, y, num_canaries, kind=canary_kind, num_classes=num_classes, seed=rng
        )
    else:
        if not isinstance(canaries, (tuple, list)) or len(canaries) != 2:
            raise DPConfigError(
                "Expected canaries=(x_canary, y_canary). Received: canaries of type "
                f"{type(canaries).__name__}"
            )
        x_canary, y_canary = (np.asarray(part) for part in canaries)
        if (
            x_canary.ndim == 0
            or y_canary.ndim == 0
            or len(x_canary) != len(y_canary)
            or len(x_canary) == 0
        ):
            raise DPConfigError(
                "Expected canaries=(x_canary, y_canary) with the same, non-zero number of "
                f"rows. Received: x_canary of shape {x_canary.shape}, y_canary of shape "
                f"{y_canary.shape}"
            )
        if x_canary.shape[1:] != x.shape[1:] or y_canary.shape[1:] != y.shape[1:]:
            raise DPConfigError(
                "Expected canaries shaped like the rows of x and y. Received: x_canary of "
                f"shape {x_canary.shape} for x of shape {x.shape}, y_canary of shape "
                f"{y_canary.shape} for y of shape {y.shape}"
            )
        keep = np.arange(len(x))
    m = len(x_canary)
    default_guesses = max(1, m // 10)
    k_pos = default_guesses if num_positive_guesses is None else num_positive_guesses
    k_pos = _check_int(k_pos, "num_positive_guesses", 0)
    if num_negative_guesses is None:
        num_negative_guesses = min(default_guesses, max(0, m - k_pos))
    k_neg = _check_int(num_negative_guesses, "num_negative_guesses", 0)
    if k_pos + k_neg > m:
        raise DPConfigError(
            "Expected num_positive_guesses + num_negative_guesses <= the number of canaries. "
            f"Received: num_positive_guesses={k_pos}, num_negative_guesses={k_neg}, "
            f"num_canaries={m}"
        )

    included = rng.random(m) < 0.5
    x_train = _concat_rows([x[keep], x_canary[included]])
    y_train = _concat_rows([y[keep], y_canary[included]])
    order = rng.permutation(len(x_train))
    x_train, y_train = x_train[order], y_train[order]

    model = build_model()
    if not hasattr(model, "get_epsilon") or not hasattr(model, "noise_multiplier"):
        raise DPConfigError(
            "Expected build_model() to return a torchdp_keras DP model (DPSequential, "
            f"DPModel, make_private(...)). Received: {type(model).__name__}"
        )
    loader = PrivateDataLoader(x_train, y_train, batch_size, seed=int(rng.integers(0, 2**31 - 1)))
    model.fit(loader, epochs=epochs, verbose=verbose, target_delta=float(delta))
    model_epsilon = float(model.get_epsilon(float(delta)))
    claim = model_epsilon if claimed_epsilon is None else float(claimed_epsilon)

    if score_fn is None:
        scores = -per_example_losses(model, x_canary, y_canary)
    else:
        scores = np.asarray(score_fn(model, x_canary, y_canary), dtype=np.float64).reshape(-1)
        if scores.shape != (m,):
            raise DPConfigError(
                f"Expected score_fn to return {m} scores, one per canary. Received: "
                f"{scores.size} scores"
            )
    # A NaN loss (a diverged model) ranks its canary last: any fixed function of
    # the trained model is a valid score, so the guarantee is unaffected.
    scores = np.where(np.isnan(scores), -np.inf, scores)
    audit = one_run_audit(
        scores,
        included,
        num_positive_guesses=k_pos,
        num_negative_guesses=k_neg,
        delta=float(delta),
        confidence=confidence,
    )
    return TrainingAuditReport(
        audit=audit,
        claimed_epsilon=claim,
        model_epsilon=model_epsilon,
        delta=float(delta),
        scores=scores,
        included=included,
        num_train_examples=len(x_train),
        sampling_probability=float(loader.sampling_probability),
        dp_steps=int(model.dp_steps),
        model=model,
    )
