"""Fast clipping rule for `keras.layers.Embedding` (sparse-aware).

Example i's gradient touches only the rows it looks up: row v receives
`sum_{t: id_it = v} g_it`. Its squared norm is the ghost form
`sum_{t,s} [id_it == id_is] (g_it . g_is)`, O(T^2 d) per example and never
O(vocabulary); the clipped sum is one `index_add` of the scaled `g` rows.
"""

from __future__ import annotations

import torch
from keras import ops

from torchdp_keras.per_example.rules.base import LayerRule, identity, weighted


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
        same = (ids[:, :, None] == ids[:, None, :]).double()
        gg = torch.bmm(g, g.transpose(1, 2)).double()
        return (same * gg).sum(dim=(1, 2))

    def clipped_sums(self, layer, args, kwargs, grad, factors, cache):
        ids, g = _ids_and_grads(args, grad)
        table = torch.zeros(tuple(layer.embeddings.shape), dtype=g.dtype, device=g.device)
        rows = weighted(g, factors).reshape(-1, g.shape[-1])
        return [table.index_add_(0, ids.reshape(-1), rows)]
