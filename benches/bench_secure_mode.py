"""The cost of secure_mode=True: OS-CSPRNG noise and sampling against the seeded streams.

Three measurements, each side by side in this process:

* noise alone: `add_noise_and_scale_` (seeded counter-based stream, fused
  kernel when built) against `add_secure_noise_and_scale_` (os.urandom,
  Box-Muller in float64, 4 normals summed per value) on `--params` floats;
* Poisson sampling of one update over n = 60,000 examples: seeded
  `PoissonSampler` against `PoissonSampler(secure_mode=True)`;
* a whole DP step (train_on_batch) of the TF Privacy tutorial CNN (26k
  weights, batch 250) and of an MLP with about 1.2M weights (batch 64):
  `DPSequential(seed=0)` against `DPSequential(secure_mode=True)`, same
  weights, interleaved rounds.

The secure noise costs about 32 random bytes and 4 Box-Muller normals per
weight, so its share grows with the number of weights and shrinks with the
cost of the forward and backward pass. Exits 1 if the tutorial-CNN step is
more than `--max-ratio` times slower in secure mode.

    python benches/bench_secure_mode.py
    python benches/bench_secure_mode.py --steps 10 --json out.json
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import torch  # noqa: E402
from _timing import (  # noqa: E402
    add_timing_arguments,
    interleaved,
    print_table,
    reexec_with_tuned_malloc,
    summarize,
    write_summary,
)
from bench_step_time import DEFAULT_DATA, compile_model, load_batches, tutorial_layers  # noqa: E402
from keras import layers  # noqa: E402

import torchdp_keras as tdk  # noqa: E402
from torchdp_keras.data import PoissonSampler  # noqa: E402
from torchdp_keras.ops import add_noise_and_scale_, add_secure_noise_and_scale_  # noqa: E402

SEEDED, SECURE = "seeded", "secure_mode=True"


def noise_times(params: int, rounds: int) -> dict[str, tuple[float, float]]:
    tensors = [torch.zeros(params)]
    steps = {
        SEEDED: lambda i: add_noise_and_scale_(tensors, 1.0, 0.5, seed=i),
        SECURE: lambda i: add_secure_noise_and_scale_(tensors, 1.0, 0.5),
    }
    return summarize(interleaved(steps, rounds, 1), SEEDED)


def sampling_times(rounds: int) -> dict[str, tuple[float, float]]:
    seeded = PoissonSampler(60_000, 256, seed=0)
    secure = PoissonSampler(60_000, 256, secure_mode=True)
    steps = {SEEDED: lambda i: seeded.sample(0, i), SECURE: lambda i: secure.sample(0, i)}
    return summarize(interleaved(steps, rounds, 2), SEEDED)


def mlp_layers():
    return [
        keras.Input((28, 28, 1)),
        layers.Flatten(),
        layers.Dense(1024, activation="relu"),
        layers.Dense(384, activation="relu"),
        layers.Dense(10),
    ]


def step_times(make_layers, batches, rounds, warmup) -> tuple[dict, int]:
    """(summary, number of weights) of the seeded and secure DP steps."""
    seeded = tdk.DPSequential(make_layers(), l2_norm_clip=1.0, noise_multiplier=1.1, seed=0)
    secure = tdk.DPSequential(
        make_layers(), l2_norm_clip=1.0, noise_multiplier=1.1, secure_mode=True
    )
    secure.set_weights(seeded.get_weights())
    models = {SEEDED: compile_model(seeded), SECURE: compile_model(secure)}
    steps = {name: (lambda i, m=m: m.train_on_batch(*batches[i])) for name, m in models.items()}
    return summarize(interleaved(steps, rounds, warmup), SEEDED), seeded.count_params()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help="MNIST .npz in keras layout")
    parser.add_argument("--params", type=int, default=1 << 22, help="floats in the noise bench")
    add_timing_arguments(parser, steps=20, warmup=3, max_ratio=1.5)
    args = parser.parse_args(argv)
    if args.tuned_malloc and argv is None:
        reexec_with_tuned_malloc()
    keras.utils.set_random_seed(0)
    summary = {}
    summary["noise"] = noise_times(args.params, max(3, args.steps // 4))
    print_table(f"Noise on {args.params} floats", summary["noise"], SEEDED)
    ns_per_value = 1e6 * summary["noise"][SECURE][0] / args.params
    print(f"  secure noise: {ns_per_value:.0f} ns per value")
    summary["secure_ns_per_value"] = ns_per_value
    summary["sampling"] = sampling_times(args.steps * 5)
    print_table("Poisson sample of 60,000 examples, q = 256/60000", summary["sampling"], SEEDED)
    total = args.warmup + args.steps
    for key, title, make_layers, batch in (
        ("tutorial_cnn", "Tutorial CNN DP step, batch 250", tutorial_layers, 250),
        ("mlp", "MLP DP step, batch 64", mlp_layers, 64),
    ):
        timed, weights = step_times(
            make_layers, load_batches(args.data, batch, total), args.steps, args.warmup
        )
        print_table(f"{title} ({weights} weights)", timed, SEEDED)
        summary[key] = {**timed, "weights": weights}
    ratio = summary["tutorial_cnn"][SECURE][1]
    summary["passed"] = ratio <= args.max_ratio
    if not summary["passed"]:
        print(f"FAIL: secure tutorial-CNN step {ratio:.2f}x is above --max-ratio {args.max_ratio}")
    if args.json:
        write_summary(args.json, summary)
    return summary


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
