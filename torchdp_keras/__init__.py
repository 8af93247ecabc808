"""Differentially private training of Keras 3 models on the PyTorch backend.

Set `KERAS_BACKEND=torch` before keras is imported, then:

    import torchdp_keras as tdk
    model = tdk.DPSequential([...], l2_norm_clip=1.0, noise_multiplier=1.1)
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=256)

The package imports lazily: `torchdp_keras.accounting` and the privacy
functions need neither torch nor keras; the model classes import keras (and
check that it runs on torch) when first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from torchdp_keras._backend import check_backend_before_import
from torchdp_keras.errors import (
    BackendError,
    DPConfigError,
    DPError,
    PrivacyBudgetExceededError,
    PrivacyStateError,
    UnsupportedLayerError,
)

check_backend_before_import()

__version__ = "0.1.0"

_LAZY = {
    "DPModel": "torchdp_keras.models",
    "DPSequential": "torchdp_keras.models",
    "Model": "torchdp_keras.models",
    "PrivateKerasModel": "torchdp_keras.models",
    "make_private": "torchdp_keras.models",
    "make_dp_model_class": "torchdp_keras.models",
    "DPKerasConfig": "torchdp_keras.config",
    "DPSettings": "torchdp_keras.settings",
    "PrivacyLedger": "torchdp_keras.accounting.ledger",
    "SamplingPlan": "torchdp_keras.data.sampling_plan",
    "LayerRegistry": "torchdp_keras.per_example",
    "LayerRule": "torchdp_keras.per_example",
    "SublayerRule": "torchdp_keras.per_example",
    "make_default_layer_registry": "torchdp_keras.per_example",
    "set_explicit_memory_budget": "torchdp_keras.per_example",
    "explicit_memory_budget": "torchdp_keras.per_example",
    "PrivateDataLoader": "torchdp_keras.data",
    "UserDataLoader": "torchdp_keras.data",
    "ModelProblem": "torchdp_keras.model_checks",
    "validate": "torchdp_keras.model_checks",
    "fix": "torchdp_keras.model_fix",
    "RDPAccountant": "torchdp_keras.accounting",
    "PRVAccountant": "torchdp_keras.accounting",
    "calibrate_noise_multiplier": "torchdp_keras.accounting",
    "compute_dp_sgd_privacy": "torchdp_keras.accounting",
    "compute_dp_sgd_privacy_statement": "torchdp_keras.accounting",
    "get_privacy_budget": "torchdp_keras.accounting",
    "compute_rdp": "torchdp_keras.privacy.analysis.rdp_accountant",
    "get_privacy_spent": "torchdp_keras.privacy.analysis.rdp_accountant",
}
_SUBMODULES = (
    "accounting",
    "auditing",
    "callbacks",
    "config",
    "data",
    "distributed",
    "lipschitz",
    "models",
    "ops",
    "optimizers",
    "per_example",
    "privacy",
    "settings",
)

__all__ = [
    "BackendError",
    "DPConfigError",
    "DPError",
    "PrivacyBudgetExceededError",
    "PrivacyStateError",
    "UnsupportedLayerError",
    *sorted(_LAZY),
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"torchdp_keras.{name}")
    raise AttributeError(f"module 'torchdp_keras' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))


if TYPE_CHECKING:  # static analysers and IDEs see the eager imports
    from torchdp_keras.accounting import (  # noqa: F401
        PRVAccountant,
        RDPAccountant,
        calibrate_noise_multiplier,
        compute_dp_sgd_privacy,
        compute_dp_sgd_privacy_statement,
        get_privacy_budget,
    )
    from torchdp_keras.accounting.ledger import PrivacyLedger  # noqa: F401
    from torchdp_keras.config import DPKerasConfig  # noqa: F401
    from torchdp_keras.data import PrivateDataLoader, UserDataLoader  # noqa: F401
    from torchdp_keras.data.sampling_plan import SamplingPlan  # noqa: F401
    from torchdp_keras.model_checks import ModelProblem, validate  # noqa: F401
    from torchdp_keras.model_fix import fix  # noqa: F401
    from torchdp_keras.models import (  # noqa: F401
        DPModel,
        DPSequential,
        Model,
        PrivateKerasModel,
        make_dp_model_class,
        make_private,
    )
    from torchdp_keras.per_example import (  # noqa: F401
        LayerRegistry,
        LayerRule,
        SublayerRule,
        explicit_memory_budget,
        make_default_layer_registry,
        set_explicit_memory_budget,
    )
    from torchdp_keras.privacy.analysis.rdp_accountant import (  # noqa: F401
        compute_rdp,
        get_privacy_spent,
    )
    from torchdp_keras.settings import DPSettings  # noqa: F401
