"""Fast clipping rule for `keras.layers.Dense` (with or without fused activation).

With input `a` of shape (B, T, d_in) and pre-activation gradient `g` of shape
(B, T, d_out) (T = 1 for 2-D inputs), example i's kernel gradient is
`a_i^T g_i` and its bias gradient `sum_t g_it`:

* T = 1: `||a_i^T g_i||^2 = ||a_i||^2 ||g_i||^2` (ghost norm, O(d_in + d_out));
* T > 1: either the ghost form `sum_{t,s} (a_it . a_is)(g_it . g_is)`,
  O(T^2 (d_in + d_out)), or the explicit per-example gradient,
  O(T d_in d_out); the cheaper one, counting the clipped sum too and within
  a memory cap, is chosen per call (mixed ghost clipping, `prefers_explicit`).

Clipped sums are `einsum(c_i a_i, g_i)` (book-keeping).
"""

from __future__ import annotations

import torch
from keras import ops

from torchdp_keras.per_example.rules.base import (
    LayerRule,
    as_sequence,
    identity,
    is_linear,
    scratch,
    sq_norm_rows,
    weighted,
)

MAX_EXPLICIT_BYTES = 1 << 28
"""Largest per-example gradient tensor (B x d_in x d_out) a rule may hold for one layer."""


def prefers_explicit(batch: int, steps: int, d_in: int, d_out: int, itemsize: int = 4) -> bool:
    """Whether explicit per-example products beat the ghost norm for one layer.

    Counts the multiply-adds of both routes to the norms *and* the clipped
    sum: ghost `T^2 (d_in + d_out)` for the norms then `T d_in d_out` for the
    book-keeping sum; explicit `T d_in d_out` for the products, from which
    the clipped sum is a `d_in d_out` weighted sum. Explicit products also
    hold `B d_in d_out` numbers, so they are used only within
    `MAX_EXPLICIT_BYTES`.
    """
    ghost = steps * steps * (d_in + d_out) + steps * d_in * d_out
    explicit = steps * d_in * d_out + d_in * d_out
    return explicit < ghost and batch * d_in * d_out * itemsize <= MAX_EXPLICIT_BYTES


def matmul_squared_norms(a: torch.Tensor, g: torch.Tensor, cache: dict | None = None):
    """Per-example `||a_i^T g_i||_F^2` for a (B, T, d_in) and g (B, T, d_out), float64.

    When the explicit per-example products are the cheaper route they are
    stored in `cache["per_example"]` (B, d_in, d_out) for the clipped sum.
    """
    batch, steps, d_in = a.shape
    d_out = g.shape[-1]
    if steps == 1:
        return sq_norm_rows(a) * sq_norm_rows(g)
    if not prefers_explicit(batch, steps, d_in, d_out, g.element_size()):
        aa = torch.bmm(a, a.transpose(1, 2)).double()
        gg = torch.bmm(g, g.transpose(1, 2)).double()
        return (aa * gg).sum(dim=(1, 2))
    if cache is not None:
        per_example = scratch(cache, "per_example", (batch, d_in, d_out), g)
        torch.bmm(a.transpose(1, 2), g, out=per_example)
        cache["per_example"] = per_example
    else:
        per_example = torch.bmm(a.transpose(1, 2), g)
    return sq_norm_rows(per_example)


def clipped_product_sum(a, g, factors, cache: dict | None = None) -> torch.Tensor:
    """`sum_i factors[i] * a_i^T g_i`, from cached per-example products if any."""
    per_example = None if cache is None else cache.get("per_example")
    if per_example is not None:
        return torch.tensordot(factors.to(per_example.dtype), per_example, dims=1)
    return scaled_product_sum(a, g, factors)


def scaled_product_sum(a: torch.Tensor, g: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """`sum_i factors[i] * a_i^T g_i` (book-keeping), scaling the smaller operand."""
    if a.numel() <= g.numel():
        a = weighted(a, factors)
    else:
        g = weighted(g, factors)
    # One (d_in, B*T) x (B*T, d_out) product, written straight into its result.
    return torch.mm(a.reshape(-1, a.shape[-1]).t(), g.reshape(-1, g.shape[-1]))


class DenseRule(LayerRule):
    """Kernel and bias of `Dense`; the activation is applied after the tap."""

    activation_after_tap = True

    def supports(self, layer) -> bool:
        expected = [layer.kernel] + ([layer.bias] if layer.bias is not None else [])
        return (
            not getattr(layer, "lora_enabled", False)
            and getattr(layer, "quantization_mode", None) is None
            and [id(w) for w in layer.trainable_weights] == [id(w) for w in expected]
        )

    def forward(self, layer, args, kwargs):
        z = ops.matmul(args[0], layer.kernel)
        if layer.bias is not None:
            z = ops.add(z, layer.bias)
        return z, (layer.activation or identity)

    def tap_output(self, layer, output):
        return output if is_linear(layer.activation) else None

    def squared_norms(self, layer, args, kwargs, grad, cache):
        a, g = as_sequence(args[0]), as_sequence(grad)
        norms = matmul_squared_norms(a.to(g.dtype), g, cache)
        if layer.bias is not None:
            norms = norms + sq_norm_rows(g.sum(dim=1))
        return norms

    def clipped_sums(self, layer, args, kwargs, grad, factors, cache):
        a, g = as_sequence(args[0]).to(grad.dtype), as_sequence(grad)
        out = [clipped_product_sum(a, g, factors, cache)]
        if layer.bias is not None:
            out.append(torch.einsum("b,be->e", factors.to(g.dtype), g.sum(dim=1)))
        return out
