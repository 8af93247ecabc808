"""Temporary adjustments of Keras's torch backend for per-example calls.

Two behaviours of Keras 3 on torch stop `torch.func.vmap` from running a
model one example at a time:

* Keras converts convolution inputs and kernels to the `channels_last`
  memory format; vmap rejects memory-format conversions of batched tensors.
  Inside the context the tensors keep their layout (the numbers are the same).
* Keras's seeded random ops (a layer built with `seed=`) draw from a fresh
  `torch.Generator` made from the layer's `SeedGenerator`; a generator
  argument gives every example of a vmap the same mask. Inside the context
  the `SeedGenerator` still advances exactly as in Keras (so later calls never
  repeat a mask), but the numbers come from torch's default generator, which
  `vmap(randomness="different")` splits into one stream per example. That
  default generator is forked and seeded from the DP model's own generator,
  so runs with a fixed `seed` are reproducible and the caller's global RNG
  state is left exactly as it was.

Everything is restored when the context exits, also on error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from torchdp_keras import _keras_compat as keras_compat


def _keep_memory_format(tensor):
    return tensor


def _advance_seed_and_use_default_generator(seed):
    keras_compat.draw_seed(seed)  # advances the SeedGenerator's state as Keras would
    return None  # torch random ops then draw from the default generator


@contextlib.contextmanager
def per_example_call_context(device: torch.device, rng_seed: int) -> Iterator[None]:
    """Runs the enclosed Keras calls in a vmap-compatible, restorable state.

    Args:
        device: The device the model runs on; its default generator is forked.
        rng_seed: Seed of the forked default generator(s) inside the context.
    """
    patches = [
        (
            keras_compat.keras_torch_random,
            "torch_seed_generator",
            _advance_seed_and_use_default_generator,
        ),
    ]
    channels_last = keras_compat.channels_last_conversion_target()
    if channels_last is not None:  # Keras < 3.14 never converts the layout
        patches.insert(0, (*channels_last, _keep_memory_format))
    cuda_devices = []
    if device.type == "cuda":
        cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda_devices):
        torch.default_generator.manual_seed(rng_seed)
        if cuda_devices:
            with torch.cuda.device(cuda_devices[0]):
                torch.cuda.manual_seed(rng_seed)
        originals = [(module, name, getattr(module, name)) for module, name, _ in patches]
        try:
            for module, name, replacement in patches:
                setattr(module, name, replacement)
            yield
        finally:
            for module, name, original in originals:
                setattr(module, name, original)
