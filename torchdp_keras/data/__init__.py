"""Data for DP training: Poisson sampling, padded batches, `PrivateDataLoader`."""

from torchdp_keras._backend import check_torch_backend

check_torch_backend()

from torchdp_keras.data.loader import (  # noqa: E402
    POISSON_BATCH_KEY,
    PrivateDataLoader,
    unpack_poisson_batch,
)
from torchdp_keras.data.sampling import PoissonSampler, padded_size  # noqa: E402
from torchdp_keras.data.users import UserDataLoader  # noqa: E402

__all__ = [
    "POISSON_BATCH_KEY",
    "PoissonSampler",
    "PrivateDataLoader",
    "UserDataLoader",
    "padded_size",
    "unpack_poisson_batch",
]
