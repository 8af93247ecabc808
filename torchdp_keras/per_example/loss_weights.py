"""Per-example sample weights shaped for a model's per-position losses."""

from __future__ import annotations

import keras
import torch
from keras import tree


def masked_example_weights(sample_weight, keep: torch.Tensor) -> torch.Tensor:
    """The sample weights with the rows where `keep` is False at weight 0.

    Args:
        sample_weight: The batch's sample weights (any shape with the batch
            axis first), or None (every row weight 1).
        keep: A `(B,)` boolean mask of the rows that count.
    """
    weights = keep.to(torch.float32)
    if sample_weight is None:
        return weights
    sample_weight = keras.ops.convert_to_tensor(sample_weight)
    return sample_weight * weights.view(-1, *[1] * (sample_weight.ndim - 1))


def broadcast_example_weights(sample_weight, y_pred):
    """A (B,) sample weight reshaped to (B, 1, ...) so it weights every position.

    A language model's loss has one value per example and position (B, T);
    Keras does not broadcast a (B,) weight against it. The DP engines weight
    examples (a `PrivateDataLoader`'s padding rows get weight 0, a non-finite
    example is left out the same way), so a one-axis weight is expanded to
    the rank of the per-position losses, `y_pred`'s rank minus its last axis.
    Other weights are returned as they are.
    """
    if not isinstance(sample_weight, torch.Tensor) or sample_weight.ndim != 1:
        return sample_weight
    outputs = [t for t in tree.flatten(y_pred) if isinstance(t, torch.Tensor)]
    if len(outputs) != 1 or outputs[0].ndim <= 2:
        return sample_weight
    return sample_weight.reshape(-1, *[1] * (outputs[0].ndim - 2))
