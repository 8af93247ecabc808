"""TF Privacy's module layout, so that a TF Privacy script moves by its package prefix.

`from tensorflow_privacy.privacy.X import Y` becomes
`from torchdp_keras.privacy.X import Y`:

* `privacy.analysis.compute_dp_sgd_privacy` (the MNIST tutorial's module),
  `privacy.analysis.compute_dp_sgd_privacy_lib`, `privacy.analysis.rdp_accountant`;
* `privacy.optimizers.dp_optimizer` (the tutorial's
  `DPGradientDescentGaussianOptimizer`), `privacy.optimizers.dp_optimizer_keras`,
  `privacy.optimizers.dp_optimizer_keras_vectorized`,
  `privacy.optimizers.dp_optimizer_vectorized`;
* `privacy.keras_models.dp_keras_model` (`DPModel`, `DPSequential`,
  `make_dp_model_class`);
* `privacy.fast_gradient_clipping.layer_registry`.

Each module holds torchdp_keras's own objects under TF Privacy's names; the
analysis modules need neither torch nor keras. The package is also the
command line `python -m torchdp_keras.privacy` (see `cli`).
"""

from torchdp_keras.privacy.cli import build_parser, main

__all__ = ["build_parser", "main"]
