"""A layer that bounds the norm of each example: the usual first layer of a Lipschitz DP model."""

from __future__ import annotations

import keras
from keras import ops

from torchdp_keras._validation import check_positive
from torchdp_keras.errors import DPConfigError, DPError
from torchdp_keras.lipschitz.layers.base import WeightlessDPLayer

__all__ = ["DP_BoundedInput"]


@keras.saving.register_keras_serializable(package="torchdp_keras")
class DP_BoundedInput(keras.layers.Layer, WeightlessDPLayer):
    """Projects each example onto the L2 ball of radius `upper_bound` (deel-lipdp's layer).

    `y = x * min(1, upper_bound / ||x||)`, the norm taken over all axes but
    the batch axis. Examples already inside the ball pass unchanged.

    Bounds (for `||x|| <= X`, output gradient of norm `<= G`):

    - `propagate_inputs(X) = min(X, upper_bound)` (`upper_bound` when X is
      None, deel-lipdp's unknown start): the projection never increases the
      norm, and its output lies in the ball.
    - `backpropagate_inputs(X, G) = G`: the Euclidean projection onto a closed
      convex set is 1-Lipschitz. Concretely, outside the ball the Jacobian is
      `(upper_bound / ||x||) (I - x x^T / ||x||^2)`, of norm
      `upper_bound / ||x|| < 1`; inside it is the identity; on the sphere
      autograd returns a convex combination of the two, still of norm `<= 1`.
    - `backpropagate_params = 0`: no weights.

    With `enforce_clipping=False` (deel-lipdp: the pipeline is trusted to
    bound the inputs, e.g. `bound_normalize`) the layer passes inputs
    unchanged, but unlike deel-lipdp it checks them: an example above the
    bound would have a gradient above the bound the noise is calibrated to,
    so it raises `DPError` instead of training with weaker privacy than
    reported.

    Args:
        upper_bound: Radius of the ball, a finite number `> 0` (alias:
            `max_norm`, this package's earlier name).
        enforce_clipping: True (default): project; False: check only.
        **kwargs: Passed to `keras.layers.Layer` (deel-lipdp's `input_shape`
            included).

    Raises:
        DPConfigError: `upper_bound` is not a finite number `> 0`, or both
            `upper_bound` and `max_norm` are given.
    """

    def __init__(
        self,
        *args,
        upper_bound: float | None = None,
        enforce_clipping: bool = True,
        max_norm: float | None = None,
        **kwargs,
    ) -> None:
        if args:  # this package's earlier positional max_norm
            if len(args) > 1 or max_norm is not None or upper_bound is not None:
                raise DPConfigError(
                    "Expected DP_BoundedInput(upper_bound=...). Received: positional "
                    f"arguments {args!r} with upper_bound={upper_bound!r}, max_norm={max_norm!r}"
                )
            max_norm = args[0]
        if upper_bound is not None and max_norm is not None:
            raise DPConfigError(
                "Expected one of upper_bound (deel-lipdp's name) and max_norm, not both. "
                f"Received: upper_bound={upper_bound!r}, max_norm={max_norm!r}"
            )
        super().__init__(**kwargs)
        if upper_bound is None and max_norm is not None:
            self.upper_bound = check_positive(max_norm, "max_norm")
        else:
            self.upper_bound = check_positive(upper_bound, "upper_bound")
        self.enforce_clipping = bool(enforce_clipping)

    @property
    def max_norm(self) -> float:
        """`upper_bound` (this package's earlier name)."""
        return self.upper_bound

    def call(self, inputs):
        axes = tuple(range(1, len(inputs.shape)))
        squared = ops.sum(ops.square(inputs), axis=axes, keepdims=True)
        # The tiny floor keeps sqrt differentiable at x = 0; it only makes the
        # denominator larger, so the output norm stays <= upper_bound.
        norm = ops.sqrt(squared + 1e-30)
        if not self.enforce_clipping:
            largest = float(ops.max(norm))
            if largest > self.upper_bound * (1 + 1e-6):
                raise DPError(
                    f"DP_BoundedInput '{self.name}' (enforce_clipping=False) received an "
                    f"example of norm {largest:.6g} > upper_bound={self.upper_bound}: its "
                    "gradient could exceed the bound the noise is calibrated to. Bound the "
                    "inputs in the pipeline, or use enforce_clipping=True."
                )
            return inputs
        scale = ops.minimum(ops.ones_like(norm), self.upper_bound / norm)
        return inputs * scale

    def compute_output_shape(self, input_shape):
        return input_shape

    def propagate_inputs(self, input_bound) -> float:
        """Returns `min(input_bound, upper_bound)` (`upper_bound` for None)."""
        if input_bound is None:
            return self.upper_bound
        return min(float(input_bound), self.upper_bound)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"upper_bound": self.upper_bound, "enforce_clipping": self.enforce_clipping})
        return config
