"""The DP-SGD training step shared by every DP model class.

`DPTrainerMixin` replaces Keras's torch `train_step` with DP-SGD:

1. per-unit gradients (a unit is one example, or one of `num_microbatches`
   contiguous groups) of the user's loss, each clipped to L2 norm `C`
   over all trainable weights together;
2. their sum plus Gaussian noise `N(0, sigma^2 C^2 I)`, divided by the number
   of units `k` (the batch size when `num_microbatches` is None);
3. plus the gradient of the weight regularizers, which do not depend on the
   data and so are outside the sensitivity;
4. handed to the compiled Keras optimizer, unchanged otherwise.

Guarantee: one step is the Gaussian mechanism with sensitivity `C` (with
respect to adding or removing one unit) and noise multiplier `sigma`; the
privacy accounting of the whole run composes these steps.
"""

from __future__ import annotations

import logging
import numbers
import random
import secrets
import warnings

import keras
import numpy as np
import torch
from keras import tree

from torchdp_keras import _validation, distributed
from torchdp_keras.errors import DPConfigError
from torchdp_keras.model_checks import check_per_example_privacy, iter_layers
from torchdp_keras.models.keras_hooks import DPKerasHooksMixin
from torchdp_keras.models.privacy_tracking import PRIVACY_STATE_KEY, PrivacyTrackingMixin
from torchdp_keras.ops import add_noise_and_scale_, add_secure_noise_and_scale_
from torchdp_keras.optimizers import (
    find_dp_optimizer,
    keras_gradient_accumulation_steps,
    private_apply,
)
from torchdp_keras.per_example import (
    WHOLE_MODEL,
    ClippingPlan,
    FastEngine,
    FastPathUnsupported,
    LayerRegistry,
    PerExampleGradientRule,
    VmapEngine,
    describe_slow_layers,
    make_default_layer_registry,
)

logger = logging.getLogger(__name__)

__all__ = ["DP_CONFIG_KEYS", "PRIVACY_STATE_KEY", "DPTrainerMixin", "validate_dp_arguments"]

DP_CONFIG_KEYS = (
    "l2_norm_clip",
    "noise_multiplier",
    "num_microbatches",
    "use_xla",
    "seed",
    "clipping_mode",
    "secure_mode",
)
CLIPPING_MODES = ("auto", "fast", "vmap")
# Largest noise std the step accepts: float32 noise values (up to ~40 std in
# the fused kernel's tails) and their sum with the clipped gradients stay finite.
MAX_NOISE_STD = 1e36
# The settings a DP optimizer may carry instead of the model.
_OPTIMIZER_KEYS = ("l2_norm_clip", "noise_multiplier", "num_microbatches")


