"""Fast clipping rules for `Conv1D`/`Conv2D`/`Conv3D` and `DepthwiseConv2D`.

A convolution is a Dense layer applied to input patches: with the patches
`P_i` of example i (one row per output position, `K = prod(kernel_size) *
in_channels` columns, in the kernel's own `(*kernel_size, in_channels)`
layout) and the pre-activation gradient `g_i` (one row per output position),
the kernel gradient is `P_i^T g_i` and the bias gradient `sum_l g_il`. Norms
and clipped sums then use the Dense formulas (ghost or explicit, whichever is
cheaper for the layer's shapes).

Both the forward pass and the patches work on the channels_last tensor
directly: the input is padded as Keras pads it ("same": TensorFlow's
convention, the odd pixel after; "causal": all of it before), the
convolution runs on a channels-first *view* (torch's channels_last memory
format, so no layout copy), and the patches are a strided view of the
padded input, materialised once. A depthwise convolution is a separate small
convolution per channel; its rule chooses per layer between the ghost norm
and the explicit per-example kernel (mixed ghost clipping).
"""

from __future__ import annotations

import itertools
import math

import keras
import torch
from keras import ops

from torchdp_keras.per_example.rules.base import (
    Forward,
    LayerRule,
    as_sequence,
    handles,
    identity,
    is_linear,
    option_reason,
    scratch,
    sq_norm_rows,
    sub_cache,
    weights_reason,
)
from torchdp_keras.per_example.rules.dense import (
    clipped_product_sum,
    matmul_squared_norms,
    scaled_product_sum,
)

_CONV_FUNCTIONS = {
    1: torch.nn.functional.conv1d,
    2: torch.nn.functional.conv2d,
    3: torch.nn.functional.conv3d,
}


