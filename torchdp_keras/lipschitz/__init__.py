"""Clipless DP training with Lipschitz networks (deel-lipdp's API on Keras 3 / torch).

    from torchdp_keras.lipschitz import DP_Sequential, DPParameters, DatasetMetadata
    from torchdp_keras.lipschitz.layers import DP_BoundedInput, DP_SpectralDense
    from torchdp_keras.lipschitz.losses import DP_TauCategoricalCrossentropy

See `torchdp_keras.lipschitz.model` for the guarantee.
"""

from torchdp_keras._backend import check_torch_backend

check_torch_backend()

from torchdp_keras.lipschitz import augmult, layers, losses, pipeline, sensitivity  # noqa: E402
from torchdp_keras.lipschitz.layers import *  # noqa: E402,F401,F403
from torchdp_keras.lipschitz.losses import *  # noqa: E402,F401,F403
from torchdp_keras.lipschitz.model import (  # noqa: E402
    AdaptiveLossGradientClipping,
    DatasetMetadata,
    DP_Accountant,
    DP_Model,
    DP_Sequential,
    DPParameters,
    NoisifyStrategyError,
    accounting_noise_multiplier,
    compute_gradient_bounds,
    get_eps_delta,
    get_noise_multiplier_coefs,
    get_optimal_noise_multiplier_coefs,
    global_noisify,
    local_noisify,
    optimal_noisify,
)

__all__ = [
    "AdaptiveLossGradientClipping",
    "augmult",
    "DP_Accountant",
    "DP_Model",
    "DP_Sequential",
    "DPParameters",
    "DatasetMetadata",
    "NoisifyStrategyError",
    "accounting_noise_multiplier",
    "compute_gradient_bounds",
    "get_eps_delta",
    "get_noise_multiplier_coefs",
    "get_optimal_noise_multiplier_coefs",
    "global_noisify",
    "layers",
    "local_noisify",
    "losses",
    "pipeline",
    "sensitivity",
    "optimal_noisify",
]
