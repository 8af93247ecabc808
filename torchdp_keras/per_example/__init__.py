"""Per-example gradient engines: what DP-SGD clips, computed per unit."""

from torchdp_keras._backend import check_torch_backend

check_torch_backend()

from torchdp_keras.per_example.engine import ClippedBatch, ClippingEngine  # noqa: E402
from torchdp_keras.per_example.factory import EngineSelection, make_engine  # noqa: E402
from torchdp_keras.per_example.fast_engine import (  # noqa: E402
    FastEngine,
    FastPathUnsupported,
    describe_slow_layers,
)
from torchdp_keras.per_example.memory import (  # noqa: E402
    DEFAULT_EXPLICIT_MEMORY_BUDGET,
    explicit_memory_budget,
    set_explicit_memory_budget,
)
from torchdp_keras.per_example.plan import WHOLE_MODEL, ClippingPlan  # noqa: E402
from torchdp_keras.per_example.registry import (  # noqa: E402
    LayerRegistry,
    make_default_layer_registry,
)
from torchdp_keras.per_example.rules.base import LayerRule  # noqa: E402
from torchdp_keras.per_example.rules.per_example import PerExampleGradientRule  # noqa: E402
from torchdp_keras.per_example.rules.sublayers import SublayerRule  # noqa: E402
from torchdp_keras.per_example.vmap_engine import VmapEngine  # noqa: E402

__all__ = [
    "DEFAULT_EXPLICIT_MEMORY_BUDGET",
    "ClippedBatch",
    "ClippingEngine",
    "ClippingPlan",
    "EngineSelection",
    "FastEngine",
    "FastPathUnsupported",
    "LayerRegistry",
    "LayerRule",
    "PerExampleGradientRule",
    "SublayerRule",
    "VmapEngine",
    "WHOLE_MODEL",
    "describe_slow_layers",
    "explicit_memory_budget",
    "make_default_layer_registry",
    "make_engine",
    "set_explicit_memory_budget",
]
