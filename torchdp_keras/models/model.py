"""`DPModel`: a `keras.Model` trained with DP-SGD, functional or subclassed."""

from __future__ import annotations

import keras

from torchdp_keras import _keras_compat as keras_compat
from torchdp_keras.errors import DPConfigError
from torchdp_keras.models.dp_trainer import PRIVACY_STATE_KEY, DPTrainerMixin
from torchdp_keras.settings import DPSettings, keras_positional_arguments


@keras.saving.register_keras_serializable(package="torchdp_keras")
class DPModel(DPTrainerMixin, keras.Model):
    """A `keras.Model` trained with DP-SGD (per-example clipping and noise).

    Works as a functional model and as a base class for subclassed models;
    takes the DP arguments of `torchdp_keras.settings.DPSettings`
    (`l2_norm_clip`, `noise_multiplier`, `num_microbatches`, `use_xla`,
    `seed`, `clipping_mode`, `layer_registry`, `secure_mode`), by keyword or
    first by position in TF Privacy's order (`DPModel(l2_norm_clip,
    noise_multiplier, num_microbatches=None, use_xla=False,
    layer_registry=None, *args, **kwargs)`).

    Args:
        *args: TF Privacy's positional DP arguments when the first is a
            number, then `keras.Model`'s (e.g. `inputs`, `outputs`).
        **kwargs: The DP arguments (see `DPSettings`; `l2_norm_clip` and
            `noise_multiplier` are required), and `keras.Model`'s.

    Example:
        >>> inputs = keras.Input((4,))
        >>> outputs = keras.layers.Dense(2)(inputs)
        >>> model = DPModel(inputs=inputs, outputs=outputs,
        ...                 l2_norm_clip=1.0, noise_multiplier=1.1)

        Subclassed models pass the DP arguments (and `**kwargs`, so that a
        saved model can be rebuilt from its config) to `super().__init__`:

        >>> class Classifier(DPModel):
        ...     def __init__(self, **kwargs):
        ...         super().__init__(**kwargs)
        ...         self.dense = keras.layers.Dense(10)
        ...     def call(self, x):
        ...         return self.dense(x)
        >>> clf = Classifier(l2_norm_clip=1.0, noise_multiplier=1.1)
    """

    _dp_settings_required = True

    def __new__(cls, *args, **kwargs):
        # Like keras.Model, which returns a Functional when called with
        # inputs and outputs: DPModel(inputs=..., outputs=...) is a
        # DPFunctional (and Model(...) a FunctionalModel). Keras's own route
        # would rewrite the class's bases.
        twin = _FUNCTIONAL_TWINS.get(cls)
        keras_args = keras_positional_arguments(args)
        if twin is not None and keras_compat.functional_init_arguments(keras_args, kwargs):
            return twin.__new__(twin, *args, **kwargs)
        return super().__new__(cls, *args, **kwargs)

    def __init__(self, *args, **kwargs):
        args, kwargs, settings = DPSettings.from_arguments(
            type(self).__name__, args, kwargs, required=self._dp_settings_required
        )
        functional = isinstance(self, keras_compat.Functional)
        if keras_compat.functional_init_arguments(args, kwargs) and not functional:
            raise DPConfigError(
                f"{type(self).__name__} passes `inputs` and `outputs` to "
                "DPModel.__init__: a DPModel subclass must define `call()`. For "
                "a functional model, call DPModel(inputs=..., outputs=..., "
                "l2_norm_clip=..., noise_multiplier=...) directly, or wrap a "
                "keras.Model with torchdp_keras.make_private(model, ...)."
            )
        if functional:
            keras_compat.Trainer.__init__(self)
            keras_compat.Functional.__init__(self, *args, **kwargs)
        else:
            super().__init__(*args, **kwargs)
        self._init_dp(settings)
        self._check_model()

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        privacy_state = config.pop(PRIVACY_STATE_KEY, None)
        model = super().from_config(config, custom_objects=custom_objects)
        model.privacy_ledger.load_state_dict(privacy_state)
        model._dp_step.rebuilt_from_config = True
        return model


@keras.saving.register_keras_serializable(package="torchdp_keras")
class DPFunctional(DPModel, keras_compat.Functional):
    """What `DPModel(inputs=..., outputs=...)` returns: a functional DP model.

    Not constructed directly; it exists so that a functional DP model is a
    `keras.Model` of the functional kind (like `keras.Model(inputs, outputs)`
    is a `Functional`) while `DPModel` stays a plain base class for
    subclassed models.
    """


@keras.saving.register_keras_serializable(package="torchdp_keras")
class Model(DPModel):
    """Drop-in for `keras.Model` whose DP settings may come from a DP optimizer.

    TF Privacy's tutorial subclasses `Model` and compiles it with a DP
    optimizer and an unreduced loss; changing `keras.Model` (or
    `tf.keras.Model`) to `torchdp_keras.Model` is the whole port. The DP
    settings (`l2_norm_clip`, `noise_multiplier`, `num_microbatches`,
    `gradient_accumulation_steps`) are read from the optimizer at `compile`;
    they may instead be given here, as for `DPModel`. Compiling without
    either is an error: this class never trains without privacy.

    Args:
        *args: Passed to `keras.Model` (e.g. `inputs`, `outputs`).
        l2_norm_clip: None (from the DP optimizer) or the clipping norm `C`.
        noise_multiplier: None (from the DP optimizer) or `sigma`.
        num_microbatches: None, or the number of clipping groups per batch
            (only with `l2_norm_clip` and `noise_multiplier`).
        **kwargs: The other `DPModel` and `keras.Model` arguments.

    Example:
        >>> from torchdp_keras.optimizers import DPKerasSGDOptimizer
        >>> class Classifier(Model):
        ...     def __init__(self, **kwargs):
        ...         super().__init__(**kwargs)
        ...         self.out = keras.layers.Dense(10)
        ...     def call(self, x):
        ...         return self.out(x)
        >>> model = Classifier()
        >>> model.compile(
        ...     optimizer=DPKerasSGDOptimizer(l2_norm_clip=1.5, noise_multiplier=1.3,
        ...                                   num_microbatches=250, learning_rate=0.25),
        ...     loss=keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None))
    """

    _dp_settings_required = False


@keras.saving.register_keras_serializable(package="torchdp_keras")
class FunctionalModel(Model, keras_compat.Functional):
    """What `Model(inputs=..., outputs=...)` returns: a functional `torchdp_keras.Model`."""


_FUNCTIONAL_TWINS = {DPModel: DPFunctional, Model: FunctionalModel}
