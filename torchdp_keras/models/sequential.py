"""`DPSequential`: TF Privacy's DP replacement for `keras.Sequential`."""

from __future__ import annotations

import keras
from keras.src.saving import serialization_lib

from torchdp_keras.model_checks import check_per_example_privacy
from torchdp_keras.models.dp_trainer import (
    DP_CONFIG_KEYS,
    NOT_GIVEN,
    PRIVACY_STATE_KEY,
    DPTrainerMixin,
    resolve_dp_arguments,
)


@keras.saving.register_keras_serializable(package="torchdp_keras")
class DPSequential(DPTrainerMixin, keras.Sequential):
    """A `keras.Sequential` trained with DP-SGD (per-example clipping and noise).

    Use it with a standard Keras optimizer and a standard reduced loss; the
    clipping and noising happen in `train_step`. Each step clips every
    example's gradient (or every microbatch's mean gradient) to L2 norm
    `l2_norm_clip`, adds Gaussian noise of std `noise_multiplier *
    l2_norm_clip` to the sum and divides by the number of units.

    The DP arguments may come first and by position, in TF Privacy's order
    (`DPSequential(l2_norm_clip, noise_multiplier, num_microbatches=None,
    use_xla=False, layer_registry=None, *args, **kwargs)`: a number first
    means this order), or as keywords after Keras's own arguments (layers
    first). TF Privacy's `use_xla` defaults to True; here to False (eager).

    Args:
        *args: Keras's positional arguments (`layers`, `trainable`, `name`),
            or TF Privacy's: `l2_norm_clip, noise_multiplier, num_microbatches,
            use_xla, layer_registry`, then Keras's.
        l2_norm_clip: Clipping norm `C` > 0 (required, by keyword or position).
        noise_multiplier: Ratio `sigma` >= 0 of the noise std to `C` (required).
        num_microbatches: None (clip every example) or the number of
            contiguous groups a batch is split into; the batch size must be a
            multiple of it.
        use_xla: Compile the DP step with `torch.compile` (same as
            `compile(jit_compile=True)`); falls back to eager with a warning.
        seed: Seed of the noise and of the random layers, for reproducible
            runs; None draws OS entropy.
        clipping_mode: "auto" (default: fast clipping for every layer the
            registry covers, explicit per-layer per-example gradients for the
            others, per-example gradients of the whole model when the model
            is outside the fast path's scope), "fast" (fast clipping only;
            anything else is an `UnsupportedLayerError`) or "vmap"
            (per-example gradients of the whole model).
        layer_registry: The `LayerRegistry` of fast-clipping rules; default
            `make_default_layer_registry()`.
        secure_mode: Draw the noise (and, in fit, the Poisson samples) from
            the OS CSPRNG, with the floating-point attack mitigation; a seed
            is then an error. Slower; for production releases.
        **kwargs: Passed to `keras.Sequential` (`name`, `trainable`).

    Example:
        >>> model = DPSequential(
        ...     [keras.Input((4,)), keras.layers.Dense(2)],
        ...     l2_norm_clip=1.0, noise_multiplier=1.1)
        >>> model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")

        TF Privacy's order, numbers first:

        >>> model = DPSequential(1.0, 1.1, None, False, None, [keras.Input((4,)),
        ...                      keras.layers.Dense(2)])
    """

    def __init__(
        self,
        *args,
        l2_norm_clip=NOT_GIVEN,
        noise_multiplier=NOT_GIVEN,
        num_microbatches=None,
        use_xla=NOT_GIVEN,
        seed=None,
        clipping_mode="auto",
        layer_registry=None,
        secure_mode=False,
        **kwargs,
    ):
        args, settings = resolve_dp_arguments(
            "DPSequential",
            args,
            l2_norm_clip=l2_norm_clip,
            noise_multiplier=noise_multiplier,
            num_microbatches=num_microbatches,
            use_xla=use_xla,
            layer_registry=layer_registry,
            seed=seed,
            clipping_mode=clipping_mode,
            secure_mode=secure_mode,
        )
        self._dp_checks_on_add = False
        super().__init__(*args, **kwargs)
        self._init_dp(settings)
        self._check_model()
        self._dp_checks_on_add = True

    def add(self, layer, rebuild=True):
        """Adds a layer on top of the stack (see `keras.Sequential.add`).

        Raises:
            UnsupportedLayerError: the layer (or a layer inside it) mixes the
                examples of a batch, like BatchNormalization.
        """
        if self._dp_checks_on_add and isinstance(layer, keras.layers.Layer):
            check_per_example_privacy(layer, prefix=f"{self.name}/{layer.name}", include_root=True)
        super().add(layer, rebuild=rebuild)

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        dp = {key: config.pop(key) for key in DP_CONFIG_KEYS if key in config}
        privacy_state = config.pop(PRIVACY_STATE_KEY, None)
        layers = []
        for layer_config in config.pop("layers"):
            layers.append(
                serialization_lib.deserialize_keras_object(
                    layer_config, custom_objects=custom_objects
                )
            )
        build_input_shape = config.pop("build_input_shape", None)
        model = cls(
            layers=layers, name=config.get("name"), trainable=config.get("trainable", True), **dp
        )
        if (
            not model._functional
            and build_input_shape
            and isinstance(build_input_shape, (tuple, list))
        ):
            model.build(build_input_shape)
        model._restore_privacy_state(privacy_state)
        model._rebuilt_from_config = True
        return model
