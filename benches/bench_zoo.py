"""The models users bring: DP/plain step time and peak memory, and which engine each takes.

Rows (random weights built from configs, random data: only time and memory
are measured; nothing is downloaded):

* `tutorial`: TF Privacy's MNIST tutorial as written (the example's
  subclassed `Classifier`, a `torchdp_keras.Model`),
  `DPGradientDescentGaussianOptimizer` with `num_microbatches=250`, an
  unreduced loss, batch 250. Plain: the same network as a `keras.Sequential`.
  Also timed: the same network as `DPSequential` (the subclass should match it).
* with keras_hub installed (`pip install ".[hub]"`), at their default dropout:
  `bert`: `BertBackbone` + Dense head (classification);
  `gpt2_lora`: `GPT2Backbone.enable_lora(4)` + head;
  `gpt2_causal_lm`: `GPT2CausalLM` (tied input/output embedding).
* layers (issue 23), each a Keras model made private with `make_private`
  and its plain twin:
  `bilstm`, `gru`, `simple_rnn`: text classifiers (vocabulary 10000,
  embedding 64 with `mask_zero=True`, sequences of 80 tokens zero-padded to
  random lengths, batch 64) with `Bidirectional(LSTM(64))`, `GRU(64)`,
  `SimpleRNN(64)`;
  `separable`: SeparableConv2D stack on 32x32x3 (batch 64);
  `conv_transpose`: a Conv2D/Conv2DTranspose autoencoder on 32x32x3 (batch 64);
  `mobilenet_v2`: `keras.applications.MobileNetV2(alpha=0.35)` at 32x32
  after `fix` (batch 32); `resnet50`: `keras.applications.ResNet50` at
  32x32 after `fix` (batch 32).
* `--gpt2-small`: GPT-2 small's shape (12 layers, hidden 768, vocabulary
  50257, sequence 128, batch 8) with `enable_lora(rank=8)`, a causal LM.

Each row times the DP model and its plain twin interleaved round by round
(`_timing.interleaved`), measures the peak resident memory of each one's
first two steps above the process's memory before them, in a fresh process
per model (Linux `VmHWM`; optimizer state and the step's temporaries, the
model's weights excluded), and prints the DP model's
`clipping_plan()` engine and slow layers. Exit status 1 if a row is above
`--max-ratio` (time) or falls back to the whole-model engine.

    python benches/bench_zoo.py
    python benches/bench_zoo.py --gpt2-small --steps 3 --warmup 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from _timing import add_timing_arguments, interleaved, summarize  # noqa: E402
from bench_memory import rss_bytes  # noqa: E402
from bench_step_time import tutorial_layers  # noqa: E402
from keras import layers  # noqa: E402

import torchdp_keras as tdk  # noqa: E402
from torchdp_keras.optimizers import DPGradientDescentGaussianOptimizer  # noqa: E402


def peak_step_bytes(step) -> int | None:
    """Peak resident memory during `step()` above the memory before it (Linux)."""
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    before = rss_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM to the current resident set
    step()
    return rss_bytes("VmHWM") - before


def tutorial_case(rng):
    """The notebook's `Classifier` (from the example), its plain and DPSequential twins."""
    import importlib.util

    path = os.path.join(os.path.dirname(HERE), "examples", "tf_privacy_mnist_tutorial.py")
    spec = importlib.util.spec_from_file_location("tf_privacy_mnist_tutorial", path)
    tutorial = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tutorial)
    x = rng.random((250, 28, 28, 1), dtype=np.float32)
    y = keras.utils.to_categorical(rng.integers(0, 10, 250), 10)
    vector_loss = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)
    dp = tutorial.Classifier()
    dp(x[:1])
    dp.compile(
        optimizer=DPGradientDescentGaussianOptimizer(
            l2_norm_clip=1.5, noise_multiplier=1.3, num_microbatches=250, learning_rate=0.25
        ),
        loss=vector_loss,
    )
    plain = keras.Sequential(tutorial_layers())
    plain.compile(
        optimizer=keras.optimizers.SGD(0.25),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
    )
    sequential = tdk.DPSequential(
        tutorial_layers(), l2_norm_clip=1.5, noise_multiplier=1.3, num_microbatches=250
    )
    sequential.compile(optimizer=keras.optimizers.SGD(0.25), loss=vector_loss)
    return {"DP": dp, "plain": plain, "DPSequential": sequential}, x, y


