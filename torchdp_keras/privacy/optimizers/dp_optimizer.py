"""TF Privacy's `privacy.optimizers.dp_optimizer` (its TF1 optimizers; the MNIST tutorial's).

`DPGradientDescentGaussianOptimizer(l2_norm_clip, noise_multiplier,
num_microbatches=None, learning_rate=...)` is DP SGD, compiled into a
`torchdp_keras.Model`. `make_gaussian_optimizer_class(cls)` takes a Keras
optimizer class (there are no TF1 optimizers on Keras 3).
"""

from torchdp_keras.optimizers import (
    DPAdagradGaussianOptimizer,
    DPAdamGaussianOptimizer,
    DPGradientDescentGaussianOptimizer,
    make_keras_optimizer_class,
)

make_gaussian_optimizer_class = make_keras_optimizer_class

__all__ = [
    "DPAdagradGaussianOptimizer",
    "DPAdamGaussianOptimizer",
    "DPGradientDescentGaussianOptimizer",
    "make_gaussian_optimizer_class",
]
