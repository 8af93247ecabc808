"""TF Privacy's `privacy.keras_models.dp_keras_model`: `DPModel`, `DPSequential`,
`make_dp_model_class`."""

from torchdp_keras.models import DPModel, DPSequential, make_dp_model_class

__all__ = ["DPModel", "DPSequential", "make_dp_model_class"]
