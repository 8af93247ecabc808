"""Fast clipping rule for `keras.layers.ReversibleEmbedding` (tied input/output embeddings).

The layer is called twice in a language model: as the input embedding
(`reverse=False`: rows of the table `E` (V, d) looked up by token ids) and as
the output projection (`reverse=True`: logits `h E^T`). Example i's gradient
of a tied table is the sum of both uses, `S1 + S2`:

* `S1`: the looked-up rows' gradients (sparse, as `EmbeddingRule`);
* `S2 = g2^T h`: a Dense-like product of the projection's input `h` (T2, d)
  and its logits gradient `g2` (T2, V) (ghost or explicit);
* the cross term `<S1, S2> = sum_t sum_s g2[s, id_t] (h_s . g1_t)`, from the
  logits gradients gathered at the looked-up ids, O(T1 T2 d).

So `||S1 + S2||^2 = ||S1||^2 + ||S2||^2 + 2 <S1, S2>`: exact, never undercounted.
An untied layer (`tie_weights=False`) has a separate `reverse_embeddings`
(d, V), clipped as the Dense-like `h^T g2`. Logit soft-capping, a reverse
dtype, LoRA or quantization leave the layer to the per-layer fallback.
"""

from __future__ import annotations

import keras
import torch
from keras import ops

from torchdp_keras import _keras_compat as keras_compat
from torchdp_keras.per_example.rules.base import (
    Forward,
    fold_rows,
    handles,
    identity,
    option_reason,
)
from torchdp_keras.per_example.rules.dense import clipped_product_sum, matmul_squared_norms
from torchdp_keras.per_example.rules.embedding import (
    EmbeddingRule,
    _ids_and_grads,
    _sparse_squared_norms,
    _sparse_sum,
)


def _is_reverse(args, kwargs) -> bool:
    return bool(kwargs.get("reverse", args[1] if len(args) > 1 else False))


@handles(getattr(keras.layers, "ReversibleEmbedding", None))  # Keras >= 3.12
class ReversibleEmbeddingRule(EmbeddingRule):
    """The table (and untied reverse table) of `ReversibleEmbedding`, over both of its uses."""

    supports_shared_uses = True

    def unsupported_reason(self, layer) -> str | None:
        expected = {id(keras_compat.embeddings_variable(layer))}
        if not layer.tie_weights:
            expected.add(id(getattr(layer, "reverse_embeddings", None)))
        for option in ("lora_enabled", "logit_soft_cap", "reverse_dtype"):
            value = getattr(layer, option, None)
            if value not in (None, False):
                return f"{option}={value!r}"
        if not {id(w) for w in layer.trainable_weights} <= expected:
            return "trainable weights other than the embeddings and reverse_embeddings"
        return option_reason(layer)

    def forward(self, layer, args, kwargs):
        if not _is_reverse(args, kwargs):
            return super().forward(layer, args[:1], {})
        kernel = ops.transpose(layer.embeddings) if layer.tie_weights else layer.reverse_embeddings
        return Forward(ops.matmul(args[0], kernel), identity)

    def tap_output(self, layer, output):
        return output

    def fold_units(self, layer, args, kwargs, grad, units):
        if not _is_reverse(args, kwargs):
            return super().fold_units(layer, args[:1], {}, grad, units)
        h = torch.as_tensor(args[0])
        return (fold_rows(h, units),), {"reverse": True}, fold_rows(grad, units)

    @classmethod
    def _split(cls, uses, cache):
        """`(ids, g1)` of the lookups and `(h, g2)` of the projections, each concatenated
        (once per step: the norms and the clipped sums share them)."""
        if "split" not in cache:
            cache["split"] = cls._concatenated(uses)
        return cache["split"]

    @staticmethod
    def _concatenated(uses):
        lookups = [_ids_and_grads(a[:1], g) for a, k, g in uses if not _is_reverse(a, k)]
        projections = [
            (
                torch.as_tensor(a[0]).reshape(g.shape[0], -1, a[0].shape[-1]).to(g.dtype),
                g.reshape(g.shape[0], -1, g.shape[-1]),
            )
            for a, k, g in uses
            if _is_reverse(a, k)
        ]

        def cat(pairs):
            if not pairs:
                return None
            return torch.cat([p for p, _ in pairs], 1), torch.cat([q for _, q in pairs], 1)

        return cat(lookups), cat(projections)

    def _trainable(self, layer) -> list[str]:
        names = {id(keras_compat.embeddings_variable(layer)): "table"}
        if not layer.tie_weights:
            names[id(layer.reverse_embeddings)] = "reverse"
        return [names[id(w)] for w in layer.trainable_weights]

    def use_squared_norms(self, layer, uses, cache):
        lookup, projection = self._split(uses, cache)
        batch = uses[0][2].shape[0]
        norms = torch.zeros(batch, dtype=torch.float64, device=uses[0][2].device)
        trained = self._trainable(layer)
        if lookup is not None and "table" in trained:
            norms = norms + _sparse_squared_norms(*lookup, cache, "")
        if projection is not None and (
            layer.tie_weights and "table" in trained or "reverse" in trained
        ):
            h, g2 = projection
            norms = norms + matmul_squared_norms(h, g2, cache)  # may keep h_i^T g2_i
            if layer.tie_weights and lookup is not None:
                ids, g1 = lookup
                dtype = torch.promote_types(g1.dtype, g2.dtype)
                h, g1, g2 = h.to(dtype), g1.to(dtype), g2.to(dtype)
                index = ids.unsqueeze(1).expand(-1, g2.shape[1], -1)  # (B, T2, T1)
                gathered = torch.gather(g2, 2, index)  # g2[s, id_t]
                products = torch.bmm(h, g1.transpose(1, 2))  # h_s . g1_t
                norms = norms + 2 * (gathered * products).sum(dim=(1, 2)).double()
        return norms

    def use_clipped_sums(self, layer, uses, factors, cache):
        lookup, projection = self._split(uses, cache)
        out = []
        for name in self._trainable(layer):
            if name == "table":
                shape = tuple(keras_compat.embeddings_variable(layer).shape)
                g_dtype = uses[0][2].dtype
                total = torch.zeros(shape, dtype=g_dtype, device=uses[0][2].device)
                if lookup is not None:
                    total = total + _sparse_sum(*lookup, factors, shape).to(g_dtype)
                if projection is not None and layer.tie_weights:
                    h, g2 = projection
                    total = total + clipped_product_sum(h, g2, factors, cache).t().to(g_dtype)
                out.append(total)
            else:
                h, g2 = projection
                out.append(clipped_product_sum(h, g2, factors, cache))
        return out

    def squared_norms(self, layer, args, kwargs, grad, cache):
        return self.use_squared_norms(layer, [(args, kwargs, grad)], cache)

    def clipped_sums(self, layer, args, kwargs, grad, factors, cache):
        return self.use_clipped_sums(layer, [(args, kwargs, grad)], factors, cache)
