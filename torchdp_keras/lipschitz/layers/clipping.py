"""deel-lipdp's `DP_ClipGradient`: the identity forward, per-example gradient clipping backward."""

from __future__ import annotations

import keras
import torch

from torchdp_keras._validation import check_positive
from torchdp_keras.errors import DPConfigError
from torchdp_keras.lipschitz.layers.base import NormPreservingDPLayer

__all__ = ["DP_ClipGradient"]


class _ClipRows(torch.autograd.Function):
    """Identity; the gradient of each example (row) is clipped to norm `<= clip`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(inputs, clip):
        return inputs.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.clip = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        rows = grad.reshape(grad.shape[0], -1)
        norms = torch.linalg.vector_norm(rows, dim=1).clamp_min(1e-30)
        factors = (ctx.clip / norms).clamp(max=1.0).to(grad.dtype)
        return grad * factors.view(-1, *[1] * (grad.ndim - 1)), None


@keras.saving.register_keras_serializable(package="torchdp_keras")
class DP_ClipGradient(keras.layers.Layer, NormPreservingDPLayer):
    """Clips each example's gradient at this point of the backward pass (deel-lipdp's layer).

    Forward: the identity. Backward: the gradient of each example's loss
    with respect to this layer's output is rescaled to norm `<= clip_value`.
    Placed last (after the logits), it replaces the loss's Lipschitz constant
    `L` by `min(L, clip_value)` in every bound below it, which lowers the
    noise when the loss gradients are mostly small.

    Bounds: `propagate_inputs(X) = X`, `backpropagate_inputs(X, G) =
    min(G, clip_value)`, no weights. The model clips per example, in the
    units of the per-example bounds. deel-lipdp clips the gradient of the
    *batch-mean* loss at `clip_value / batch_size` (the same thing) but
    compares `clip_value` with the batch-mean bound `L / batch_size`, so its
    reported bounds ignore the clipping; here they use it.

    Args:
        clip_value: The per-example gradient norm bound, a finite number
            `> 0`. deel-lipdp's `None` (the clipping value chosen during
            training by its sparse-vector-technique callback) is refused:
            each such update is an extra pure-DP mechanism that the
            accountants of this package do not compose yet, so the epsilon
            reported would be too small.
        epsilon: deel-lipdp's SVT epsilon (kept; no update uses it).
        patience: deel-lipdp's epochs between updates (kept; no update uses it).
        mode: deel-lipdp's "fixed", "dynamic" or "dynamic_svt". A dynamic mode
            with a `clip_value` starts there and stays there: the callbacks
            that would update it are not available.
        **kwargs: Passed to `keras.layers.Layer`.

    Raises:
        DPConfigError: `clip_value` is None or not a finite number `> 0`.
    """

    def __init__(
        self, clip_value=None, epsilon=None, patience: int = 1, mode: str | None = None, **kwargs
    ) -> None:
        if mode not in (None, "fixed", "dynamic", "dynamic_svt"):
            raise DPConfigError(
                "Expected mode None, 'fixed', 'dynamic' or 'dynamic_svt'. Received: "
                f"mode={mode!r}"
            )
        if clip_value is None:
            raise DPConfigError(
                "Expected a number for clip_value. Received: clip_value=None (deel-lipdp's "
                "dynamic clipping by the sparse vector technique): its updates are extra "
                "pure-DP mechanisms that this package's accountants do not compose, so "
                "training with it would report too small an epsilon. Give a fixed clip_value."
            )
        super().__init__(**kwargs)
        self.clip_value = check_positive(clip_value, "clip_value")
        self.epsilon = epsilon
        self.patience = patience
        # deel-lipdp's "dynamic" modes name callbacks that update the value
        # during training; none is available here, so the value stays fixed.
        self.mode = mode or "fixed"

    def call(self, inputs):
        return _ClipRows.apply(inputs, self.clip_value)

    def compute_output_shape(self, input_shape):
        return input_shape

    def backpropagate_inputs(self, input_bound: float, gradient_bound: float) -> float:
        """Returns `min(gradient_bound, clip_value)`."""
        return min(float(gradient_bound), self.clip_value)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"clip_value": self.clip_value})
        return config
