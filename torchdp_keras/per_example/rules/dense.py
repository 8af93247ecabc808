"""Fast clipping rule for `keras.layers.Dense` (with or without fused activation).

With input `a` of shape (B, T, d_in) and pre-activation gradient `g` of shape
(B, T, d_out) (T = 1 for 2-D inputs), example i's kernel gradient is
`a_i^T g_i` and its bias gradient `sum_t g_it`:

* T = 1: `||a_i^T g_i||^2 = ||a_i||^2 ||g_i||^2` (ghost norm, O(d_in + d_out));
* T > 1: either the ghost form `sum_{t,s} (a_it . a_is)(g_it . g_is)`,
  O(T^2 (d_in + d_out)), or the explicit per-example gradient,
  O(T d_in d_out); the cheaper one, counting the clipped sum too and within
  the step's explicit memory budget, is chosen per call (mixed ghost clipping, `prefers_explicit`).

Clipped sums are `einsum(c_i a_i, g_i)` (book-keeping).
"""

from __future__ import annotations

import keras
import torch
from keras import ops

from torchdp_keras import _keras_compat as keras_compat
from torchdp_keras.per_example.memory import BUDGET_KEY, explicit_memory_budget
from torchdp_keras.per_example.rules.base import (
    Forward,
    LayerRule,
    as_sequence,
    fold_rows,
    handles,
    identity,
    is_linear,
    option_reason,
    scratch,
    sq_norm_rows,
    weighted,
)


def prefers_explicit(
    batch: int, steps: int, d_in: int, d_out: int, itemsize: int = 4, budget=None
) -> bool:
    """Whether explicit per-example products beat the ghost norm for one layer.

    Counts the multiply-adds of both routes to the norms *and* the clipped
    sum: ghost `T^2 (d_in + d_out)` for the norms then `T d_in d_out` for the
    book-keeping sum; explicit `T d_in d_out` for the products, from which
    the clipped sum is a `d_in d_out` weighted sum. Explicit products also
    hold `B d_in d_out` numbers: they are used only when they fit in what is
    left of the step's explicit memory budget (`budget`, a
    `memory.StepBudget`, which they then take), or without one in the whole
    budget (`set_explicit_memory_budget`).
    """
    ghost = steps * steps * (d_in + d_out) + steps * d_in * d_out
    explicit = steps * d_in * d_out + d_in * d_out
    if explicit >= ghost:
        return False
    num_bytes = batch * d_in * d_out * itemsize
    if budget is None:
        return num_bytes <= explicit_memory_budget()
    return budget.take(num_bytes)


def matmul_squared_norms(a: torch.Tensor, g: torch.Tensor, cache: dict | None = None):
    """Per-example `||a_i^T g_i||_F^2` for a (B, T, d_in) and g (B, T, d_out), float64.

    When the explicit per-example products are the cheaper route they are
    stored in `cache["per_example"]` (B, d_in, d_out) for the clipped sum.
    """
    batch, steps, d_in = a.shape
    d_out = g.shape[-1]
    if steps == 1:
        return sq_norm_rows(a) * sq_norm_rows(g)
    budget = None if cache is None else cache.get(BUDGET_KEY)
    if not prefers_explicit(batch, steps, d_in, d_out, g.element_size(), budget):
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


def lora_variables(layer) -> tuple:
    """The LoRA factor variables (A, B) of a Dense, EinsumDense or Embedding layer."""
    if hasattr(layer, "lora_kernel_a"):
        return layer.lora_kernel_a, layer.lora_kernel_b
    return layer.lora_embeddings_a, layer.lora_embeddings_b


def lora_factors(layer, dtype):
    """`(A, B, s)` of a LoRA-enabled layer: its kernel is `W + s A B`, s = alpha / rank."""
    scale = layer.lora_alpha / layer.lora_rank
    a, b = lora_variables(layer)
    return a.value.to(dtype), b.value.to(dtype), scale


