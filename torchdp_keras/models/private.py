"""`PrivateKerasModel` and `make_private`: DP training for an existing model."""

from __future__ import annotations

import keras

from torchdp_keras import _validation
from torchdp_keras.config import DPKerasConfig
from torchdp_keras.errors import DPConfigError
from torchdp_keras.models.dp_trainer import (
    DP_CONFIG_KEYS,
    PRIVACY_STATE_KEY,
    DPTrainerMixin,
    validate_dp_arguments,
)


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
        l2_norm_clip: Clipping norm `C` > 0.
        noise_multiplier: Ratio `sigma` >= 0 of the noise std to `C`.
        num_microbatches: None (clip every example) or the number of
            contiguous groups a batch is split into.
        use_xla: Compile the DP step with `torch.compile`.
        seed: Seed of the noise and of the random layers; None: OS entropy.
        clipping_mode: "auto", "fast" or "vmap" (see `DPSequential`).
        layer_registry: The `LayerRegistry` of fast-clipping rules.
        secure_mode: Draw the noise (and, in fit, the Poisson samples) from
            the OS CSPRNG, with the floating-point attack mitigation; a seed
            is then an error.
        **kwargs: Passed to `keras.Model` (`name`, `trainable`).

    Example:
        >>> base = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        >>> dp_model = PrivateKerasModel(model=base, l2_norm_clip=1.0,
        ...                              noise_multiplier=1.2)
        >>> dp_model.compile(optimizer="sgd", loss="mse")
    """

    _dp_wraps_model = True  # its output is exactly model.model's (see fast clipping)

    def __init__(
        self,
        model,
        config: DPKerasConfig | None = None,
        *,
        l2_norm_clip=None,
        noise_multiplier=None,
        num_microbatches=None,
        use_xla=False,
        seed=None,
        clipping_mode="auto",
        layer_registry=None,
        secure_mode=False,
        **kwargs,
    ):
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
        config, settings = _resolve_settings(
            config,
            l2_norm_clip=l2_norm_clip,
            noise_multiplier=noise_multiplier,
            num_microbatches=num_microbatches,
            use_xla=use_xla,
            seed=seed,
            clipping_mode=clipping_mode,
            layer_registry=layer_registry,
            secure_mode=secure_mode,
        )
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
        config.update(self._dp_config())
        if self._dp_keras_config is not None:
            config["dp_keras_config"] = self._dp_keras_config.to_dict()
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
        private._restore_privacy_state(privacy_state)
        private._rebuilt_from_config = True
        return private


def _resolve_settings(
    config,
    *,
    l2_norm_clip,
    noise_multiplier,
    num_microbatches,
    use_xla,
    seed,
    clipping_mode,
    layer_registry,
    secure_mode=False,
):
    """Returns (config with a resolved sigma or None, validated DP settings)."""
    if config is None:
        if l2_norm_clip is None or noise_multiplier is None:
            raise DPConfigError(
                "Expected either a DPKerasConfig or both l2_norm_clip and noise_multiplier. "
                f"Received: config=None, l2_norm_clip={l2_norm_clip!r}, "
                f"noise_multiplier={noise_multiplier!r}"
            )
        return None, validate_dp_arguments(
            l2_norm_clip=l2_norm_clip,
            noise_multiplier=noise_multiplier,
            num_microbatches=num_microbatches,
            use_xla=use_xla,
            seed=seed,
            clipping_mode=clipping_mode,
            layer_registry=layer_registry,
            secure_mode=secure_mode,
        )
    if not isinstance(config, DPKerasConfig):
        raise DPConfigError(
            f"Expected config to be a DPKerasConfig. Received: config={config!r} "
            f"of type {type(config).__name__}"
        )
    given = {
        "l2_norm_clip": l2_norm_clip,
        "noise_multiplier": noise_multiplier,
        "num_microbatches": num_microbatches,
        "seed": seed,
        "secure_mode": _validation.check_bool(secure_mode, "secure_mode") or None,
    }
    clashing = {k: v for k, v in given.items() if v is not None}
    if clashing:
        raise DPConfigError(
            "Expected the DP settings in the DPKerasConfig only. Received also: "
            + ", ".join(f"{k}={v!r}" for k, v in clashing.items())
        )
    config = config.update_with_calibrated_noise_multiplier()
    settings = validate_dp_arguments(
        l2_norm_clip=config.clipping_norm,
        noise_multiplier=config.noise_multiplier,
        use_xla=use_xla,
        seed=config.seed,
        clipping_mode=clipping_mode,
        layer_registry=layer_registry,
        secure_mode=config.secure_mode,
    )
    return config, settings


def make_private(
    model: keras.Model,
    config: DPKerasConfig | None = None,
    *,
    l2_norm_clip: float | None = None,
    noise_multiplier: float | None = None,
    num_microbatches: int | None = None,
    seed: int | None = None,
    clipping_mode: str = "auto",
    layer_registry=None,
    secure_mode: bool = False,
) -> PrivateKerasModel:
    """Returns a DP-SGD model that shares the layers and weights of `model`.

    Give either a `DPKerasConfig` (JAX Privacy's `make_private(model, config)`:
    the noise multiplier is calibrated from the budget, the reported epsilon
    uses the config's delta and the training stops being allowed after
    `train_steps` updates) or the DP settings directly.

    Args:
        model: Any Keras model (Sequential, functional or subclassed).
        config: A `DPKerasConfig`, or None.
        l2_norm_clip: Clipping norm `C` > 0 (without a config).
        noise_multiplier: Ratio `sigma` >= 0 of the noise std to `C` (without a config).
        num_microbatches: None (clip every example) or the number of
            contiguous groups a batch is split into (without a config).
        seed: Seed of the noise and of the random layers; None: OS entropy.
        clipping_mode: "auto", "fast" or "vmap" (see `DPSequential`).
        layer_registry: The `LayerRegistry` of fast-clipping rules.
        secure_mode: Draw the noise (and, in fit, the Poisson samples) from
            the OS CSPRNG, with the floating-point attack mitigation; a seed
            is then an error.

    Returns:
        A `PrivateKerasModel` wrapping `model`.

    Example:
        >>> base = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        >>> dp_model = make_private(base, l2_norm_clip=1.0, noise_multiplier=1.1)
        >>> dp_model.model is base
        True
    """
    return PrivateKerasModel(
        model,
        config,
        l2_norm_clip=l2_norm_clip,
        noise_multiplier=noise_multiplier,
        num_microbatches=num_microbatches,
        seed=seed,
        clipping_mode=clipping_mode,
        layer_registry=layer_registry,
        secure_mode=secure_mode,
    )
