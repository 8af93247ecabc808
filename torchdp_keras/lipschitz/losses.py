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
    "DP_MeanAbsoluteError",
    "DP_MulticlassHKR",
    "DP_TauCategoricalCrossentropy",
]


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
class DP_TauCategoricalCrossentropy(keras.losses.Loss):
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


@keras.saving.register_keras_serializable(package="torchdp_keras")
class DP_MulticlassHKR(keras.losses.Loss):
    """Multiclass hinge-Kantorovich-Rubinstein loss for one-hot labels.

    With `c` the true class (the entry of `y` above 0.5) and `K >= 2` classes:
    `KR = -(z_c - mean_{j != c} z_j)`, `hinge = relu(min_margin - (z_c -
    max_{j != c} z_j))`, `loss = alpha * hinge + KR`.

    `get_L() = (alpha + 1) * sqrt(2)`: the KR gradient is
    `-e_c + 1_{j != c} / (K - 1)`, of norm `sqrt(1 + 1 / (K - 1)) <= sqrt(2)`;
    the hinge gradient is 0 or `-e_c + e_{j*}` (`j*` the arg-max; with ties,
    autograd spreads it evenly over the tied `j`, a convex combination), of
    norm `<= sqrt(2)`; the triangle inequality gives
    `alpha sqrt(2) + sqrt(2)`. The bound is attained for `K = 2` when the
    hinge is active.

    Args:
        alpha: Weight of the hinge term, a finite number `>= 0`.
        min_margin: The margin of the hinge, a finite number `> 0`.
        reduction: Keras reduction of the per-example losses.
        name: Name of the loss.
        dtype: Dtype of the loss computation.

    Raises:
        DPConfigError: `alpha` or `min_margin` is out of range, or (when
            called) there are fewer than 2 classes.
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
        z = _flatten(y_pred)
        y = ops.cast(_flatten(y_true), z.dtype)
        num_classes = z.shape[-1]
        if num_classes is None or num_classes < 2:
            raise DPConfigError(
                f"DP_MulticlassHKR needs at least 2 classes. Received: y_pred.shape="
                f"{tuple(y_pred.shape)}"
            )
        z_true = ops.sum(y * z, axis=-1)
        mean_others = ops.sum((1.0 - y) * z, axis=-1) / (num_classes - 1)
        others = ops.where(y > 0.5, ops.full_like(z, -float("inf")), z)
        max_others = ops.max(others, axis=-1)
        kr = -(z_true - mean_others)
        hinge = ops.relu(self.min_margin - (z_true - max_others))
        return self.alpha * hinge + kr

    def get_L(self) -> float:
        """Returns `(alpha + 1) * sqrt(2)`."""
        return (self.alpha + 1.0) * math.sqrt(2.0)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"alpha": self.alpha, "min_margin": self.min_margin})
        return config


@keras.saving.register_keras_serializable(package="torchdp_keras")
class DP_KCosineSimilarity(keras.losses.Loss):
    """Negative cosine similarity with the norm of the logits floored at `K`.

    `loss = -<y / ||y||, z> / max(||z||, K)` (0 for `y = 0`), norms over all
    axes but the batch.

    `get_L() = 1 / K`: with `u = y / ||y||` (`||u|| <= 1`), for `||z|| < K`
    the gradient is `-u / K`; for `||z|| > K` it is
    `-(I - z z^T / ||z||^2) u / ||z||`, of norm `<= 1 / ||z|| < 1 / K`; at
    `||z|| = K` autograd returns a convex combination of the two. The floor
    is computed as `sqrt(max(||z||^2, K^2))`, so the gradient is defined at
    `z = 0` too.

    Args:
        K: The floor of the logits' norm, a finite number `> 0`.
        reduction: Keras reduction of the per-example losses.
        name: Name of the loss.
        dtype: Dtype of the loss computation.

    Raises:
        DPConfigError: `K` is not a finite number `> 0`.
    """

    def __init__(
        self,
        K: float = 1.0,
        reduction: str | None = "sum_over_batch_size",
        name: str = "dp_k_cosine_similarity",
        dtype=None,
    ) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.K = check_positive(K, "K")

    def call(self, y_true, y_pred):
        z = _flatten(y_pred)
        y = ops.cast(_flatten(y_true), z.dtype)
        y_norm = ops.sqrt(ops.sum(ops.square(y), axis=-1, keepdims=True))
        u = y / ops.maximum(y_norm, 1e-30)
        z_norm = ops.sqrt(ops.maximum(ops.sum(ops.square(z), axis=-1), self.K**2))
        return -ops.sum(u * z, axis=-1) / z_norm

    def get_L(self) -> float:
        """Returns `1 / K`."""
        return 1.0 / self.K

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"K": self.K})
        return config


@keras.saving.register_keras_serializable(package="torchdp_keras")
class DP_MeanAbsoluteError(keras.losses.Loss):
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
