"""Losses for Lipschitz DP models, each with a bound on its gradient w.r.t. the logits.

`get_L()` returns `L` such that, for every example, every `y_pred` and every
valid `y_true`, the gradient of that example's (unreduced) loss with respect
to its own `y_pred` has L2 norm `<= L`. The per-example loss is what `call()`
returns (shape `(batch,)`); the reduction of the Keras loss (by default the
mean over the batch) scales the gradients further and is accounted for by
the model, not here.
"""

from __future__ import annotations

import math
import numbers

import keras
from keras import ops

from torchdp_keras._validation import check_positive
from torchdp_keras.errors import DPConfigError

__all__ = [
    "DP_KCosineSimilarity",
    "DP_Loss",
    "DP_MeanAbsoluteError",
    "DP_MulticlassHKR",
    "DP_MulticlassHinge",
    "DP_MulticlassKR",
    "DP_TauBCE",
    "DP_TauCategoricalCrossentropy",
]


class DP_Loss(keras.losses.Loss):
    """deel-lipdp's base of the losses: a Keras loss with a known Lipschitz constant.

    Subclass it (or any `keras.losses.Loss` with a `get_L` method) for a loss of
    your own: `get_L()` must bound, for every example, the norm of the
    gradient of that example's loss (what `call` returns for it) with respect
    to its own `y_pred`.
    """

    def get_L(self) -> float:
        """The Lipschitz constant `L` of the per-example loss w.r.t. `y_pred`."""
        raise NotImplementedError(f"{type(self).__name__} must define get_L()")


def _check_non_negative(value, name: str) -> float:
    if (
        not isinstance(value, numbers.Real)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value < 0
    ):
        raise DPConfigError(f"Expected {name} >= 0 and finite. Received: {name}={value!r}")
    return float(value)


def _flatten(x):
    """Reshapes `(B, ...)` to `(B, n)`."""
    if len(x.shape) == 2:
        return x
    return ops.reshape(x, (x.shape[0], -1))


@keras.saving.register_keras_serializable(package="torchdp_keras")
class DP_TauCategoricalCrossentropy(DP_Loss):
    """Categorical cross-entropy with temperature: `CE(softmax(tau * z), y) / tau`.

    For labels `y` in the probability simplex (one-hot in particular), the
    gradient w.r.t. the logits `z` is `softmax(tau z) - y`, the difference of
    two points of the simplex. Its squared norm is a convex function of the
    pair, so it is largest at vertices: `||e_i - e_j|| = sqrt(2)`. Hence
    `get_L() = sqrt(2)`, independently of `tau`.

    Args:
        tau: The temperature, a finite number `> 0`.
        reduction: Keras reduction of the per-example losses.
        name: Name of the loss.
        dtype: Dtype of the loss computation.

    Raises:
        DPConfigError: `tau` is not a finite number `> 0`.
    """

    def __init__(
        self,
        tau: float,
        reduction: str | None = "sum_over_batch_size",
        name: str = "dp_tau_categorical_crossentropy",
        dtype=None,
    ) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.tau = check_positive(tau, "tau")

    def call(self, y_true, y_pred):
        y_true = ops.cast(_flatten(y_true), y_pred.dtype)
        logits = _flatten(y_pred) * self.tau
        return ops.categorical_crossentropy(y_true, logits, from_logits=True) / self.tau

    def get_L(self) -> float:
        """Returns `sqrt(2)`, the bound on `||softmax(tau z) - y||`."""
        return math.sqrt(2.0)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"tau": self.tau})
        return config


def _one_hot_pair(y_true, y_pred, loss: str):
    z = _flatten(y_pred)
    y = ops.cast(_flatten(y_true), z.dtype)
    if z.shape[-1] is None:
        raise DPConfigError(f"{loss} needs a known number of outputs. Received: {z.shape}")
    return y, z


def _kr_per_example(y, z):
    """deel-lip's multiclass KR term at balanced class frequencies, per example.

    deel-lip weights the logit of class c by `B / n_c` (positives) and
    `B / (B - n_c)` (negatives), with `n_c` the positives of class c *in the
    batch*, and averages over the classes. With every class at its expected
    share (`n_c = B / C`) this is `z_true - mean_{j != true} z_j`; for one
    output (binary labels in {0, 1}) `(2y - 1) z`. Unlike the batch-level
    form, it depends on the example alone, so its gradient has the bound
    below whatever the rest of the batch is.
    """
    num_classes = z.shape[-1]
    if num_classes == 1:
        return ops.sum((2.0 * y - 1.0) * z, axis=-1)
    positive = ops.cast(y > 0.5, z.dtype)
    z_true = ops.sum(positive * z, axis=-1)
    mean_others = ops.sum((1.0 - positive) * z, axis=-1) / (num_classes - 1)
    return z_true - mean_others


