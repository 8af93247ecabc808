"""Fused clip-and-noise ops: the `csrc/` kernels when built, pure torch otherwise.

    clip_and_noise(per_example_grads, l2_norm_clip, noise_std, *, seed=None, offset=0)
        sum_i min(1, C / ||g_i||) g_i + N(0, noise_std^2 I), per tensor
    clipped_sum_and_norms(per_example_grads, l2_norm_clip)
        (the clipped sums, the per-example squared norms in float64)
    add_noise_and_scale_(tensors, noise_std, scale, *, seed=None, offset=0)
        t <- (t + N(0, noise_std^2 I)) * scale, in place
    add_secure_noise_and_scale_(tensors, noise_std, scale)
        the same with noise from the OS CSPRNG (secure mode, never seeded)

`per_example_grads` is a list of tensors of shape (B, ...); example i's norm
is taken over row i of all of them together, and clipped with the same
factor and margin as `clip_noise.clip_factors`.

Noise: with the extension, noise number n of a call is a Philox4x32-10
normal of `(seed, offset + n)` (n runs over the elements of the tensors in
order), identical on CPU and CUDA: the same `(seed, offset)` gives the same
noise, and calls whose `[offset, offset + numel)` ranges do not overlap get
independent noise. Without it, the noise comes from a torch generator seeded
from `(seed, offset)` (the same properties, another stream). `seed=None`
draws a fresh 63-bit seed from the operating system.

Guarantee: every clipped example contributes a vector of norm at most
`l2_norm_clip` (float64 norms, relative margin 1e-6); noise is added to every
coordinate once per call.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Sequence
from typing import Any

import torch

from torchdp_keras._validation import check_int, check_l2_norm_clip, check_noise_multiplier
from torchdp_keras.ops.clip_noise import add_gaussian_noise, clip_factors, per_unit_squared_norms

logger = logging.getLogger(__name__)

# Values of secure noise drawn on the host at once.
_SECURE_CHUNK = 1 << 20
_OPS = ("clipped_sum", "add_noise_and_scale_", "clip_and_noise")
_STATE: dict = {}


def _load() -> dict:
    if _STATE:
        return _STATE
    state: dict[str, Any] = {
        "loaded": False,
        "cpu": False,
        "cuda": False,
        "cpu_one_read_bytes": None,
        "cpu_l2_bytes": None,
        "reason": "",
    }
    if os.environ.get("TORCHDP_KERAS_DISABLE_EXT") == "1":
        state["reason"] = "disabled by TORCHDP_KERAS_DISABLE_EXT=1"
    else:
        try:
            from torchdp_keras import _C  # registers torch.ops.torchdp_keras.*
        except ImportError as error:
            state["reason"] = (
                f"not built ({error}); reinstall with `pip install --no-build-isolation` "
                "to compile csrc/ against the installed torch"
            )
        else:
            has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
            state["loaded"] = True
            state["cpu"] = has_kernel("torchdp_keras::clipped_sum", "CPU")
            state["cuda"] = has_kernel("torchdp_keras::clipped_sum", "CUDA")
            state["cpu_one_read_bytes"] = int(_C.cpu_one_read_bytes())
            state["cpu_l2_bytes"] = int(_C.cpu_l2_bytes()) or None
            state["reason"] = "loaded" + (" with CUDA kernels" if state["cuda"] else " (CPU only)")
            _register_fakes()
    if state["loaded"]:
        logger.info("torchdp_keras fused kernels: %s", state["reason"])
    else:
        logger.info(
            "torchdp_keras fused kernels: %s; using the pure-torch reference", state["reason"]
        )
    _STATE.update(state)
    return _STATE


def _register_fakes() -> None:
    """Shapes for torch.compile / FakeTensor tracing of the three ops."""

    def clipped_sum_fake(grads, l2_norm_clip):
        sums = [g.new_empty(g.shape[1:]) for g in grads]
        return sums, grads[0].new_empty((grads[0].shape[0],), dtype=torch.float64)

    def add_noise_and_scale_fake(tensors, noise_std, scale, seed, offset):
        return None

    def clip_and_noise_fake(grads, l2_norm_clip, noise_std, seed, offset):
        return [g.new_empty(g.shape[1:]) for g in grads]

    for name, fake in zip(_OPS, (clipped_sum_fake, add_noise_and_scale_fake, clip_and_noise_fake)):
        torch.library.register_fake(f"torchdp_keras::{name}")(fake)


def extension_info() -> dict:
    """What is loaded: `{"loaded", "cpu", "cuda", "cpu_one_read_bytes", "cpu_l2_bytes", "reason"}`.

    `cpu_one_read_bytes` is the largest example (all its rows, in bytes) that
    the CPU clipped sum reads once from memory: half the last-level cache as
    Linux reports it (the example and the sum must fit in it together), at
    most 64 MiB; larger examples take two reads (norms, then one gemv). 0 when
    torch's CPU parallel backend is not OpenMP (the one-read kernel's barrier
    needs all threads of a parallel region running at once). `cpu_l2_bytes`
    is one core's L2 cache as the kernel sees it (it sizes the groups of
    examples per barrier), None if unknown. Both None without the extension.

    Example:
        >>> info = torchdp_keras.ops.extension_info()
        >>> sorted(info)
        ['cpu', 'cpu_l2_bytes', 'cpu_one_read_bytes', 'cuda', 'loaded', 'reason']
        >>> info["reason"]  # e.g. 'loaded (CPU only)', or why the kernels did not load
        '...'
    """
    return dict(_load())


def _use_kernel(tensors: Sequence[torch.Tensor]) -> bool:
    state = _load()
    if not state["loaded"] or not tensors:
        return False
    device = tensors[0].device.type
    return (
        state.get(device, False)
        and all(t.dtype in (torch.float32, torch.float64) for t in tensors)
        and len({t.dtype for t in tensors}) == 1
        and all(t.device == tensors[0].device for t in tensors)
    )


def _check(l2_norm_clip=None, noise_std=None, offset=0, grads=None):
    if grads is not None and not grads:
        raise ValueError("Expected at least one gradient tensor. Received: per_example_grads=[]")
    if l2_norm_clip is not None:
        check_l2_norm_clip(l2_norm_clip)
    if noise_std is not None:
        check_noise_multiplier(noise_std, "noise_std")
    check_int(offset, "offset", minimum=0)


def _seed(seed: int | None) -> int:
    if seed is None:
        return secrets.randbits(63)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ValueError(f"Expected seed to be an int in [0, 2**63). Received: seed={seed!r}")
    return seed


# --------------------------------------------------------------- pure torch ---
def reference_clipped_sum_and_norms(grads, l2_norm_clip):
    """One norm pass (float64, blocked) and one `mv` pass per tensor."""
    batch = grads[0].shape[0]
    squared = per_unit_squared_norms(grads)
    factors = clip_factors(squared, l2_norm_clip)
    sums = [
        torch.mv(g.reshape(batch, -1).t(), factors.to(g.dtype)).reshape(g.shape[1:]) for g in grads
    ]
    return sums, squared


def reference_add_noise_and_scale_(tensors, noise_std, scale, seed, offset):
    """The fallback noise: torch's sampler from a generator seeded by (seed, offset).

    In place and in chunks (`clip_noise.add_gaussian_noise`), so that no
    model-sized noise tensor exists.
    """
    if noise_std > 0 and tensors:
        generator = torch.Generator(device=tensors[0].device)
        generator.manual_seed(hash((seed, offset)) & (2**63 - 1))
        with torch.no_grad():
            add_gaussian_noise(tensors, noise_std, generator, inplace=True)
    if scale != 1:
        with torch.no_grad():
            for t in tensors:
                t.mul_(scale)


# ------------------------------------------------------------------- public ---
def clipped_sum_and_norms(
    per_example_grads: Sequence[torch.Tensor], l2_norm_clip: float
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Clipped sums `sum_i min(1, C/||g_i||) g_i` and the squared norms `||g_i||^2`.

    Example:
        >>> sums, sq = clipped_sum_and_norms([torch.ones(4, 3)], 1.0)
        >>> sq
        tensor([3., 3., 3., 3.], dtype=torch.float64)
    """
    grads = list(per_example_grads)
    _check(l2_norm_clip=l2_norm_clip, grads=grads)
    if _use_kernel(grads):
        sums, squared = torch.ops.torchdp_keras.clipped_sum(grads, float(l2_norm_clip))
        return list(sums), squared
    return reference_clipped_sum_and_norms(grads, l2_norm_clip)


