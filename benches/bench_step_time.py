"""Step time of DPSequential against plain keras.Sequential (same process, interleaved).

The model is the CNN of TF Privacy's MNIST tutorial (conv 16x8x8/2 "same",
maxpool 2/1, conv 32x4x4/2, maxpool 2/1, dense 32, dropout 0.5, dense 10) at
batch 250. Every round runs one plain Keras step and one DP step per clipping
mode ("auto": fast clipping, "vmap": per-example gradients) on the same
batch, in rotating order; the report gives each median step time and the
median per-round ratio to plain Keras. Exit status 1 if the fast path's
ratio is above `--max-ratio`.

    python benches/bench_step_time.py --data ../shared/data/mnist.npz
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _timing import (  # noqa: E402
    add_timing_arguments,
    finish,
    interleaved,
    print_table,
    reexec_with_tuned_malloc,
    summarize,
)
from keras import layers  # noqa: E402

import torchdp_keras as tdk  # noqa: E402

DEFAULT_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist.npz")
PLAIN = "plain keras.Sequential"


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


def compile_model(model, jit=False, learning_rate=0.25):
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit,
    )
    return model


def keras_contenders(batch_size=250, jit=False, modes=("auto", "vmap")):
    """Plain Keras and DPSequential per clipping mode, all with the same weights."""
    plain = compile_model(keras.Sequential(tutorial_layers()), jit)
    models = {PLAIN: plain}
    for mode in modes:
        private = tdk.DPSequential(
            tutorial_layers(), l2_norm_clip=1.5, noise_multiplier=1.3, seed=0, clipping_mode=mode
        )
        private.set_weights(plain.get_weights())
        models[f"DPSequential ({mode})"] = compile_model(private, jit)
    return models


def main(argv=None) -> dict[str, tuple[float, float]]:
    """Runs the benchmark; returns `{name: (ms per step, ratio to plain Keras)}`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help="MNIST .npz in keras layout")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--jit", action="store_true", help="jit_compile=True for all")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--dtype-policy",
        choices=("float32", "mixed_bfloat16", "mixed_float16"),
        default="float32",
        help="Keras dtype policy of every model (mixed_float16: loss scaling as compile sets it)",
    )
    add_timing_arguments(parser, steps=60, warmup=5, max_ratio=1.3)
    args = parser.parse_args(argv)
    if args.tuned_malloc and argv is None:
        reexec_with_tuned_malloc()
    keras.config.set_dtype_policy(args.dtype_policy)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = keras_contenders(args.batch_size, args.jit)
    batches = load_batches(args.data, args.batch_size, args.warmup + args.steps)
    steps = {
        name: (lambda i, m=model: m.train_on_batch(*batches[i])) for name, model in models.items()
    }
    summary = summarize(interleaved(steps, args.steps, args.warmup), PLAIN)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print_table(
        f"Tutorial CNN, batch {args.batch_size}, {device}, {torch.get_num_threads()} threads, "
        f"{args.steps} rounds, jit={args.jit}, {args.dtype_policy}",
        summary,
        PLAIN,
    )
    return finish(summary, "DPSequential (auto)", args.max_ratio, "fast-path ratio", args.json)


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
