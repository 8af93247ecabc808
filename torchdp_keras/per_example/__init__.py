"""Per-example gradient engines: what DP-SGD clips, computed per unit."""

from torchdp_keras._backend import check_torch_backend

check_torch_backend()

from torchdp_keras.per_example.vmap_engine import ClippedBatch, VmapEngine  # noqa: E402

__all__ = ["ClippedBatch", "VmapEngine"]
