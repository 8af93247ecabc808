"""The interface every accountant implements (numpy/scipy only).

An accountant records what a training run composed -- a history of
`(noise_multiplier, sampling_probability, steps)` events of the
Poisson-subsampled Gaussian mechanism -- and converts it to an
(epsilon, delta) guarantee. Histories with several different events
(sigma or q changing during training) are composed exactly.

The neighbouring relation is a constructor option of every accountant:
`neighboring="add_or_remove"` (default: one example added or removed) or
`"replace_one"` (one example replaced by another), and `group_size=k` (add/remove
only) accounts a group of k examples, e.g. one user's, added or removed at once
(see `torchdp_keras.accounting.pairs` for the pairs and their references).

Edge cases every accountant honours:
  * no steps, or only events with `sampling_probability == 0`: epsilon is 0;
  * any event with `noise_multiplier == 0` and `sampling_probability > 0`:
    epsilon is infinite (no noise, no privacy).
"""

from __future__ import annotations

import abc
import math
import numbers
from typing import Any

from torchdp_keras._validation import to_float
from torchdp_keras.accounting.pairs import check_group_size, check_neighboring
from torchdp_keras.errors import DPConfigError

STATE_VERSION = 1


def check_delta(delta) -> float:
    """Returns `delta` as a float in (0, 1) or raises `DPConfigError`."""
    number = (
        to_float(delta)
        if isinstance(delta, numbers.Real) and not isinstance(delta, bool)
        else math.nan
    )
    if not 0 < number < 1:
        raise DPConfigError(f"Expected 0 < delta < 1. Received: delta={delta!r}")
    return number


def check_epsilon(epsilon) -> float:
    """Returns `epsilon` as a float >= 0 (inf allowed) or raises `DPConfigError`."""
    number = (
        to_float(epsilon)
        if isinstance(epsilon, numbers.Real) and not isinstance(epsilon, bool)
        else math.nan
    )
    if not number >= 0:
        raise DPConfigError(f"Expected epsilon >= 0. Received: epsilon={epsilon!r}")
    return number


def check_event(noise_multiplier, sampling_probability, steps) -> tuple[float, float, int]:
    """Validates one composition event and returns it normalised."""
    if (
        not isinstance(noise_multiplier, numbers.Real)
        or isinstance(noise_multiplier, bool)
        or not math.isfinite(to_float(noise_multiplier))
        or noise_multiplier < 0
    ):
        raise DPConfigError(
            "Expected noise_multiplier >= 0 and finite. "
            f"Received: noise_multiplier={noise_multiplier!r}"
        )
    if (
        not isinstance(sampling_probability, numbers.Real)
        or isinstance(sampling_probability, bool)
        or not 0 <= to_float(sampling_probability) <= 1
    ):
        raise DPConfigError(
            "Expected 0 <= sampling_probability <= 1. "
            f"Received: sampling_probability={sampling_probability!r}"
        )
    if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or steps < 0:
        raise DPConfigError(f"Expected steps to be an integer >= 0. Received: steps={steps!r}")
    return float(noise_multiplier), float(sampling_probability), int(steps)


