"""Keras callbacks for DP training."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import keras

from torchdp_keras.accounting.base import check_delta
from torchdp_keras.errors import DPConfigError

logger = logging.getLogger(__name__)

_LOG_FNS = ("logging", "wandb", "all")


def _max_steps_within(accountant, sigma, q, delta, target_epsilon, limit=10**8) -> int:
    """Largest k such that the history plus k steps of (sigma, q) stays <= target."""

    def fits(k):
        trial = type(accountant)()
        trial.load_state_dict(accountant.state_dict())
        trial.compose(sigma, q, k)
        return trial.get_epsilon(delta) <= target_epsilon

    if not fits(0):
        return 0
    low, high = 0, 1
    while fits(high):
        low, high = high, high * 2
        if high > limit:
            return limit
    while high - low > 1:
        mid = (low + high) // 2
        if fits(mid):
            low = mid
        else:
            high = mid
    return low


class DPAccountant(keras.callbacks.Callback):
    """Reports the epsilon spent at the end of each epoch; can stop at a target.

    The deel-lipdp callback of the same name, for every DP model of
    torchdp_keras. At each epoch end it writes `epsilon` into the logs (so the
    progress bar and `History` show it) and to `log_fn`; `user_epsilon`
    instead for a model trained on a `UserDataLoader` (its epsilon protects
    users, not examples). DP models add one
    automatically in `fit` when a delta is known; add your own to log
    elsewhere or to stop at a budget.

    Args:
        log_fn: "logging" (default: `logging.info` on this module's logger),
            "wandb" (`wandb.log`), "all" (both), a callable taking a dict, or
            None (logs dict only).
        delta: Delta of the reported epsilon; default: the model's
            `privacy_delta`.
        target_epsilon: If set, training stops after the last update that
            keeps epsilon <= target_epsilon: the number of updates allowed is
            computed when training begins and checked at every batch, so the
            model never overspends.

    Example:
        >>> x = np.random.default_rng(0).random((1000, 4), dtype="float32")
        >>> y = x.sum(axis=1, keepdims=True)
        >>> model = tdk.DPSequential([keras.Input((4,)), keras.layers.Dense(1)],
        ...                          l2_norm_clip=1.0, noise_multiplier=1.1)
        >>> model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        >>> loader = tdk.PrivateDataLoader(x, y, batch_size=100, seed=0)
        >>> history = model.fit(loader, epochs=50, target_delta=1e-5, verbose=0,
        ...                     callbacks=[DPAccountant(target_epsilon=3.0)])
        >>> epsilons = history.history["epsilon"]
        >>> len(epsilons) < 50, epsilons[-1] <= 3.0  # stopped within the budget
        (True, True)
    """

    def __init__(
        self,
        log_fn: str | Callable[[dict], None] | None = "logging",
        delta: float | None = None,
        target_epsilon: float | None = None,
    ):
        super().__init__()
        if log_fn is not None and not callable(log_fn) and log_fn not in _LOG_FNS:
            raise DPConfigError(
                f"Expected log_fn in {_LOG_FNS}, a callable or None. Received: log_fn={log_fn!r}"
            )
        if target_epsilon is not None and (
            isinstance(target_epsilon, bool)
            or not isinstance(target_epsilon, (int, float))
            or math.isnan(target_epsilon)
            or target_epsilon <= 0
        ):
            raise DPConfigError(
                f"Expected target_epsilon > 0. Received: target_epsilon={target_epsilon!r}"
            )
        self.log_fn = log_fn
        self.delta = None if delta is None else check_delta(delta)
        self.target_epsilon = target_epsilon
        self._allowed_steps = None
        self._wandb = None

    def _delta(self):
        return self.delta if self.delta is not None else self.model.privacy_delta

    def on_train_begin(self, logs=None):
        if not hasattr(self.model, "get_epsilon"):
            raise DPConfigError(
                "DPAccountant needs a torchdp_keras DP model. "
                f"Received: {type(self.model).__name__}"
            )
        if self.log_fn in ("wandb", "all"):
            try:
                import wandb
            except ImportError as error:
                raise DPConfigError(
                    f"log_fn={self.log_fn!r} needs the wandb package, which is not installed."
                ) from error
            self._wandb = wandb
        self._allowed_steps = None
        if self.target_epsilon is not None:
            model = self.model
            q = model.privacy_ledger.sampling_probability
            if q is None:
                raise DPConfigError(
                    "target_epsilon needs a known sampling probability (array inputs to "
                    "fit() or a DPKerasConfig)."
                )
            delta = self._delta()
            if delta is None:
                raise DPConfigError("target_epsilon needs a delta. Received: delta=None")
            self._allowed_steps = model.dp_steps + _max_steps_within(
                model.accountant, model.noise_multiplier, q, delta, self.target_epsilon
            )
            if model.dp_steps >= self._allowed_steps:
                model.stop_training = True

    def on_train_batch_begin(self, batch, logs=None):
        if self._allowed_steps is not None and self.model.dp_steps >= self._allowed_steps:
            self.model.stop_training = True

    def on_train_batch_end(self, batch, logs=None):
        if self._allowed_steps is not None and self.model.dp_steps >= self._allowed_steps:
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        delta = self._delta()
        if delta is None:
            return
        epsilon = self.model.get_epsilon(delta)
        unit = getattr(self.model, "privacy_unit", "example")
        key = "epsilon" if unit == "example" else f"{unit}_epsilon"
        if logs is not None:
            logs[key] = epsilon
        record = {
            "epoch": epoch,
            key: epsilon,
            "delta": delta,
            "steps": self.model.dp_steps,
            "privacy_unit": unit,
        }
        if self.log_fn in ("logging", "all"):
            logger.info("DP guarantee after epoch %d: %s", epoch, record)
        if self.log_fn in ("wandb", "all"):
            self._wandb.log(record)
        if callable(self.log_fn):
            self.log_fn(record)