def _pad_channels_last(layer, inputs: torch.Tensor) -> torch.Tensor:
    """`inputs` (B, *spatial, C) padded exactly as the Keras layer pads them."""
    if layer.padding == "valid":
        return inputs
    kernel_size, strides, dilation = layer.kernel_size, layer.strides, layer.dilation_rate
    pads = []
    for axis in range(len(kernel_size)):
        effective = (kernel_size[axis] - 1) * dilation[axis] + 1
        if layer.padding == "causal":
            pads.append((effective - 1, 0))
            continue
        size, stride = inputs.shape[1 + axis], strides[axis]
        total = max((math.ceil(size / stride) - 1) * stride + effective - size, 0)
        pads.append((total // 2, total - total // 2))
    if not any(left or right for left, right in pads):
        return inputs
    flat = [0, 0]  # torch pads the last axis first: channels, then spatial backwards
    for left, right in reversed(pads):
        flat += [left, right]
    return torch.nn.functional.pad(inputs, flat)


def _patches(layer, padded: torch.Tensor, out_spatial, cache=None) -> torch.Tensor:
    """(B, L, *kernel_size, C) patches of a padded input (in a scratch tensor).

    A 1x1 kernel at stride 1 has the input itself as its patches: no copy.
    """
    if all(k == 1 for k in layer.kernel_size) and all(s == 1 for s in layer.strides):
        return padded.reshape(padded.shape[0], math.prod(out_spatial), *layer.kernel_size, -1)
    padded = padded.contiguous()
    strides = padded.stride()
    rank = len(out_spatial)
    shape = (padded.shape[0], *out_spatial, *layer.kernel_size, padded.shape[-1])
    view_strides = (
        strides[0],
        *(strides[1 + a] * layer.strides[a] for a in range(rank)),
        *(strides[1 + a] * layer.dilation_rate[a] for a in range(rank)),
        strides[-1],
    )
    view = padded.as_strided(shape, view_strides)
    out_shape = (padded.shape[0], math.prod(out_spatial), *shape[1 + rank :])
    if cache is None:
        return view.reshape(out_shape)
    out = scratch(cache, "patches", shape, padded)
    out.copy_(view)
    return out.view(out_shape)


# Keyword marking arguments that `ConvRule.fold_units` already turned into patches.
FOLDED_PATCHES = "_folded_patches"


_PADDINGS = ("valid", "same", "causal")


def _kernel_reason(layer, max_patch_size: int | None) -> str | None:
    kernel = getattr(layer, "kernel", None)
    if kernel is None:
        return "no kernel"
    if getattr(layer, "lora_enabled", False):
        return "LoRA-enabled convolution"
    reason = option_reason(layer, paddings=_PADDINGS, channels_last=True)
    reason = reason or weights_reason(layer, {"kernel": kernel, "bias": layer.bias})
    return reason or _width_reason(kernel, max_patch_size)


def _width_reason(kernel, max_patch_size: int | None) -> str | None:
    """Why a kernel is too wide for `max_patch_size` (None: no limit), or None."""
    width = math.prod(kernel.shape[:-1])
    if max_patch_size is not None and width > max_patch_size:
        return f"patch width {width} over the rule's max_patch_size={max_patch_size}"
    return None


def _convolve(layer, inputs, kernel, groups):
    """The layer's convolution of a channels_last input, without layout copies."""
    rank = layer.rank
    padded = _pad_channels_last(layer, inputs)
    # (*kernel_size, C_in/groups, C_out) -> (C_out, C_in/groups, *kernel_size).
    weight = kernel.permute(rank + 1, rank, *range(rank))
    out = _CONV_FUNCTIONS[rank](
        padded.movedim(-1, 1),
        weight,
        stride=tuple(layer.strides),
        dilation=tuple(layer.dilation_rate),
        groups=groups,
    )
    return out.movedim(1, -1)


def _layer_inputs(layer, args):
    inputs = torch.as_tensor(args[0])
    dtype = getattr(torch, layer.compute_dtype)
    return inputs if inputs.dtype == dtype else inputs.to(dtype)


@handles(keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
class ConvRule(LayerRule):
    """Kernel and bias of a standard convolution (groups=1), through patches.

    Args:
        max_patch_size: None (default: any width; the patches are about
            `prod(kernel_size)` times the input's size, and the products take the
            cheaper of the ghost and the explicit form within the step's explicit
            memory budget), or the largest `prod(kernel_size) * in_channels`
            handled here, wider layers being left to the per-layer fallback.
    """

    activation_after_tap = True

    def __init__(self, max_patch_size: int | None = None):
        self.max_patch_size = max_patch_size

    def unsupported_reason(self, layer) -> str | None:
        groups = getattr(layer, "groups", 1)
        if groups != 1:
            return f"groups={groups} (grouped convolution)"
        return _kernel_reason(layer, self.max_patch_size)

    def forward(self, layer, args, kwargs):
        inputs = _layer_inputs(layer, args)
        z = _convolve(layer, inputs, layer.kernel.value.to(inputs.dtype), groups=1)
        if layer.use_bias:
            z = z + layer.bias.value.to(z.dtype)
        return Forward(z, layer.activation or identity)

    def tap_output(self, layer, output):
        return output if is_linear(layer.activation) else None

    def fold_units(self, layer, args, kwargs, grad, units):
        # A group's kernel gradient is the product of its examples' patches and
        # gradients side by side: (units, B/units * L, K) and (units, B/units * L, C).
        padded = _pad_channels_last(layer, _layer_inputs(layer, args).to(grad.dtype))
        patches = _patches(layer, padded, grad.shape[1:-1])
        patches = patches.reshape(units, -1, math.prod(patches.shape[2:]))
        return (patches,), {FOLDED_PATCHES: True}, grad.reshape(units, -1, grad.shape[-1])

    def _patches_and_grads(self, layer, args, kwargs, grad, cache):
        if kwargs.get(FOLDED_PATCHES):
            return args[0], grad
        patches = cache.get("patches")
        g = grad.reshape(grad.shape[0], -1, grad.shape[-1])
        if patches is None:
            padded = _pad_channels_last(layer, _layer_inputs(layer, args).to(grad.dtype))
            patches = _patches(layer, padded, grad.shape[1:-1], cache)
            patches = patches.reshape(*patches.shape[:2], -1)
        return patches, g

    def squared_norms(self, layer, args, kwargs, grad, cache):
        patches, g = self._patches_and_grads(layer, args, kwargs, grad, cache)
        cache["patches"] = patches
        norms = matmul_squared_norms(patches, g, cache)
        if layer.use_bias:
            norms = norms + sq_norm_rows(g.sum(dim=1))
        return norms

    def clipped_sums(self, layer, args, kwargs, grad, factors, cache):
        patches, g = self._patches_and_grads(layer, args, kwargs, grad, cache)
        kernel = clipped_product_sum(patches, g, factors, cache)
        out = [kernel.reshape(tuple(layer.kernel.shape))]
        if layer.use_bias:
            out.append(torch.einsum("b,bo->o", factors.to(g.dtype), g.sum(dim=1)))
        return out


@handles(keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
class DepthwiseConvRule(LayerRule):
    """Kernel and bias of `DepthwiseConv1D`/`DepthwiseConv2D`.

    Channel c of example i has kernel gradient `sum_l x_ic[l*s + o*d] g_ic[l]`
    at kernel offset o. The per-example kernels (B x the kernel's size, as
    small as the layer's input is large) are formed explicitly, one strided
    window of the input per kernel offset; the ghost norm would cost L^2
    per channel and the patches tensor prod(kernel_size) copies of the input.
    """

    activation_after_tap = True

    def __init__(self, max_patch_size: int | None = None):
        self.max_patch_size = max_patch_size

    def unsupported_reason(self, layer) -> str | None:
        return _kernel_reason(layer, self.max_patch_size)

    def forward(self, layer, args, kwargs):
        inputs = _layer_inputs(layer, args)
        kernel = layer.kernel.value.to(inputs.dtype)  # (*k, C, M)
        channels, multiplier = kernel.shape[-2], kernel.shape[-1]
        grouped = kernel.reshape(*kernel.shape[:-2], 1, channels * multiplier)
        z = _convolve(layer, inputs, grouped, groups=channels)
        if layer.use_bias:
            z = z + layer.bias.value.to(z.dtype)
        return Forward(z, layer.activation or identity)

    def tap_output(self, layer, output):
        return output if is_linear(layer.activation) else None

    def _kernel(self, layer):
        """The depthwise kernel variable, (*kernel_size, C, M)."""
        return layer.kernel

    def _per_example_kernel(self, layer, args, grad, cache):
        """(B, *kernel_size, C, M): every example's depthwise kernel gradient.

        Kernel offset `o` of example i is `sum_l x_i[l*s + o*d] g_i[l]` per
        channel: one strided window of the padded input against the
        gradient, offset by offset, without the patches tensor.
        """
        if "per_example" in cache:
            return cache["per_example"]
        kernel_shape = tuple(self._kernel(layer).shape)
        channels, multiplier = kernel_shape[-2], kernel_shape[-1]
        batch, out_spatial = grad.shape[0], tuple(grad.shape[1:-1])
        padded = _pad_channels_last(layer, _layer_inputs(layer, args).to(grad.dtype))
        g = grad.reshape(batch, *out_spatial, channels, multiplier)
        out = scratch(cache, "per_example", (batch, *kernel_shape), g)
        axes = "xyz"[: len(out_spatial)]
        equation = f"b{axes}c,b{axes}cm->bcm"
        positions = tuple(range(1, 1 + len(out_spatial)))
        for offset in itertools.product(*(range(k) for k in layer.kernel_size)):
            window = padded[
                (slice(None),)
                + tuple(
                    slice(o * d, o * d + (n - 1) * s + 1, s)
                    for o, d, n, s in zip(offset, layer.dilation_rate, out_spatial, layer.strides)
                )
            ]
            if multiplier == 1:  # elementwise, then a sum over the positions
                index = (slice(None), *offset, Ellipsis, 0)
                torch.sum(window * grad, dim=positions, out=out[index])
            else:
                index = (slice(None), *offset)
                out[index] = torch.einsum(equation, window, g)
        cache["per_example"] = out
        return out

    def _kernel_norms(self, layer, args, grad, cache):
        """Per-example squared norms of the depthwise kernel's gradient, from the
        gradient `grad` at the depthwise convolution's output."""
        return sq_norm_rows(self._per_example_kernel(layer, args, grad, cache))

    def _kernel_sum(self, layer, args, grad, factors, cache):
        per_example = self._per_example_kernel(layer, args, grad, cache)
        return torch.tensordot(factors.to(per_example.dtype), per_example, dims=1)

    def squared_norms(self, layer, args, kwargs, grad, cache):
        norms = self._kernel_norms(layer, args, grad, cache)
        if layer.use_bias:
            norms = norms + sq_norm_rows(grad.reshape(grad.shape[0], -1, grad.shape[-1]).sum(1))
        return norms

    def clipped_sums(self, layer, args, kwargs, grad, factors, cache):
        out = [self._kernel_sum(layer, args, grad, factors, cache)]
        if layer.use_bias:
            flat = grad.reshape(grad.shape[0], -1, grad.shape[-1]).sum(dim=1)
            out.append(torch.einsum("b,bo->o", factors.to(flat.dtype), flat))
        return out


@handles(keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)
class SeparableConvRule(DepthwiseConvRule):
    """`SeparableConv1D/2D`: a depthwise convolution `u`, then a 1x1 pointwise one, then bias.

    The pointwise kernel's per-example gradient is the Dense-like `u_i^T g_i`
    (positions as the sequence); the gradient at `u` is `g W_p^T` (the
    pointwise step is linear), from which the depthwise kernel is clipped as
    in `DepthwiseConvRule`. `u` is kept from the forward pass.
    """

    def _kernel(self, layer):
        return layer.depthwise_kernel

    def unsupported_reason(self, layer) -> str | None:
        reason = option_reason(layer, paddings=_PADDINGS, channels_last=True)
        reason = reason or weights_reason(
            layer,
            {
                "depthwise_kernel": layer.depthwise_kernel,
                "pointwise_kernel": layer.pointwise_kernel,
                "bias": layer.bias,
            },
        )
        return reason or _width_reason(layer.depthwise_kernel, self.max_patch_size)

    @staticmethod
    def _pointwise(layer, dtype):
        kernel = layer.pointwise_kernel.value.to(dtype)
        return kernel.reshape(-1, kernel.shape[-1])  # (C*M, C_out)

    def forward(self, layer, args, kwargs):
        inputs = _layer_inputs(layer, args)
        depthwise = layer.depthwise_kernel.value.to(inputs.dtype)
        channels, multiplier = depthwise.shape[-2], depthwise.shape[-1]
        grouped = depthwise.reshape(*depthwise.shape[:-2], 1, channels * multiplier)
        u = _convolve(layer, inputs, grouped, groups=channels)
        z = torch.matmul(u, self._pointwise(layer, u.dtype))
        if layer.use_bias:
            z = z + layer.bias.value.to(z.dtype)
        return Forward(z, layer.activation or identity, u)

    # The norms need u, which only the rule's forward keeps: never tapped from
    # the layer's finished output (with or without an activation).
    activation_after_tap = False
    recomputes_in_hooks = True

    def tap_output(self, layer, output):
        return None

    def _depthwise_grad(self, layer, grad, cache):
        if "depthwise_grad" not in cache:
            cache["depthwise_grad"] = torch.matmul(grad, self._pointwise(layer, grad.dtype).t())
        return cache["depthwise_grad"]

    def squared_norms(self, layer, args, kwargs, grad, cache):
        u = cache["saved"].to(grad.dtype)
        norms = self._kernel_norms(layer, args, self._depthwise_grad(layer, grad, cache), cache)
        u_seq, g_seq = u.reshape(u.shape[0], -1, u.shape[-1]), as_sequence(grad)
        norms = norms + matmul_squared_norms(u_seq, g_seq, sub_cache(cache, "pointwise"))
        if layer.use_bias:
            norms = norms + sq_norm_rows(g_seq.sum(dim=1))
        return norms

    def clipped_sums(self, layer, args, kwargs, grad, factors, cache):
        u = cache["saved"].to(grad.dtype)
        depthwise_grad = self._depthwise_grad(layer, grad, cache)
        out = [self._kernel_sum(layer, args, depthwise_grad, factors, cache)]
        u_seq, g_seq = u.reshape(u.shape[0], -1, u.shape[-1]), as_sequence(grad)
        pointwise = clipped_product_sum(u_seq, g_seq, factors, sub_cache(cache, "pointwise"))
        out.append(pointwise.reshape(tuple(layer.pointwise_kernel.shape)))
        if layer.use_bias:
            out.append(torch.einsum("b,bo->o", factors.to(g_seq.dtype), g_seq.sum(dim=1)))
        return out


@handles(keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose)
class ConvTransposeRule(LayerRule):
    """Kernel and bias of `Conv1DTranspose/2DTranspose/3DTranspose`.

    A transposed convolution `y = conv_T(x, W)` is the adjoint of the
    convolution with the same geometry: `<conv_T(x, W), g> = <x, conv(g, W)>`.
    Example i's kernel gradient is therefore the convolution's, with the roles
    of input and output swapped: the patches of the output gradient `g_i`
    (taken as a convolution would, stepping to `x`'s positions) against
    `x_i`, a Dense-like product (ghost or explicit). Any geometry the check
    below does not cover (an explicit `output_padding` with "same") is left
    to the per-layer fallback.
    """

    activation_after_tap = True

    def unsupported_reason(self, layer) -> str | None:
        kernel = getattr(layer, "kernel", None)
        if kernel is None:
            return "no kernel"
        reason = option_reason(layer, paddings=("valid", "same"), channels_last=True)
        if reason is None and layer.output_padding is not None and layer.padding != "valid":
            reason = f"output_padding={layer.output_padding} with padding={layer.padding!r}"
        return reason or weights_reason(layer, {"kernel": kernel, "bias": layer.bias})

    def forward(self, layer, args, kwargs):
        inputs = _layer_inputs(layer, args)
        z = ops.conv_transpose(
            inputs,
            layer.kernel,
            strides=list(layer.strides),
            padding=layer.padding,
            output_padding=layer.output_padding,
            dilation_rate=layer.dilation_rate,
            data_format=layer.data_format,
        )
        if layer.use_bias:
            z = z + layer.bias.value.to(z.dtype)
        return Forward(z, layer.activation or identity)

    def tap_output(self, layer, output):
        return output if is_linear(layer.activation) else None

    def _operands(self, layer, args, grad, cache):
        """(B, L, K*F) patches of the output gradient and (B, L, C) inputs."""
        if "operands" not in cache:
            x = _layer_inputs(layer, args).to(grad.dtype)
            padded = _pad_channels_last(layer, grad)
            patches = _patches(layer, padded, x.shape[1:-1])
            patches = patches.reshape(*patches.shape[:2], -1)
            cache["operands"] = (patches, x.reshape(x.shape[0], -1, x.shape[-1]))
        return cache["operands"]

    def squared_norms(self, layer, args, kwargs, grad, cache):
        patches, x = self._operands(layer, args, grad, cache)
        norms = matmul_squared_norms(patches, x)
        if layer.use_bias:
            norms = norms + sq_norm_rows(grad.reshape(grad.shape[0], -1, grad.shape[-1]).sum(1))
        return norms

    def clipped_sums(self, layer, args, kwargs, grad, factors, cache):
        patches, x = self._operands(layer, args, grad, cache)
        out = [scaled_product_sum(patches, x, factors).reshape(tuple(layer.kernel.shape))]
        if layer.use_bias:
            flat = grad.reshape(grad.shape[0], -1, grad.shape[-1]).sum(dim=1)
            out.append(torch.einsum("b,bo->o", factors.to(flat.dtype), flat))
        return out
