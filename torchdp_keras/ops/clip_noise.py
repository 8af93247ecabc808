"""Clipping and Gaussian noise in plain torch.

These are the building blocks of the DP-SGD update

    (sum_i min(1, C / ||g_i||) g_i + N(0, sigma^2 C^2 I)) / B

where `g_i` is the gradient of one clipping unit (an example, or a
microbatch) flattened over all trainable weights together.

Guarantee: every clipped unit gradient has an L2 norm of at most `C`. The norm
is summed in float64 (float32 values in blocks of 8 squares first, see
`squared_row_norms`) and the clip factor carries a relative safety margin of
1e-6, so that float32 rounding in the norm or in the scaling cannot push a
clipped norm above `C`. A unit whose gradient is exactly zero gets the factor 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Relative margin that keeps ||factor * g|| <= C under float32 rounding.
CLIP_SAFETY_MARGIN = 1e-6
# float32 values per block of `squared_row_norms` (error ~ (block + 2) * 2**-24).
_NORM_BLOCK = 8
# Values of noise drawn at once by the in-place `add_gaussian_noise`.
_NOISE_CHUNK = 1 << 20


def _accumulation_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def per_unit_squared_norms(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Squared L2 norms of per-unit gradients, taken over all tensors together.

    Args:
        grads: Tensors of shape `(k, ...)`, one per trainable weight; row `i`
            of every tensor belongs to unit `i`.

    Returns:
        A float64 tensor of shape `(k,)`.

    Example:
        >>> g = [torch.tensor([[3.0], [0.0]]), torch.tensor([[4.0], [1.0]])]
        >>> per_unit_squared_norms(g)
        tensor([25.,  1.], dtype=torch.float64)
    """
    if not grads:
        raise ValueError("Expected at least one gradient tensor. Received: grads=[]")
    total = squared_row_norms(grads[0])
    for g in grads[1:]:
        total = total + squared_row_norms(g)
    return total


def squared_row_norms(t: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of each row `t[i]` of a `(k, ...)` tensor, in float64.

    float32 rows are reduced in blocks of `_NORM_BLOCK` values in float32,
    and the block results are squared and summed in float64: the relative
    error of a block's sum of squares is at most about `(_NORM_BLOCK + 2)`
    float32 roundings (6e-7), below `CLIP_SAFETY_MARGIN`, and no float64 copy
    of the gradients is made (on CPU, allocating that copy costs more than the
    reduction). Other dtypes are converted to float64 first.
    """
    rows = t.reshape(t.shape[0], -1)
    dtype = _accumulation_dtype(t.device)
    if rows.dtype == torch.float32 and dtype == torch.float64:
        width = rows.shape[1]
        blocked = width - width % _NORM_BLOCK
        total = rows.new_zeros(rows.shape[0], dtype=dtype)
        if blocked:
            part = torch.linalg.vector_norm(
                rows[:, :blocked].reshape(rows.shape[0], -1, _NORM_BLOCK), dim=2
            )
            part = part.to(dtype)
            total = (part * part).sum(dim=1)
        if blocked < width:
            rest = rows[:, blocked:].to(dtype)
            total = total + (rest * rest).sum(dim=1)
        return total
    if rows.dtype != dtype:
        rows = rows.to(dtype)
    n = torch.linalg.vector_norm(rows, dim=1)
    return n * n


def clip_factors(squared_norms: torch.Tensor, l2_norm_clip: float) -> torch.Tensor:
    """Per-unit factors `min(1, C / ||g_i||)` (with the safety margin).

    Args:
        squared_norms: Squared norms of shape `(k,)` (float64 preferred).
        l2_norm_clip: The clipping norm `C` > 0.

    Returns:
        Factors of the same shape and dtype, in `(0, 1]`.

    Example:
        >>> clip_factors(torch.tensor([4.0, 0.25], dtype=torch.float64), 1.0)
        tensor([0.5000, 1.0000], dtype=torch.float64)
    """
    norms = torch.sqrt(squared_norms)
    return torch.clamp(l2_norm_clip / (norms * (1.0 + CLIP_SAFETY_MARGIN)), max=1.0)


def clipped_sum(grads: Sequence[torch.Tensor], factors: torch.Tensor) -> list[torch.Tensor]:
    """Returns `sum_i factors[i] * grads[.][i]` for every tensor in `grads`.

    Args:
        grads: Tensors of shape `(k, ...)`.
        factors: Clip factors of shape `(k,)`.

    Returns:
        Tensors of shape `grads[j].shape[1:]`, in the dtype of `grads`.
    """
    out = []
    for g in grads:
        f = factors.to(g.dtype)
        out.append(torch.tensordot(f, g, dims=1))
    return out


def add_gaussian_noise(
    tensors: Sequence[torch.Tensor],
    noise_std: float,
    generator: torch.Generator | None,
    *,
    inplace: bool = False,
) -> list[torch.Tensor]:
    """Returns `t + N(0, noise_std^2 I)` for every tensor, drawn from `generator`.

    The noise is drawn in float32 (at least) and cast to each tensor's dtype.
    With `noise_std == 0` the tensors are returned unchanged (no draw).

    Args:
        tensors: The tensors to noise.
        noise_std: Standard deviation of every coordinate's noise, >= 0.
        generator: The torch generator the noise is drawn from.
        inplace: Add the noise into `tensors` themselves, drawn in chunks of
            `_NOISE_CHUNK` values: the noise then never exists as a whole
            (memory: one chunk, not the model's size).
    """
    if noise_std < 0:
        raise ValueError(f"Expected noise_std >= 0. Received: noise_std={noise_std}")
    if noise_std == 0:
        return list(tensors)
    out = []
    for t in tensors:
        draw_dtype = torch.promote_types(t.dtype, torch.float32)
        if inplace and t.is_contiguous():
            flat = t.view(-1)
            for start in range(0, flat.numel(), _NOISE_CHUNK):
                part = flat[start : start + _NOISE_CHUNK]
                noise = torch.randn(
                    part.shape, generator=generator, device=t.device, dtype=draw_dtype
                )
                part.add_(noise.mul_(noise_std).to(t.dtype))
            out.append(t)
            continue
        noise = torch.randn(t.shape, generator=generator, device=t.device, dtype=draw_dtype)
        noise.mul_(noise_std)
        if inplace:
            out.append(t.add_(noise.to(t.dtype)))
        else:  # on the fresh noise buffer: no further tensor of this size
            noise.add_(t)
            out.append(noise if noise.dtype == t.dtype else noise.to(t.dtype))
    return out
