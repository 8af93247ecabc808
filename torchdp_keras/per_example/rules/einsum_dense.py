"""Fast clipping rule for `keras.layers.EinsumDense` (with or without activation).

The layer computes `z = einsum(equation, a, W) + b`. Its axes fall into
classes: the batch axis, "free" axes of the input that reach the output
(sequence positions), "contracted" axes shared by input and kernel, and
"kernel" axes shared by kernel and output. Flattening each class turns the
layer into a batched matrix product `z_i = A_i W` with `A_i` of shape
(T, C) and `W` of shape (C, D), so the Dense formulas apply unchanged: the
ghost norm or the explicit per-example kernel, whichever is cheaper, and
book-keeping for the clipped sum. Equations with an axis shared by all three
operands (a batched product inside the layer) use the explicit per-example
kernel `einsum(a_i, g_i)`. The bias gradient of example i is its output
gradient summed over the axes the bias is broadcast along.

With Keras's LoRA (`enable_lora(rank)`: kernel `W + s A B`, A over the
kernel's leading axes, B over its last), example i's per-example kernel
gradient `G_i` is formed explicitly (B x the kernel's size) and the
factors' gradients are `s G_i B^T` and `s A^T G_i` (leading axes flattened).
"""

from __future__ import annotations

import math
import string

import keras
import torch
from keras import ops

from torchdp_keras import _keras_compat as keras_compat
from torchdp_keras.per_example.rules.base import (
    Forward,
    LayerRule,
    handles,
    identity,
    is_linear,
    option_reason,
    reduce_to_shape,
    sq_norm_rows,
)
from torchdp_keras.per_example.rules.dense import (
    clipped_product_sum,
    lora_factors,
    matmul_squared_norms,
    parts_reason,
    trainable_parts,
)


def expand_equation(equation: str, input_ndim: int) -> tuple[str, str, str]:
    """`(input, kernel, output)` specs of `equation` with "..." spelled out."""
    inputs, rest = equation.replace(" ", "").split(",")
    kernel, output = rest.split("->")
    if "..." in inputs:
        used = set(equation)
        fresh = [c for c in string.ascii_letters if c not in used]
        elided = "".join(fresh[: input_ndim - (len(inputs) - 3)])
        inputs, output = inputs.replace("...", elided), output.replace("...", elided)
    return inputs, kernel, output