def validate_dp_arguments(
    *,
    l2_norm_clip,
    noise_multiplier,
    num_microbatches=None,
    use_xla=False,
    seed=None,
    clipping_mode="auto",
    layer_registry=None,
    secure_mode=False,
    required=True,
) -> dict:
    """Checks the DP keyword arguments and returns them normalised.

    With `required=False` (`torchdp_keras.Model`), `l2_norm_clip` and
    `noise_multiplier` may both be None: a DP optimizer supplies them at
    `compile` time.
    """
    missing = [
        name
        for name, value in (("l2_norm_clip", l2_norm_clip), ("noise_multiplier", noise_multiplier))
        if value is NOT_GIVEN
    ]
    if missing and required:
        # Python's own kind of error for a missing required argument.
        raise TypeError(
            f"Missing required argument(s) {', '.join(missing)}: give l2_norm_clip and "
            "noise_multiplier as keywords, or first and by position in TF Privacy's order."
        )
    l2_norm_clip = None if l2_norm_clip is NOT_GIVEN else l2_norm_clip
    noise_multiplier = None if noise_multiplier is NOT_GIVEN else noise_multiplier
    if not required and l2_norm_clip is None and noise_multiplier is None:
        if num_microbatches is not None:
            raise DPConfigError(
                "Expected num_microbatches together with l2_norm_clip and noise_multiplier "
                "(or all three on the DP optimizer). Received: "
                f"num_microbatches={num_microbatches!r}, l2_norm_clip=None, "
                "noise_multiplier=None"
            )
        settings = validate_dp_arguments(
            l2_norm_clip=1.0,
            noise_multiplier=0.0,
            use_xla=use_xla,
            seed=seed,
            clipping_mode=clipping_mode,
            layer_registry=layer_registry,
            secure_mode=secure_mode,
        )
        return {**settings, "l2_norm_clip": None, "noise_multiplier": None}
    if not isinstance(clipping_mode, str) or clipping_mode not in CLIPPING_MODES:
        raise DPConfigError(
            f"Expected clipping_mode in {CLIPPING_MODES}. Received: clipping_mode={clipping_mode!r}"
        )
    if layer_registry is None:
        layer_registry = make_default_layer_registry()
    elif not isinstance(layer_registry, LayerRegistry):
        raise DPConfigError(
            "Expected layer_registry to be a torchdp_keras.LayerRegistry. "
            f"Received: layer_registry={layer_registry!r}"
        )
    l2_norm_clip = _validation.check_l2_norm_clip(l2_norm_clip)
    noise_multiplier = _validation.check_noise_multiplier(noise_multiplier)
    if noise_multiplier * l2_norm_clip > MAX_NOISE_STD:
        raise DPConfigError(
            f"Expected noise_multiplier * l2_norm_clip <= {MAX_NOISE_STD:g}: the noise is "
            "added in float32, where a larger standard deviation overflows to inf. "
            f"Received: noise_multiplier={noise_multiplier}, l2_norm_clip={l2_norm_clip}"
        )
    return {
        "clipping_mode": clipping_mode,
        "layer_registry": layer_registry,
        "l2_norm_clip": l2_norm_clip,
        "noise_multiplier": noise_multiplier,
        "num_microbatches": _validation.check_optional_positive_int(
            num_microbatches, "num_microbatches"
        ),
        "use_xla": _validation.check_bool(use_xla, "use_xla"),
        "seed": _validation.check_seed(seed),
        "secure_mode": _validation.check_secure_mode(secure_mode, seed),
    }


class _NotGiven:
    """Default of the required DP arguments: tells "not given" from an explicit None."""

    def __repr__(self) -> str:
        return "<not given>"


NOT_GIVEN = _NotGiven()

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


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def keras_positional_arguments(args: tuple) -> tuple:
    """The positional arguments meant for the Keras class (after TF Privacy's DP ones)."""
    return args[len(TF_PRIVACY_POSITIONAL) :] if args and _is_number(args[0]) else args


def split_positional_dp_arguments(owner: str, args: tuple, given: dict) -> tuple[tuple, dict]:
    """Reads TF Privacy's positional order (numbers first) as well as Keras's (layers first).

    A first positional argument that is a number is `l2_norm_clip` (a Keras
    model's first positional argument, layers or inputs, never is); then come
    `noise_multiplier`, `num_microbatches`, `use_xla`, `layer_registry`, and
    the rest is the Keras class's own. In Keras's order, a number right
    after the layers is refused rather than taken as Keras's `trainable`.

    Args:
        owner: The class name, for the error messages.
        args: The positional arguments of the constructor.
        given: The DP keyword arguments as received (name to value), where
            None means not given.

    Returns:
        `(keras_args, dp_arguments)`: the positional arguments left for the
        Keras class, and `given` updated with the DP arguments taken from the
        positions.
    """
    if not args or not _is_number(args[0]):
        if len(args) > 1 and _is_number(args[1]):
            raise DPConfigError(
                f"{owner} takes the DP arguments either first, in TF Privacy's order "
                f"({owner}(l2_norm_clip, noise_multiplier, ...)), or as keywords after "
                f"the Keras arguments ({owner}(layers, l2_norm_clip=..., "
                "noise_multiplier=...)). Received: a number in second position, "
                f"{args[1]!r}, after {type(args[0]).__name__}"
            )
        return args, dict(given)
    positional = dict(zip(TF_PRIVACY_POSITIONAL, args))
    twice = [name for name in positional if given.get(name) is not None]
    twice = [name for name in twice if given[name] is not NOT_GIVEN]
    if twice:
        raise DPConfigError(
            f"{owner} received {', '.join(twice)} both by position (TF Privacy's order) "
            "and as keyword. Received: "
            + ", ".join(f"{name}={positional[name]!r} and {name}={given[name]!r}" for name in twice)
        )
    return keras_positional_arguments(args), {**given, **positional}


