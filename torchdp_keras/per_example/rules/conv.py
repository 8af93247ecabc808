"""Fast clipping rule for `Conv1D`, `Conv2D` and `Conv3D` (channels_last, groups=1).

A convolution is a Dense layer applied to input patches: with the patches
`P_i` of example i (one row per output position, `K = prod(kernel_size) *
in_channels` columns, in the kernel's own layout) and the pre-activation
gradient `g_i` (one row per output position), the kernel gradient is
`P_i^T g_i` and the bias gradient `sum_l g_il`. The patches are extracted by
the layer's own convolution (same strides, padding, dilation) with a one-hot
kernel, so padding semantics match Keras exactly; norms and clipped sums
then use the Dense formulas (ghost or explicit, whichever is cheaper).
For 2-D convolutions the patches come from `unfold` (im2col), after the
same TensorFlow-style padding for "same". Layers whose patches would be too
wide (K above `max_patch_size`) are left to the per-layer per-example rule.
"""

from __future__ import annotations

import math

import torch
from keras import ops

from torchdp_keras.per_example.rules.base import LayerRule, sq_norm_rows
from torchdp_keras.per_example.rules.dense import clipped_product_sum, matmul_squared_norms


def _same_padding_2d(inputs, kernel_size, strides, dilation):
    """Pads NHWC `inputs` as Keras's "same" does: out = ceil(in / stride), the
    extra row or column going after (TensorFlow's convention)."""
    pads = []
    for axis in (2, 1):  # torch.nn.functional.pad wants the last axis first: W, then H
        size, k, s, d = (
            inputs.shape[axis],
            kernel_size[axis - 1],
            strides[axis - 1],
            dilation[axis - 1],
        )
        effective = (k - 1) * d + 1
        total = max((math.ceil(size / s) - 1) * s + effective - size, 0)
        pads += [total // 2, total - total // 2]
    return torch.nn.functional.pad(inputs, (0, 0, *pads))


class ConvRule(LayerRule):
    """Kernel and bias of a standard convolution, through patches.

    Args:
        max_patch_size: Largest `prod(kernel_size) * in_channels` handled here.
    """

    def __init__(self, max_patch_size: int = 1024):
        self.max_patch_size = max_patch_size

    def supports(self, layer) -> bool:
        kernel = getattr(layer, "kernel", None)
        if kernel is None or getattr(layer, "groups", 1) != 1:
            return False
        expected = [kernel] + ([layer.bias] if layer.use_bias else [])
        return (
            layer.data_format == "channels_last"
            and layer.padding in ("valid", "same")
            and not getattr(layer, "lora_enabled", False)
            and getattr(layer, "quantization_mode", None) is None
            and [id(w) for w in layer.trainable_weights] == [id(w) for w in expected]
            and math.prod(kernel.shape[:-1]) <= self.max_patch_size
        )

    def forward(self, layer, args, kwargs):
        z = layer.convolution_op(args[0], layer.kernel)
        if layer.use_bias:
            z = ops.add(z, ops.reshape(layer.bias, (1,) * (layer.rank + 1) + (layer.filters,)))
        return z, (layer.activation or (lambda t: t))

    @staticmethod
    def _patches(layer, inputs, grad):
        kernel_shape = tuple(layer.kernel.shape)
        width = math.prod(kernel_shape[:-1])
        batch = grad.shape[0]
        inputs = inputs.to(grad.dtype)
        if layer.rank == 2:
            if layer.padding == "same":
                inputs = _same_padding_2d(
                    inputs, kernel_shape[:2], layer.strides, layer.dilation_rate
                )
            # im2col: (B, C*kh*kw, L) in (C, kh, kw) order -> (B, L, kh*kw*C).
            unfolded = torch.nn.functional.unfold(
                inputs.permute(0, 3, 1, 2),
                kernel_size=kernel_shape[:2],
                dilation=tuple(layer.dilation_rate),
                stride=tuple(layer.strides),
            )
            channels = kernel_shape[2]
            patches = (
                unfolded.reshape(batch, channels, kernel_shape[0] * kernel_shape[1], -1)
                .permute(0, 3, 2, 1)
                .reshape(batch, -1, width)
            )
        else:
            # The layer's own convolution with a one-hot kernel: exact padding.
            one_hot = torch.eye(width, dtype=grad.dtype, device=grad.device).reshape(
                *kernel_shape[:-1], width
            )
            patches = layer.convolution_op(inputs, one_hot).reshape(batch, -1, width)
        return patches, grad.reshape(batch, -1, grad.shape[-1])

    def squared_norms(self, layer, args, kwargs, grad, cache):
        patches, g = self._patches(layer, args[0], grad)
        cache["patches"] = patches
        norms = matmul_squared_norms(patches, g, cache)
        if layer.use_bias:
            norms = norms + sq_norm_rows(g.sum(dim=1))
        return norms

    def clipped_sums(self, layer, args, kwargs, grad, factors, cache):
        patches = cache.get("patches")
        if patches is None:
            patches, _ = self._patches(layer, args[0], grad)
        g = grad.reshape(grad.shape[0], -1, grad.shape[-1])
        kernel = clipped_product_sum(patches, g, factors, cache)
        out = [kernel.reshape(tuple(layer.kernel.shape))]
        if layer.use_bias:
            out.append(torch.einsum("b,bo->o", factors.to(g.dtype), g.sum(dim=1)))
        return out
