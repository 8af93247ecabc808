"""A layer that bounds the norm of each example: the usual first layer of a Lipschitz DP model."""

from __future__ import annotations

import keras
from keras import ops

from torchdp_keras._validation import check_positive
from torchdp_keras.lipschitz.layers.base import WeightlessDPLayer

__all__ = ["DP_BoundedInput"]


@keras.saving.register_keras_serializable(package="torchdp_keras")
class DP_BoundedInput(keras.layers.Layer, WeightlessDPLayer):
    """Projects each example onto the L2 ball of radius `max_norm`.

    `y = x * min(1, max_norm / ||x||)`, the norm taken over all axes but the
    batch axis. Examples already inside the ball pass unchanged.

    Bounds (for `||x|| <= X`, output gradient of norm `<= G`):

    - `propagate_inputs(X) = min(X, max_norm)`: the projection never increases
      the norm, and its output lies in the ball.
    - `backpropagate_inputs(X, G) = G`: the Euclidean projection onto a closed
      convex set is 1-Lipschitz. Concretely, outside the ball the Jacobian is
      `(max_norm / ||x||) (I - x x^T / ||x||^2)`, of norm `max_norm / ||x|| < 1`;
      inside it is the identity; on the sphere autograd returns a convex
      combination of the two, still of norm `<= 1`.
    - `backpropagate_params = 0`: no weights.

    Args:
        max_norm: Radius of the ball, a finite number `> 0`.
        **kwargs: Passed to `keras.layers.Layer`.

    Raises:
        DPConfigError: `max_norm` is not a finite number `> 0`.
    """

    def __init__(self, max_norm: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.max_norm = check_positive(max_norm, "max_norm")

    def call(self, inputs):
        axes = tuple(range(1, len(inputs.shape)))
        squared = ops.sum(ops.square(inputs), axis=axes, keepdims=True)
        # The tiny floor keeps sqrt differentiable at x = 0; it only makes the
        # denominator larger, so the output norm stays <= max_norm.
        norm = ops.sqrt(squared + 1e-30)
        scale = ops.minimum(ops.ones_like(norm), self.max_norm / norm)
        return inputs * scale

    def compute_output_shape(self, input_shape):
        return input_shape

    def propagate_inputs(self, input_bound: float) -> float:
        """Returns `min(input_bound, max_norm)`."""
        return min(float(input_bound), self.max_norm)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"max_norm": self.max_norm})
        return config