def _hinge_one_vs_all(y, z, min_margin):
    """deel-lip's multiclass hinge: `mean_c relu(min_margin / 2 - s_c z_c)`, `s_c = +-1`."""
    sign = ops.where(y > 0, ops.ones_like(z), -ops.ones_like(z))
    return ops.mean(ops.relu(min_margin / 2.0 - sign * z), axis=-1)


@keras.saving.register_keras_serializable(package="torchdp_keras")
class DP_MulticlassHKR(DP_Loss):
    """deel-lip's multiclass hinge-KR loss: `-KR + alpha * hinge`, per example.

    `hinge` is deel-lip's one-vs-all multiclass hinge, `mean_c relu(
    min_margin / 2 - s_c z_c)` with `s_c = +1` for the true class and -1
    otherwise. `KR` is deel-lip's multiclass Kantorovich-Rubinstein term at
    balanced class frequencies (see `_kr_per_example`): deel-lip normalises
    it by the class counts *of the batch*, which makes an example's loss
    depend on the other examples (and its gradient up to `B` times larger
    for a class with one example in the batch); no per-example bound holds
    for that form, so it cannot be trained clipless. The two coincide when
    the batch is balanced.

    `get_L() = sqrt(2) + alpha`: the KR gradient is `-e_c + 1_{j != c} /
    (C - 1)`, of norm `sqrt(1 + 1 / (C - 1)) <= sqrt(2)` (1 for one
    output); the hinge gradient has entries in `{0, +-1/C}`, norm `<= 1 /
    sqrt(C) <= 1`; triangle inequality. deel-lipdp states `alpha + 1`, which
    the KR term alone exceeds (`sqrt(2)` for two classes).

    Args:
        alpha: Weight of the hinge term, a finite number `>= 0`.
        min_margin: The margin, a finite number `> 0`.
        reduction: Keras reduction of the per-example losses.
        name: Name of the loss.
        dtype: Dtype of the loss computation.

    Raises:
        DPConfigError: `alpha` or `min_margin` is out of range.
    """

    def __init__(
        self,
        alpha: float = 10.0,
        min_margin: float = 1.0,
        reduction: str | None = "sum_over_batch_size",
        name: str = "dp_multiclass_hkr",
        dtype=None,
    ) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.alpha = _check_non_negative(alpha, "alpha")
        self.min_margin = check_positive(min_margin, "min_margin")

    def call(self, y_true, y_pred):
        y, z = _one_hot_pair(y_true, y_pred, "DP_MulticlassHKR")
        return self.alpha * _hinge_one_vs_all(y, z, self.min_margin) - _kr_per_example(y, z)

    def get_L(self) -> float:
        """Returns `sqrt(2) + alpha`."""
        return math.sqrt(2.0) + self.alpha

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"alpha": self.alpha, "min_margin": self.min_margin})
        return config


@keras.saving.register_keras_serializable(package="torchdp_keras")
class DP_MulticlassHinge(DP_Loss):
    """deel-lip's one-vs-all multiclass hinge: `mean_c relu(min_margin / 2 - s_c z_c)`.

    `s_c = +1` for the true class (labels > 0), -1 otherwise. The gradient has
    entries in `{0, +-1/C}` for `C` outputs: `get_L() = 1` (`1 / sqrt(C)` in
    fact; deel-lipdp's value).

    Args:
        min_margin: The margin, a finite number `> 0`.
        reduction, name, dtype: As `keras.losses.Loss`.
    """

    def __init__(
        self,
        min_margin: float = 1.0,
        reduction: str | None = "sum_over_batch_size",
        name: str = "dp_multiclass_hinge",
        dtype=None,
    ) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.min_margin = check_positive(min_margin, "min_margin")

    def call(self, y_true, y_pred):
        y, z = _one_hot_pair(y_true, y_pred, "DP_MulticlassHinge")
        return _hinge_one_vs_all(y, z, self.min_margin)

    def get_L(self) -> float:
        """Returns 1."""
        return 1.0

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"min_margin": self.min_margin})
        return config


@keras.saving.register_keras_serializable(package="torchdp_keras")
class DP_MulticlassKR(DP_Loss):
    """deel-lip's multiclass KR term, per example: `z_true - mean_{j != true} z_j`.

    See `_kr_per_example` for why the batch-normalised form of deel-lip is
    replaced by its value at balanced class frequencies. `get_L() = sqrt(2)`
    (deel-lipdp states 1, which two classes already exceed).

    Args:
        reduction, name, dtype: As `keras.losses.Loss`.
    """

    def __init__(
        self,
        reduction: str | None = "sum_over_batch_size",
        name: str = "dp_multiclass_kr",
        dtype=None,
    ) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def call(self, y_true, y_pred):
        y, z = _one_hot_pair(y_true, y_pred, "DP_MulticlassKR")
        return _kr_per_example(y, z)

    def get_L(self) -> float:
        """Returns `sqrt(2)`."""
        return math.sqrt(2.0)


