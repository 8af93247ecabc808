"""Fast clipping rule for `keras.layers.Embedding` (sparse-aware).

Example i's gradient touches only the rows it looks up: row v receives
`sum_{t: id_it = v} g_it`. Its squared norm is the sum over the distinct ids
of the example of those row sums' squared norms: the ids of each example are
sorted, the gradients of equal ids are summed into one slot per distinct id
(a scatter-add), and the slots' norms are taken. That is O(T log T + T d)
per example, never O(vocabulary) nor O(T^2). The clipped sum is one
`index_add` of the scaled `g` rows into the table.
"""

from __future__ import annotations

import torch
from keras import ops

from torchdp_keras.per_example.rules.base import (
    LayerRule,
    identity,
    scratch,
    sq_norm_rows,
    weighted,
)


def _ids_and_grads(args, grad):
    ids = torch.as_tensor(args[0]).reshape(grad.shape[0], -1).long()
    return ids, grad.reshape(grad.shape[0], ids.shape[1], grad.shape[-1])


class EmbeddingRule(LayerRule):
    """The embedding table of `Embedding`."""

    def supports(self, layer) -> bool:
        return (
            not getattr(layer, "lora_enabled", False)
            and getattr(layer, "quantization_mode", None) is None
            and [id(w) for w in layer.trainable_weights] == [id(layer.embeddings)]
        )

    def forward(self, layer, args, kwargs):
        ids = args[0]
        if ids.dtype not in (torch.int32, torch.int64):
            ids = ops.cast(ids, "int32")
        return ops.cast(ops.take(layer.embeddings, ids, axis=0), layer.compute_dtype), identity

    def tap_output(self, layer, output):
        return output

    def squared_norms(self, layer, args, kwargs, grad, cache):
        ids, g = _ids_and_grads(args, grad)
        batch, steps, width = g.shape
        sorted_ids, order = torch.sort(ids, dim=1, stable=True)
        # Slot of each sorted position: the index of its id among the distinct
        # ids of the example (0, 0, 1, 2, 2, ...).
        starts = torch.ones_like(sorted_ids, dtype=torch.bool)
        starts[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
        slots = torch.cumsum(starts, dim=1) - 1
        rows = scratch(cache, "rows", g.shape, g)
        torch.gather(g, 1, order.unsqueeze(-1).expand(-1, -1, width), out=rows)
        summed = scratch(cache, "summed", g.shape, g).zero_()
        summed.scatter_add_(1, slots.unsqueeze(-1).expand(-1, -1, width), rows)
        return sq_norm_rows(summed)

    def clipped_sums(self, layer, args, kwargs, grad, factors, cache):
        ids, g = _ids_and_grads(args, grad)
        table = torch.zeros(tuple(layer.embeddings.shape), dtype=g.dtype, device=g.device)
        rows = weighted(g, factors).reshape(-1, g.shape[-1])
        return [table.index_add_(0, ids.reshape(-1), rows)]
