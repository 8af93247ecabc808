"""Per-example gradient engines: what DP-SGD clips, computed per unit."""

from torchdp_keras.per_example.vmap_engine import ClippedBatch, VmapEngine

__all__ = ["ClippedBatch", "VmapEngine"]