def resolve_dp_arguments(owner: str, args: tuple, *, required: bool = True, **given):
    """`(keras_args, settings)`: a DP model constructor's positional and DP arguments.

    Reads TF Privacy's positional order (`split_positional_dp_arguments`),
    defaults `use_xla` to False and validates everything
    (`validate_dp_arguments`).
    """
    positional = {name: given.pop(name) for name in TF_PRIVACY_POSITIONAL}
    args, dp = split_positional_dp_arguments(owner, args, positional)
    if dp["use_xla"] is NOT_GIVEN:
        dp["use_xla"] = False
    return args, validate_dp_arguments(required=required, **dp, **given)


def _batch_size(x) -> int:
    for leaf in tree.flatten(x):
        if leaf is not None:
            return int(leaf.shape[0])
    raise DPConfigError("Expected a batch with at least one input tensor. Received: x=None")


class DPTrainerMixin(DPKerasHooksMixin, PrivacyTrackingMixin):
    """DP-SGD `train_step` for Keras models on the torch backend.

    Put it before the Keras class in the bases and call `_init_dp` after the
    Keras constructor. It is not part of the public API: use `DPSequential`,
    `DPModel`, `PrivateKerasModel` or `make_private`.
    """

    def _init_dp(self, settings: dict, dp_keras_config=None) -> None:
        self._init_privacy_tracking(dp_keras_config=dp_keras_config)
        self._rescale_to_unit_norm = bool(
            dp_keras_config is not None and dp_keras_config.rescale_to_unit_norm
        )
        self._microbatch_size = dp_keras_config.microbatch_size if dp_keras_config else None
        # As given to the constructor (None in a torchdp_keras.Model whose DP
        # optimizer supplies them); what the step uses is set from these and
        # the optimizer at compile time.
        self._dp_model_settings = {key: settings[key] for key in _OPTIMIZER_KEYS}
        self._l2_norm_clip = settings["l2_norm_clip"]
        self._noise_multiplier = settings["noise_multiplier"]
        self._num_microbatches = settings["num_microbatches"]
        self._optimizer_accumulation_steps = 1
        self._keras_accumulation_steps = None
        self._use_xla = settings["use_xla"]
        self._dp_seed = settings["seed"]
        self._clipping_mode = settings["clipping_mode"]
        self._layer_registry = settings["layer_registry"]
        self._secure_mode = settings["secure_mode"]
        entropy = self._dp_seed if self._dp_seed is not None else secrets.randbits(128)
        noise_seed, layer_seed = np.random.SeedSequence(entropy).generate_state(2, np.uint64)
        self._noise_seed = int(noise_seed)
        self._layer_rng = random.Random(int(layer_seed))
        self._dp_engine = None
        self._vmap_reason = None
        self._engine_checked = False
        self._poisson_expected_batch_size = None
        self._accumulation_steps = 1
        self._nonfinite_examples = 0
        self._nonfinite_logged_at = None
        self._rebuilt_from_config = False
        self._distributed_synced = False
        self._reset_accumulation()

    # -- read-only DP settings ----------------------------------------------
    @property
    def l2_norm_clip(self) -> float:
        """The clipping norm C: every unit's gradient is clipped to this L2 norm."""
        return self._l2_norm_clip

    @property
    def noise_multiplier(self) -> float:
        """sigma: the noise added to the clipped sum has std sigma * C."""
        return self._noise_multiplier

    @property
    def num_microbatches(self) -> int | None:
        """Number of groups a batch is split into for clipping (None: per example)."""
        return self._num_microbatches

    @property
    def clipping_mode(self) -> str:
        """ "auto" (fast clipping where possible), "fast" (only) or "vmap"."""
        return self._clipping_mode

    @property
    def layer_registry(self) -> LayerRegistry:
        """The rules the fast clipping path uses."""
        return self._layer_registry

    @property
    def secure_mode(self) -> bool:
        """Whether noise (and Poisson sampling in fit) come from the OS CSPRNG.

        In secure mode the Gaussian noise is drawn with
        `torchdp_keras.secure_random` (resistant to floating-point attacks),
        fit() accepts only secure `PrivateDataLoader`s, and nothing is seeded.
        """
        return self._secure_mode

    @property
    def use_xla(self) -> bool:
        """Whether the DP step is compiled with torch.compile (TF Privacy's name)."""
        return self._use_xla

    def _dp_config(self) -> dict:
        return {
            **self._dp_model_settings,
            "use_xla": self._use_xla,
            "seed": self._dp_seed,
            "clipping_mode": self._clipping_mode,
            "secure_mode": self._secure_mode,
        }

    def get_config(self):
        config = super().get_config()
        config.update(self._dp_config())
        return config

    # -- Keras hooks ----------------------------------------------------------
    def compile(self, optimizer="rmsprop", loss=None, *args, **kwargs):
        """Configures the model for DP training; see `keras.Model.compile`.

        A loss is required: DP-SGD clips the gradient of each example's loss.
        With `use_xla=True`, `jit_compile` defaults to True.
        """
        if loss is None:
            raise DPConfigError(
                "Expected a loss in compile(): DP-SGD clips the gradient of each "
                "example's loss. Received: loss=None"
            )
        if self._use_xla and kwargs.get("jit_compile", "auto") == "auto":
            kwargs["jit_compile"] = True
        super().compile(optimizer, loss, *args, **kwargs)
        self._adopt_optimizer_settings()
        self._dp_engine = None

    def _adopt_optimizer_settings(self) -> None:
        """Takes the DP settings of a DP optimizer (TF Privacy's style), checking clashes."""
        given = self._dp_model_settings
        dp_optimizer = find_dp_optimizer(self.optimizer)
        if dp_optimizer is None:
            if given["l2_norm_clip"] is None:
                raise DPConfigError(
                    f"Model '{self.name}' has no DP settings: compile it with a DP "
                    "optimizer, e.g. torchdp_keras.optimizers.DPKerasSGDOptimizer("
                    "l2_norm_clip=1.0, noise_multiplier=1.1, learning_rate=0.1), or "
                    "construct it with l2_norm_clip=... and noise_multiplier=.... "
                    f"Received: optimizer={type(self.optimizer).__name__}"
                )
            settings = {**given, "gradient_accumulation_steps": 1}
        else:
            settings = dp_optimizer.dp_settings
            self._check_optimizer_settings(given, settings)
        keras_steps = keras_gradient_accumulation_steps(self.optimizer)
        if keras_steps is not None:
            self._check_keras_accumulation(keras_steps, settings["gradient_accumulation_steps"])
            settings = {**settings, "gradient_accumulation_steps": keras_steps}
        self._keras_accumulation_steps = keras_steps
        self._l2_norm_clip = settings["l2_norm_clip"]
        self._noise_multiplier = settings["noise_multiplier"]
        self._num_microbatches = settings["num_microbatches"]
        self._optimizer_accumulation_steps = settings["gradient_accumulation_steps"]
        self._accumulation_steps = self._optimizer_accumulation_steps
        if dp_optimizer is not None:
            dp_optimizer._claim_for_dp_model()

    def _check_optimizer_settings(self, given: dict, settings: dict) -> None:
        """A DP optimizer's settings must not contradict the model's or its config's."""
        if given["l2_norm_clip"] is not None:
            clashes = [
                f"{key}=({given[key]!r}, {settings[key]!r})"
                for key in _OPTIMIZER_KEYS
                if given[key] != settings[key]
            ]
            if clashes:
                raise DPConfigError(
                    f"Expected the DP optimizer's settings to match those of model "
                    f"'{self.name}' (give them in one place: the model, or the optimizer "
                    "on a torchdp_keras.Model). Received (model, optimizer): " + ", ".join(clashes)
                )
        accumulation = settings["gradient_accumulation_steps"]
        config = self._dp_keras_config
        if (
            config is not None
            and accumulation > 1
            and accumulation != config.gradient_accumulation_steps
        ):
            raise DPConfigError(
                "Expected the DP optimizer's gradient_accumulation_steps to match the "
                "DPKerasConfig's. Received: gradient_accumulation_steps="
                f"{accumulation} (optimizer), {config.gradient_accumulation_steps} (config)"
            )

    def _check_keras_accumulation(self, keras_steps: int, dp_steps: int) -> None:
        """Keras's own accumulation must be the DP accumulation, never a second one.

        The DP step accumulates the clipped sums of k batches, adds noise once
        and hands the optimizer that update; an optimizer averaging k such
        updates again would step once every k * k batches.
        """
        name = type(self.optimizer).__name__
        config = self._dp_keras_config
        planned, source = (
            (config.gradient_accumulation_steps, "DPKerasConfig")
            if config is not None
            else (dp_steps, "DP optimizer")
        )
        if (config is not None or dp_steps > 1) and planned != keras_steps:
            raise DPConfigError(
                f"Expected the optimizer's gradient_accumulation_steps to equal the "
                f"{source}'s: the DP step accumulates the clipped sums of that many batches, "
                "adds the noise once and the optimizer applies the update once (an "
                "optimizer accumulating a different number of DP updates would silently "
                f"step every product of the two). Received: gradient_accumulation_steps="
                f"{keras_steps} ({name}), gradient_accumulation_steps={planned} ({source})"
            )

    def _get_dp_engine(self):
        key = tuple(id(v) for v in self.trainable_variables + self.non_trainable_variables)
        if self._dp_engine is None or self._dp_engine.variable_key != key:
            self._check_model()
            self._vmap_reason = None
            self._engine_checked = False
            self._dp_engine = self._build_engine()
        return self._dp_engine

    def _check_model(self) -> None:
        """`torchdp_keras.validate` with this model's clipping mode: every problem at once."""
        check_per_example_privacy(
            self, clipping_mode=self._clipping_mode, layer_registry=self._layer_registry
        )

    def _vmap_engine(self) -> VmapEngine:
        return VmapEngine(
            self,
            compile=bool(self.jit_compile),
            compile_source=self._compile_source(),
            units_per_chunk=self._microbatch_size if self._num_microbatches is None else None,
        )

    def _compile_source(self) -> str:
        """The user's argument that turned compilation on, as the user wrote it."""
        return "use_xla=True" if self._use_xla else "jit_compile=True"

    def _build_engine(self):
        """The engine of `clipping_mode`; "auto" says (once) what it could not make fast."""
        mode = self._clipping_mode
        if mode == "vmap":
            return self._vmap_engine()
        try:
            fallback = PerExampleGradientRule() if mode == "auto" else None
            engine = FastEngine(self, self._layer_registry, fallback=fallback)
        except FastPathUnsupported as error:
            if mode == "fast":
                raise
            return self._fall_back_to_vmap(error)
        slow = describe_slow_layers(engine)
        if slow:
            self._log_once("slow-layers", slow)
        if self.jit_compile and "jit-fast" not in self._warned_once:
            self._warned_once = self._warned_once | {"jit-fast"}
            warnings.warn(
                f"torchdp_keras: {self._compile_source()} compiles the per-example engine "
                "(clipping_mode='vmap'); the fast clipping path runs eagerly.",
                stacklevel=3,
            )
        return engine

    def _fall_back_to_vmap(self, error) -> VmapEngine:
        """The per-example engine for "auto", saying once why the fast path was left."""
        self._vmap_reason = str(error)
        self._log_once(
            "vmap-fallback",
            f"model '{self.name}' uses per-example gradients (clipping_mode='auto'): {error}",
        )
        return self._vmap_engine()

    def clipping_plan(self) -> ClippingPlan:
        """Which engine clips each weighted layer of this model, and why; printable.

        Builds the engine if no step has run yet (the model must be built):
        the fast path's remaining checks run at the first step, which can
        still move the model to per-example gradients of the whole model;
        `ClippingPlan.checked` says whether a step has confirmed the plan.

        Example:
            >>> print(model.clipping_plan())  # doctest: +SKIP
        """
        engine = self._get_dp_engine()
        if isinstance(engine, FastEngine):
            return ClippingPlan("fast", tuple(engine.plan), None, self._engine_checked)
        layers = tuple(
            (path, type(layer).__name__, WHOLE_MODEL)
            for path, layer in iter_layers(self)
            if layer.trainable_weights and not layer._flatten_layers(include_self=False)
        )
        reason = None if self._clipping_mode == "vmap" else self._vmap_reason
        return ClippingPlan("vmap", layers, reason, self._engine_checked)

    def _log_once(self, key: str, message: str) -> None:
        if key not in self._warned_once:
            self._warned_once = self._warned_once | {key}
            logger.warning("torchdp_keras: %s", message)

    def _clipped_batch(self, **kwargs):
        engine = self._get_dp_engine()
        try:
            result = engine.clipped_batch(**kwargs)
        except FastPathUnsupported as error:
            if self._clipping_mode == "fast":
                raise
            self._dp_engine = self._fall_back_to_vmap(error)
            result = self._dp_engine.clipped_batch(**kwargs)
        self._engine_checked = True
        return result

    def _warn_if_noise_restarts(self) -> None:
        """A seeded model rebuilt from its config alone restarts its noise stream."""
        if not self._privacy_state_restored and self._dp_steps_taken == 0:
            self._warn_once(
                "seed-restart",
                f"model '{self.name}' was rebuilt from its config with seed={self._dp_seed} "
                "but without its privacy state, so its noise restarts at update 0: if its "
                "weights come from an earlier run with this seed, continued training "
                "repeats that run's noise (and its epsilon does not count the earlier "
                "updates). Restore it with keras.models.load_model or load_weights (which "
                "carry the privacy state), or rebuild it with seed=None.",
            )
        self._rebuilt_from_config = False

    @property
    def nonfinite_examples(self) -> int:
        """Clipping units left out so far because their gradient was NaN or inf.

        Such a unit contributes exactly zero to its step (so every step stays
        finite and the sensitivity bound `l2_norm_clip` still holds). The count
        itself depends on the data and is not privatised: it is for debugging
        the input pipeline, not for publication.
        """
        return self._nonfinite_examples

    def _report_nonfinite(self, count: int) -> None:
        """Warns (in the logs) about units left out, at most once per 100 steps."""
        self._nonfinite_examples += count
        step = self._dp_steps_taken
        if self._nonfinite_logged_at is None or step - self._nonfinite_logged_at >= 100:
            self._nonfinite_logged_at = step
            logger.warning(
                "torchdp_keras: %d example(s) of this batch had a non-finite (NaN or inf) "
                "gradient or loss and were left out of the update (%d so far in model '%s', "
                "DP step %d). Check the inputs and the loss; this count is not private.",
                count,
                self._nonfinite_examples,
                self.name,
                step,
            )

    def _noise_key(self) -> int:
        """The key of this update's noise stream: a function of (noise seed, update number).

        Counter-based, so that a model restored with its privacy state (its
        update count) continues with fresh noise and never repeats the noise of
        an update it already released. Without a seed, the noise seed is OS
        entropy drawn when the model is built and never saved: a restored model
        draws new entropy.
        """
        sequence = np.random.SeedSequence([self._noise_seed, self._dp_steps_taken])
        return int(sequence.generate_state(1, np.uint64)[0]) & (2**62 - 1)

    def _weight_regularization(self, trainable_variables):
        """Returns (loss, gradients) of the weight regularizers (not private data)."""
        with torch.enable_grad():
            losses = self._get_regularization_losses()
            if not losses:
                return None, None
            total = losses[0]
            for extra in losses[1:]:
                total = total + extra
            grads = torch.autograd.grad(
                total, [v.value for v in trainable_variables], allow_unused=True
            )
        return total.detach(), grads

    def _accumulate(self, summed, units: int) -> bool:
        """Adds one physical batch; True when an update is due."""
        if self._accum_grads is None:
            self._accum_grads = list(summed)
        else:
            self._accum_grads = [a.add_(b) for a, b in zip(self._accum_grads, summed)]
        self._accum_batches += 1
        self._accum_units += units
        return self._accum_batches >= self._accumulation_steps

    def _reset_accumulation(self) -> None:
        self._accum_grads = None
        self._accum_batches = 0
        self._accum_units = 0

    def train_step(self, data):
        x, y, sample_weight, mask = self._unpack(data)
        trainable_variables = list(self.trainable_variables)
        if not trainable_variables:
            raise DPConfigError(
                f"Model '{self.name}' has no trainable weights: there is nothing "
                "to train privately."
            )
        batch_size = _batch_size(x)
        if mask is not None:
            if self._poisson_expected_batch_size is None:
                raise DPConfigError(
                    "Received a PrivateDataLoader batch outside fit(): pass the loader "
                    "itself to fit(), which reads its sampling probability."
                )
            if self._num_microbatches is not None:
                raise DPConfigError(
                    "Expected num_microbatches=None with Poisson-sampled batches (each "
                    f"example is its own clipping unit). Received: "
                    f"num_microbatches={self._num_microbatches}"
                )
            real_examples = int(mask.sum().item())
        else:
            real_examples = batch_size
        self._check_budget_before_step(batch_size, poisson=mask is not None)
        rank, world = distributed.process_group()
        if world > 1 and not self._distributed_synced:
            self._sync_ranks()
        if self._rebuilt_from_config and self._dp_seed is not None:
            self._warn_if_noise_restarts()
        num_units = _validation.units_per_batch(batch_size, self._num_microbatches)
        optimizer = self.optimizer
        loss_scale = 1.0
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            loss_scale = float(optimizer.dynamic_scale)

        result = self._clipped_batch(
            x=x,
            y=y,
            sample_weight=sample_weight,
            num_units=num_units,
            l2_norm_clip=self._l2_norm_clip,
            rng_seed=self._layer_rng.getrandbits(63),
            loss_scale=loss_scale,
            unit_mask=mask,
        )
        if result.num_nonfinite:
            self._report_nonfinite(result.num_nonfinite)
        update_due = self._accumulate(result.summed, num_units)
        reg_loss, reg_grads = self._weight_regularization(trainable_variables)
        if update_due:
            noise_std = self._noise_multiplier * self._l2_norm_clip
            units = self._accum_units
            if world > 1:
                # Rank 0 alone noises its clipped sum; one all-reduce sums the
                # ranks' sums (noise once per update) and their clipping units.
                if rank == 0:
                    self._add_noise_and_scale(noise_std, 1.0)
                (units,) = distributed.all_reduce_sum_(self._accum_grads, [units])
                noise_std = 0.0
            # Normalise by the expected batch of the update under Poisson
            # sampling (never the realised one, which depends on the data),
            # else by the number of clipping units accumulated (on all ranks).
            normaliser = self._poisson_expected_batch_size if mask is not None else None
            normaliser = normaliser or units
            scale = normaliser * (self._l2_norm_clip if self._rescale_to_unit_norm else 1.0)
            grads = self._add_noise_and_scale(noise_std, 1.0 / scale)
            if reg_grads is not None:
                grads = [g if r is None else g.add_(r) for g, r in zip(grads, reg_grads)]
            if loss_scale != 1.0:
                grads = [g.mul_(loss_scale) for g in grads]
            if self._keras_accumulation_steps:
                # Keras applies (sum of its window's gradients) / k: k * update
                # with zeros elsewhere in the window applies the update once.
                grads = [g.mul_(self._keras_accumulation_steps) for g in grads]
            with torch.no_grad(), private_apply():
                optimizer.apply(grads, trainable_variables)
            self._reset_accumulation()
            self._record_step()
        elif self._keras_accumulation_steps:
            # Advances the optimizer's own accumulation window in step with the
            # DP one; its accumulators only ever hold zeros or noised updates.
            zeros = [torch.zeros_like(v.value) for v in trainable_variables]
            with torch.no_grad(), private_apply():
                optimizer.apply(zeros, trainable_variables)

        before = self._metric_state() if world > 1 else None
        loss = result.loss_sum / max(1, num_units if mask is None else real_examples)
        if reg_loss is not None:
            loss = loss + reg_loss
        self._loss_tracker.update_state(loss, sample_weight=real_examples)

        y_pred = result.y_pred
        if mask is not None:
            keep = keras.ops.convert_to_tensor(mask) > 0
            x, y, sample_weight, y_pred = tree.map_structure(
                lambda t: None if t is None else t[keep], (x, y, sample_weight, y_pred)
            )
        logs = None
        if real_examples:
            compile_loss = self._compile_loss
            if compile_loss is not None and compile_loss.metrics:
                # Per-output loss trackers of multi-output models: the per-unit
                # calls ran in a stateless scope, so update them on the batch.
                with torch.no_grad():
                    compile_loss(y, y_pred, sample_weight)
            logs = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        if before is not None:
            self._sum_metric_updates(before)
            logs = None
        return logs if logs is not None else self.get_metrics_result()

    # -- torch.distributed (see torchdp_keras.distributed) -----------------------------
    def _add_noise_and_scale(self, noise_std: float, scale: float) -> list:
        """The accumulated sum, noised and scaled in one pass, in place.

        Secure mode: OS CSPRNG; otherwise a stream keyed by (noise seed,
        update number), so a fixed seed reproduces the run and a restored
        model never repeats released noise. With the extension the stream is
        the kernel's Philox one, the same on CPU and CUDA.
        """
        if self._secure_mode:
            return add_secure_noise_and_scale_(self._accum_grads, noise_std, scale)
        return add_noise_and_scale_(self._accum_grads, noise_std, scale, seed=self._noise_key())

    def _sync_ranks(self) -> None:
        """Before the first data-parallel step: rank 0's weights everywhere."""
        distributed.check_same(self._dp_steps_taken, "dp_steps")
        variables = list(self.variables)
        if self.optimizer is not None and self.optimizer.built:
            variables += list(self.optimizer.variables)
        distributed.broadcast_([v.value for v in variables])
        self._layer_rng.seed(distributed.shared_entropy(self._layer_rng.getrandbits(63)))
        self._distributed_synced = True

    def _metric_variables(self) -> list:
        return [v for metric in self.metrics for v in metric.variables]

    def _metric_state(self) -> list:
        return [v.value.detach().clone() for v in self._metric_variables()]

    def _sum_metric_updates(self, before: list) -> None:
        """Adds every rank's change of the metric state to the state before this step."""
        variables = self._metric_variables()
        if not variables:
            return
        deltas = [(v.value.detach() - b).to(torch.float64) for v, b in zip(variables, before)]
        distributed.all_reduce_sum_(deltas)
        for v, b, d in zip(variables, before, deltas):
            v.assign((b.to(torch.float64) + d).to(b.dtype))

    def predict(
        self, x, batch_size=None, verbose="auto", steps=None, callbacks=None, *, label_columns=None
    ):
        """Predicts as `keras.Model.predict`; DataFrames in, DataFrames out.

        With a pandas DataFrame (or a `PrivateDataLoader`, whose features are
        used in order, without sampling) as `x`, or with `label_columns`, the
        result is a `pandas.DataFrame` indexed like `x`, its columns named by
        `label_columns` (default 0, 1, ...).
        """
        from torchdp_keras.data import PrivateDataLoader
        from torchdp_keras.data.loader import is_pandas, to_numpy_tree

        index = None
        if isinstance(x, PrivateDataLoader):
            index, x = x.index, x.features
        elif is_pandas(x):
            index, x = x.index, to_numpy_tree(x, "x")
        elif label_columns is None:
            return super().predict(
                x, batch_size=batch_size, verbose=verbose, steps=steps, callbacks=callbacks
            )
        out = super().predict(
            x, batch_size=batch_size, verbose=verbose, steps=steps, callbacks=callbacks
        )
        if not isinstance(out, np.ndarray):
            raise DPConfigError(
                "Expected a model with a single output for DataFrame predictions. "
                f"Received outputs of type {type(out).__name__}"
            )
        import pandas as pd

        values = out.reshape(len(out), -1)
        columns = list(label_columns) if label_columns is not None else list(range(values.shape[1]))
        if len(columns) != values.shape[1]:
            raise DPConfigError(
                f"Expected {values.shape[1]} label_columns for the model's output. "
                f"Received: label_columns={label_columns!r}"
            )
        return pd.DataFrame(values, index=index, columns=columns)
