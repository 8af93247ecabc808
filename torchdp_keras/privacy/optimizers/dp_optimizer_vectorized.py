"""TF Privacy's `privacy.optimizers.dp_optimizer_vectorized` (its vectorized TF1 optimizers).

`VectorizedDPSGD`, `VectorizedDPAdam`, `VectorizedDPAdagrad`: the same
algorithm as every DP optimizer here, under TF Privacy's names.
"""

from torchdp_keras.optimizers import VectorizedDPAdagrad, VectorizedDPAdam, VectorizedDPSGD

__all__ = ["VectorizedDPAdagrad", "VectorizedDPAdam", "VectorizedDPSGD"]
