"""`PrivateKerasModel` and `make_private`: DP training for an existing model."""

from __future__ import annotations

import keras

from torchdp_keras.errors import DPConfigError
from torchdp_keras.model_checks import check_per_example_privacy
from torchdp_keras.models.dp_trainer import (
    DP_CONFIG_KEYS,
    DPTrainerMixin,
    validate_dp_arguments,
    warn_if_seed_restored,
)


@keras.saving.register_keras_serializable(package="torchdp_keras")
class PrivateKerasModel(DPTrainerMixin, keras.Model):
    """Wraps any Keras model (Sequential, functional, subclassed) for DP-SGD.

    The wrapper calls the wrapped model, so both share the same layers and
    weights: training the wrapper trains `model`, and `model` can be used or
    saved on its own afterwards. Compile and fit the wrapper.

    Args:
        model: The Keras model to train privately.
        l2_norm_clip: Clipping norm `C` > 0.
        noise_multiplier: Ratio `sigma` >= 0 of the noise std to `C`.
        num_microbatches: None (clip every example) or the number of
            contiguous groups a batch is split into.
        use_xla: Compile the DP step with `torch.compile`.
        seed: Seed of the noise and of the random layers; None: OS entropy.
        **kwargs: Passed to `keras.Model` (`name`, `trainable`).

    Example:
        >>> base = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        >>> dp_model = PrivateKerasModel(model=base, l2_norm_clip=1.0,
        ...                              noise_multiplier=1.2)
        >>> dp_model.compile(optimizer="sgd", loss="mse")
    """

    def __init__(
        self,
        model,
        *,
        l2_norm_clip,
        noise_multiplier,
        num_microbatches=None,
        use_xla=False,
        seed=None,
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
        settings = validate_dp_arguments(
            l2_norm_clip=l2_norm_clip,
            noise_multiplier=noise_multiplier,
            num_microbatches=num_microbatches,
            use_xla=use_xla,
            seed=seed,
        )
        kwargs.setdefault("name", f"private_{model.name}")
        super().__init__(**kwargs)
        self.model = model
        self._init_dp(settings)
        check_per_example_privacy(self)
        if model.built:
            self.built = True

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
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        warn_if_seed_restored(config)
        model = keras.saving.deserialize_keras_object(
            config.pop("model"), custom_objects=custom_objects
        )
        dp = {key: config.pop(key) for key in DP_CONFIG_KEYS if key in config}
        return cls(model=model, **dp, **config)


def make_private(
    model: keras.Model,
    *,
    l2_norm_clip: float,
    noise_multiplier: float,
    num_microbatches: int | None = None,
    seed: int | None = None,
) -> PrivateKerasModel:
    """Returns a DP-SGD model that shares the layers and weights of `model`.

    Args:
        model: Any Keras model (Sequential, functional or subclassed).
        l2_norm_clip: Clipping norm `C` > 0.
        noise_multiplier: Ratio `sigma` >= 0 of the noise std to `C`.
        num_microbatches: None (clip every example) or the number of
            contiguous groups a batch is split into.
        seed: Seed of the noise and of the random layers; None: OS entropy.

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
        l2_norm_clip=l2_norm_clip,
        noise_multiplier=noise_multiplier,
        num_microbatches=num_microbatches,
        seed=seed,
    )
