"""The DP-SGD training step shared by every per-example DP model class.

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

Who owns what: the model's `dp_settings` (a frozen `DPSettings`, as given to
the constructor), its `privacy_ledger` (a `PrivacyLedger`: what was spent),
the `sampling_plan` of the current `fit` (a `SamplingPlan`), and the step's
own runtime state (`DPStepState`: the settings in effect after compile, the
engine, the noise seed, the accumulation).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import secrets

import keras
import numpy as np
import torch
from keras import tree

from torchdp_keras import _keras_compat as keras_compat
from torchdp_keras import _validation, distributed
from torchdp_keras.accounting.ledger import PrivacyLedger
from torchdp_keras.errors import DPConfigError
from torchdp_keras.model_checks import check_per_example_privacy
from torchdp_keras.models.keras_hooks import DPKerasHooksMixin
from torchdp_keras.models.privacy_tracking import PRIVACY_STATE_KEY, PrivacyTrackingMixin
from torchdp_keras.ops import add_noise_and_scale_, add_secure_noise_and_scale_
from torchdp_keras.optimizers import (
    find_dp_optimizer,
    keras_gradient_accumulation_steps,
    private_apply,
)
from torchdp_keras.per_example import (
    ClippingPlan,
    EngineSelection,
    LayerRegistry,
    make_engine,
)
from torchdp_keras.settings import DPSettings

logger = logging.getLogger(__name__)

__all__ = ["PRIVACY_STATE_KEY", "DPStepState", "DPTrainerMixin"]


@dataclasses.dataclass
class DPStepState:
    """The DP-SGD step's own state; one per model, declared here and nowhere else.

    Attributes:
        settings: The DP settings in effect: the model's `dp_settings`,
            completed at `compile` by a DP optimizer's.
        noise_seed: Seed of the noise stream (keyed by update number).
        layer_rng: Draws the random layers' seed of each step.
        rescale_to_unit_norm: Divide the update by `C` too (JAX Privacy's option).
        microbatch_size: Examples per chunk of the whole-model engine.
        optimizer_accumulation_steps: Batches per update the DP optimizer asks.
        keras_accumulation_steps: The Keras optimizer's own accumulation
            (then equal to the DP one), or None.
        engine: The engine selection, built at the first step.
        accum_grads, accum_batches, accum_units: The clipped sums of the
            batches of the update in progress, and their counts.
        nonfinite_logged_at: Update number of the last non-finite warning.
        rebuilt_from_config: The model came from a config without its state.
        distributed_synced: Rank 0's weights were broadcast.
    """

    settings: DPSettings
    noise_seed: int
    layer_rng: random.Random
    rescale_to_unit_norm: bool = False
    microbatch_size: int | None = None
    optimizer_accumulation_steps: int = 1
    keras_accumulation_steps: int | None = None
    engine: EngineSelection | None = None
    accum_grads: list | None = None
    accum_batches: int = 0
    accum_units: int = 0
    nonfinite_logged_at: int | None = None
    rebuilt_from_config: bool = False
    distributed_synced: bool = False

    def reset_accumulation(self) -> None:
        """Drops the update in progress."""
        self.accum_grads, self.accum_batches, self.accum_units = None, 0, 0

    def accumulate(self, summed: list, units: int, steps: int) -> bool:
        """Adds one physical batch; True when the update of `steps` batches is due."""
        if self.accum_grads is None:
            self.accum_grads = list(summed)
        else:
            self.accum_grads = [a.add_(b) for a, b in zip(self.accum_grads, summed)]
        self.accum_batches += 1
        self.accum_units += units
        return self.accum_batches >= steps


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

    def _init_dp(self, settings: DPSettings, dp_keras_config=None) -> None:
        config = dp_keras_config
        self._init_privacy_tracking(
            PrivacyLedger(
                config=config,
                sampling_probability=config.sampling_probability if config else None,
                train_size=config.train_size if config else None,
                target_delta=config.delta if config else None,
            )
        )
        self.dp_settings = settings
        entropy = settings.seed if settings.seed is not None else secrets.randbits(128)
        noise_seed, layer_seed = np.random.SeedSequence(entropy).generate_state(2, np.uint64)
        self._dp_step = DPStepState(
            settings=settings,
            noise_seed=int(noise_seed),
            layer_rng=random.Random(int(layer_seed)),
            rescale_to_unit_norm=bool(config is not None and config.rescale_to_unit_norm),
            microbatch_size=config.microbatch_size if config is not None else None,
        )

    # -- read-only DP settings (in effect) -------------------------------------------
    @property
    def l2_norm_clip(self) -> float | None:
        """The clipping norm C: every unit's gradient is clipped to this L2 norm."""
        return self._dp_step.settings.l2_norm_clip

    @property
    def noise_multiplier(self) -> float | None:
        """sigma: the noise added to the clipped sum has std sigma * C."""
        return self._dp_step.settings.noise_multiplier

    @property
    def num_microbatches(self) -> int | None:
        """Number of groups a batch is split into for clipping (None: per example)."""
        return self._dp_step.settings.num_microbatches

    @property
    def clipping_mode(self) -> str:
        """ "auto" (fast clipping where possible), "fast" (only) or "vmap"."""
        return self.dp_settings.clipping_mode

    @property
    def layer_registry(self) -> LayerRegistry:
        """The rules the fast clipping path uses."""
        return self.dp_settings.layer_registry

    @property
    def secure_mode(self) -> bool:
        """Whether noise (and Poisson sampling in fit) come from the OS CSPRNG.

        In secure mode the Gaussian noise is drawn with
        `torchdp_keras.secure_random` (resistant to floating-point attacks),
        fit() accepts only secure `PrivateDataLoader`s, and nothing is seeded.
        """
        return self.dp_settings.secure_mode

    @property
    def use_xla(self) -> bool:
        """Whether the DP step is compiled with torch.compile (TF Privacy's name)."""
        return self.dp_settings.use_xla

    def get_config(self):
        config = super().get_config()
        config.update(self.dp_settings.to_config())
        return config

    def _planned_accumulation_steps(self) -> int:
        return self._dp_step.optimizer_accumulation_steps

    def _requires_secure_sampling(self) -> bool:
        return self.dp_settings.secure_mode

    def _accumulation_steps(self) -> int:
        """Batches per update now: this fit's plan's, else the optimizer's."""
        plan = self.sampling_plan
        if plan is not None:
            return plan.accumulation_steps
        return self._dp_step.optimizer_accumulation_steps

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
        if self.dp_settings.use_xla and kwargs.get("jit_compile", "auto") == "auto":
            kwargs["jit_compile"] = True
        super().compile(optimizer, loss, *args, **kwargs)
        self._adopt_optimizer_settings()
        self.sampling_plan = None
        self._dp_step.engine = None

    def fit(self, *args, **kwargs):
        """Trains with DP-SGD; see `PrivacyTrackingMixin.fit` and `keras.Model.fit`."""
        self._dp_step.reset_accumulation()
        return super().fit(*args, **kwargs)

    def _adopt_optimizer_settings(self) -> None:
        """Takes the DP settings of a DP optimizer (TF Privacy's style), checking clashes."""
        given = self.dp_settings
        state = self._dp_step
        dp_optimizer = find_dp_optimizer(self.optimizer)
        if dp_optimizer is None:
            if not given.complete:
                raise DPConfigError(
                    f"Model '{self.name}' has no DP settings: compile it with a DP "
                    "optimizer, e.g. torchdp_keras.optimizers.DPKerasSGDOptimizer("
                    "l2_norm_clip=1.0, noise_multiplier=1.1, learning_rate=0.1), or "
                    "construct it with l2_norm_clip=... and noise_multiplier=.... "
                    f"Received: optimizer={type(self.optimizer).__name__}"
                )
            effective, accumulation = given, 1
        else:
            optimizer_settings = dp_optimizer.dp_settings
            self._check_optimizer_settings(given, optimizer_settings)
            effective = given.with_optimizer_settings(
                optimizer_settings["l2_norm_clip"],
                optimizer_settings["noise_multiplier"],
                optimizer_settings["num_microbatches"],
            )
            accumulation = optimizer_settings["gradient_accumulation_steps"]
        keras_steps = keras_gradient_accumulation_steps(self.optimizer)
        if keras_steps is not None:
            self._check_keras_accumulation(keras_steps, accumulation)
            accumulation = keras_steps
        state.keras_accumulation_steps = keras_steps
        state.settings = effective
        state.optimizer_accumulation_steps = accumulation
        if dp_optimizer is not None:
            dp_optimizer._claim_for_dp_model()

    def _check_optimizer_settings(self, given: DPSettings, settings: dict) -> None:
        """A DP optimizer's settings must not contradict the model's or its config's."""
        if given.complete:
            clashes = [
                f"{key}=({getattr(given, key)!r}, {settings[key]!r})"
                for key in ("l2_norm_clip", "noise_multiplier", "num_microbatches")
                if getattr(given, key) != settings[key]
            ]
            if clashes:
                raise DPConfigError(
                    f"Expected the DP optimizer's settings to match those of model "
                    f"'{self.name}' (give them in one place: the model, or the optimizer "
                    "on a torchdp_keras.Model). Received (model, optimizer): " + ", ".join(clashes)
                )
        accumulation = settings["gradient_accumulation_steps"]
        config = self.dp_keras_config
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
        config = self.dp_keras_config
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
        """The engine the next step clips with (rebuilt when the variables changed)."""
        state = self._dp_step
        key = tuple(id(v) for v in self.trainable_variables + self.non_trainable_variables)
        if state.engine is None or state.engine.variable_key != key:
            self._check_model()
            state.engine = make_engine(
                self,
                state.settings,
                microbatch_size=state.microbatch_size,
                log_once=self._log_once,
                warn_once=self._warn_once,
            )
        return state.engine.engine

    def _check_model(self) -> None:
        """`torchdp_keras.validate` with this model's clipping mode: every problem at once."""
        check_per_example_privacy(
            self,
            clipping_mode=self.dp_settings.clipping_mode,
            layer_registry=self.dp_settings.layer_registry,
        )

    def clipping_plan(self) -> ClippingPlan:
        """Which engine clips each weighted layer of this model, and why; printable.

        Builds the engine if no step has run yet (the model must be built):
        the fast path's remaining checks run at the first step, which can
        still move the model to per-example gradients of the whole model;
        `ClippingPlan.checked` says whether a step has confirmed the plan.

        Example:
            >>> model = tdk.DPSequential(
            ...     [keras.Input((4,)), keras.layers.Dense(2, name="dense")],
            ...     l2_norm_clip=1.0, noise_multiplier=1.0, name="classifier")
            >>> model.compile(optimizer="sgd", loss="mse")
            >>> model.clipping_plan().engine, model.clipping_plan().layers
            ('fast', (('classifier/dense', 'Dense', 'DenseRule'),))
        """
        self._get_dp_engine()
        engine = self._dp_step.engine
        assert engine is not None  # built by _get_dp_engine
        return engine.plan()

    def _log_once(self, key: str, message: str) -> None:
        if key not in self._warned_once:
            self._warned_once = self._warned_once | {key}
            logger.warning("torchdp_keras: %s", message)

    def _warn_if_noise_restarts(self) -> None:
        """A seeded model rebuilt from its config alone restarts its noise stream."""
        if not self.privacy_ledger.restored and self.privacy_ledger.steps == 0:
            self._warn_once(
                "seed-restart",
                f"model '{self.name}' was rebuilt from its config with "
                f"seed={self.dp_settings.seed} but without its privacy state, so its noise "
                "restarts at update 0: if its weights come from an earlier run with this "
                "seed, continued training repeats that run's noise (and its epsilon does "
                "not count the earlier updates). Restore it with keras.models.load_model or "
                "load_weights (which carry the privacy state), or rebuild it with seed=None.",
            )
        self._dp_step.rebuilt_from_config = False

    @property
    def nonfinite_examples(self) -> int:
        """Clipping units left out so far because their gradient was NaN or inf.

        Such a unit contributes exactly zero to its step (so every step stays
        finite and the sensitivity bound `l2_norm_clip` still holds). The count
        itself depends on the data and is not privatised: it is for debugging
        the input pipeline, not for publication.
        """
        return self.privacy_ledger.nonfinite_examples

    def _report_nonfinite(self, count: int) -> None:
        """Warns (in the logs) about units left out, at most once per 100 steps."""
        ledger, state = self.privacy_ledger, self._dp_step
        ledger.nonfinite_examples += count
        step = ledger.steps
        if state.nonfinite_logged_at is None or step - state.nonfinite_logged_at >= 100:
            state.nonfinite_logged_at = step
            logger.warning(
                "torchdp_keras: %d example(s) of this batch had a non-finite (NaN or inf) "
                "gradient or loss and were left out of the update (%d so far in model '%s', "
                "DP step %d). Check the inputs and the loss; this count is not private.",
                count,
                ledger.nonfinite_examples,
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
        sequence = np.random.SeedSequence([self._dp_step.noise_seed, self.privacy_ledger.steps])
        return int(sequence.generate_state(1, np.uint64)[0]) & (2**62 - 1)

    def _weight_regularization(self, trainable_variables):
        """Returns (loss, gradients) of the weight regularizers (not private data)."""
        with torch.enable_grad():
            losses = keras_compat.regularization_losses(self)
            if not losses:
                return None, None
            total = losses[0]
            for extra in losses[1:]:
                total = total + extra
            grads = torch.autograd.grad(
                total, [v.value for v in trainable_variables], allow_unused=True
            )
        return total.detach(), grads

    def train_step(self, data):
        x, y, sample_weight, mask = self._unpack(data)
        state, ledger, plan = self._dp_step, self.privacy_ledger, self.sampling_plan
        settings = state.settings
        trainable_variables = list(self.trainable_variables)
        if not trainable_variables:
            raise DPConfigError(
                f"Model '{self.name}' has no trainable weights: there is nothing "
                "to train privately."
            )
        batch_size = _batch_size(x)
        expected_batch = None if plan is None else plan.expected_batch_size
        if mask is not None:
            if expected_batch is None:
                raise DPConfigError(
                    "Received a PrivateDataLoader batch outside fit(): pass the loader "
                    "itself to fit(), which reads its sampling probability."
                )
            if settings.num_microbatches is not None:
                raise DPConfigError(
                    "Expected num_microbatches=None with Poisson-sampled batches (each "
                    f"example is its own clipping unit). Received: "
                    f"num_microbatches={settings.num_microbatches}"
                )
            unit_size = plan.unit_size if plan is not None else 1
            if batch_size % unit_size:
                raise DPConfigError(
                    f"Expected a batch of whole clipping units of {unit_size} rows (one user "
                    f"each). Received: a batch of {batch_size} rows"
                )
            num_units = batch_size // unit_size
            unit_present = keras.ops.convert_to_tensor(mask).reshape(num_units, unit_size) > 0
            real_units = int(unit_present.any(dim=1).sum().item())
            real_examples = int(mask.sum().item())
        else:
            num_units = _validation.units_per_batch(batch_size, settings.num_microbatches)
            real_units = real_examples = batch_size
        ledger.check_before_step(batch_size, poisson=mask is not None)
        rank, world = distributed.process_group()
        if world > 1 and not state.distributed_synced:
            self._sync_ranks()
        if state.rebuilt_from_config and settings.seed is not None:
            self._warn_if_noise_restarts()
        optimizer = self.optimizer
        loss_scale = 1.0
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            loss_scale = float(optimizer.dynamic_scale)

        self._get_dp_engine()
        result = state.engine.clipped_batch(
            x,
            y,
            sample_weight,
            num_units=num_units,
            l2_norm_clip=settings.l2_norm_clip,
            rng_seed=state.layer_rng.getrandbits(63),
            loss_scale=loss_scale,
            unit_mask=mask,
        )
        if result.num_nonfinite:
            self._report_nonfinite(result.num_nonfinite)
        update_due = state.accumulate(result.summed, num_units, self._accumulation_steps())
        reg_loss, reg_grads = self._weight_regularization(trainable_variables)
        if update_due:
            noise_std = settings.noise_std
            units = state.accum_units
            if world > 1:
                # Rank 0 alone noises its clipped sum; one all-reduce sums the
                # ranks' sums (noise once per update) and their clipping units.
                if rank == 0:
                    self._add_noise_and_scale(noise_std, 1.0)
                (units,) = distributed.all_reduce_sum_(state.accum_grads, [units])
                noise_std = 0.0
            # Normalise by the expected batch of the update under Poisson
            # sampling (never the realised one, which depends on the data),
            # else by the number of clipping units accumulated (on all ranks).
            normaliser = expected_batch if mask is not None else None
            normaliser = normaliser or units
            scale = normaliser * (settings.l2_norm_clip if state.rescale_to_unit_norm else 1.0)
            grads = self._add_noise_and_scale(noise_std, 1.0 / scale)
            if reg_grads is not None:
                grads = [g if r is None else g.add_(r) for g, r in zip(grads, reg_grads)]
            if loss_scale != 1.0:
                grads = [g.mul_(loss_scale) for g in grads]
            if state.keras_accumulation_steps:
                # Keras applies (sum of its window's gradients) / k: k * update
                # with zeros elsewhere in the window applies the update once.
                grads = [g.mul_(state.keras_accumulation_steps) for g in grads]
            with torch.no_grad(), private_apply():
                optimizer.apply(grads, trainable_variables)
            state.reset_accumulation()
            ledger.record_update(settings.noise_multiplier)
        elif state.keras_accumulation_steps:
            # Advances the optimizer's own accumulation window in step with the
            # DP one; its accumulators only ever hold zeros or noised updates.
            zeros = [torch.zeros_like(v.value) for v in trainable_variables]
            with torch.no_grad(), private_apply():
                optimizer.apply(zeros, trainable_variables)

        before = self._metric_state() if world > 1 else None
        loss = result.loss_sum / max(1, num_units if mask is None else real_units)
        if reg_loss is not None:
            loss = loss + reg_loss
        keras_compat.loss_tracker(self).update_state(
            loss, sample_weight=real_examples if mask is None else real_units
        )

        y_pred = result.y_pred
        if mask is not None:
            keep = keras.ops.convert_to_tensor(mask) > 0
            x, y, sample_weight, y_pred = tree.map_structure(
                lambda t: None if t is None else t[keep], (x, y, sample_weight, y_pred)
            )
        logs = None
        if real_examples:
            compile_loss = keras_compat.compile_loss(self)
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
        grads = self._dp_step.accum_grads
        if grads is None:
            raise RuntimeError("torchdp_keras: no clipped sum to noise (no batch accumulated).")
        if self.dp_settings.secure_mode:
            return add_secure_noise_and_scale_(grads, noise_std, scale)
        return add_noise_and_scale_(grads, noise_std, scale, seed=self._noise_key())

    def _sync_ranks(self) -> None:
        """Before the first data-parallel step: rank 0's weights everywhere."""
        state = self._dp_step
        distributed.check_same(self.privacy_ledger.steps, "dp_steps")
        variables = list(self.variables)
        if self.optimizer is not None and self.optimizer.built:
            variables += list(self.optimizer.variables)
        distributed.broadcast_([v.value for v in variables])
        state.layer_rng.seed(distributed.shared_entropy(state.layer_rng.getrandbits(63)))
        state.distributed_synced = True

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