@keras.saving.register_keras_serializable(package="torchdp_keras")
class DP_TauBCE(DP_Loss):
    """Binary cross-entropy with temperature: `mean_j BCE(y_j, sigmoid(tau z_j)) / tau`.

    Labels in {0, 1} (or {-1, 1}, read as y > 0). The gradient w.r.t. `z_j`
    is `(sigmoid(tau z_j) - y_j) / n` for `n` outputs, entries in
    `[-1/n, 1/n]`: `get_L() = 1` (`1 / sqrt(n)` in fact).

    Args:
        tau: The temperature, a finite number `> 0`.
        reduction, name, dtype: As `keras.losses.Loss`.
    """

    def __init__(
        self,
        tau: float,
        reduction: str | None = "sum_over_batch_size",
        name: str = "dp_tau_bce",
        dtype=None,
    ) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.tau = check_positive(tau, "tau")

    def call(self, y_true, y_pred):
        y, z = _one_hot_pair(y_true, y_pred, "DP_TauBCE")
        labels = ops.cast(y > 0, z.dtype)
        logits = z * self.tau
        # log(1 + exp(l)) - y l, computed stably: the sigmoid cross-entropy.
        per_output = ops.relu(logits) - logits * labels + ops.log1p(ops.exp(-ops.abs(logits)))
        return ops.mean(per_output, axis=-1) / self.tau

    def get_L(self) -> float:
        """Returns 1."""
        return 1.0

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"tau": self.tau})
        return config


@keras.saving.register_keras_serializable(package="torchdp_keras")
class DP_KCosineSimilarity(DP_Loss):
    """deel-lipdp's negative cosine similarity with both norms floored at `K`.

    `loss = -<y / max(||y||, K), z / max(||z||, K)>` along `axis`
    (deel-lipdp's `l2_normalize(., epsilon=K**2)` of both; it stores `K**2`
    as `self.K`, and so does this port).

    `get_L() = 1 / K`: with `u = y / max(||y||, K)` (`||u|| <= 1`), the map
    `z -> z / max(||z||, K)` has Jacobian `I / K` inside the ball and
    `(I - z z^T / ||z||^2) / ||z||` outside, both of norm `<= 1 / K`. deel-lipdp
    returns `1 / self.K = 1 / K**2`, which is below the true constant for
    `K > 1` (noise too small for the bound): the sound `1 / K` is kept.

    Args:
        K: The floor of the norms, a finite number `> 0`.
        axis: The axis of the similarity: -1 (or 1) on `(batch, outputs)`.
        reduction, name, dtype: As `keras.losses.Loss`.

    Raises:
        DPConfigError: `K` is not a finite number `> 0`, or another `axis`.
    """

    def __init__(
        self,
        K: float = 1.0,
        axis: int = -1,
        reduction: str | None = "sum_over_batch_size",
        name: str = "dp_k_cosine_similarity",
        dtype=None,
    ) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        floor = check_positive(K, "K")
        if axis not in (-1, 1):
            raise DPConfigError(
                f"Expected axis=-1 (outputs of shape (batch, n)). Received: axis={axis!r}"
            )
        self.axis = axis
        self.K = floor**2  # deel-lipdp's attribute: the epsilon of l2_normalize

    @property
    def floor(self) -> float:
        """The floor `K` of the norms (`sqrt(self.K)`)."""
        return math.sqrt(self.K)

    def call(self, y_true, y_pred):
        z = _flatten(y_pred)
        y = ops.cast(_flatten(y_true), z.dtype)
        y_norm = ops.sqrt(ops.maximum(ops.sum(ops.square(y), axis=-1, keepdims=True), self.K))
        z_norm = ops.sqrt(ops.maximum(ops.sum(ops.square(z), axis=-1), self.K))
        return -ops.sum((y / y_norm) * z, axis=-1) / z_norm

    def get_L(self) -> float:
        """Returns `1 / K` (see the class docstring; not deel-lipdp's `1 / K**2`)."""
        return 1.0 / self.floor

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"K": self.floor, "axis": self.axis})
        return config


@keras.saving.register_keras_serializable(package="torchdp_keras")
class DP_MeanAbsoluteError(DP_Loss):
    """Mean absolute error over all non-batch elements: `mean_i |z_i - y_i|`.

    The gradient is `sign(z - y) / n` (entries in `{-1/n, 0, 1/n}` for `n`
    elements), of norm `<= 1 / sqrt(n) <= 1`, so `get_L() = 1` (`n` is not
    known when the loss is created; the bound is tight for `n = 1`).

    Args:
        reduction: Keras reduction of the per-example losses.
        name: Name of the loss.
        dtype: Dtype of the loss computation.
    """

    def __init__(
        self,
        reduction: str | None = "sum_over_batch_size",
        name: str = "dp_mean_absolute_error",
        dtype=None,
    ) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def call(self, y_true, y_pred):
        z = _flatten(y_pred)
        y = ops.cast(_flatten(y_true), z.dtype)
        return ops.mean(ops.abs(z - y), axis=-1)

    def get_L(self) -> float:
        """Returns 1."""
        return 1.0
