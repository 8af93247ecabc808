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

import keras
import torch
from keras import ops

from torchdp_keras import _keras_compat as keras_compat
from torchdp_keras.per_example.rules.base import (
    Forward,
    LayerRule,
    fold_rows,
    handles,
    identity,
    option_reason,
    scratch,
    sq_norm_rows,
    weighted,
)
from torchdp_keras.per_example.rules.dense import (
    lora_factors,
    matmul_squared_norms,
    parts_reason,
    scaled_product_sum,
    trainable_parts,
)


def _ids_and_grads(args, grad):
    ids = torch.as_tensor(args[0]).reshape(grad.shape[0], -1).long()
    return ids, grad.reshape(grad.shape[0], ids.shape[1], grad.shape[-1])


def _sparse_squared_norms(ids, g, cache, prefix: str):
    """Per-example squared norms of `sum_{t: id_t = v} g_t` over the distinct ids v."""
    width = g.shape[-1]
    sorted_ids, order = torch.sort(ids, dim=1, stable=True)
    # Slot of each sorted position: the index of its id among the distinct
    # ids of the example (0, 0, 1, 2, 2, ...).
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    slots = torch.cumsum(starts, dim=1) - 1
    rows = scratch(cache, f"{prefix}rows", g.shape, g)
    torch.gather(g, 1, order.unsqueeze(-1).expand(-1, -1, width), out=rows)
    summed = scratch(cache, f"{prefix}summed", g.shape, g).zero_()
    summed.scatter_add_(1, slots.unsqueeze(-1).expand(-1, -1, width), rows)
    return sq_norm_rows(summed)


def _sparse_sum(ids, g, factors, shape):
    table = torch.zeros(tuple(shape), dtype=g.dtype, device=g.device)
    rows = weighted(g, factors).reshape(-1, g.shape[-1])
    return table.index_add_(0, ids.reshape(-1), rows)


@handles(keras.layers.Embedding)
class EmbeddingRule(LayerRule):
    """The embedding table of `Embedding`, and its LoRA factors.

    With `enable_lora(rank)` (table `W + s A B`, W frozen), example i's
    gradient of B is `s A[ids_i]^T g_i` (a Dense-like product of rank r) and
    that of A is sparse like the table's, with rows `s g_it B^T`.
    """

    def unsupported_reason(self, layer) -> str | None:
        return option_reason(layer) or parts_reason(layer, keras_compat.embeddings_variable(layer))

    def forward(self, layer, args, kwargs):
        ids = args[0]
        if ids.dtype not in (torch.int32, torch.int64):
            ids = ops.cast(ids, "int32")
        return Forward(
            ops.cast(ops.take(layer.embeddings, ids, axis=0), layer.compute_dtype), identity
        )

    def tap_output(self, layer, output):
        return output

    supports_shared_uses = True

    def fold_units(self, layer, args, kwargs, grad, units):
        ids = torch.as_tensor(args[0])
        return (fold_rows(ids, units, keep_last=0), *args[1:]), kwargs, fold_rows(grad, units)

    def merge_uses(self, layer, uses):
        parts = [_ids_and_grads(args, grad) for args, _, grad in uses]
        return (torch.cat([i for i, _ in parts], 1),), {}, torch.cat([g for _, g in parts], 1)

    @staticmethod
    def _lora(layer, ids, g, cache):
        """`(A[ids], s g B^T, s)`, computed once per step."""
        if "lora" not in cache:
            lora_a, lora_b, scale = lora_factors(layer, g.dtype)
            cache["lora"] = (lora_a[ids], torch.matmul(g, lora_b.t()).mul_(scale), scale)
        return cache["lora"]

    def squared_norms(self, layer, args, kwargs, grad, cache):
        ids, g = _ids_and_grads(args, grad)
        parts = trainable_parts(layer, keras_compat.embeddings_variable(layer), {})
        norms = torch.zeros(g.shape[0], dtype=torch.float64, device=g.device)
        if "kernel" in parts:
            norms = norms + _sparse_squared_norms(ids, g, cache, "")
        if "lora_kernel_a" in parts or "lora_kernel_b" in parts:
            looked_up, gb, scale = self._lora(layer, ids, g, cache)
            if "lora_kernel_a" in parts:
                norms = norms + _sparse_squared_norms(ids, gb, cache, "lora_")
            if "lora_kernel_b" in parts:
                norms = norms + scale**2 * matmul_squared_norms(looked_up, g)
        return norms

    def clipped_sums(self, layer, args, kwargs, grad, factors, cache):
        ids, g = _ids_and_grads(args, grad)
        out = []
        for name, weight in trainable_parts(
            layer, keras_compat.embeddings_variable(layer), {}
        ).items():
            if name == "kernel":
                out.append(_sparse_sum(ids, g, factors, weight.shape))
            elif name == "lora_kernel_a":
                out.append(
                    _sparse_sum(ids, self._lora(layer, ids, g, cache)[1], factors, weight.shape)
                )
            else:
                looked_up, _, scale = self._lora(layer, ids, g, cache)
                out.append(scaled_product_sum(looked_up, g, factors).mul_(scale))
        return out