def add_noise_and_scale_(
    tensors: Sequence[torch.Tensor],
    noise_std: float,
    scale: float = 1.0,
    *,
    seed: int | None = None,
    offset: int = 0,
    portable: bool = True,
) -> list[torch.Tensor]:
    """`t <- (t + N(0, noise_std^2 I)) * scale` for every tensor, in place.

    Args:
        tensors: The tensors to noise and scale.
        noise_std: Standard deviation of every coordinate's noise, >= 0.
        scale: Applied after the noise.
        seed: Key of the noise stream; None draws one from the OS.
        offset: Index of the first noise number of this call in the stream.
        portable: Use the kernel's Philox stream (bit-identical on CPU and
            CUDA) when the extension is loaded; it is also the faster one
            (on CPU about 1.7x torch's sampler here, see benches/). False takes
            torch's own sampler from a generator seeded with (seed, offset),
            equally Gaussian, another stream.

    Returns the same tensors. Non-contiguous tensors and dtypes other than
    float32/float64 use the reference.
    """
    tensors = list(tensors)
    _check(noise_std=noise_std, offset=offset)
    seed = _seed(seed)
    if portable and _use_kernel(tensors) and all(t.is_contiguous() for t in tensors):
        torch.ops.torchdp_keras.add_noise_and_scale_(
            tensors, float(noise_std), float(scale), seed, offset
        )
    else:
        reference_add_noise_and_scale_(tensors, noise_std, scale, seed, offset)
    return tensors


