"""DP model classes: Keras models whose `train_step` is DP-SGD."""

from torchdp_keras._backend import check_torch_backend

check_torch_backend()

from torchdp_keras.models.dp_model_class import make_dp_model_class  # noqa: E402
from torchdp_keras.models.model import DPModel, Model  # noqa: E402
from torchdp_keras.models.private import PrivateKerasModel, make_private  # noqa: E402
from torchdp_keras.models.sequential import DPSequential  # noqa: E402

__all__ = [
    "DPModel",
    "DPSequential",
    "Model",
    "PrivateKerasModel",
    "make_dp_model_class",
    "make_private",
]