def hub_case(name, rng, *, batch, length, vocab, hidden, num_layers, heads, lora_rank):
    import keras_hub

    def build():
        keras.utils.set_random_seed(0)
        config = dict(
            vocabulary_size=vocab,
            num_layers=num_layers,
            num_heads=heads,
            hidden_dim=hidden,
            intermediate_dim=4 * hidden,
            max_sequence_length=length,
        )
        if name == "bert":
            backbone = keras_hub.models.BertBackbone(**config)
        else:
            backbone = keras_hub.models.GPT2Backbone(**config)
        if lora_rank:
            backbone.enable_lora(lora_rank)
        if name.endswith("causal_lm"):
            return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
        inputs = {key: keras.Input((length,), dtype="int32") for key in backbone.input}
        features = backbone(inputs)
        pooled = (
            features["pooled_output"]
            if name == "bert"
            else layers.GlobalAveragePooling1D()(features)
        )
        return keras.Model(inputs, layers.Dense(2)(pooled))

    x = {
        "token_ids": rng.integers(1, vocab, (batch, length)).astype("int32"),
        "padding_mask": np.ones((batch, length), "int32"),
    }
    if name == "bert":
        x["segment_ids"] = np.zeros((batch, length), "int32")
    if name.endswith("causal_lm"):
        y = rng.integers(1, vocab, (batch, length))
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    else:
        y = np.eye(2)[rng.integers(0, 2, batch)]
        loss = keras.losses.CategoricalCrossentropy(from_logits=True)
    plain = build()
    plain.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss)
    dp = tdk.make_private(build(), l2_norm_clip=1.0, noise_multiplier=1.0, seed=0)
    dp.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss)
    return {"DP": dp, "plain": plain}, x, y


def layer_case(name, rng):
    """A layer row: the plain Keras model and its `make_private` twin (same weights)."""
    if name in ("bilstm", "gru", "simple_rnn"):
        batch, length, vocab = 64, 80, 10000
        recurrent = {
            "bilstm": lambda: layers.Bidirectional(layers.LSTM(64)),
            "gru": lambda: layers.GRU(64),
            "simple_rnn": lambda: layers.SimpleRNN(64),
        }[name]

        def build():
            return keras.Sequential(
                [
                    keras.Input((length,), dtype="int32"),
                    layers.Embedding(vocab, 64, mask_zero=True),
                    recurrent(),
                    layers.Dense(1),
                ]
            )

        x = rng.integers(1, vocab, (batch, length)).astype("int32")
        for row, kept in enumerate(rng.integers(length // 4, length + 1, batch)):
            x[row, kept:] = 0
        y = rng.integers(0, 2, (batch, 1)).astype("float32")
        loss = keras.losses.BinaryCrossentropy(from_logits=True)
    else:
        batch = 64 if name in ("separable", "conv_transpose") else 32
        shape = (32, 32, 3)

        def build():
            if name == "separable":
                return keras.Sequential(
                    [
                        keras.Input(shape),
                        layers.SeparableConv2D(32, 3, padding="same", activation="relu"),
                        layers.SeparableConv2D(64, 3, strides=2, padding="same", activation="relu"),
                        layers.SeparableConv2D(
                            128, 3, strides=2, padding="same", activation="relu"
                        ),
                        layers.GlobalAveragePooling2D(),
                        layers.Dense(10),
                    ]
                )
            if name == "conv_transpose":
                return keras.Sequential(
                    [
                        keras.Input(shape),
                        layers.Conv2D(32, 3, strides=2, padding="same", activation="relu"),
                        layers.Conv2D(64, 3, strides=2, padding="same", activation="relu"),
                        layers.Conv2DTranspose(32, 3, strides=2, padding="same", activation="relu"),
                        layers.Conv2DTranspose(3, 3, strides=2, padding="same"),
                    ]
                )
            head = dict(input_shape=shape, weights=None, classes=10, classifier_activation=None)
            application = (
                keras.applications.MobileNetV2(alpha=0.35, **head)
                if name == "mobilenet_v2"
                else keras.applications.ResNet50(**head)
            )
            return tdk.fix(application)

        x = rng.random((batch, *shape), dtype=np.float32)
        if name == "conv_transpose":
            y, loss = x, "mse"
        else:
            y = rng.integers(0, 10, batch)
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    keras.utils.set_random_seed(0)
    plain = build()
    plain.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss)
    keras.utils.set_random_seed(0)
    dp = tdk.make_private(build(), l2_norm_clip=1.0, noise_multiplier=1.0, seed=0)
    dp.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss)
    return {"DP": dp, "plain": plain}, x, y


LAYER_ROWS = (
    "bilstm",
    "gru",
    "simple_rnn",
    "separable",
    "conv_transpose",
    "mobilenet_v2",
    "resnet50",
)


