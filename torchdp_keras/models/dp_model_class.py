"""`make_dp_model_class`: TF Privacy's factory of DP versions of Keras model classes."""

from __future__ import annotations

import functools

import keras

from torchdp_keras.errors import DPConfigError
from torchdp_keras.models.dp_trainer import DPTrainerMixin
from torchdp_keras.models.model import DPModel
from torchdp_keras.models.sequential import DPSequential


@functools.cache
def make_dp_model_class(cls: type) -> type:
    """Returns the DP version of a Keras model class (TF Privacy's function).

    `keras.Sequential` gives `DPSequential` and `keras.Model` gives `DPModel`;
    a subclass of either (your own model class) gives a class deriving from
    both, whose constructor takes the DP arguments (TF Privacy's
    `l2_norm_clip, noise_multiplier, num_microbatches=None, use_xla,
    layer_registry`, first by position or as keywords) and passes the rest
    to `cls`. Calling it twice with the same class returns the same class,
    registered for Keras saving as `torchdp_keras>DP<module>.<name>`.

    Args:
        cls: `keras.Model`, `keras.Sequential` or a subclass of either.

    Returns:
        The DP model class.

    Raises:
        DPConfigError: `cls` is not a Keras model class, or is already DP.

    Example:
        >>> DPSeq = make_dp_model_class(keras.Sequential)
        >>> model = DPSeq(1.0, 1.1, None, False, None, [keras.Input((3,)),
        ...               keras.layers.Dense(1)])
    """
    if not (isinstance(cls, type) and issubclass(cls, keras.Model)):
        raise DPConfigError(
            "Expected cls to be a Keras model class (keras.Model, keras.Sequential or a "
            f"subclass). Received: cls={cls!r}"
        )
    if issubclass(cls, DPTrainerMixin):
        raise DPConfigError(f"Expected a non-DP model class. Received: cls={cls.__name__}")
    if cls is keras.Sequential:
        return DPSequential
    if cls is keras.Model:
        return DPModel
    base = DPSequential if issubclass(cls, keras.Sequential) else DPModel
    name = f"DP{cls.__name__}"
    dp_cls = type(
        name,
        (base, cls),
        {
            "__module__": cls.__module__,
            "__qualname__": name,
            "__doc__": f"`{cls.__name__}` trained with DP-SGD (see `{base.__name__}`).",
        },
    )
    return keras.saving.register_keras_serializable(
        package="torchdp_keras", name=f"DP{cls.__module__}.{cls.__name__}"
    )(dp_cls)
