"""What a DP model knows about the privacy it has spent, and how `fit` plans it.

Every DP model (per-example and Lipschitz) owns a `PrivacyLedger`
(`model.privacy_ledger`): one composition event per DP update it actually
performed, with the noise multiplier and the sampling probability of that
update. From it come `model.get_epsilon()`, the `epsilon` entry of `fit`
logs, and the enforcement of a `DPKerasConfig`'s budget.

`fit` resolves a `SamplingPlan` once (where q, n and the batches come from)
and hands it to the ledger; updates whose q cannot be known (a generator
without a config, `train_on_batch` outside `fit`) are counted as
unaccounted, and `get_epsilon` then reports infinity rather than a value
that could be below the truth.

The ledger travels with the weights (`save_own_variables`), so that
`model.save`, `save_weights` and `keras.callbacks.BackupAndRestore` all carry
it: a resumed run continues the accountant history and the update count
that keys the noise.
"""

from __future__ import annotations

import warnings

import keras

from torchdp_keras.accounting.analysis import TINY_TRAIN_SIZE
from torchdp_keras.accounting.base import Accountant, check_delta
from torchdp_keras.accounting.ledger import PrivacyLedger, decode_state, encode_state
from torchdp_keras.data.sampling_plan import SamplingPlan
from torchdp_keras.errors import DPConfigError
from torchdp_keras.models.keras_hooks import KerasModelBase

PRIVACY_STATE_KEY = "privacy_state"

__all__ = ["PRIVACY_STATE_KEY", "PrivacyTrackingMixin"]


