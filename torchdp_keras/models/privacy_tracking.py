"""What a DP model knows about the privacy it has spent.

Every DP model keeps its own accountant history: one composition event per
DP update it actually performed, with the noise multiplier and the sampling
probability of that update. From it come `model.get_epsilon()`, the
`epsilon` entry of `fit` logs, and the enforcement of a step budget.

The sampling probability of an update is q = batch_size / n, where n is the
number of training examples: from the `DPKerasConfig`, or, without one, from
the arrays given to `fit` (after `validation_split`). Updates whose q cannot
be known (a generator without a config, `train_on_batch` outside `fit`) are
counted as unaccounted, and `get_epsilon` then reports infinity rather than
a value that could be below the truth.
"""

from __future__ import annotations

import json
import math
import warnings

import keras
import numpy as np

from torchdp_keras.accounting import PRVAccountant, default_delta
from torchdp_keras.accounting.analysis import TINY_TRAIN_SIZE
from torchdp_keras.accounting.base import check_delta
from torchdp_keras.errors import DPConfigError, PrivacyBudgetExceededError, PrivacyStateError

PRIVACY_STATE_KEY = "privacy_state"
# Version of the saved privacy state (1: in the model config, before 0.2).
STATE_FORMAT = 2


def num_examples(x) -> int | None:
    """Number of examples in array-like training inputs; None for datasets/generators.

    Arrays are anything with a `shape` and a length (numpy, torch, pandas),
    alone or as the first entry of a list, tuple or dict of inputs.
    """
    if isinstance(x, dict):
        x = next(iter(x.values()), None)
    elif isinstance(x, (list, tuple)):
        x = x[0] if x else None
    if x is not None and hasattr(x, "shape") and hasattr(x, "__len__"):
        return len(x)
    return None