class Accountant(abc.ABC):
    """Records composed DP-SGD steps and reports their (epsilon, delta) guarantee.

    Subclasses set `name` and implement `_epsilon(events, delta)` and
    `_delta(events, epsilon)` for a non-trivial history (at least one event
    with steps > 0, q > 0 and sigma > 0).

    Example:
        >>> from torchdp_keras.accounting import RDPAccountant
        >>> acc = RDPAccountant()
        >>> acc.compose(noise_multiplier=1.1, sampling_probability=0.01, steps=1000)
        >>> acc.steps
        1000
    """

    name: str = ""

    def __init__(self, *, neighboring: str = "add_or_remove", group_size: int = 1) -> None:
        self.neighboring = check_neighboring(neighboring)
        self.group_size = check_group_size(group_size, self.neighboring)
        self._history: list[tuple[float, float, int]] = []

    # -- history -------------------------------------------------------------
    def compose(self, noise_multiplier: float, sampling_probability: float, steps: int = 1) -> None:
        """Adds `steps` steps of the Poisson-subsampled Gaussian mechanism.

        Args:
            noise_multiplier: sigma, the noise std divided by the clipping norm.
            sampling_probability: q, the probability that an example is in a batch.
            steps: How many such steps (optimizer updates) were taken.
        """
        event = check_event(noise_multiplier, sampling_probability, steps)
        if event[2] == 0:
            return
        if self._history and self._history[-1][:2] == event[:2]:
            sigma, q, n = self._history[-1]
            self._history[-1] = (sigma, q, n + event[2])
        else:
            self._history.append(event)

    @property
    def steps(self) -> int:
        """Total number of composed steps."""
        return sum(n for _, _, n in self._history)

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """The composed events `(noise_multiplier, sampling_probability, steps)`, in order."""
        return list(self._history)

    def _grouped_history(self) -> list[tuple[float, float, int]]:
        """Events merged by (sigma, q), dropping the ones that cost nothing."""
        grouped: dict[tuple[float, float], int] = {}
        for sigma, q, n in self._history:
            if q > 0 and n > 0:
                grouped[(sigma, q)] = grouped.get((sigma, q), 0) + n
        return [(sigma, q, n) for (sigma, q), n in grouped.items()]

    # -- epsilon ---------------------------------------------------------------
    def get_epsilon(self, delta: float) -> float:
        """The epsilon of everything composed so far, at `delta`.

        Returns 0.0 for an empty history, inf when some step had no noise.
        """
        delta = check_delta(delta)
        events = self._grouped_history()
        if not events:
            return 0.0
        if any(sigma == 0 for sigma, _, _ in events):
            return math.inf
        return float(self._epsilon(events, delta))

    @abc.abstractmethod
    def _epsilon(self, events: list[tuple[float, float, int]], delta: float) -> float:
        """Epsilon of a non-trivial grouped history (sigma > 0, q > 0, steps > 0)."""

    def get_delta(self, epsilon: float) -> float:
        """The delta of everything composed so far, at `epsilon` (an upper bound).

        Returns 0.0 for an empty history or an infinite epsilon, 1.0 when some
        step had no noise.

        Raises:
            DPConfigError: `epsilon` is not a number >= 0.
        """
        epsilon = check_epsilon(epsilon)
        events = self._grouped_history()
        if not events:
            return 0.0
        if any(sigma == 0 for sigma, _, _ in events):
            return 1.0
        if math.isinf(epsilon):
            return 0.0
        return float(self._delta(events, epsilon))

    def _delta(self, events: list[tuple[float, float, int]], epsilon: float) -> float:
        """Delta of a non-trivial grouped history at a finite `epsilon`."""
        raise NotImplementedError(f"{type(self).__name__} does not compute delta")

    # -- state -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot of the history."""
        return {
            "accountant": self.name,
            "version": STATE_VERSION,
            "history": [[sigma, q, n] for sigma, q, n in self._history],
            "neighboring": self.neighboring,
            "group_size": self.group_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a history saved by `state_dict` of the same accountant kind.

        Raises:
            DPConfigError: the state belongs to another accountant or is malformed.
        """
        if not isinstance(state, dict) or "history" not in state:
            raise DPConfigError(f"Expected an accountant state dict. Received: state={state!r}")
        if state.get("accountant") != self.name:
            raise DPConfigError(
                f"Expected the state of a {self.name!r} accountant. "
                f"Received: accountant={state.get('accountant')!r}"
            )
        if state.get("version") != STATE_VERSION:
            raise DPConfigError(
                f"Expected accountant state version {STATE_VERSION}. "
                f"Received: version={state.get('version')!r}"
            )
        # States saved before these keys existed are add/remove states of one example.
        for key, default in (("neighboring", "add_or_remove"), ("group_size", 1)):
            if state.get(key, default) != getattr(self, key):
                raise DPConfigError(
                    f"Expected the state of an accountant with {key}={getattr(self, key)!r} "
                    f"(construct the accountant with the state's). Received: {key}="
                    f"{state.get(key, default)!r}"
                )
        events = state["history"]
        if not isinstance(events, (list, tuple)) or not all(
            isinstance(event, (list, tuple)) and len(event) == 3 for event in events
        ):
            raise DPConfigError(
                "Expected history to be a list of [noise_multiplier, sampling_probability, "
                f"steps] events. Received: history={events!r}"
            )
        history = [check_event(*event) for event in events]
        self._history = history

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={self.steps}, events={len(self._history)})"
