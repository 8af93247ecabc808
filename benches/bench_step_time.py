"""Step time of DPSequential against plain keras.Sequential (same process, interleaved).

The model is the CNN of TF Privacy's MNIST tutorial (conv 16x8x8/2, maxpool,
conv 32x4x4/2, maxpool, dense 32, dropout 0.5, dense 10) at batch 250. Every
round runs one plain Keras step and one DP step per clipping mode ("auto":
fast clipping, "vmap": per-example gradients) on the same batch, in rotating
order, so all see the same machine state; the report gives the median of each
and its ratio to plain Keras.

    python benches/bench_step_time.py --data ../shared/data/mnist.npz
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from keras import layers  # noqa: E402

import torchdp_keras as tdk  # noqa: E402

DEFAULT_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist.npz")


def tutorial_layers():
    return [
        keras.Input((28, 28, 1)),
        layers.Conv2D(16, 8, strides=2, padding="same", activation="relu"),
        layers.MaxPool2D(2, 1),
        layers.Conv2D(32, 4, strides=2, padding="valid", activation="relu"),
        layers.MaxPool2D(2, 1),
        layers.Flatten(),
        layers.Dense(32, activation="relu"),
        layers.Dropout(0.5),
        layers.Dense(10),
    ]


def load_batches(path, batch_size, count):
    if path and os.path.exists(path):
        with np.load(path) as data:
            x, y = data["x_train"], data["y_train"]
    else:
        (x, y), _ = keras.datasets.mnist.load_data()
    x = (x[..., None] / 255.0).astype("float32")
    y = y.astype("int32")
    batches = []
    for i in range(count):
        start = (i * batch_size) % (len(x) - batch_size)
        batches.append((x[start : start + batch_size], y[start : start + batch_size]))
    return batches


def compile_model(model, jit):
    model.compile(
        optimizer=keras.optimizers.SGD(0.25),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit,
    )
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help="MNIST .npz in keras layout")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--steps", type=int, default=60, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--jit", action="store_true", help="jit_compile=True for both")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    plain = compile_model(keras.Sequential(tutorial_layers()), args.jit)
    models = {"plain keras.Sequential": plain}
    for mode in ("auto", "vmap"):
        private = tdk.DPSequential(
            tutorial_layers(), l2_norm_clip=1.5, noise_multiplier=1.3, seed=0, clipping_mode=mode
        )
        private.set_weights(plain.get_weights())
        models[f"DPSequential ({mode})"] = compile_model(private, args.jit)
    batches = load_batches(args.data, args.batch_size, args.warmup + args.steps)

    names = list(models)
    times = {name: [] for name in names}
    for i, (x, y) in enumerate(batches):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            start = time.perf_counter()
            models[name].train_on_batch(x, y)
            elapsed = time.perf_counter() - start
            if i >= args.warmup:
                times[name].append(elapsed)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(
        f"device={device} threads={torch.get_num_threads()} batch={args.batch_size} "
        f"rounds={args.steps} jit={args.jit}"
    )
    plain_ms = 1e3 * statistics.median(times[names[0]])
    ratios = {}
    for name in names:
        ms = 1e3 * statistics.median(times[name])
        ratios[name] = ms / plain_ms
        print(f"{name:24s}: {ms:8.2f} ms/step (median)   {ratios[name]:5.2f}x plain")
    return ratios["DPSequential (auto)"]


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
