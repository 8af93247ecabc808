"""deel-lipdp's residual connections: split, wrapped branch, merge (`make_residuals`).

A residual block is a `DP_SplitResidual` (`x -> (x, x)`), one
`DP_WrappedResidual(layer)` per layer of the branch (`(a, b) -> (a, layer(b))`)
and a `DP_MergeResidual` (`(a, b) -> a + b`, or `(a + b) / 2` for
"1-lip-add"). Between the split and the merge the bounds are pairs, one per
path; used in a `DP_Model`, whose layers are called one after the other.

Bounds (pairs written `(., .)`):

- split: `propagate(X) = (X, X)`; its input gradient is the sum of the two
  paths' gradients, `backpropagate_inputs(X, (G1, G2)) = G1 + G2`.
- wrapped: the second component through the layer's own bounds.
- merge "add": `propagate((X1, X2)) = X1 + X2`, input gradients
  `(G, G)`; "1-lip-add": halves of both (the map is 1-Lipschitz).
"""

from __future__ import annotations

import keras

from torchdp_keras.errors import DPConfigError
from torchdp_keras.lipschitz.layers.base import DPLayer, WeightlessDPLayer

__all__ = ["DP_MergeResidual", "DP_SplitResidual", "DP_WrappedResidual", "make_residuals"]

MERGE_POLICIES = ("add", "1-lip-add")


def _pair(value, what: str) -> tuple:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise DPConfigError(f"Expected a pair of {what}. Received: {value!r}")
    return tuple(value)


@keras.saving.register_keras_serializable(package="torchdp_keras")
class DP_SplitResidual(keras.layers.Layer, WeightlessDPLayer):
    """`x -> (x, x)`: the start of a residual block."""

    def call(self, inputs):
        return (inputs, inputs)

    def compute_output_shape(self, input_shape):
        return (input_shape, input_shape)

    def propagate_inputs(self, input_bound):
        """Returns `(input_bound, input_bound)`."""
        return (input_bound, input_bound)

    def backpropagate_inputs(self, input_bound, gradient_bound) -> float:
        """Returns `G1 + G2`: both paths' gradients reach the input."""
        first, second = _pair(gradient_bound, "gradient bounds")
        return float(first) + float(second)


@keras.saving.register_keras_serializable(package="torchdp_keras")
class DP_MergeResidual(keras.layers.Layer, WeightlessDPLayer):
    """`(a, b) -> a + b` ("add") or `(a + b) / 2` ("1-lip-add"): the end of a block.

    Args:
        merge_policy: "add" or "1-lip-add".

    Raises:
        DPConfigError: another `merge_policy`.
    """

    def __init__(self, merge_policy: str, **kwargs) -> None:
        if merge_policy not in MERGE_POLICIES:
            raise DPConfigError(
                f"Expected merge_policy in {MERGE_POLICIES}. Received: "
                f"merge_policy={merge_policy!r}"
            )
        super().__init__(**kwargs)
        self.merge_policy = merge_policy
        self._weight = 1.0 if merge_policy == "add" else 0.5

    def call(self, inputs):
        first, second = _pair(inputs, "inputs")
        merged = first + second
        return merged if self._weight == 1.0 else merged * self._weight

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def propagate_inputs(self, input_bound) -> float:
        """Returns `X1 + X2` ("add") or `(X1 + X2) / 2`."""
        first, second = _pair(input_bound, "input bounds")
        return self._weight * (float(first) + float(second))

    def backpropagate_inputs(self, input_bound, gradient_bound):
        """Returns `(G, G)` ("add") or `(G / 2, G / 2)`."""
        share = self._weight * float(gradient_bound)
        return (share, share)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"merge_policy": self.merge_policy})
        return config


@keras.saving.register_keras_serializable(package="torchdp_keras")
class DP_WrappedResidual(keras.layers.Layer, DPLayer):
    """`(a, b) -> (a, block(b))`: one layer of a residual branch, with its bounds.

    Args:
        block: A DP layer (of `torchdp_keras.lipschitz.layers`).

    Raises:
        DPConfigError: `block` is not a DP layer.
    """

    def __init__(self, block, **kwargs) -> None:
        if not isinstance(block, DPLayer):
            raise DPConfigError(
                "Expected block to be a layer of torchdp_keras.lipschitz.layers (its bounds "
                f"are needed). Received: block={type(block).__name__}"
            )
        super().__init__(**kwargs)
        self.block = block

    @property
    def nm_coef(self) -> float:
        """The block's noise multiplier coefficient."""
        return self.block.nm_coef

    @nm_coef.setter
    def nm_coef(self, value: float) -> None:
        raise AttributeError(
            "DP_WrappedResidual.nm_coef is its block's; set it on the block instead."
        )

    def build(self, input_shape) -> None:
        if not self.block.built:
            self.block.build(tuple(input_shape[1]))

    def call(self, inputs):
        first, second = _pair(inputs, "inputs")
        return (first, self.block(second))

    def compute_output_shape(self, input_shape):
        first, second = input_shape
        return (first, self.block.compute_output_shape(second))

    def propagate_inputs(self, input_bound):
        first, second = _pair(input_bound, "input bounds")
        return (first, self.block.propagate_inputs(second))

    def backpropagate_inputs(self, input_bound, gradient_bound):
        _, second_input = _pair(input_bound, "input bounds")
        first, second = _pair(gradient_bound, "gradient bounds")
        return (first, self.block.backpropagate_inputs(second_input, second))

    def backpropagate_params(self, input_bound, gradient_bound) -> float:
        _, second_input = _pair(input_bound, "input bounds")
        _, second = _pair(gradient_bound, "gradient bounds")
        return self.block.backpropagate_params(second_input, second)

    def has_parameters(self) -> bool:
        return self.block.has_parameters()

    def project(self) -> None:
        self.block.project()

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"block": keras.saving.serialize_keras_object(self.block)})
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["block"] = keras.saving.deserialize_keras_object(config["block"])
        return cls(**config)


def make_residuals(merge_policy: str, wrapped_layers) -> list:
    """deel-lipdp's residual block: `[split, wrapped(layer) for each layer, merge]`.

    Args:
        merge_policy: "add" or "1-lip-add".
        wrapped_layers: The DP layers of the residual branch, in order.

    Returns:
        The layers to splice into a `DP_Model`'s list of layers.
    """
    return [
        DP_SplitResidual(),
        *[DP_WrappedResidual(layer) for layer in wrapped_layers],
        DP_MergeResidual(merge_policy),
    ]
