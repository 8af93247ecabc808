"""Step time of a small transformer text classifier: DPModel against plain Keras.

The model: Embedding(20000, 128), two blocks of MultiHeadAttention(4 heads
of 32) + residual + LayerNormalization + Dense(256, relu) + Dense(128) +
residual + LayerNormalization, average pooling and a 2-way Dense head; token
sequences of length 128 at batch 64 (random token ids: only time is measured).
Plain `keras.Model` and `DPModel` (fast clipping, "auto") have the same
initial weights and run on the same batches, interleaved round by round.
Exit status 1 if the DP/plain ratio is above `--max-ratio`.

    python benches/bench_transformer.py
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

PLAIN = "plain keras.Model"


def classifier_graph(vocab, length, dim=128, heads=4, blocks=2, hidden=256, classes=2):
    tokens = keras.Input((length,), dtype="int32")
    h = layers.Embedding(vocab, dim)(tokens)
    for _ in range(blocks):
        attended = layers.MultiHeadAttention(heads, dim // heads)(h, h)
        h = layers.LayerNormalization()(layers.Add()([h, attended]))
        f = layers.Dense(hidden, activation="relu")(h)
        h = layers.LayerNormalization()(layers.Add()([h, layers.Dense(dim)(f)]))
    return tokens, layers.Dense(classes)(layers.GlobalAveragePooling1D()(h))


def main(argv=None) -> dict:
    """Runs the benchmark; returns `{name: (ms per step, ratio to plain Keras)}`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=20000)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--dtype-policy",
        choices=("float32", "mixed_bfloat16", "mixed_float16"),
        default="float32",
        help="Keras dtype policy of every model (mixed_float16: loss scaling as compile sets it)",
    )
    add_timing_arguments(parser, steps=30, warmup=3, max_ratio=1.4)
    args = parser.parse_args(argv)
    if args.tuned_malloc and argv is None:
        reexec_with_tuned_malloc()
    keras.config.set_dtype_policy(args.dtype_policy)
    keras.utils.set_random_seed(0)

    def compiled(model):
        model.compile(
            optimizer=keras.optimizers.SGD(0.05),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        return model

    plain = compiled(keras.Model(*classifier_graph(args.vocab, args.length)))
    private = compiled(
        tdk.DPModel(
            *classifier_graph(args.vocab, args.length),
            l2_norm_clip=1.0,
            noise_multiplier=1.0,
            seed=0,
        )
    )
    private.set_weights(plain.get_weights())
    rng = np.random.default_rng(0)
    batches = [
        (
            rng.integers(0, args.vocab, size=(args.batch_size, args.length)).astype("int32"),
            rng.integers(0, 2, size=(args.batch_size,)).astype("int32"),
        )
        for _ in range(args.warmup + args.steps)
    ]
    steps = {
        PLAIN: lambda i: plain.train_on_batch(*batches[i]),
        "DPModel (auto)": lambda i: private.train_on_batch(*batches[i]),
    }
    summary = summarize(interleaved(steps, args.steps, args.warmup), PLAIN)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print_table(
        f"Transformer classifier (vocab {args.vocab}, length {args.length}), batch "
        f"{args.batch_size}, {device}, {torch.get_num_threads()} threads, {args.steps} rounds, "
        f"{args.dtype_policy}",
        summary,
        PLAIN,
    )
    slow = private.clipping_plan().slow_layers
    if slow:
        print("layers on per-example gradients:", ", ".join(slow))
    return finish(summary, "DPModel (auto)", args.max_ratio, "DP/plain ratio", args.json)


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
