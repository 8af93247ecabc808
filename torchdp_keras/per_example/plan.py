"""`ClippingPlan`: which engine clips each weighted layer of a DP model, and why."""

from __future__ import annotations

import dataclasses

WHOLE_MODEL = "per-example gradients of the whole model (vmap)"


@dataclasses.dataclass(frozen=True)
class ClippingPlan:
    """How a DP model computes its per-example clipped gradients.

    Attributes:
        engine: "fast" (fast clipping: one forward, one backward, per-layer
            rules) or "vmap" (per-example gradients of the whole model).
        layers: `(path, layer class, how)` for every layer whose weights are
            clipped: a rule's name, the per-layer per-example fallback, or
            the whole-model engine.
        reason: Why the whole model takes per-example gradients (None on the
            fast path, or when `clipping_mode="vmap"` was asked for).
        checked: Whether a training step has run with this plan: some checks
            (each tapped layer runs once per step, every use of every weight
            is seen) happen at the first step, which may still move the model
            to the whole-model engine.

    Example:
        >>> model = tdk.DPSequential(
        ...     [keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, name="conv2d"),
        ...      keras.layers.Flatten(name="flatten"), keras.layers.Dense(2, name="dense")],
        ...     l2_norm_clip=1.0, noise_multiplier=1.0, name="classifier")
        >>> model.compile(optimizer="sgd", loss="mse")
        >>> print(model.clipping_plan())
        engine: fast (not yet checked on a step)
          classifier/dense   Dense   DenseRule
          classifier/conv2d  Conv2D  ConvRule
    """

    engine: str
    layers: tuple[tuple[str, str, str], ...]
    reason: str | None = None
    checked: bool = False

    @property
    def slow_layers(self) -> tuple[str, ...]:
        """Paths of the layers not on a fast-clipping rule."""
        return tuple(path for path, _, how in self.layers if not how.endswith("Rule"))

    def __str__(self) -> str:
        state = "checked on a training step" if self.checked else "not yet checked on a step"
        lines = [f"engine: {self.engine} ({state})"]
        if self.reason:
            lines.append(f"  why: {self.reason}")
        if self.layers:
            width_path = max(len(path) for path, _, _ in self.layers)
            width_class = max(len(cls) for _, cls, _ in self.layers)
            for path, cls, how in self.layers:
                lines.append(f"  {path:<{width_path}}  {cls:<{width_class}}  {how}")
        return "\n".join(lines)
