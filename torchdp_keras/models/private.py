"""`PrivateKerasModel` and `make_private`: DP training for an existing model."""

from __future__ import annotations

import keras

from torchdp_keras import _validation
from torchdp_keras.config import DPKerasConfig
from torchdp_keras.errors import DPConfigError
from torchdp_keras.models.dp_trainer import PRIVACY_STATE_KEY, DPTrainerMixin
from torchdp_keras.settings import DP_CONFIG_KEYS, DPSettings


@keras.saving.register_keras_serializable(package="torchdp_keras")
class PrivateKerasModel(DPTrainerMixin, keras.Model):
    """Wraps any Keras model (Sequential, functional, subclassed) for DP-SGD.

    The wrapper calls the wrapped model, so both share the same layers and
    weights: training the wrapper trains `model`, and `model` can be used or
    saved on its own afterwards. Compile and fit the wrapper.

    Args:
        model: The Keras model to train privately.
        config: A `DPKerasConfig` (JAX Privacy's style: budget first, sigma
            calibrated). Give either `config` or `l2_norm_clip` and
            `noise_multiplier`.
        **kwargs: The DP arguments of `torchdp_keras.settings.DPSettings`
            (without a config; with one, only `use_xla`, `clipping_mode` and
            `layer_registry`), and `keras.Model`'s (`name`, `trainable`).

    Example:
        >>> base = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        >>> dp_model = PrivateKerasModel(model=base, l2_norm_clip=1.0,
        ...                              noise_multiplier=1.2)
        >>> dp_model.compile(optimizer="sgd", loss="mse")
    """

    _dp_wraps_model = True  # its output is exactly model.model's (see fast clipping)

    def __init__(self, model, config: DPKerasConfig | None = None, **kwargs):
        if not isinstance(model, keras.Model):
            raise DPConfigError(
                f"Expected model to be a keras.Model. Received: model={model!r} "
                f"of type {type(model).__name__}"
            )
        if isinstance(model, DPTrainerMixin):
            raise DPConfigError(
                f"Expected a non-private model. Received: model={model.name!r}, "
                f"which is already a {type(model).__name__}."
            )
        config, settings, kwargs = _resolve_settings(config, kwargs)
        kwargs.setdefault("name", f"private_{model.name}")
        super().__init__(**kwargs)
        self.model = model
        self._init_dp(settings, dp_keras_config=config)
        if model.built:
            self.built = True
        self._check_model()

    def call(self, inputs, training=None):
        return self.model(inputs, training=training)

    def compute_output_spec(self, inputs, training=None):
        return self.model.compute_output_spec(inputs)

    def get_config(self):
        config = {
            "name": self.name,
            "trainable": self.trainable,
            "model": keras.saving.serialize_keras_object(self.model),
        }
        config.update(self.dp_settings.to_config())
        if self.dp_keras_config is not None:
            config["dp_keras_config"] = self.dp_keras_config.to_dict()
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        model = keras.saving.deserialize_keras_object(
            config.pop("model"), custom_objects=custom_objects
        )
        dp = {key: config.pop(key) for key in DP_CONFIG_KEYS if key in config}
        privacy_state = config.pop(PRIVACY_STATE_KEY, None)
        dp_keras_config = config.pop("dp_keras_config", None)
        if dp_keras_config is not None:
            dp = {
                "config": DPKerasConfig.from_dict(dp_keras_config),
                "use_xla": dp["use_xla"],
                "clipping_mode": dp.get("clipping_mode", "auto"),
            }
        private = cls(model=model, **dp, **config)
        private.privacy_ledger.load_state_dict(privacy_state)
        private._dp_step.rebuilt_from_config = True
        return private


_CONFIG_OWNS = ("l2_norm_clip", "noise_multiplier", "num_microbatches", "seed", "secure_mode")


def _resolve_settings(config, kwargs: dict):
    """`(config with a resolved sigma or None, DPSettings, Keras kwargs)`."""
    kwargs = dict(kwargs)
    if config is None:
        if kwargs.get("l2_norm_clip") is None or kwargs.get("noise_multiplier") is None:
            raise DPConfigError(
                "Expected either a DPKerasConfig or both l2_norm_clip and noise_multiplier. "
                f"Received: config=None, l2_norm_clip={kwargs.get('l2_norm_clip')!r}, "
                f"noise_multiplier={kwargs.get('noise_multiplier')!r}"
            )
        _, kwargs, settings = DPSettings.from_arguments("PrivateKerasModel", (), kwargs)
        return None, settings, kwargs
    if not isinstance(config, DPKerasConfig):
        raise DPConfigError(
            f"Expected config to be a DPKerasConfig. Received: config={config!r} "
            f"of type {type(config).__name__}"
        )
    given = {key: kwargs.pop(key, None) for key in _CONFIG_OWNS if key != "secure_mode"}
    if "secure_mode" in kwargs:  # False is allowed (the config decides); True clashes
        secure_mode = _validation.check_bool(kwargs.pop("secure_mode"), "secure_mode")
        given["secure_mode"] = secure_mode or None
    clashing = {k: v for k, v in given.items() if v is not None}
    if clashing:
        raise DPConfigError(
            "Expected the DP settings in the DPKerasConfig only. Received also: "
            + ", ".join(f"{k}={v!r}" for k, v in clashing.items())
        )
    config = config.update_with_calibrated_noise_multiplier()
    settings = DPSettings.create(
        l2_norm_clip=config.clipping_norm,
        noise_multiplier=config.noise_multiplier,
        use_xla=kwargs.pop("use_xla", False),
        seed=config.seed,
        clipping_mode=kwargs.pop("clipping_mode", "auto"),
        layer_registry=kwargs.pop("layer_registry", None),
        secure_mode=config.secure_mode,
    )
    return config, settings, kwargs


def make_private(
    model: keras.Model, config: DPKerasConfig | None = None, **settings
) -> PrivateKerasModel:
    """Returns a DP-SGD model that shares the layers and weights of `model`.

    Give either a `DPKerasConfig` (JAX Privacy's `make_private(model, config)`:
    the noise multiplier is calibrated from the budget, the reported epsilon
    uses the config's delta and the training stops being allowed after
    `train_steps` updates) or the DP settings directly.

    Args:
        model: Any Keras model (Sequential, functional or subclassed).
        config: A `DPKerasConfig`, or None.
        **settings: Without a config, the DP arguments of
            `torchdp_keras.settings.DPSettings` (`l2_norm_clip` and
            `noise_multiplier` required); with one, only `use_xla`,
            `clipping_mode` and `layer_registry`.

    Returns:
        A `PrivateKerasModel` wrapping `model`.

    Example:
        >>> base = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        >>> dp_model = make_private(base, l2_norm_clip=1.0, noise_multiplier=1.1)
        >>> dp_model.model is base
        True
    """
    return PrivateKerasModel(model, config, **settings)