def trainable_parts(layer, kernel, extra: dict) -> dict | None:
    """Names of `layer.trainable_weights` among `kernel`, bias and the LoRA factors.

    Returns `{name: variable}` in the order of `layer.trainable_weights`, or
    None when a trainable weight is none of these (the rule declines).
    """
    known = {"kernel": kernel, "bias": getattr(layer, "bias", None), **extra}
    if getattr(layer, "lora_enabled", False):
        a, b = lora_variables(layer)
        known["lora_kernel_a"], known["lora_kernel_b"] = a, b
    names = {id(v): name for name, v in known.items() if v is not None}
    parts = {}
    for weight in layer.trainable_weights:
        if id(weight) not in names:
            return None
        parts[names[id(weight)]] = weight
    return parts


def parts_reason(layer, kernel, extra: dict | None = None) -> str | None:
    """Why `trainable_parts` declines `layer`, or None."""
    if trainable_parts(layer, kernel, extra or {}) is not None:
        return None
    return "trainable weights other than kernel, bias and LoRA factors: " + ", ".join(
        w.path for w in layer.trainable_weights
    )


@handles(keras.layers.Dense)
class DenseRule(LayerRule):
    """Kernel and bias of `Dense`, and its LoRA factors; the activation follows the tap.

    With `enable_lora(rank)` (Keras's LoRA: kernel `W + s A B`, W frozen),
    example i's gradients are `s (a_i A)^T g_i` for B and `s a_i^T (g_i B^T)`
    for A: two Dense-like products of rank r, clipped with the same ghost or
    explicit formulas.
    """

    activation_after_tap = True

    def unsupported_reason(self, layer) -> str | None:
        return option_reason(layer) or parts_reason(layer, keras_compat.kernel_variable(layer))

    def forward(self, layer, args, kwargs):
        z = ops.matmul(args[0], layer.kernel)
        if layer.bias is not None:
            z = ops.add(z, layer.bias)
        return Forward(z, layer.activation or identity)

    def tap_output(self, layer, output):
        return output if is_linear(layer.activation) else None

    supports_shared_uses = True

    def fold_units(self, layer, args, kwargs, grad, units):
        x = torch.as_tensor(args[0])
        return (fold_rows(x, units), *args[1:]), kwargs, fold_rows(grad, units)

    def merge_uses(self, layer, uses):
        # sum_u a_u^T g_u is one product of the uses' rows side by side.
        a = torch.cat([as_sequence(torch.as_tensor(args[0])) for args, _, _ in uses], dim=1)
        g = torch.cat([as_sequence(grad) for _, _, grad in uses], dim=1)
        return (a,), {}, g

    @staticmethod
    def _lora_inputs(layer, a, g, cache):
        """`(a A, g B^T, s)`, computed once per step."""
        if "lora" not in cache:
            lora_a, lora_b, scale = lora_factors(layer, g.dtype)
            cache["lora"] = (torch.matmul(a, lora_a), torch.matmul(g, lora_b.t()), scale)
        return cache["lora"]

    def squared_norms(self, layer, args, kwargs, grad, cache):
        a, g = as_sequence(args[0]).to(grad.dtype), as_sequence(grad)
        parts = trainable_parts(layer, keras_compat.kernel_variable(layer), {})
        norms = torch.zeros(g.shape[0], dtype=torch.float64, device=g.device)
        if "kernel" in parts:
            norms = norms + matmul_squared_norms(a, g, cache)
        if "bias" in parts:
            norms = norms + sq_norm_rows(g.sum(dim=1))
        if "lora_kernel_a" in parts or "lora_kernel_b" in parts:
            xa, gb, scale = self._lora_inputs(layer, a, g, cache)
            if "lora_kernel_a" in parts:
                norms = norms + scale**2 * matmul_squared_norms(a, gb)
            if "lora_kernel_b" in parts:
                norms = norms + scale**2 * matmul_squared_norms(xa, g)
        return norms

    def clipped_sums(self, layer, args, kwargs, grad, factors, cache):
        a, g = as_sequence(args[0]).to(grad.dtype), as_sequence(grad)
        out = []
        for name in trainable_parts(layer, keras_compat.kernel_variable(layer), {}):
            if name == "kernel":
                out.append(clipped_product_sum(a, g, factors, cache))
            elif name == "bias":
                out.append(torch.einsum("b,be->e", factors.to(g.dtype), g.sum(dim=1)))
            else:
                xa, gb, scale = self._lora_inputs(layer, a, g, cache)
                pair = (a, gb) if name == "lora_kernel_a" else (xa, g)
                out.append(scaled_product_sum(*pair, factors).mul_(scale))
        return out