def memory_in_child(name: str, label: str, argv: list[str]) -> int | None:
    """Peak memory of one step of one model, in a fresh process (nothing else in it)."""
    import subprocess

    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *argv, "--memory-child", f"{name}:{label}"],
        capture_output=True,
        text=True,
        check=False,
    )
    for line in done.stdout.splitlines():
        if line.startswith("peak_bytes="):
            value = line.split("=", 1)[1]
            return None if value == "None" else int(value)
    raise RuntimeError(f"memory child {name}:{label} failed:\n{done.stderr[-2000:]}")


def run_case(name, models, x, y, args, argv) -> dict:
    steps = {label: (lambda i, m=model: m.train_on_batch(x, y)) for label, model in models.items()}
    times = summarize(interleaved(steps, args.steps, args.warmup), "plain")
    memory = {label: memory_in_child(name, label, argv) for label in ("DP", "plain")}
    plan = models["DP"].clipping_plan()
    row = {
        "dp_ms": times["DP"][0],
        "plain_ms": times["plain"][0],
        "ratio": times["DP"][1],
        "engine": plan.engine,
        "slow_layers": list(plan.slow_layers),
        "reason": plan.reason,
    }
    if memory["plain"]:
        row["memory_ratio"] = memory["DP"] / memory["plain"]
        row["dp_mib"], row["plain_mib"] = memory["DP"] / 2**20, memory["plain"] / 2**20
    if "DPSequential" in times:
        row["dpsequential_ms"] = times["DPSequential"][0]
        row["ratio_to_dpsequential"] = times["DP"][1] / times["DPSequential"][1]
    return row


def main(argv=None) -> dict:
    """Runs the benchmark; returns `{row: {...}}` and `passed`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_timing_arguments(parser, steps=10, warmup=2, max_ratio=1.5)
    parser.add_argument("--gpt2-small", action="store_true", help="add the GPT-2 small row")
    parser.add_argument("--only", default=None, help="comma-separated rows to run")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    passed_on = list(sys.argv[1:] if argv is None else argv)
    rng = np.random.default_rng(0)
    cases = {"tutorial": lambda: tutorial_case(rng)}
    for name in LAYER_ROWS:
        cases[name] = lambda name=name: layer_case(name, rng)
    try:
        import keras_hub  # noqa: F401

        small = dict(batch=16, length=128, vocab=8000, hidden=256, num_layers=2, heads=4)
        cases["bert"] = lambda: hub_case("bert", rng, lora_rank=None, **small)
        cases["gpt2_lora"] = lambda: hub_case("gpt2", rng, lora_rank=4, **small)
        cases["gpt2_causal_lm"] = lambda: hub_case("gpt2_causal_lm", rng, lora_rank=None, **small)
        if args.gpt2_small:
            cases["gpt2_small_lora"] = lambda: hub_case(
                "gpt2_causal_lm",
                rng,
                lora_rank=8,
                batch=8,
                length=128,
                vocab=50257,
                hidden=768,
                num_layers=12,
                heads=12,
            )
    except ImportError:
        print("keras_hub not installed: only the tutorial row (pip install '.[hub]')")
    if args.memory_child:
        name, label = args.memory_child.split(":")
        models, x, y = cases[name]()
        model = models[label]

        def two_steps():  # the first builds the optimizer state and the DP engine
            model.train_on_batch(x, y)
            model.train_on_batch(x, y)

        print(f"peak_bytes={peak_step_bytes(two_steps)}")
        return {"passed": True}
    if args.only:
        cases = {k: v for k, v in cases.items() if k in args.only.split(",")}
    summary: dict = {}
    print(f"{'row':18s} {'DP ms':>9s} {'plain ms':>9s} {'DP/plain':>9s} {'memory':>8s}  engine")
    for name, make in cases.items():
        models, x, y = make()
        row = run_case(name, models, x, y, args, ["--only", name, *_without_json(passed_on)])
        summary[name] = row
        memory = f"{row['memory_ratio']:7.2f}x" if "memory_ratio" in row else "    n/a"
        extra = f"  slow: {', '.join(row['slow_layers'])}" if row["slow_layers"] else ""
        print(
            f"{name:18s} {row['dp_ms']:9.1f} {row['plain_ms']:9.1f} {row['ratio']:8.2f}x "
            f"{memory}  {row['engine']}{extra}"
        )
        if "ratio_to_dpsequential" in row:
            print(
                f"{'':18s} DPSequential of the same network: {row['dpsequential_ms']:.1f} ms; "
                f"subclass/DPSequential {row['ratio_to_dpsequential']:.2f}x"
            )
    summary["passed"] = all(
        row["ratio"] <= args.max_ratio and row["engine"] == "fast"
        for key, row in summary.items()
        if isinstance(row, dict)
    )
    if not summary["passed"]:
        print(f"FAIL: a row is above --max-ratio {args.max_ratio} or off the fast path")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return summary


def _without_json(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--json", "--only"):
            skip = True
        else:
            out.append(arg)
    return out


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
