"""Poisson sampling and batch-size buckets (numpy only).

DP-SGD's privacy analysis (and every epsilon torchdp_keras reports) assumes
Poisson sampling: at every step each of the n examples is included
independently with probability q. The batch size is then random
(Binomial(n, q)), so batches are padded up to one of a few bucket sizes, which
keeps the set of shapes the model sees small.

Draws are a pure function of `(entropy, epoch, step)`: the same seed gives
the same batches, in any order of access, and different steps use
independent streams (numpy's SeedSequence spawning). In secure mode every
draw comes from the OS CSPRNG instead (`torchdp_keras.secure_random`) and
nothing is reproducible.
"""

from __future__ import annotations

import math
import secrets

import numpy as np

from torchdp_keras._validation import check_int, check_secure_mode
from torchdp_keras.errors import DPConfigError
from torchdp_keras.secure_random import secure_poisson_sample


class PoissonSampler:
    """Draws Poisson samples of `range(num_examples)` with rate q = expected / n.

    Args:
        num_examples: n, the dataset size.
        expected_batch_size: The expected number of examples per draw; q =
            expected_batch_size / num_examples.
        seed: Seed (int >= 0) for reproducible draws; None: OS entropy.
        secure_mode: Draw every sample from the OS CSPRNG (no seed allowed).

    Example:
        >>> sampler = PoissonSampler(1000, 50, seed=0)
        >>> batch = sampler.sample(epoch=0, step=0)  # sorted indices, ~50 of them
        >>> sampler.sampling_probability
        0.05
    """

    def __init__(
        self,
        num_examples: int,
        expected_batch_size: int,
        *,
        seed: int | None = None,
        secure_mode: bool = False,
    ):
        self.num_examples = check_int(num_examples, "num_examples", 1)
        self.expected_batch_size = check_int(expected_batch_size, "expected_batch_size", 1)
        if self.expected_batch_size > self.num_examples:
            raise DPConfigError(
                "Expected expected_batch_size <= num_examples. Received: "
                f"expected_batch_size={expected_batch_size}, num_examples={num_examples}"
            )
        if seed is not None:
            seed = check_int(seed, "seed", 0)
        self.secure_mode = check_secure_mode(secure_mode, seed)
        self.seed = seed
        self._entropy = seed if seed is not None else secrets.randbits(128)

    @property
    def sampling_probability(self) -> float:
        """q, the probability that an example is in a draw."""
        return self.expected_batch_size / self.num_examples

    def sample(self, epoch: int, step: int) -> np.ndarray:
        """Sorted indices of the examples included at `(epoch, step)`."""
        if self.secure_mode:
            return secure_poisson_sample(self.num_examples, self.sampling_probability)
        sequence = np.random.SeedSequence([self._entropy, epoch, step])
        rng = np.random.Generator(np.random.PCG64(sequence))
        return np.flatnonzero(rng.random(self.num_examples) < self.sampling_probability)


def padded_size(size: int, expected_batch_size: int, max_size: int) -> int:
    """The bucket a draw of `size` examples is padded to.

    Buckets are the multiples of `g = ceil(expected_batch_size / 8)` (capped at
    `max_size`): the binomial spread of the batch size (about
    sqrt(expected)) then covers a handful of shapes, and padding wastes less
    than `g` rows. An empty draw gets the smallest bucket.

    Example:
        >>> padded_size(0, 64, 1000), padded_size(61, 64, 1000), padded_size(70, 64, 1000)
        (8, 64, 72)
    """
    granularity = max(1, math.ceil(expected_batch_size / 8))
    if size > max_size:
        raise DPConfigError(f"Expected a batch of at most {max_size} examples. Received: {size}")
    return min(max_size, max(1, math.ceil(size / granularity)) * granularity)
