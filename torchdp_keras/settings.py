"""`DPSettings`: the DP arguments of a DP model, validated once and frozen.

Every DP model class (`DPSequential`, `DPModel`, `torchdp_keras.Model`,
`PrivateKerasModel`, the classes of `make_dp_model_class`) and
`make_private` take the same DP arguments; this module is the one place that
names, documents, validates and serialises them. A model holds one
`DPSettings` as given to its constructor (`model.dp_settings`); a
`torchdp_keras.Model` whose DP optimizer supplies the clipping norm and the
noise completes it at `compile` with `DPSettings.with_optimizer_settings`.

The DP arguments:

    l2_norm_clip: Clipping norm `C` > 0: each clipping unit's gradient (over
        all trainable weights together) is clipped to this L2 norm.
    noise_multiplier: Ratio `sigma` >= 0 of the noise std to `C`: the sum of
        clipped gradients gets Gaussian noise of std `sigma * C`.
    num_microbatches: None (clip every example: a unit is one example) or
        the number of contiguous groups a batch is split into (a unit is one
        group's mean gradient); the batch size must be a multiple of it.
    use_xla: Compile the DP step with `torch.compile` (TF Privacy's name; same
        as `compile(jit_compile=True)`); falls back to eager with a warning.
        TF Privacy defaults it to True; here to False (eager).
    seed: Seed of the noise and of the random layers, for reproducible runs;
        None draws OS entropy.
    clipping_mode: "auto" (default: fast clipping for every layer the
        registry covers, explicit per-layer per-example gradients for the
        others, per-example gradients of the whole model when the model is
        outside the fast path's scope), "fast" (fast clipping only; anything
        else is an `UnsupportedLayerError`) or "vmap" (per-example gradients
        of the whole model).
    layer_registry: The `LayerRegistry` of fast-clipping rules; default
        `make_default_layer_registry()`.
    secure_mode: Draw the noise (and, in fit, the Poisson samples) from the OS
        CSPRNG, with the floating-point attack mitigation; a seed is then an
        error. Slower; for production releases.

TF Privacy's constructors take the first five positionally
(`l2_norm_clip, noise_multiplier, num_microbatches, use_xla, layer_registry`);
`DPSettings.from_arguments` reads that order as well as keywords.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

from torchdp_keras import _validation
from torchdp_keras.errors import DPConfigError

__all__ = [
    "CLIPPING_MODES",
    "DP_CONFIG_KEYS",
    "MAX_NOISE_STD",
    "NOT_GIVEN",
    "TF_PRIVACY_POSITIONAL",
    "DPSettings",
    "keras_positional_arguments",
]

CLIPPING_MODES = ("auto", "fast", "vmap")
# Largest noise std a step accepts: float32 noise values (up to ~40 std in the
# fused kernel's tails) and their sum with the clipped gradients stay finite.
MAX_NOISE_STD = 1e36
# The keys a DP model's Keras config carries (the registry is code, not config).
DP_CONFIG_KEYS = (
    "l2_norm_clip",
    "noise_multiplier",
    "num_microbatches",
    "use_xla",
    "seed",
    "clipping_mode",
    "secure_mode",
)
# TF Privacy's constructors take the DP arguments first and positionally:
# DPSequential(l2_norm_clip, noise_multiplier, num_microbatches=None,
# use_xla=True, layer_registry=None, *args, **kwargs).
TF_PRIVACY_POSITIONAL = (
    "l2_norm_clip",
    "noise_multiplier",
    "num_microbatches",
    "use_xla",
    "layer_registry",
)
_KEYWORDS = DP_CONFIG_KEYS + ("layer_registry",)


class _NotGiven:
    """Default of the required DP arguments: tells "not given" from an explicit None."""

    def __repr__(self) -> str:
        return "<not given>"


NOT_GIVEN: Any = _NotGiven()


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def keras_positional_arguments(args: tuple) -> tuple:
    """The positional arguments meant for the Keras class (after TF Privacy's DP ones)."""
    return args[len(TF_PRIVACY_POSITIONAL) :] if args and _is_number(args[0]) else args


def _default_registry():
    # Imported here: the registry lives with the engines, which import torch.
    from torchdp_keras.per_example.registry import make_default_layer_registry

    return make_default_layer_registry()


@dataclasses.dataclass(frozen=True)
class DPSettings:
    """The DP arguments of a DP model, validated (see the module docstring).

    Build it with `DPSettings.create(...)` (keywords) or
    `DPSettings.from_arguments` (a constructor's arguments); the dataclass
    fields are then normalised (floats, ints, a `LayerRegistry`) and frozen.
    `l2_norm_clip` and `noise_multiplier` are both None only in a
    `torchdp_keras.Model` whose DP optimizer supplies them at `compile`
    (`complete` is False until then).

    Example:
        >>> settings = DPSettings.create(l2_norm_clip=1.0, noise_multiplier=1.1)
        >>> settings.noise_std
        1.1
        >>> DPSettings.from_config(settings.to_config()) == settings
        True
        >>> DPSettings.create(l2_norm_clip=-1, noise_multiplier=1.1)
        Traceback (most recent call last):
        ...
        torchdp_keras.errors.DPConfigError: Expected l2_norm_clip > 0 and finite. Received: ...
    """

    l2_norm_clip: float | None
    noise_multiplier: float | None
    num_microbatches: int | None = None
    use_xla: bool = False
    seed: int | None = None
    clipping_mode: str = "auto"
    layer_registry: Any = dataclasses.field(default=None, compare=False, repr=False)
    secure_mode: bool = False

    @classmethod
    def create(
        cls,
        *,
        l2_norm_clip: Any = NOT_GIVEN,
        noise_multiplier: Any = NOT_GIVEN,
        num_microbatches: int | None = None,
        use_xla: bool = False,
        seed: int | None = None,
        clipping_mode: str = "auto",
        layer_registry: Any = None,
        secure_mode: bool = False,
        required: bool = True,
    ) -> DPSettings:
        """Validates the DP arguments once and returns them frozen.

        Args:
            l2_norm_clip, noise_multiplier, num_microbatches, use_xla, seed,
                clipping_mode, layer_registry, secure_mode: see the module
                docstring.
            required: False for `torchdp_keras.Model`, where `l2_norm_clip`
                and `noise_multiplier` may both be left out (a DP optimizer
                gives them at `compile`).

        Raises:
            TypeError: `l2_norm_clip` or `noise_multiplier` is missing (and
                `required`).
            DPConfigError: a value is invalid; the message names it.
        """
        missing = [
            name
            for name, value in (
                ("l2_norm_clip", l2_norm_clip),
                ("noise_multiplier", noise_multiplier),
            )
            if value is NOT_GIVEN
        ]
        if missing and required:
            # Python's own kind of error for a missing required argument.
            raise TypeError(
                f"Missing required argument(s) {', '.join(missing)}: give l2_norm_clip and "
                "noise_multiplier as keywords, or first and by position in TF Privacy's order."
            )
        clip = None if l2_norm_clip is NOT_GIVEN else l2_norm_clip
        sigma = None if noise_multiplier is NOT_GIVEN else noise_multiplier
        deferred = not required and clip is None and sigma is None
        if deferred and num_microbatches is not None:
            raise DPConfigError(
                "Expected num_microbatches together with l2_norm_clip and noise_multiplier "
                "(or all three on the DP optimizer). Received: "
                f"num_microbatches={num_microbatches!r}, l2_norm_clip=None, "
                "noise_multiplier=None"
            )
        if not isinstance(clipping_mode, str) or clipping_mode not in CLIPPING_MODES:
            raise DPConfigError(
                f"Expected clipping_mode in {CLIPPING_MODES}. "
                f"Received: clipping_mode={clipping_mode!r}"
            )
        if layer_registry is None:
            layer_registry = _default_registry()
        else:
            from torchdp_keras.per_example.registry import LayerRegistry

            if not isinstance(layer_registry, LayerRegistry):
                raise DPConfigError(
                    "Expected layer_registry to be a torchdp_keras.LayerRegistry. "
                    f"Received: layer_registry={layer_registry!r}"
                )
        if not deferred:
            clip = _validation.check_l2_norm_clip(clip)
            sigma = _validation.check_noise_multiplier(sigma)
            _check_noise_std(clip, sigma)
        return cls(
            l2_norm_clip=clip,
            noise_multiplier=sigma,
            num_microbatches=_validation.check_optional_positive_int(
                num_microbatches, "num_microbatches"
            ),
            use_xla=_validation.check_bool(use_xla, "use_xla"),
            seed=_validation.check_seed(seed),
            clipping_mode=clipping_mode,
            layer_registry=layer_registry,
            secure_mode=_validation.check_secure_mode(secure_mode, seed),
        )

    @classmethod
    def from_arguments(
        cls, owner: str, args: tuple, kwargs: dict, *, required: bool = True
    ) -> tuple[tuple, dict, DPSettings]:
        """Splits a DP model constructor's arguments into Keras's and the DP settings.

        A first positional argument that is a number is `l2_norm_clip` (a
        Keras model's first positional argument, layers or inputs, never is);
        then come `noise_multiplier`, `num_microbatches`, `use_xla`,
        `layer_registry` (TF Privacy's order), and the rest is the Keras
        class's own. In Keras's order (layers first), a number right after
        the layers is refused rather than taken as Keras's `trainable`.

        Args:
            owner: The class name, for the error messages.
            args: The constructor's positional arguments.
            kwargs: Its keyword arguments; the DP ones are taken out.
            required: See `create`.

        Returns:
            `(keras_args, keras_kwargs, settings)`.
        """
        kwargs = dict(kwargs)
        given = {key: kwargs.pop(key) for key in _KEYWORDS if key in kwargs}
        if not args or not _is_number(args[0]):
            if len(args) > 1 and _is_number(args[1]):
                raise DPConfigError(
                    f"{owner} takes the DP arguments either first, in TF Privacy's order "
                    f"({owner}(l2_norm_clip, noise_multiplier, ...)), or as keywords after "
                    f"the Keras arguments ({owner}(layers, l2_norm_clip=..., "
                    "noise_multiplier=...)). Received: a number in second position, "
                    f"{args[1]!r}, after {type(args[0]).__name__}"
                )
            keras_args = args
        else:
            positional = dict(zip(TF_PRIVACY_POSITIONAL, args))
            twice = [name for name in positional if given.get(name) is not None]
            if twice:
                raise DPConfigError(
                    f"{owner} received {', '.join(twice)} both by position (TF Privacy's "
                    "order) and as keyword. Received: "
                    + ", ".join(
                        f"{name}={positional[name]!r} and {name}={given[name]!r}" for name in twice
                    )
                )
            given.update(positional)
            keras_args = keras_positional_arguments(args)
        return keras_args, kwargs, cls.create(required=required, **given)

    # -- derived --------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        """Whether the clipping norm and the noise multiplier are known."""
        return self.l2_norm_clip is not None and self.noise_multiplier is not None

    @property
    def noise_std(self) -> float:
        """The std `noise_multiplier * l2_norm_clip` of the noise on the clipped sum."""
        if self.l2_norm_clip is None or self.noise_multiplier is None:
            raise DPConfigError(
                "The noise is not known yet: compile the model with a DP optimizer, or give "
                "l2_norm_clip and noise_multiplier."
            )
        return float(self.noise_multiplier) * float(self.l2_norm_clip)

    def with_optimizer_settings(
        self, l2_norm_clip: float, noise_multiplier: float, num_microbatches: int | None
    ) -> DPSettings:
        """These settings with the clipping, noise and microbatches of a DP optimizer."""
        _check_noise_std(l2_norm_clip, noise_multiplier)
        return dataclasses.replace(
            self,
            l2_norm_clip=l2_norm_clip,
            noise_multiplier=noise_multiplier,
            num_microbatches=num_microbatches,
        )

    # -- Keras config ------------------------------------------------------------------
    def to_config(self) -> dict:
        """The settings a Keras config carries (`DP_CONFIG_KEYS`; not the registry)."""
        return {key: getattr(self, key) for key in DP_CONFIG_KEYS}

    @classmethod
    def from_config(cls, config: dict, *, layer_registry: Any = None) -> DPSettings:
        """Settings from `to_config()`'s dict (validated again)."""
        given = {key: config[key] for key in DP_CONFIG_KEYS if key in config}
        required = (
            given.get("l2_norm_clip") is not None or given.get("noise_multiplier") is not None
        )
        return cls.create(required=required, layer_registry=layer_registry, **given)


def _check_noise_std(l2_norm_clip: float, noise_multiplier: float) -> None:
    if noise_multiplier * l2_norm_clip > MAX_NOISE_STD:
        raise DPConfigError(
            f"Expected noise_multiplier * l2_norm_clip <= {MAX_NOISE_STD:g}: the noise is "
            "added in float32, where a larger standard deviation overflows to inf. "
            f"Received: noise_multiplier={noise_multiplier}, l2_norm_clip={l2_norm_clip}"
        )
