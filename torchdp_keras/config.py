"""`DPKerasConfig`: JAX Privacy's Keras configuration, on the torch backend.

A config states the privacy budget first (epsilon, delta) and the training
plan (batch size, steps, dataset size); the noise multiplier follows from
them. It needs neither torch nor keras.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

from torchdp_keras._validation import check_int, check_positive, check_secure_mode, to_float
from torchdp_keras.accounting.analysis import calibrate_noise_multiplier, make_accountant
from torchdp_keras.errors import DPConfigError

_INT64_MAX = 2**63 - 1


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class DPKerasConfig:
    """Parameters for adding DP-SGD to a Keras model (JAX Privacy's fields and meanings).

    Attributes:
        epsilon: The privacy budget's epsilon, in (0, inf]. Set it from the
            guarantee you need, never from the accuracy you get.
        delta: The privacy budget's delta, in (0, 1); as small as possible
            (well below 1 / train_size).
        clipping_norm: Clipping norm of the per-example gradients (alias:
            `l2_norm_clip`).
        batch_size: Batch size of one physical step. With
            `poisson_sampling_in_fit=True` the expected batch size of the
            Poisson sampler; otherwise it must match the batch size of `fit()`.
        gradient_accumulation_steps: Physical batches accumulated before noise
            is added and the optimizer steps; effective batch size =
            batch_size * gradient_accumulation_steps.
        train_steps: Number of optimizer updates the budget covers. Training
            past it raises `PrivacyBudgetExceededError`.
        train_size: Number of training examples (before any repetition).
        poisson_sampling_in_fit: Whether `fit()` resamples array inputs with
            Poisson sampling.
        noise_multiplier: None (recommended): calibrated with the PRV
            accountant so that the run spends at most `epsilon`. An explicit
            value is checked against the budget.
        rescale_to_unit_norm: Divide the clipped gradients by the clipping norm
            (the noise is scaled to match), which decouples the learning rate
            from the clipping norm (https://arxiv.org/abs/2204.13650).
        microbatch_size: Examples differentiated at once by the per-example
            engine (memory versus speed); None: the whole batch. The result
            does not depend on it.
        seed: Seed of the noise (an int64 >= 0); None: OS entropy.
        secure_mode: Noise and Poisson sampling from the OS CSPRNG (see
            `torchdp_keras.secure_random`); requires `seed=None`. Not in JAX
            Privacy.

    Example:
        >>> config = DPKerasConfig(epsilon=3.0, delta=1e-5, clipping_norm=1.0,
        ...                        batch_size=250, gradient_accumulation_steps=1,
        ...                        train_steps=1000, train_size=60000)
        >>> config.effective_batch_size
        250
        >>> sigma = config.update_with_calibrated_noise_multiplier().noise_multiplier
    """

    epsilon: float
    delta: float
    clipping_norm: float
    batch_size: int
    gradient_accumulation_steps: int
    train_steps: int
    train_size: int
    poisson_sampling_in_fit: bool = False
    noise_multiplier: float | None = None
    rescale_to_unit_norm: bool = True
    microbatch_size: int | None = None
    seed: int | None = None
    secure_mode: bool = False

    def __post_init__(self):
        if not _is_real(self.epsilon) or math.isnan(to_float(self.epsilon)) or self.epsilon <= 0:
            raise DPConfigError(f"Expected epsilon > 0. Received: epsilon={self.epsilon!r}")
        if not _is_real(self.delta) or not 0 < to_float(self.delta) < 1:
            raise DPConfigError(f"Expected 0 < delta < 1. Received: delta={self.delta!r}")
        check_positive(self.clipping_norm, "clipping_norm")
        for name in ("batch_size", "gradient_accumulation_steps", "train_steps", "train_size"):
            check_int(getattr(self, name), name)
        if self.effective_batch_size > self.train_size:
            raise DPConfigError(
                "Expected effective_batch_size (batch_size * gradient_accumulation_steps) "
                f"<= train_size. Received: effective_batch_size={self.effective_batch_size}, "
                f"train_size={self.train_size}"
            )
        for name in ("poisson_sampling_in_fit", "rescale_to_unit_norm", "secure_mode"):
            if not isinstance(getattr(self, name), bool):
                raise DPConfigError(
                    f"Expected {name} to be True or False. Received: {name}={getattr(self, name)!r}"
                )
        if self.microbatch_size is not None and (
            not _is_int(self.microbatch_size) or self.microbatch_size < 1
        ):
            raise DPConfigError(
                "Expected microbatch_size to be None or an integer >= 1. "
                f"Received: microbatch_size={self.microbatch_size!r}"
            )
        if self.microbatch_size is not None and self.microbatch_size > self.batch_size:
            raise DPConfigError(
                "Expected microbatch_size <= batch_size (a microbatch is a slice of one "
                f"batch). Received: microbatch_size={self.microbatch_size}, "
                f"batch_size={self.batch_size}"
            )
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= _INT64_MAX):
            raise DPConfigError(
                f"Expected seed to be None or an int64 >= 0. Received: seed={self.seed!r}"
            )
        check_secure_mode(self.secure_mode, self.seed)
        if self.noise_multiplier is not None:
            sigma = self.noise_multiplier
            if not _is_real(sigma) or not math.isfinite(to_float(sigma)) or sigma < 0:
                raise DPConfigError(
                    "Expected noise_multiplier >= 0 and finite. "
                    f"Received: noise_multiplier={sigma!r}"
                )
            spent = self.planned_epsilon(sigma)
            if spent > self.epsilon:
                raise DPConfigError(
                    f"noise_multiplier={sigma} gives epsilon={spent:.4g} for "
                    f"train_steps={self.train_steps} at sampling probability "
                    f"{self.sampling_probability:.4g} and delta={self.delta}, more than "
                    f"the budget epsilon={self.epsilon}. Use a larger noise_multiplier, "
                    "fewer train_steps, or noise_multiplier=None to calibrate it."
                )

    # -- derived values ----------------------------------------------------------
    @property
    def effective_batch_size(self) -> int:
        """The batch size of one model update: batch_size * gradient_accumulation_steps."""
        return self.batch_size * self.gradient_accumulation_steps

    @property
    def sampling_probability(self) -> float:
        """q = effective_batch_size / train_size, the accounted sampling probability."""
        return self.effective_batch_size / self.train_size

    @property
    def l2_norm_clip(self) -> float:
        """Alias of `clipping_norm` (the name the rest of torchdp_keras uses)."""
        return float(self.clipping_norm)

    def planned_epsilon(self, noise_multiplier: float | None = None) -> float:
        """Epsilon (PRV) of `train_steps` updates at `delta` with the given sigma."""
        sigma = self.noise_multiplier if noise_multiplier is None else noise_multiplier
        if sigma is None:
            sigma = self._calibrated_noise_multiplier()
        accountant = make_accountant("prv")
        accountant.compose(sigma, self.sampling_probability, self.train_steps)
        return accountant.get_epsilon(self.delta)

    def update_with_calibrated_noise_multiplier(self) -> DPKerasConfig:
        """Returns this config with `noise_multiplier` set (calibrated if it was None).

        The calibrated sigma is the smallest (within 1%) whose PRV epsilon
        upper bound for `train_steps` updates is at most `epsilon`.
        """
        if self.noise_multiplier is not None:
            return self
        return dataclasses.replace(self, noise_multiplier=self._calibrated_noise_multiplier())

    def _calibrated_noise_multiplier(self) -> float:
        return calibrate_noise_multiplier(
            self.epsilon, self.delta, self.sampling_probability, self.train_steps, "prv"
        )

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-serialisable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DPKerasConfig:
        """Rebuilds a config from `to_dict()` output (validated again)."""
        return cls(**values)