class PrivacyTrackingMixin:
    """Accountant history, epsilon reporting and step budget of a DP model."""

    def _init_privacy_tracking(self, *, dp_keras_config=None) -> None:
        self._accountant = PRVAccountant()
        self._dp_steps_taken = 0
        self._unaccounted_steps = 0
        self._dp_keras_config = dp_keras_config
        self._train_size = dp_keras_config.train_size if dp_keras_config else None
        self._target_delta = dp_keras_config.delta if dp_keras_config else None
        self._sampling_probability = (
            dp_keras_config.sampling_probability if dp_keras_config else None
        )
        self._warned_once = frozenset()
        self._privacy_state_restored = False

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned_once:
            self._warned_once = self._warned_once | {key}
            warnings.warn(f"torchdp_keras: {message}", stacklevel=4)

    # -- what the model has spent ------------------------------------------------
    @property
    def accountant(self) -> PRVAccountant:
        """The accountant holding every DP update this model performed."""
        return self._accountant

    @property
    def dp_steps(self) -> int:
        """Number of DP updates (optimizer steps) this model has taken."""
        return self._dp_steps_taken

    @property
    def privacy_delta(self) -> float | None:
        """The delta `get_epsilon()` uses: given to `fit`, from the config, or 1/max(n, 2)^1.1."""
        if self._target_delta is not None:
            return self._target_delta
        if self._train_size:
            return default_delta(self._train_size)
        return None

    def get_epsilon(self, delta: float | None = None) -> float:
        """Epsilon (PRV upper bound) of all DP updates so far, at `delta`.

        Args:
            delta: Defaults to `privacy_delta` (the delta given to `fit`, the
                config's, or 1/max(n, 2)^1.1 for n training examples).

        Returns:
            The epsilon; 0.0 before training; inf if some updates could not be
            accounted (unknown sampling probability).

        Raises:
            DPConfigError: no delta is given and none is known.
        """
        if delta is None:
            delta = self.privacy_delta
        if delta is None:
            raise DPConfigError(
                "Expected a delta: pass get_epsilon(delta=...), fit(..., target_delta=...), "
                "or train with a DPKerasConfig. Received: delta=None"
            )
        delta = check_delta(delta)
        if self._unaccounted_steps:
            self._warn_once(
                "unaccounted",
                f"{self._unaccounted_steps} DP updates ran with an unknown sampling "
                "probability (no DPKerasConfig and no array inputs to fit()); their "
                "privacy cannot be accounted, so the reported epsilon is inf.",
            )
            return math.inf
        return self._accountant.get_epsilon(delta)

    # -- hooks of the DP step ------------------------------------------------------
    def _check_budget_before_step(self, batch_size: int, poisson: bool = False) -> None:
        config = self._dp_keras_config
        if config is None:
            return
        if self._dp_steps_taken >= config.train_steps:
            raise PrivacyBudgetExceededError(
                f"The privacy budget covers train_steps={config.train_steps} updates "
                f"(epsilon={config.epsilon}, delta={config.delta}) and this model has "
                f"taken {self._dp_steps_taken}; one more would overspend it. Stop "
                "training, or plan a larger train_steps (with more noise) from the start."
            )
        if not poisson and batch_size > config.batch_size:
            raise DPConfigError(
                f"Expected batches of at most batch_size={config.batch_size} examples "
                f"(DPKerasConfig). Received: a batch of {batch_size}"
            )

    def _record_step(self) -> None:
        self._dp_steps_taken += 1
        if self._sampling_probability is None:
            self._unaccounted_steps += 1
        else:
            self._accountant.compose(self._noise_multiplier, self._sampling_probability, 1)

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
        """Trains with DP-SGD; see `keras.Model.fit`. Logs `epsilon` at each epoch end.

        Args:
            target_delta: The delta of the reported epsilon (default: the
                config's, or 1/max(n, 2)^1.1 for n training examples).
            Other arguments: as `keras.Model.fit`.
        """
        from torchdp_keras.callbacks import DPAccountant
        from torchdp_keras.data import PrivateDataLoader

        config = self._dp_keras_config
        if config is not None and batch_size is not None and batch_size != config.batch_size:
            raise DPConfigError(
                f"Expected fit(batch_size=...) to match DPKerasConfig.batch_size="
                f"{config.batch_size}. Received: batch_size={batch_size}"
            )
        if config is not None and config.poisson_sampling_in_fit and num_examples(x) is not None:
            if validation_split:
                raise DPConfigError(
                    "Expected validation_data instead of validation_split with "
                    "poisson_sampling_in_fit=True. Received: "
                    f"validation_split={validation_split}"
                )
            x = PrivateDataLoader(
                x,
                y,
                config.batch_size,
                sample_weight=kwargs.pop("sample_weight", None),
                seed=None if config.seed is None else config.seed + 1,
                gradient_accumulation_steps=config.gradient_accumulation_steps,
                secure_mode=config.secure_mode,
            )
            y, batch_size = None, None
        self._reset_accumulation()
        self._poisson_expected_batch_size = None
        if isinstance(x, PrivateDataLoader):
            if kwargs.get("shuffle", False) is not False:
                raise DPConfigError(
                    "Expected shuffle=False (or unset) with a PrivateDataLoader: each of "
                    "its updates is already a fresh Poisson sample, and Keras shuffling "
                    "its batches would mix the physical batches of different updates "
                    f"(one example could then count twice in one update). Received: "
                    f"shuffle={kwargs['shuffle']!r}"
                )
            kwargs["shuffle"] = False
            self._use_loader(x, y, batch_size, config)
            n = train_size = x.num_examples
        else:
            n = num_examples(x)
            if n is not None and validation_split:
                n = int(math.floor(n * (1.0 - validation_split)))
            accumulation = self._optimizer_accumulation_steps
            if config is not None:
                accumulation = config.gradient_accumulation_steps
            self._accumulation_steps = accumulation
            if config is not None:
                if n is not None:
                    batch_size = config.batch_size
                train_size = config.train_size
            else:
                train_size = n
                if n is not None:
                    # k consecutive shuffled batches make one update's batch.
                    effective = (batch_size if batch_size is not None else 32) * accumulation
                    self._sampling_probability = min(1.0, effective / n)
                else:
                    self._sampling_probability = None
        if train_size:
            self._train_size = train_size
        if target_delta is not None:
            self._target_delta = check_delta(target_delta)
        delta = self.privacy_delta
        if self._target_delta is None and train_size and train_size < TINY_TRAIN_SIZE:
            self._warn_once(
                "tiny-n",
                f"only {train_size} training example(s): no delta is meaningful at this "
                f"size (a delta that is not negligible next to 1/n = {1.0 / train_size:.3g} "
                "allows publishing an example outright). The reported epsilon uses the "
                f"default delta={delta:.3g}; pass fit(..., target_delta=...) to choose it.",
            )
        elif delta is not None and train_size and delta >= 1.0 / train_size:
            self._warn_once(
                f"delta>={delta}",
                f"delta={delta} is not smaller than 1/n = {1.0 / train_size:.3g}: a "
                "mechanism that publishes one random example outright satisfies such "
                "a guarantee. Use a delta well below 1/n.",
            )
        if isinstance(x, PrivateDataLoader):
            pass
        elif n is not None:
            self._warn_once(
                "not-poisson",
                "fit() on arrays trains on shuffled batches of fixed size, while the "
                "reported epsilon assumes Poisson sampling (each example in each batch "
                "independently with probability q = batch_size / n). The two are not "
                "the same; shuffling can be noticeably less private (Chua et al. 2024). "
                "Pass a torchdp_keras.PrivateDataLoader (or use DPKerasConfig("
                "poisson_sampling_in_fit=True)) for the guarantee as stated.",
            )
        elif config is not None:
            self._warn_once(
                "user-sampled",
                "this input is used as it is, without resampling: the reported epsilon "
                f"assumes that every update's batch is a Poisson sample with q = "
                f"{config.sampling_probability:.4g} of the {config.train_size} examples. "
                "If your pipeline shuffles or batches differently, the guarantee does "
                "not hold as stated.",
            )
        else:
            self._warn_once(
                "unknown-n",
                "the number of training examples is unknown for this input (not "
                "arrays) and there is no DPKerasConfig: the privacy spent cannot be "
                "accounted and get_epsilon() will report inf.",
            )
        callbacks = list(callbacks or [])
        if self.privacy_delta is not None and not any(
            isinstance(cb, DPAccountant) for cb in callbacks
        ):
            callbacks.insert(0, DPAccountant(log_fn=None))
        # Last, so that it runs after keras.callbacks.BackupAndRestore.
        callbacks.append(_ResumeSync(self, x if isinstance(x, PrivateDataLoader) else None))
        return super().fit(
            x,
            y,
            batch_size=batch_size,
            epochs=epochs,
            verbose=verbose,
            callbacks=callbacks,
            validation_split=validation_split,
            **kwargs,
        )

    def _use_loader(self, loader, y, batch_size, config) -> None:
        """Takes q, the expected batch and the accumulation from a PrivateDataLoader."""
        if y is not None or batch_size is not None:
            raise DPConfigError(
                "Expected y=None and batch_size=None with a PrivateDataLoader, which "
                f"holds the labels and the batch size. Received: y={type(y).__name__}, "
                f"batch_size={batch_size}"
            )
        if config is not None:
            mismatched = {
                name: (getattr(loader, name), expected)
                for name, expected in (
                    ("batch_size", config.batch_size),
                    ("gradient_accumulation_steps", config.gradient_accumulation_steps),
                    ("num_examples", config.train_size),
                )
                if getattr(loader, name) != expected
            }
            if mismatched:
                raise DPConfigError(
                    "Expected the PrivateDataLoader to match the DPKerasConfig. Received "
                    "(loader, config): " + ", ".join(f"{k}={v}" for k, v in mismatched.items())
                )
        accumulation = self._optimizer_accumulation_steps
        if accumulation > 1 and accumulation != loader.gradient_accumulation_steps:
            # Accumulating k independent Poisson draws would let one example
            # appear in several of them: its contribution to the update could
            # reach k * C. The loader must draw one update's batch and split it.
            raise DPConfigError(
                f"Expected PrivateDataLoader(gradient_accumulation_steps={accumulation}) "
                "to match the DP optimizer's: one Poisson draw per update, split into "
                "physical batches. Received: PrivateDataLoader("
                f"gradient_accumulation_steps={loader.gradient_accumulation_steps})"
            )
        if getattr(self, "_secure_mode", False) and not loader.secure_mode:
            raise DPConfigError(
                f"Expected PrivateDataLoader(secure_mode=True) for model '{self.name}', "
                "which was built with secure_mode=True: its noise comes from the OS "
                "CSPRNG and its samples must too. Received: PrivateDataLoader("
                "secure_mode=False)"
            )
        self._sampling_probability = loader.sampling_probability
        self._poisson_expected_batch_size = loader.expected_batch_size
        self._accumulation_steps = loader.gradient_accumulation_steps

    # -- persistence -----------------------------------------------------------------
    # The privacy state travels with the weights (`save_own_variables`), so
    # that `model.save`, `save_weights` and `keras.callbacks.BackupAndRestore`
    # all carry it: a resumed run continues the accountant history and the
    # update count that keys the noise. It is stored as UTF-8 JSON in a uint8
    # array and read back with `json.loads` only (no pickle, no code).
    def _weights_fingerprint(self) -> list:
        return [[list(map(int, w.shape)), str(w.dtype)] for w in self.weights]

    def _privacy_state(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "accountant": self._accountant.state_dict(),
            "dp_steps_taken": self._dp_steps_taken,
            "unaccounted_steps": self._unaccounted_steps,
            "train_size": self._train_size,
            "target_delta": self._target_delta,
            "sampling_probability": self._sampling_probability,
            "nonfinite_examples": getattr(self, "_nonfinite_examples", 0),
            "weights": self._weights_fingerprint(),
        }

    def save_own_variables(self, store):
        """Saves the model's own variables and its privacy state (see Keras)."""
        super().save_own_variables(store)
        encoded = json.dumps(self._privacy_state(), sort_keys=True).encode("utf-8")
        store[PRIVACY_STATE_KEY] = np.frombuffer(encoded, dtype=np.uint8).copy()

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
        state = _decode_state(store[PRIVACY_STATE_KEY])
        self._check_privacy_state(state)
        super().load_own_variables({k: store[k] for k in keys if k != PRIVACY_STATE_KEY})
        self._restore_privacy_state(state)

    def _check_privacy_state(self, state: dict) -> None:
        """Refuses a state that was not written by a model like this one."""
        if state.get("format") != STATE_FORMAT:
            raise PrivacyStateError(
                f"Expected a privacy state of format {STATE_FORMAT}. Received: "
                f"format={state.get('format')!r}"
            )
        saved = state.get("weights")
        if self.built and saved != self._weights_fingerprint():
            raise PrivacyStateError(
                f"The saved privacy state belongs to another model: its weights are "
                f"{_describe(saved)}, model '{self.name}' has "
                f"{_describe(self._weights_fingerprint())}. Load it into the model that "
                "wrote it."
            )
        accountant = state.get("accountant")
        kind = accountant.get("accountant") if isinstance(accountant, dict) else accountant
        if kind != self._accountant.name:
            raise PrivacyStateError(
                f"Expected the state of a {self._accountant.name!r} accountant. "
                f"Received: accountant={kind!r}"
            )
        config = self._dp_keras_config
        saved_q = state.get("sampling_probability")
        if config is not None and saved_q is not None and saved_q != config.sampling_probability:
            raise PrivacyStateError(
                "The saved privacy state was spent at another sampling probability than "
                f"this model's DPKerasConfig plans. Received: sampling_probability={saved_q} "
                f"(saved), {config.sampling_probability} (config)"
            )

    def _restore_privacy_state(self, state: dict | None) -> None:
        if not state:
            return
        try:
            self._accountant.load_state_dict(state["accountant"])
            self._dp_steps_taken = _count(state["dp_steps_taken"], "dp_steps_taken")
            self._unaccounted_steps = _count(state["unaccounted_steps"], "unaccounted_steps")
            nonfinite = _count(state.get("nonfinite_examples", 0), "nonfinite_examples")
        except (KeyError, TypeError, DPConfigError) as error:
            raise PrivacyStateError(f"Malformed privacy state: {error}") from error
        if hasattr(self, "_nonfinite_examples"):
            self._nonfinite_examples = nonfinite
        self._train_size = state.get("train_size")
        self._target_delta = state.get("target_delta")
        self._sampling_probability = state.get("sampling_probability")
        self._privacy_state_restored = True


