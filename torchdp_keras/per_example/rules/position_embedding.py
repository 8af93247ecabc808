"""Fast clipping rule for keras_hub's `PositionEmbedding` (learned positions).

The layer's output is its table's first T rows (from `start_index`),
broadcast over the batch: example i's gradient of the table is its output
gradient `g_i` (T, d) in those rows, so its squared norm is `||g_i||^2` and
the clipped sum is `sum_i c_i g_i` written into those rows. Calls with
explicit `positions` leave the layer to the per-layer fallback.
"""

from __future__ import annotations

import torch
from keras import ops

from torchdp_keras.per_example.rules.base import (
    Forward,
    LayerRule,
    handles,
    identity,
    sq_norm_rows,
    weights_reason,
)


@handles("keras_hub.src.layers.modeling.position_embedding.PositionEmbedding")
class PositionEmbeddingRule(LayerRule):
    """The `position_embeddings` table of keras_hub's `PositionEmbedding`."""

    def unsupported_reason(self, layer) -> str | None:
        table = getattr(layer, "position_embeddings", None)
        if table is None:
            return "no position_embeddings table"
        return weights_reason(layer, {"position_embeddings": table})

    def forward(self, layer, args, kwargs):
        start = kwargs.get("start_index", args[1] if len(args) > 1 else 0)
        if kwargs.get("positions") is not None or not isinstance(start, int):
            raise TypeError("PositionEmbeddingRule: explicit positions are not supported")
        inputs = args[0]
        steps, width = inputs.shape[-2], inputs.shape[-1]
        rows = ops.slice(
            ops.convert_to_tensor(layer.position_embeddings), (start, 0), (steps, width)
        )
        return Forward(ops.broadcast_to(rows, ops.shape(inputs)), identity)

    def tap_output(self, layer, output):
        return output

    def fold_units(self, layer, args, kwargs, grad, units):
        # Every example writes the same rows: a group's gradient is their sum.
        return args, kwargs, grad.reshape(units, -1, *grad.shape[1:]).sum(dim=1)

    def squared_norms(self, layer, args, kwargs, grad, cache):
        return sq_norm_rows(grad)

    def clipped_sums(self, layer, args, kwargs, grad, factors, cache):
        start = kwargs.get("start_index", args[1] if len(args) > 1 else 0)
        table = torch.zeros(
            tuple(layer.position_embeddings.shape), dtype=grad.dtype, device=grad.device
        )
        rows = grad.shape[-2] if grad.ndim >= 3 else table.shape[0]
        summed = torch.tensordot(factors.to(grad.dtype), grad, dims=1)
        table[start : start + rows] = summed.reshape(rows, -1)
        return [table]
