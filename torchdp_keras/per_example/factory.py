"""`make_engine`: the one place that chooses how a DP model clips.

`clipping_mode` decides: "vmap" takes per-example gradients of the whole
model (`VmapEngine`); "fast" takes fast clipping (`FastEngine`) or fails
with the reason; "auto" takes fast clipping, with explicit per-layer
per-example gradients for layers no rule covers, and falls back to the whole
model's per-example gradients when the model is outside the fast path's
scope, at construction or at the first step (some checks need a step: each
tapped layer runs once, every use of every weight is seen). The returned
`EngineSelection` keeps that choice and the reason for it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import keras

from torchdp_keras import _keras_compat as keras_compat
from torchdp_keras.model_walk import iter_layers
from torchdp_keras.per_example.engine import ClippedBatch, ClippingEngine
from torchdp_keras.per_example.fast_engine import (
    FastEngine,
    FastPathUnsupported,
    describe_slow_layers,
)
from torchdp_keras.per_example.plan import WHOLE_MODEL, ClippingPlan
from torchdp_keras.per_example.registry import LayerRegistry
from torchdp_keras.per_example.rules.per_example import PerExampleGradientRule
from torchdp_keras.per_example.vmap_engine import VmapEngine

logger = logging.getLogger(__name__)

__all__ = ["EngineSelection", "make_engine"]

Notify = Callable[[str, str], None]


def _log(key: str, message: str) -> None:
    logger.warning("torchdp_keras: %s", message)


class EngineSelection:
    """The engine a model clips with, and why; itself a `ClippingEngine`.

    Built by `make_engine`. In "auto" mode a `FastPathUnsupported` raised at
    a step moves the model to the whole-model per-example engine (once, with
    the reason logged) and the step is computed again there.

    Attributes:
        engine: The current engine (`FastEngine` or `VmapEngine`).
        vmap_reason: Why "auto" left the fast path (None otherwise).
        checked: Whether a step has confirmed the choice.
    """

    def __init__(
        self,
        model: keras.Model,
        *,
        clipping_mode: str,
        registry: LayerRegistry,
        use_xla: bool = False,
        units_per_chunk: int | None = None,
        log_once: Notify = _log,
        warn_once: Notify | None = None,
    ) -> None:
        self._model = model
        self.clipping_mode = clipping_mode
        self._registry = registry
        self._use_xla = use_xla
        self._units_per_chunk = units_per_chunk
        self._log_once = log_once
        self._warn_once = warn_once
        self.vmap_reason: str | None = None
        self.checked = False
        self.engine: ClippingEngine = self._choose()

    @property
    def variable_key(self) -> tuple[int, ...]:
        return self.engine.variable_key

    def _compile_source(self) -> str:
        """The user's argument that turned compilation on, as the user wrote it."""
        return "use_xla=True" if self._use_xla else "jit_compile=True"

    def _vmap_engine(self) -> VmapEngine:
        return VmapEngine(
            self._model,
            compile=bool(self._model.jit_compile),
            compile_source=self._compile_source(),
            units_per_chunk=self._units_per_chunk,
        )

    def _choose(self) -> ClippingEngine:
        mode = self.clipping_mode
        if mode == "vmap":
            return self._vmap_engine()
        try:
            fallback = PerExampleGradientRule() if mode == "auto" else None
            engine = FastEngine(self._model, self._registry, fallback=fallback)
        except FastPathUnsupported as error:
            if mode == "fast":
                raise
            return self._fall_back(error)
        slow = describe_slow_layers(engine)
        if slow:
            self._log_once("slow-layers", slow)
        if self._model.jit_compile and self._warn_once is not None:
            self._warn_once(
                "jit-fast",
                f"{self._compile_source()} compiles the per-example engine "
                "(clipping_mode='vmap'); the fast clipping path runs eagerly.",
            )
        return engine

    def _fall_back(self, error: FastPathUnsupported) -> VmapEngine:
        self.vmap_reason = str(error)
        self._log_once(
            "vmap-fallback",
            f"model '{self._model.name}' uses per-example gradients "
            f"(clipping_mode='auto'): {error}",
        )
        return self._vmap_engine()

    def clipped_batch(self, x, y, sample_weight, **kwargs: Any) -> ClippedBatch:
        """`ClippingEngine.clipped_batch` on the chosen engine (see the class)."""
        try:
            result = self.engine.clipped_batch(x, y, sample_weight, **kwargs)
        except FastPathUnsupported as error:
            if self.clipping_mode == "fast":
                raise
            self.engine = self._fall_back(error)
            result = self.engine.clipped_batch(x, y, sample_weight, **kwargs)
        self.checked = True
        return result

    def plan(self) -> ClippingPlan:
        """Which engine clips each weighted layer, and why (see `ClippingPlan`)."""
        if isinstance(self.engine, FastEngine):
            return ClippingPlan("fast", tuple(self.engine.plan), None, self.checked)
        layers = tuple(
            (path, type(layer).__name__, WHOLE_MODEL)
            for path, layer in iter_layers(self._model)
            if layer.trainable_weights
            and not keras_compat.flatten_layers(layer, include_self=False)
        )
        reason = None if self.clipping_mode == "vmap" else self.vmap_reason
        return ClippingPlan("vmap", layers, reason, self.checked)


def make_engine(
    model: keras.Model,
    settings: Any,
    registry: LayerRegistry | None = None,
    *,
    microbatch_size: int | None = None,
    log_once: Notify = _log,
    warn_once: Notify | None = None,
) -> EngineSelection:
    """The clipping engine of `model` under `settings` (a `DPSettings`).

    Args:
        model: A built Keras model compiled with a loss.
        settings: The model's `DPSettings` (its `clipping_mode`, `use_xla`,
            `num_microbatches` and, by default, `layer_registry`).
        registry: The rules of the fast path; default the settings'.
        microbatch_size: Examples per chunk of the whole-model engine (JAX
            Privacy's `microbatch_size`; only without `num_microbatches`).
        log_once: Called with `(key, message)` for a log line (the slow
            layers, a fallback); the model keeps each key to once.
        warn_once: Called with `(key, message)` for a user warning.

    Returns:
        An `EngineSelection`.

    Raises:
        FastPathUnsupported: `clipping_mode="fast"` and the model is outside
            the fast path's scope.

    Example:
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> model.compile(loss="mse")
        >>> from torchdp_keras.settings import DPSettings
        >>> settings = DPSettings.create(l2_norm_clip=1.0, noise_multiplier=1.0)
        >>> make_engine(model, settings).plan().engine
        'fast'
    """
    return EngineSelection(
        model,
        clipping_mode=settings.clipping_mode,
        registry=registry if registry is not None else settings.layer_registry,
        use_xla=settings.use_xla,
        units_per_chunk=microbatch_size if settings.num_microbatches is None else None,
        log_once=log_once,
        warn_once=warn_once,
    )
