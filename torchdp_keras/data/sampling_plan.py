"""`SamplingPlan`: where one `fit` call's batches, q and n come from.

Resolved once at the start of `fit`, from what the user passed (arrays, a
`PrivateDataLoader`, any other input), the model's `DPKerasConfig` if any,
and the DP optimizer's accumulation. It decides:

- the input Keras iterates (arrays may be wrapped in a `PrivateDataLoader`
  when the config asks for Poisson sampling in fit);
- the sampling probability `q` the accountant composes each update at, and
  the training-set size `n` (for the default delta);
- the normaliser of a Poisson update (the expected batch, never the realised
  one, which depends on the data) and the number of physical batches per
  update;
- the notice to give when the input does not match what the epsilon
  assumes (shuffled fixed-size batches, an unknown n).

Guarantee stated by the plan: with a `PrivateDataLoader` every update's batch
is a Poisson sample at `q`, as the accountant assumes. For arrays `q` is
`batch_size * accumulation / n`, which the accountant treats as Poisson
although Keras shuffles; the notice says so.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from torchdp_keras.errors import DPConfigError

__all__ = ["SamplingPlan", "num_examples"]


def num_examples(x) -> int | None:
    """Number of examples in array-like training inputs; None for datasets/generators.

    Arrays are anything with a `shape` and a length (numpy, torch, pandas),
    alone or as the first entry of a list, tuple or dict of inputs.

    Example:
        >>> num_examples({"image": np.zeros((10, 3)), "label": np.zeros(10)})
        10
    """
    if isinstance(x, dict):
        x = next(iter(x.values()), None)
    elif isinstance(x, (list, tuple)):
        x = x[0] if x else None
    if x is not None and hasattr(x, "shape") and hasattr(x, "__len__"):
        return len(x)
    return None


@dataclasses.dataclass(frozen=True)
class SamplingPlan:
    """The batches, q and n of one `fit` call (see the module docstring).

    Attributes:
        x, y, batch_size: What `fit` passes on to Keras.
        fit_kwargs: The other `fit` keyword arguments, as passed on.
        loader: The `PrivateDataLoader` the batches come from, or None.
        sampling_probability: q of every update; None when unknown.
        train_size: n; None when unknown.
        expected_batch_size: The normaliser of a Poisson update (None
            without a loader: the update is normalised by its clipping units).
        accumulation_steps: Physical batches per update.
        privacy_unit: What a clipping unit is and the epsilon protects:
            "example", or "user" (a `UserDataLoader`).
        unit_size: Rows per clipping unit in a loader batch (1, or a
            `UserDataLoader`'s `max_examples_per_user`).
        notice: `(key, message)` of the warning this input deserves, or None.

    Example:
        >>> plan = SamplingPlan.resolve(np.zeros((100, 2)), np.zeros(100), batch_size=10)
        >>> plan.sampling_probability, plan.train_size, plan.notice[0]
        (0.1, 100, 'not-poisson')
    """

    x: Any
    y: Any
    batch_size: int | None
    fit_kwargs: dict
    loader: Any
    sampling_probability: float | None
    train_size: int | None
    expected_batch_size: float | None
    accumulation_steps: int
    notice: tuple[str, str] | None
    privacy_unit: str = "example"
    unit_size: int = 1

    @classmethod
    def resolve(
        cls,
        x,
        y=None,
        *,
        batch_size: int | None = None,
        validation_split: float = 0.0,
        config: Any = None,
        accumulation_steps: int = 1,
        secure_mode: bool = False,
        fit_kwargs: dict | None = None,
    ) -> SamplingPlan:
        """The plan of a `fit(x, y, batch_size=..., **fit_kwargs)` call.

        Args:
            x, y, batch_size, validation_split: As given to `fit`.
            config: The model's `DPKerasConfig`, or None.
            accumulation_steps: The DP optimizer's batches per update.
            secure_mode: Whether the model requires secure sampling.
            fit_kwargs: `fit`'s other keyword arguments (`shuffle`,
                `sample_weight`, ...); returned adjusted in `fit_kwargs`.

        Raises:
            DPConfigError: the input contradicts the config, the loader or
                the optimizer (each message names the values).
        """
        from torchdp_keras.data.loader import PrivateDataLoader

        kwargs = dict(fit_kwargs or {})
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
            return cls.from_loader(
                x,
                y=y,
                batch_size=batch_size,
                config=config,
                accumulation_steps=accumulation_steps,
                secure_mode=secure_mode,
                fit_kwargs=kwargs,
            )
        n = num_examples(x)
        if n is not None and validation_split:
            n = int(math.floor(n * (1.0 - validation_split)))
        q = None
        if config is not None:
            accumulation = config.gradient_accumulation_steps
            if n is not None:
                batch_size = config.batch_size
            train_size = config.train_size
            q = config.sampling_probability
        else:
            accumulation = accumulation_steps
            train_size = n
            if n is not None:
                # k consecutive shuffled batches make one update's batch.
                effective = (batch_size if batch_size is not None else 32) * accumulation
                q = min(1.0, effective / n)
        if n is not None:
            notice = (
                "not-poisson",
                "fit() on arrays trains on shuffled batches of fixed size, while the "
                "reported epsilon assumes Poisson sampling (each example in each batch "
                "independently with probability q = batch_size / n). The two are not "
                "the same; shuffling can be noticeably less private (Chua et al. 2024). "
                "Pass a torchdp_keras.PrivateDataLoader (or use DPKerasConfig("
                "poisson_sampling_in_fit=True)) for the guarantee as stated.",
            )
        elif config is not None:
            notice = (
                "user-sampled",
                "this input is used as it is, without resampling: the reported epsilon "
                f"assumes that every update's batch is a Poisson sample with q = "
                f"{config.sampling_probability:.4g} of the {config.train_size} examples. "
                "If your pipeline shuffles or batches differently, the guarantee does "
                "not hold as stated.",
            )
        else:
            notice = (
                "unknown-n",
                "the number of training examples is unknown for this input (not "
                "arrays) and there is no DPKerasConfig: the privacy spent cannot be "
                "accounted and get_epsilon() will report inf.",
            )
        return cls(
            x=x,
            y=y,
            batch_size=batch_size,
            fit_kwargs=kwargs,
            loader=None,
            sampling_probability=q,
            train_size=train_size,
            expected_batch_size=None,
            accumulation_steps=accumulation,
            notice=notice,
        )

    @classmethod
    def from_loader(
        cls,
        loader,
        *,
        y=None,
        batch_size: int | None = None,
        config: Any = None,
        accumulation_steps: int = 1,
        secure_mode: bool = False,
        fit_kwargs: dict | None = None,
    ) -> SamplingPlan:
        """The plan of training on a `PrivateDataLoader` (q, n and batches from it).

        Raises:
            DPConfigError: `y` or `batch_size` is given, or the loader does
                not match the config, the optimizer's accumulation or the
                model's secure mode.
        """
        if y is not None or batch_size is not None:
            raise DPConfigError(
                "Expected y=None and batch_size=None with a PrivateDataLoader, which "
                f"holds the labels and the batch size. Received: y={type(y).__name__}, "
                f"batch_size={batch_size}"
            )
        if config is not None:
            units = "num_users" if loader.privacy_unit == "user" else "num_examples"
            mismatched = {
                name: (getattr(loader, name), expected)
                for name, expected in (
                    ("batch_size", config.batch_size),
                    ("gradient_accumulation_steps", config.gradient_accumulation_steps),
                    (units, config.train_size),
                )
                if getattr(loader, name) != expected
            }
            if mismatched:
                raise DPConfigError(
                    "Expected the PrivateDataLoader to match the DPKerasConfig. Received "
                    "(loader, config): " + ", ".join(f"{k}={v}" for k, v in mismatched.items())
                )
        if accumulation_steps > 1 and accumulation_steps != loader.gradient_accumulation_steps:
            # Accumulating k independent Poisson draws would let one example
            # appear in several of them: its contribution to the update could
            # reach k * C. The loader must draw one update's batch and split it.
            raise DPConfigError(
                f"Expected PrivateDataLoader(gradient_accumulation_steps={accumulation_steps}) "
                "to match the DP optimizer's: one Poisson draw per update, split into "
                "physical batches. Received: PrivateDataLoader("
                f"gradient_accumulation_steps={loader.gradient_accumulation_steps})"
            )
        if secure_mode and not loader.secure_mode:
            raise DPConfigError(
                "Expected PrivateDataLoader(secure_mode=True) for a model built with "
                "secure_mode=True: its noise comes from the OS CSPRNG and its samples "
                "must too. Received: PrivateDataLoader(secure_mode=False)"
            )
        return cls(
            x=loader,
            y=None,
            batch_size=None,
            fit_kwargs=dict(fit_kwargs or {}),
            loader=loader,
            sampling_probability=loader.sampling_probability,
            train_size=loader.num_units,
            expected_batch_size=loader.expected_batch_size,
            accumulation_steps=loader.gradient_accumulation_steps,
            notice=None,
            privacy_unit=loader.privacy_unit,
            unit_size=loader.unit_size,
        )
