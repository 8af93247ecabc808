"""`PrivacyLedger`: what one DP model has spent, and the state that carries it.

Host-side and framework-free (no Keras, no torch): a ledger holds the
accountant history of the DP updates a model actually performed, the update
count (which also keys the noise stream), the sampling probability `q` and
training-set size `n` of the updates to come, the delta epsilon is reported
at, and the planned budget of a `DPKerasConfig`. Every DP model (per-example
and Lipschitz) owns one, as `model.privacy_ledger`.

Guarantee: `get_epsilon(delta)` upper-bounds the privacy loss of all the
recorded updates at `delta`, provided every update's batch was a Poisson
sample at the recorded `q`; updates whose `q` was unknown make it infinite
rather than a value that could be below the truth.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from torchdp_keras.accounting.analysis import default_delta
from torchdp_keras.accounting.base import Accountant, check_delta
from torchdp_keras.accounting.prv import PRVAccountant
from torchdp_keras.errors import DPConfigError, PrivacyBudgetExceededError, PrivacyStateError

__all__ = ["STATE_FORMAT", "PrivacyLedger", "decode_state", "encode_state"]

# Version of the saved privacy state (1: in the model config, before 0.2).
STATE_FORMAT = 2


class PrivacyLedger:
    """The accountant history, update count, q, n and delta of one DP model.

    Args:
        accountant: The accountant updates are composed in; default a fresh
            `PRVAccountant`.
        config: A `DPKerasConfig` whose planned budget (`train_steps`,
            `batch_size`) the model must keep, or None.
        sampling_probability: q of the updates to come, if known.
        train_size: n, the number of training examples, if known.
        target_delta: The delta of the reported epsilon, if chosen.

    Attributes:
        privacy_unit: What the epsilon protects: "example" (add or remove
            one example) or "user" (one user with all of its examples, when
            the updates sampled users).

    Example:
        >>> ledger = PrivacyLedger(sampling_probability=0.01, train_size=60_000)
        >>> ledger.record_update(noise_multiplier=1.1)
        >>> ledger.steps, ledger.get_epsilon() < 0.2
        (1, True)
    """

    def __init__(
        self,
        accountant: Accountant | None = None,
        *,
        config: Any = None,
        sampling_probability: float | None = None,
        train_size: int | None = None,
        target_delta: float | None = None,
    ) -> None:
        self.accountant: Accountant = accountant if accountant is not None else PRVAccountant()
        self.config = config
        self.steps = 0
        self.unaccounted_steps = 0
        self.nonfinite_examples = 0
        self.sampling_probability = sampling_probability
        self.train_size = train_size
        self.target_delta = target_delta
        self.privacy_unit = "example"
        self.restored = False

    # -- what has been spent ---------------------------------------------------------
    @property
    def delta(self) -> float | None:
        """The delta of the reported epsilon: chosen, or 1/max(n, 2)^1.1, or None."""
        if self.target_delta is not None:
            return self.target_delta
        if self.train_size:
            return default_delta(self.train_size)
        return None

    def get_epsilon(self, delta: float | None = None) -> float:
        """Epsilon of all recorded updates at `delta` (default `self.delta`).

        Returns:
            0.0 before any update; inf when some updates ran with an unknown q.

        Raises:
            DPConfigError: no delta is given and none is known.
        """
        if delta is None:
            delta = self.delta
        if delta is None:
            raise DPConfigError(
                "Expected a delta: pass get_epsilon(delta=...), fit(..., target_delta=...), "
                "or train with a DPKerasConfig. Received: delta=None"
            )
        delta = check_delta(delta)
        if self.unaccounted_steps:
            return math.inf
        return self.accountant.get_epsilon(delta)

    def record_update(self, noise_multiplier: float) -> None:
        """One more DP update at the current q (unaccounted when q is unknown)."""
        self.steps += 1
        if self.sampling_probability is None:
            self.unaccounted_steps += 1
        else:
            self.accountant.compose(noise_multiplier, self.sampling_probability, 1)

    def use_accountant(self, accountant: Accountant) -> None:
        """Replaces the accountant before any update was composed in it.

        Raises:
            DPConfigError: the current accountant already holds updates.
        """
        if self.accountant.steps:
            raise DPConfigError(
                f"Cannot switch from the {self.accountant.name!r} accountant to the "
                f"{accountant.name!r} one after training steps were accounted with it."
            )
        self.accountant = accountant

    def check_before_step(self, batch_size: int, poisson: bool = False) -> None:
        """Refuses a step beyond the config's planned budget or batch size.

        Raises:
            PrivacyBudgetExceededError: the planned `train_steps` are all taken.
            DPConfigError: a fixed-size batch is larger than the config's.
        """
        config = self.config
        if config is None:
            return
        if self.steps >= config.train_steps:
            raise PrivacyBudgetExceededError(
                f"The privacy budget covers train_steps={config.train_steps} updates "
                f"(epsilon={config.epsilon}, delta={config.delta}) and this model has "
                f"taken {self.steps}; one more would overspend it. Stop "
                "training, or plan a larger train_steps (with more noise) from the start."
            )
        if not poisson and batch_size > config.batch_size:
            raise DPConfigError(
                f"Expected batches of at most batch_size={config.batch_size} examples "
                f"(DPKerasConfig). Received: a batch of {batch_size}"
            )

    # -- state ------------------------------------------------------------------------
    def state_dict(self, weights: list) -> dict:
        """The ledger as JSON-able data, with the fingerprint of the model's weights."""
        return {
            "format": STATE_FORMAT,
            "accountant": self.accountant.state_dict(),
            "dp_steps_taken": self.steps,
            "unaccounted_steps": self.unaccounted_steps,
            "train_size": self.train_size,
            "target_delta": self.target_delta,
            "sampling_probability": self.sampling_probability,
            "nonfinite_examples": self.nonfinite_examples,
            "privacy_unit": self.privacy_unit,
            "weights": weights,
        }

    def check_state(self, state: dict, weights: list | None, owner: str) -> None:
        """Refuses a state that was not written by a model like this one.

        Args:
            state: A `state_dict()`.
            weights: This model's weight fingerprint, or None when unbuilt.
            owner: The model's name, for the message.

        Raises:
            PrivacyStateError: other format, other weights, other accountant,
                or another q than the config plans.
        """
        if state.get("format") != STATE_FORMAT:
            raise PrivacyStateError(
                f"Expected a privacy state of format {STATE_FORMAT}. Received: "
                f"format={state.get('format')!r}"
            )
        saved = state.get("weights")
        if weights is not None and saved != weights:
            raise PrivacyStateError(
                f"The saved privacy state belongs to another model: its weights are "
                f"{_describe(saved)}, model '{owner}' has {_describe(weights)}. Load it "
                "into the model that wrote it."
            )
        accountant = state.get("accountant")
        kind = accountant.get("accountant") if isinstance(accountant, dict) else accountant
        if kind != self.accountant.name:
            raise PrivacyStateError(
                f"Expected the state of a {self.accountant.name!r} accountant. "
                f"Received: accountant={kind!r}"
            )
        config = self.config
        saved_q = state.get("sampling_probability")
        if config is not None and saved_q is not None and saved_q != config.sampling_probability:
            raise PrivacyStateError(
                "The saved privacy state was spent at another sampling probability than "
                f"this model's DPKerasConfig plans. Received: sampling_probability={saved_q} "
                f"(saved), {config.sampling_probability} (config)"
            )

    def load_state_dict(self, state: dict | None) -> None:
        """Restores a `state_dict()` (nothing for None or an empty state).

        Raises:
            PrivacyStateError: the state is malformed.
        """
        if not state:
            return
        try:
            self.accountant.load_state_dict(state["accountant"])
            steps = _count(state["dp_steps_taken"], "dp_steps_taken")
            unaccounted = _count(state["unaccounted_steps"], "unaccounted_steps")
            nonfinite = _count(state.get("nonfinite_examples", 0), "nonfinite_examples")
        except (KeyError, TypeError, DPConfigError) as error:
            raise PrivacyStateError(f"Malformed privacy state: {error}") from error
        self.steps, self.unaccounted_steps, self.nonfinite_examples = steps, unaccounted, nonfinite
        self.train_size = state.get("train_size")
        self.target_delta = state.get("target_delta")
        self.sampling_probability = state.get("sampling_probability")
        self.privacy_unit = state.get("privacy_unit", "example")
        self.restored = True


def encode_state(state: dict) -> np.ndarray:
    """A state dict as UTF-8 JSON in a uint8 array (how Keras stores it with the weights)."""
    encoded = json.dumps(state, sort_keys=True).encode("utf-8")
    return np.frombuffer(encoded, dtype=np.uint8).copy()


def decode_state(raw) -> dict:
    """The state dict from its stored uint8 array; JSON only (no pickle, no code).

    Raises:
        PrivacyStateError: not a 1-D uint8 array of a JSON object.
    """
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


def _count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PrivacyStateError(f"Expected {name} to be an int >= 0. Received: {name}={value!r}")
    return value


def _describe(fingerprint) -> str:
    if not isinstance(fingerprint, list):
        return repr(fingerprint)
    return "[" + ", ".join(f"{tuple(shape)}" for shape, _ in fingerprint) + "]"
