"""TF Privacy's `privacy.optimizers.dp_optimizer_keras`."""

from torchdp_keras.optimizers import (
    DPKerasAdagradOptimizer,
    DPKerasAdamOptimizer,
    DPKerasSGDOptimizer,
    make_keras_optimizer_class,
)

__all__ = [
    "DPKerasAdagradOptimizer",
    "DPKerasAdamOptimizer",
    "DPKerasSGDOptimizer",
    "make_keras_optimizer_class",
]
