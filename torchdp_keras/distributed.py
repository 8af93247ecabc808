"""Data-parallel DP training over `torch.distributed` (launched with `torchrun`).

When a default process group is initialised (`torch.distributed.init_process_group`,
gloo on CPU, nccl on GPU) before the models and loaders are built, every DP
model and `PrivateDataLoader` trains data-parallel with no other change:

* the weights (and optimizer state) are broadcast from rank 0 before the
  first step, and each rank's update count is checked to be the same;
* a `PrivateDataLoader` draws one Poisson sample of the *global* dataset per
  update, from a seed shared by all ranks (rank 0's), and rank r keeps the
  sampled indices at positions r, r + W, r + 2W, ...: every sampled example
  is trained on by exactly one rank, and q = expected_batch_size / n is the
  global sampling probability the accountant uses;
* each rank clips its own examples; rank 0 alone adds the Gaussian noise to
  its clipped sum; one all-reduce sums the ranks' clipped sums (and, without
  Poisson sampling, their clipping units); every rank divides by the global
  normaliser and applies the same update, so the ranks stay bit-identical
  and the noise is added exactly once per update, whatever the world size;
* the training metrics' state is summed over the ranks every step, so the
  logs (and the epsilon, from identical accountants) agree on every rank.

Collectives time out with the process group's `timeout` (set it in
`init_process_group`): a rank that dies mid-step makes the others fail with
an error instead of waiting forever (gloo also fails at once when a peer's
connection closes).

Example (run with `torchrun --nproc_per_node=2 train.py`; skipped in the doctests,
which run in one process that no torchrun started):
    >>> import torch.distributed as dist  # doctest: +SKIP
    >>> dist.init_process_group("gloo")  # doctest: +SKIP
    >>> loader = PrivateDataLoader(x, y, batch_size=256)  # global batch  # doctest: +SKIP
    >>> model.fit(loader, epochs=3)  # doctest: +SKIP
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch

from torchdp_keras.errors import DPConfigError

__all__ = ["all_reduce_sum_", "broadcast_", "process_group", "shared_entropy", "check_same"]


def process_group() -> tuple[int, int]:
    """`(rank, world_size)` of the default process group; `(0, 1)` without one."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _device() -> torch.device:
    """The device collectives of scalars use: CUDA for nccl, else CPU."""
    backend = torch.distributed.get_backend()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shared_entropy(seed: int | None) -> int:
    """Rank 0's seed (or 128 bits of its OS entropy when `seed` is None), on every rank."""
    _, world = process_group()
    value = seed if seed is not None else secrets.randbits(128)
    if world == 1:
        return value
    words = torch.tensor([(value >> (31 * i)) & (2**31 - 1) for i in range(5)], dtype=torch.int64)
    words = words.to(_device())
    torch.distributed.broadcast(words, src=0)
    return sum(int(w) << (31 * i) for i, w in enumerate(words.cpu().tolist()))


def broadcast_(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Overwrites `tensors` on every rank with rank `src`'s values, in place."""
    for tensor in tensors:
        torch.distributed.broadcast(tensor.data, src=src)


def check_same(value: int, name: str) -> None:
    """Raises on every rank if the ranks hold different values of an int."""
    pair = torch.tensor([value, -value], dtype=torch.int64, device=_device())
    torch.distributed.all_reduce(pair, op=torch.distributed.ReduceOp.MAX)
    high, low = int(pair[0]), -int(pair[1])
    if high != low:
        raise DPConfigError(
            f"Expected the same {name} on every rank (a model restored on some ranks "
            f"only?). Received: {name} between {low} and {high} across ranks"
        )


def all_reduce_sum_(tensors: list[torch.Tensor], scalars: Sequence[float] = ()) -> list[float]:
    """Sums `tensors` (in place) and `scalars` over the ranks in one all-reduce.

    The tensors are packed into one flat buffer (one collective, not one per
    weight), summed, and unpacked; the scalars travel at the end of it.

    Returns:
        The summed scalars.
    """
    if not tensors:
        raise DPConfigError("Expected at least one tensor to all-reduce. Received: []")
    first = tensors[0]
    flat = torch.cat(
        [t.reshape(-1) for t in tensors]
        + [torch.tensor(list(scalars), dtype=first.dtype, device=first.device)]
    )
    torch.distributed.all_reduce(flat)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n
    return [float(v) for v in flat[offset:].tolist()]
