"""DP model classes: Keras models whose `train_step` is DP-SGD."""

from torchdp_keras.models.model import DPModel
from torchdp_keras.models.private import PrivateKerasModel, make_private
from torchdp_keras.models.sequential import DPSequential

__all__ = ["DPModel", "DPSequential", "PrivateKerasModel", "make_private"]
