"""`DPSequential`: TF Privacy's DP replacement for `keras.Sequential`."""

from __future__ import annotations

import keras

from torchdp_keras import _keras_compat as keras_compat
from torchdp_keras.model_checks import check_per_example_privacy
from torchdp_keras.models.dp_trainer import PRIVACY_STATE_KEY, DPTrainerMixin
from torchdp_keras.settings import DP_CONFIG_KEYS, DPSettings


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
        **kwargs: The DP arguments of `torchdp_keras.settings.DPSettings`
            (`l2_norm_clip` and `noise_multiplier` required, by keyword or
            position; `num_microbatches`, `use_xla`, `seed`, `clipping_mode`,
            `layer_registry`, `secure_mode`), and `keras.Sequential`'s
            (`name`, `trainable`).

    Example:
        >>> model = DPSequential(
        ...     [keras.Input((4,)), keras.layers.Dense(2)],
        ...     l2_norm_clip=1.0, noise_multiplier=1.1)
        >>> model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")

        TF Privacy's order, numbers first:

        >>> model = DPSequential(1.0, 1.1, None, False, None, [keras.Input((4,)),
        ...                      keras.layers.Dense(2)])
    """

    def __init__(self, *args, **kwargs):
        args, kwargs, settings = DPSettings.from_arguments("DPSequential", args, kwargs)
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
                keras_compat.deserialize_keras_object(layer_config, custom_objects=custom_objects)
            )
        build_input_shape = config.pop("build_input_shape", None)
        model = cls(
            layers=layers, name=config.get("name"), trainable=config.get("trainable", True), **dp
        )
        if (
            keras_compat.sequential_graph(model) is None
            and build_input_shape
            and isinstance(build_input_shape, (tuple, list))
        ):
            model.build(build_input_shape)
        model.privacy_ledger.load_state_dict(privacy_state)
        model._dp_step.rebuilt_from_config = True
        return model
