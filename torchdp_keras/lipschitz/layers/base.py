"""The contract every layer of a Lipschitz DP model fulfils.

Clipless DP training (deel-lipdp) needs, for every layer, three bounds that
hold for *every* example and every value of the weights the training can
reach:

- `propagate_inputs(input_bound)`: if `||x|| <= input_bound` (L2 norm of one
  example's input, all axes but the batch), then `||layer(x)|| <= result`;
- `backpropagate_inputs(input_bound, gradient_bound)`: if moreover the
  gradient of the example's loss with respect to the output has norm at most
  `gradient_bound`, the gradient with respect to the input has norm at most
  the result (the layer's Lipschitz constant times `gradient_bound`);
- `backpropagate_params(input_bound, gradient_bound)`: under the same
  conditions, the gradient with respect to the layer's trainable weights
  (all of them together) has L2 norm at most the result; 0 without weights.

Layers whose weights must stay in a set for the bounds to hold (spectral
layers: operator norm <= 1; bias: norm <= its bound) restore it in
`project()`, which the DP model calls after every optimizer step. Projection
is post-processing of the noisy update, so it costs no privacy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torchdp_keras._validation import check_positive


def check_nm_coef(value) -> float:
    """`nm_coef` as a float; it must be a finite number > 0."""
    return check_positive(value, "nm_coef")


def check_no_bias(use_bias, layer: str) -> None:
    """deel-lipdp's spectral layers take `use_bias` and refuse True."""
    if use_bias:
        from torchdp_keras.errors import DPConfigError

        raise DPConfigError(
            f"Expected use_bias=False for {layer}: its bounds are those of a linear map "
            f"(add a bias with DP_AddBias, whose norm is bounded). Received: use_bias={use_bias!r}"
        )


class DPLayer:
    """Mixin for Keras layers allowed in a Lipschitz DP model (see the module docstring)."""

    nm_coef: float = 1.0
    """deel-lipdp's noise multiplier coefficient of a layer with weights.

    Under the "per-layer" strategy this layer's gradient gets noise of std
    `noise_multiplier * nm_coef * bound`, and the accountant composes one
    Gaussian mechanism of noise multiplier `noise_multiplier * nm_coef` per
    layer.
    """

    if TYPE_CHECKING:
        # Provided by the keras.layers.Layer every DP layer also derives from.
        name: str
        trainable_weights: list[Any]
        built: bool

        def build(self, input_shape: Any) -> None: ...

    def propagate_inputs(self, input_bound: float) -> float:
        """Bound on the L2 norm of one example's output, given one on its input."""
        raise NotImplementedError

    def backpropagate_inputs(self, input_bound: float, gradient_bound: float) -> float:
        """Bound on the norm of the gradient w.r.t. the input, given one w.r.t. the output."""
        raise NotImplementedError

    def backpropagate_params(self, input_bound: float, gradient_bound: float) -> float:
        """Bound on the norm of one example's gradient w.r.t. this layer's weights."""
        raise NotImplementedError

    def has_parameters(self) -> bool:
        """Whether the layer has trainable weights (and so receives noise)."""
        return bool(self.trainable_weights)

    def project(self) -> None:
        """Restores the weight constraints the bounds rely on (after each step)."""


class WeightlessDPLayer(DPLayer):
    """A 1-Lipschitz layer without weights: input gradient `<= G`, weight gradient 0.

    Subclasses state why they are 1-Lipschitz and give `propagate_inputs`.
    """

    def backpropagate_inputs(self, input_bound: float, gradient_bound: float) -> float:
        """Returns `gradient_bound`: the layer is 1-Lipschitz."""
        return float(gradient_bound)

    def backpropagate_params(self, input_bound: float, gradient_bound: float) -> float:
        """Returns 0: the layer has no weights."""
        return 0.0

    def has_parameters(self) -> bool:
        """Returns False: the layer has no weights."""
        return False


class NormPreservingDPLayer(WeightlessDPLayer):
    """A weightless 1-Lipschitz layer whose output norm is at most its input norm."""

    def propagate_inputs(self, input_bound: float) -> float:
        """Returns `input_bound`."""
        return float(input_bound)