@handles(keras.layers.EinsumDense)
class EinsumDenseRule(LayerRule):
    """Kernel and bias of `EinsumDense`; the activation is applied after the tap."""

    activation_after_tap = True

    def unsupported_reason(self, layer) -> str | None:
        try:
            inputs, kernel, output = layer.equation.replace(" ", "").replace("->", ",").split(",")
        except ValueError:
            return f"equation {layer.equation!r} is not 'inputs,kernel->output'"
        # The batch axis leads input and output (possibly inside a leading "...").
        batch = "..." if inputs.startswith("...") else inputs[:1]
        if not (
            "..." not in kernel
            and output.startswith(batch)
            and batch not in kernel
            and all(c in inputs or c in output for c in kernel)
        ):
            return (
                f"equation {layer.equation!r} (the batch axis must lead the input and "
                "the output, and stay out of the kernel)"
            )
        return option_reason(layer) or parts_reason(layer, keras_compat.kernel_variable(layer))

    def forward(self, layer, args, kwargs):
        z = ops.einsum(layer.equation, args[0], layer.kernel)
        if layer.bias is not None:
            z = ops.add(z, layer.bias)
        return Forward(z, layer.activation or identity)

    def tap_output(self, layer, output):
        return output if is_linear(layer.activation) else None

    def fold_units(self, layer, args, kwargs, grad, units):
        # A group folds into the first free axis (a sequence axis right after
        # the batch axis in both input and output), when there is one.
        a = torch.as_tensor(args[0])
        inputs, kernel, output = expand_equation(layer.equation, a.ndim)
        if len(inputs) < 2 or len(output) < 2 or inputs[1] != output[1] or inputs[1] in kernel:
            return None
        folded_a = a.reshape(units, -1, *a.shape[2:])
        return (folded_a, *args[1:]), kwargs, grad.reshape(units, -1, *grad.shape[2:])

    @staticmethod
    def _matrices(layer, a, g, cache):
        """(B, T, C) and (B, T, D) views of input and gradient, or None (triple axes)."""
        if "matrices" in cache:
            return cache["matrices"]
        inputs, kernel, output = expand_equation(layer.equation, a.ndim)
        if any(c in inputs and c in kernel and c in output for c in kernel):
            cache["matrices"] = None
            cache["specs"] = (inputs, kernel, output)
            return None
        free = [c for c in inputs[1:] if c in output]
        contracted = [c for c in inputs if c in kernel]
        produced = [c for c in output if c in kernel]
        summed_out = [i for i, c in enumerate(inputs) if c not in output and c not in kernel]
        if summed_out:  # input axes that only get summed: sum them first
            a = a.sum(dim=summed_out)
            inputs = "".join(c for c in inputs if c in output or c in kernel)
        a = a.permute([inputs.index(c) for c in inputs[0] + "".join(free) + "".join(contracted)])
        g = g.permute([output.index(c) for c in output[0] + "".join(free) + "".join(produced)])
        batch = a.shape[0]
        steps = math.prod(a.shape[1 : 1 + len(free)])
        a = a.reshape(batch, steps, -1)
        g = g.reshape(batch, steps, -1)
        # The (C, D) product is laid out as contracted + produced axes; the
        # kernel's own order is a permutation of that.
        order = contracted + produced
        cache["matrices"] = (a, g, [order.index(c) for c in kernel])
        cache["kernel_shape"] = tuple(layer.kernel.shape[kernel.index(c)] for c in order)
        return cache["matrices"]

    def _explicit(self, layer, a, g, cache):
        if "per_example_kernel" not in cache:
            inputs, kernel, output = cache["specs"]
            cache["per_example_kernel"] = torch.einsum(
                f"{inputs},{output}->{inputs[0]}{kernel}", a, g
            )
        return cache["per_example_kernel"]

    def _bias_grads(self, layer, g):
        return reduce_to_shape(g, tuple(layer.bias.shape))

    def _per_example_kernel(self, layer, a, g, cache):
        """(B, *kernel.shape): every example's kernel gradient, explicitly."""
        if "per_example_kernel" in cache:
            return cache["per_example_kernel"]
        matrices = self._matrices(layer, a, g, cache)
        if matrices is None:
            return self._explicit(layer, a, g, cache)
        am, gm, permutation = matrices
        per_example = torch.bmm(am.transpose(1, 2), gm).reshape(g.shape[0], *cache["kernel_shape"])
        per_example = per_example.permute(0, *[1 + p for p in permutation])
        cache["per_example_kernel"] = per_example
        return per_example

    def _lora_grads(self, layer, a, g, cache) -> dict:
        """Per-example gradients of the LoRA factors (kernel `W + s A B` over its last axis)."""
        if "lora" not in cache:
            kernel = self._per_example_kernel(layer, a, g, cache)
            flat = kernel.reshape(kernel.shape[0], -1, kernel.shape[-1])  # (B, M, e)
            lora_a, lora_b, scale = lora_factors(layer, g.dtype)
            a_flat = lora_a.reshape(-1, lora_a.shape[-1])  # (M, r)
            cache["lora"] = {
                "lora_kernel_a": torch.matmul(flat, lora_b.t()).mul_(scale),  # (B, M, r)
                "lora_kernel_b": torch.matmul(a_flat.t(), flat).mul_(scale),  # (B, r, e)
            }
        return cache["lora"]

    def squared_norms(self, layer, args, kwargs, grad, cache):
        a = torch.as_tensor(args[0]).to(grad.dtype)
        parts = trainable_parts(layer, keras_compat.kernel_variable(layer), {})
        norms = torch.zeros(grad.shape[0], dtype=torch.float64, device=grad.device)
        if "kernel" in parts:
            matrices = self._matrices(layer, a, grad, cache)
            if matrices is None:
                norms = norms + sq_norm_rows(self._explicit(layer, a, grad, cache))
            else:
                am, gm, _ = matrices
                norms = norms + matmul_squared_norms(am, gm, cache)
        if "bias" in parts:
            norms = norms + sq_norm_rows(self._bias_grads(layer, grad))
        if getattr(layer, "lora_enabled", False):
            lora = self._lora_grads(layer, a, grad, cache)
            for name in ("lora_kernel_a", "lora_kernel_b"):
                if name in parts:
                    norms = norms + sq_norm_rows(lora[name])
        return norms

    def clipped_sums(self, layer, args, kwargs, grad, factors, cache):
        a = torch.as_tensor(args[0]).to(grad.dtype)
        out = []
        for name, weight in trainable_parts(layer, keras_compat.kernel_variable(layer), {}).items():
            if name == "kernel":
                matrices = self._matrices(layer, a, grad, cache)
                if matrices is None:
                    per_example = self._explicit(layer, a, grad, cache)
                    kernel = torch.tensordot(factors.to(per_example.dtype), per_example, dims=1)
                else:
                    am, gm, permutation = matrices
                    kernel = clipped_product_sum(am, gm, factors, cache)
                    kernel = kernel.reshape(cache["kernel_shape"]).permute(permutation)
                out.append(kernel.reshape(tuple(weight.shape)))
            elif name == "bias":
                bias = self._bias_grads(layer, grad)
                out.append(torch.tensordot(factors.to(bias.dtype), bias, dims=1))
            else:
                per_example = self._lora_grads(layer, a, grad, cache)[name]
                total = torch.tensordot(factors.to(per_example.dtype), per_example, dims=1)
                out.append(total.reshape(tuple(weight.shape)))
        return out