class _ResumeSync(keras.callbacks.Callback):
    """Re-applies this fit's settings after a callback restored a privacy state.

    `keras.callbacks.BackupAndRestore` loads the weights (and with them the
    saved privacy state) in `on_train_begin`, after fit() has read its input.
    The accountant history and the update count come from the file; the
    sampling probability, training-set size and delta of the updates to come
    are this fit's, and the loader numbers its draws from the restored update
    count (else a resumed run would replay the samples of the first one).
    """

    def __init__(self, model, loader):
        super().__init__()
        self._settings = (model._sampling_probability, model._train_size, model._target_delta)
        self._loader = loader

    def on_train_begin(self, logs=None):
        model = self.model
        model._sampling_probability, model._train_size, model._target_delta = self._settings
        if self._loader is not None:
            self._loader.start_at(model._dp_steps_taken)


def _count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PrivacyStateError(f"Expected {name} to be an int >= 0. Received: {name}={value!r}")
    return value


def _describe(fingerprint) -> str:
    if not isinstance(fingerprint, list):
        return repr(fingerprint)
    return "[" + ", ".join(f"{tuple(shape)}" for shape, _ in fingerprint) + "]"


def _decode_state(raw) -> dict:
    """The state dict from its stored uint8 array; JSON only."""
    array = np.asarray(raw)
    if array.dtype != np.uint8 or array.ndim != 1:
        raise PrivacyStateError(
            f"Expected the privacy state as a 1-D uint8 array of JSON. Received: an array "
            f"of dtype {array.dtype} and shape {array.shape}"
        )
    try:
        state = json.loads(array.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PrivacyStateError(f"The saved privacy state is not valid JSON: {error}") from error
    if not isinstance(state, dict):
        raise PrivacyStateError(
            f"Expected the privacy state to be a JSON object. Received: {type(state).__name__}"
        )
    return state
