"""TF Privacy's `privacy.optimizers.dp_optimizer_keras_vectorized`.

Every engine here computes the per-example terms vectorised, so these are the
same algorithm as `dp_optimizer_keras`'s classes under TF Privacy's names.
"""

from torchdp_keras.optimizers import (
    VectorizedDPKerasAdagradOptimizer,
    VectorizedDPKerasAdamOptimizer,
    VectorizedDPKerasSGDOptimizer,
    make_keras_optimizer_class,
)

make_vectorized_keras_optimizer_class = make_keras_optimizer_class

__all__ = [
    "VectorizedDPKerasAdagradOptimizer",
    "VectorizedDPKerasAdamOptimizer",
    "VectorizedDPKerasSGDOptimizer",
    "make_vectorized_keras_optimizer_class",
]
