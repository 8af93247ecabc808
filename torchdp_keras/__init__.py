"""Differentially private training of Keras 3 models on the PyTorch backend.

Set `KERAS_BACKEND=torch` before keras is imported, then:

    import torchdp_keras as tdk
    model = tdk.DPSequential([...], l2_norm_clip=1.0, noise_multiplier=1.1)
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=256)
"""

from torchdp_keras._backend import check_torch_backend

check_torch_backend()

from torchdp_keras.errors import (  # noqa: E402
    BackendError,
    DPConfigError,
    DPError,
    UnsupportedLayerError,
)
from torchdp_keras.models import (  # noqa: E402
    DPModel,
    DPSequential,
    PrivateKerasModel,
    make_private,
)

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "DPConfigError",
    "DPError",
    "DPModel",
    "DPSequential",
    "PrivateKerasModel",
    "UnsupportedLayerError",
    "make_private",
]
