"""Peak memory of a DP training step against a plain Keras step (MLP, ~21M parameters).

The model: Dense(4096, relu) -> Dense(4096, relu) -> Dense(10) on 1024
features (21.0M parameters), batch 256, SGD. Each contender runs in its own
subprocess: it builds its data, records the process's resident memory,
builds and compiles the model, runs one warm-up step, resets the peak, runs
`--steps` steps, and reports the peak above the memory recorded before the
model existed (so weights, gradients, optimizer state and activations all
count). On CUDA the same is measured with `torch.cuda.max_memory_allocated`.
Contenders: plain `keras.Sequential`, `DPSequential` with fast clipping
("auto"), and, with `--with-vmap`, per-example gradients ("vmap"; about
B x P numbers, chunked). Exit status 1 if the fast path's ratio to plain is
above `--max-ratio`.

    python benches/bench_memory.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("KERAS_BACKEND", "torch")

from _timing import finish  # noqa: E402

PLAIN = "plain keras.Sequential"
MODES = {PLAIN: None, "DPSequential (auto)": "auto", "DPSequential (vmap)": "vmap"}


def rss_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(mode: str | None, args) -> dict:
    import keras
    import numpy as np
    import torch
    from keras import layers

    import torchdp_keras as tdk

    cuda = torch.cuda.is_available()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch_size, args.features)).astype("float32")
    y = rng.integers(0, 10, size=(args.batch_size,)).astype("int32")
    stack = [
        keras.Input((args.features,)),
        layers.Dense(args.width, activation="relu"),
        layers.Dense(args.width, activation="relu"),
        layers.Dense(10),
    ]
    before = torch.cuda.memory_allocated() if cuda else rss_bytes("VmRSS")
    if mode is None:
        model = keras.Sequential(stack)
    else:
        model = tdk.DPSequential(
            stack, l2_norm_clip=1.0, noise_multiplier=1.0, seed=0, clipping_mode=mode
        )
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.train_on_batch(x, y)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets the peak resident set (VmHWM)
    for _ in range(args.steps):
        model.train_on_batch(x, y)
    peak = torch.cuda.max_memory_allocated() if cuda else rss_bytes("VmHWM")
    return {"peak_bytes": peak - before, "parameters": model.count_params()}


def main(argv=None) -> dict:
    """Runs the benchmark; returns `{name: (peak MiB, ratio to plain)}`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--features", type=int, default=1024)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--with-vmap", action="store_true")
    parser.add_argument("--max-ratio", type=float, default=1.3)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="also write the summary to this file")
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(MODES[args.child], args)))
        return {}
    names = [n for n in MODES if args.with_vmap or MODES[n] != "vmap"]
    results = {}
    for name in names:
        command = [sys.executable, os.path.abspath(__file__), "--child", name]
        command += [f"--batch-size={args.batch_size}", f"--features={args.features}"]
        command += [f"--width={args.width}", f"--steps={args.steps}"]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    plain = results[PLAIN]["peak_bytes"]
    print(
        f"MLP {results[PLAIN]['parameters'] / 1e6:.1f}M parameters, batch {args.batch_size}: "
        "peak memory of a training step (above the process before the model)"
    )
    summary = {}
    for name, result in results.items():
        mib, ratio = result["peak_bytes"] / 2**20, result["peak_bytes"] / plain
        summary[name] = (mib, ratio)
        print(f"  {name:34s} {mib:9.1f} MiB {ratio:8.2f}x plain")
    return finish(summary, "DPSequential (auto)", args.max_ratio, "DP/plain peak memory", args.json)


if __name__ == "__main__":
    summary = main()
    sys.exit(0 if summary.get("passed", True) else 1)