class PrivacyTrackingMixin(KerasModelBase):
    """Ledger, epsilon reporting, sampling plan and persistence of a DP model.

    State (declared in `_init_privacy_tracking`): `privacy_ledger`, the
    `SamplingPlan` of the current `fit` (`sampling_plan`) and the keys of the
    warnings already given. What a concrete model class may refine: the
    batches per update its optimizer accumulates
    (`_planned_accumulation_steps`, default 1) and whether its samples must
    come from the OS CSPRNG (`_requires_secure_sampling`, default False).
    """

    def _init_privacy_tracking(self, ledger: PrivacyLedger) -> None:
        self.privacy_ledger = ledger
        self.sampling_plan: SamplingPlan | None = None
        self._warned_once: frozenset = frozenset()

    def _planned_accumulation_steps(self) -> int:
        """Batches whose clipped sums make one update (1: no accumulation)."""
        return 1

    def _requires_secure_sampling(self) -> bool:
        """Whether `fit` accepts only secure `PrivateDataLoader`s."""
        return False

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned_once:
            self._warned_once = self._warned_once | {key}
            warnings.warn(f"torchdp_keras: {message}", stacklevel=4)

    # -- what the model has spent ------------------------------------------------
    @property
    def accountant(self) -> Accountant:
        """The accountant holding every DP update this model performed."""
        return self.privacy_ledger.accountant

    @property
    def dp_steps(self) -> int:
        """Number of DP updates (optimizer steps) this model has taken."""
        return self.privacy_ledger.steps

    @property
    def dp_keras_config(self):
        """The `DPKerasConfig` this model trains under, or None."""
        return self.privacy_ledger.config

    @property
    def privacy_unit(self) -> str:
        """What the epsilon protects: "example", or "user" (trained on a `UserDataLoader`)."""
        return self.privacy_ledger.privacy_unit

    @property
    def privacy_delta(self) -> float | None:
        """The delta `get_epsilon()` uses: given to `fit`, from the config, or 1/max(n, 2)^1.1."""
        return self.privacy_ledger.delta

    def get_epsilon(self, delta: float | None = None) -> float:
        """Epsilon (upper bound) of all DP updates so far, at `delta`.

        The epsilon is about the model's `privacy_unit`: one example, or one
        user with all of its examples (after training on a `UserDataLoader`).

        Args:
            delta: Defaults to `privacy_delta` (the delta given to `fit`, the
                config's, or 1/max(n, 2)^1.1 for n training examples).

        Returns:
            The epsilon; 0.0 before training; inf if some updates could not be
            accounted (unknown sampling probability).

        Raises:
            DPConfigError: no delta is given and none is known.
        """
        epsilon = self.privacy_ledger.get_epsilon(delta)
        unaccounted = self.privacy_ledger.unaccounted_steps
        if unaccounted:
            self._warn_once(
                "unaccounted",
                f"{unaccounted} DP updates ran with an unknown sampling "
                "probability (no DPKerasConfig and no array inputs to fit()); their "
                "privacy cannot be accounted, so the reported epsilon is inf.",
            )
        return epsilon

    # -- fit -----------------------------------------------------------------------
    def fit(
        self,
        x=None,
        y=None,
        batch_size=None,
        epochs=1,
        verbose="auto",
        callbacks=None,
        validation_split=0.0,
        *,
        target_delta=None,
        **kwargs,
    ):
        """Trains with DP; see `keras.Model.fit`. Logs `epsilon` at each epoch end.

        Args:
            target_delta: The delta of the reported epsilon (default: the
                config's, or 1/max(n, 2)^1.1 for n training examples).
            Other arguments: as `keras.Model.fit`.
        """
        from torchdp_keras.callbacks import DPAccountant

        plan = SamplingPlan.resolve(
            x,
            y,
            batch_size=batch_size,
            validation_split=validation_split,
            config=self.dp_keras_config,
            accumulation_steps=self._planned_accumulation_steps(),
            secure_mode=self._requires_secure_sampling(),
            fit_kwargs=kwargs,
        )
        self._use_sampling_plan(plan, target_delta=target_delta)
        self._give_notices(plan)
        callbacks = list(callbacks or [])
        if self.privacy_delta is not None and not any(
            isinstance(cb, DPAccountant) for cb in callbacks
        ):
            callbacks.insert(0, DPAccountant(log_fn=None))
        # Last, so that it runs after keras.callbacks.BackupAndRestore.
        callbacks.append(_ResumeSync(self.privacy_ledger, plan.loader))
        return super().fit(
            plan.x,
            plan.y,
            batch_size=plan.batch_size,
            epochs=epochs,
            verbose=verbose,
            callbacks=callbacks,
            validation_split=validation_split,
            **plan.fit_kwargs,
        )

    def _use_sampling_plan(self, plan: SamplingPlan, *, target_delta=None) -> None:
        """Adopts a plan: q and n (and a chosen delta) for the ledger."""
        ledger = self.privacy_ledger
        if ledger.steps and plan.privacy_unit != ledger.privacy_unit:
            raise DPConfigError(
                f"Model '{self.name}' has taken {ledger.steps} updates with {ledger.privacy_unit}-"
                f"level privacy; one epsilon cannot account for {plan.privacy_unit}-level "
                "updates too. Train a fresh model for the other unit. Received: a "
                f"{plan.privacy_unit}-level input"
            )
        ledger.privacy_unit = plan.privacy_unit
        self.sampling_plan = plan
        if plan.loader is not None or ledger.config is None:
            ledger.sampling_probability = plan.sampling_probability
        if plan.train_size:
            ledger.train_size = plan.train_size
        if target_delta is not None:
            ledger.target_delta = check_delta(target_delta)

    def _give_notices(self, plan: SamplingPlan) -> None:
        """Warns (once per model) about a delta that n makes meaningless, and the plan's notice."""
        ledger = self.privacy_ledger
        delta, n = ledger.delta, plan.train_size
        if ledger.target_delta is None and n and n < TINY_TRAIN_SIZE:
            self._warn_once(
                "tiny-n",
                f"only {n} training example(s): no delta is meaningful at this "
                f"size (a delta that is not negligible next to 1/n = {1.0 / n:.3g} "
                "allows publishing an example outright). The reported epsilon uses the "
                f"default delta={delta:.3g}; pass fit(..., target_delta=...) to choose it.",
            )
        elif delta is not None and n and delta >= 1.0 / n:
            self._warn_once(
                f"delta>={delta}",
                f"delta={delta} is not smaller than 1/n = {1.0 / n:.3g}: a "
                "mechanism that publishes one random example outright satisfies such "
                "a guarantee. Use a delta well below 1/n.",
            )
        if plan.notice is not None:
            self._warn_once(*plan.notice)

    # -- persistence -----------------------------------------------------------------
    # Stored as UTF-8 JSON in a uint8 array and read back with `json.loads`
    # only (no pickle, no code).
    def _weights_fingerprint(self) -> list:
        return [[list(map(int, w.shape)), str(w.dtype)] for w in self.weights]

    def _privacy_state(self) -> dict:
        return self.privacy_ledger.state_dict(self._weights_fingerprint())

    def save_own_variables(self, store):
        """Saves the model's own variables and its privacy state (see Keras)."""
        super().save_own_variables(store)
        store[PRIVACY_STATE_KEY] = encode_state(self._privacy_state())

    def load_own_variables(self, store):
        """Loads the model's own variables and restores its privacy state.

        Raises:
            PrivacyStateError: the saved state belongs to another model (other
                weights), another accountant or another sampling probability,
                or is malformed; nothing is loaded then.
        """
        keys = list(store.keys())
        if PRIVACY_STATE_KEY not in keys:
            super().load_own_variables(store)
            return
        state = decode_state(store[PRIVACY_STATE_KEY])
        fingerprint = self._weights_fingerprint() if self.built else None
        self.privacy_ledger.check_state(state, fingerprint, self.name)
        super().load_own_variables({k: store[k] for k in keys if k != PRIVACY_STATE_KEY})
        self.privacy_ledger.load_state_dict(state)


class _ResumeSync(keras.callbacks.Callback):
    """Re-applies this fit's plan after a callback restored a privacy state.

    `keras.callbacks.BackupAndRestore` loads the weights (and with them the
    saved privacy state) in `on_train_begin`, after fit() has read its input.
    The accountant history and the update count come from the file; the
    sampling probability, training-set size and delta of the updates to come
    are this fit's, and the loader numbers its draws from the restored update
    count (else a resumed run would replay the samples of the first one).
    """

    def __init__(self, ledger: PrivacyLedger, loader):
        super().__init__()
        self._ledger = ledger
        self._settings = (ledger.sampling_probability, ledger.train_size, ledger.target_delta)
        self._loader = loader

    def on_train_begin(self, logs=None):
        ledger = self._ledger
        ledger.sampling_probability, ledger.train_size, ledger.target_delta = self._settings
        if self._loader is not None:
            self._loader.start_at(ledger.steps)