def add_secure_noise_and_scale_(
    tensors: Sequence[torch.Tensor], noise_std: float, scale: float = 1.0
) -> list[torch.Tensor]:
    """`t <- (t + N(0, noise_std^2 I)) * scale` in place, with secure noise.

    The noise comes from `torchdp_keras.secure_random.secure_gaussian`: the
    operating system's CSPRNG, Box-Muller in float64, 4 normals summed per
    value against floating-point attacks. It is drawn on the host in chunks
    of 2^20 values (never a model-sized host buffer) and copied to each
    tensor's device and dtype. There is no seed: nothing can reproduce or predict it.

    Example:
        >>> t = [torch.zeros(3)]
        >>> _ = add_secure_noise_and_scale_(t, 1.0, 0.5)  # t[0] ~ N(0, 0.25)
    """
    from torchdp_keras.secure_random import secure_gaussian

    tensors = list(tensors)
    _check(noise_std=noise_std)
    with torch.no_grad():
        for t in tensors:
            if noise_std > 0:
                # A strided tensor gets its noise through a contiguous buffer.
                target = (
                    t if t.is_contiguous() else torch.zeros(t.shape, dtype=t.dtype, device=t.device)
                )
                flat = target.view(-1)
                for start in range(0, flat.numel(), _SECURE_CHUNK):
                    part = flat[start : start + _SECURE_CHUNK]
                    noise = torch.from_numpy(secure_gaussian(part.numel(), noise_std))
                    part.add_(noise.to(device=t.device, dtype=t.dtype))
                if target is not t:
                    t.add_(target)
            if scale != 1:
                t.mul_(scale)
    return tensors


def clip_and_noise(
    per_example_grads: Sequence[torch.Tensor],
    l2_norm_clip: float,
    noise_std: float,
    *,
    seed: int | None = None,
    offset: int = 0,
) -> list[torch.Tensor]:
    """`sum_i min(1, C/||g_i||) g_i + N(0, noise_std^2 I)` for every tensor.

    Args:
        per_example_grads: Tensors of shape (B, ...); row i of all of them is
            example i's gradient.
        l2_norm_clip: C > 0.
        noise_std: Standard deviation of the noise on every coordinate, >= 0.
        seed: Key of the noise stream (an int in [0, 2**63)); None draws one
            from the operating system.
        offset: Index of the first noise number of this call in the stream.

    Example:
        >>> out = clip_and_noise([torch.ones(4, 3)], 1.0, 0.0)
        >>> out[0]  # four examples of norm sqrt(3), each clipped to norm 1
        tensor([2.3094, 2.3094, 2.3094])
    """
    grads = list(per_example_grads)
    _check(l2_norm_clip=l2_norm_clip, noise_std=noise_std, offset=offset, grads=grads)
    seed = _seed(seed)
    if _use_kernel(grads):
        return list(
            torch.ops.torchdp_keras.clip_and_noise(
                grads, float(l2_norm_clip), float(noise_std), seed, offset
            )
        )
    sums, _ = reference_clipped_sum_and_norms(grads, l2_norm_clip)
    reference_add_noise_and_scale_(sums, noise_std, 1.0, seed, offset)
    return sums
