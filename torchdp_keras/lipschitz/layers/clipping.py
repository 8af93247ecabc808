"""deel-lipdp's `DP_ClipGradient`: the identity forward, per-example gradient clipping backward."""

from __future__ import annotations

import keras
import torch

from torchdp_keras._validation import check_int, check_positive
from torchdp_keras.errors import DPConfigError
from torchdp_keras.lipschitz.layers.base import NormPreservingDPLayer

__all__ = ["DP_ClipGradient", "clip_gradient"]


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


def clip_gradient(x, clip_value: float):
    """deel-lipdp's `clip_gradient`: identity forward, each example's gradient clipped backward."""
    return _ClipRows.apply(x, check_positive(clip_value, "clip_value"))


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

    With `clip_value=None` (deel-lipdp's `mode="dynamic_svt"`), the value is
    chosen during training by `AdaptiveLossGradientClipping`: it starts at
    the loss's `L` and every `patience` epochs an `epsilon`-DP release of the
    sparse vector technique picks a new one; the model's accountant (RDP for
    such a model) composes each release.

    Args:
        clip_value: The per-example gradient norm bound, a finite number
            `> 0`, or None for the dynamic mode.
        epsilon: The pure-DP epsilon of each dynamic update (dynamic mode).
        patience: Epochs between dynamic updates, an integer `>= 1`.
        mode: deel-lipdp's "fixed", "dynamic" (a fixed start value with
            updates by a callback; none is needed here, it stays fixed) or
            "dynamic_svt" (requires `clip_value=None`).
        **kwargs: Passed to `keras.layers.Layer`.

    Raises:
        DPConfigError: an out-of-range argument, or a dynamic mode without
            `epsilon`.
    """

    def __init__(
        self, clip_value=None, epsilon=None, patience: int = 1, mode: str | None = None, **kwargs
    ) -> None:
        if mode not in (None, "fixed", "dynamic", "dynamic_svt"):
            raise DPConfigError(
                f"Expected mode None, 'fixed', 'dynamic' or 'dynamic_svt'. Received: mode={mode!r}"
            )
        if mode == "dynamic_svt" and clip_value is not None:
            raise DPConfigError(
                "Expected clip_value=None with mode='dynamic_svt' (the value is chosen "
                f"during training). Received: clip_value={clip_value!r}"
            )
        super().__init__(**kwargs)
        self.patience = check_int(patience, "patience")
        if clip_value is None:
            self.mode = "dynamic_svt"
            self.epsilon = check_positive(epsilon, "epsilon")
            self.clip_value = None  # set by AdaptiveLossGradientClipping.on_train_begin
        else:
            self.mode = mode or "fixed"
            self.epsilon = epsilon
            self.clip_value = check_positive(clip_value, "clip_value")

    @property
    def is_dynamic(self) -> bool:
        """Whether the value is chosen during training (pure-DP releases)."""
        return self.mode == "dynamic_svt"

    def call(self, inputs):
        if self.clip_value is None:
            # Dynamic mode before AdaptiveLossGradientClipping set a value: no
            # clipping, and the bounds below use the loss's own constant.
            return inputs
        return _ClipRows.apply(inputs, self.clip_value)

    def compute_output_shape(self, input_shape):
        return input_shape

    def backpropagate_inputs(self, input_bound: float, gradient_bound: float) -> float:
        """Returns `min(gradient_bound, clip_value)` (`gradient_bound` before it is set)."""
        if self.clip_value is None:
            return float(gradient_bound)
        return min(float(gradient_bound), self.clip_value)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "clip_value": None if self.is_dynamic else self.clip_value,
                "epsilon": self.epsilon,
                "patience": self.patience,
                "mode": self.mode,
            }
        )
        return config
