"""The fused clip-and-noise ops against the best pure-torch formulation.

For B = 256 examples and P = 2^14 .. 2^22 parameters split over four tensors
(1/2, 1/4, 1/8, 1/8 of P), interleaved round by round:

* `naive`: `(g * factors).sum(0)` per tensor, after the norms (P <= 2^17);
* `torch`: the best pure-torch formulation, one `torch.linalg.vector_norm`
  pass and one `torch.mv` per tensor;
* `fused`: `torch.ops.torchdp_keras.clipped_sum` (csrc/).

Reported: median ms, effective read bandwidth (B x P x itemsize / time) and
the fused/torch speed-up. Also times the final noise (`add_noise_and_scale_`)
of P values: the portable Philox kernel and torch's sampler. And, end to
end, a `clipping_mode="vmap"` DP step of the tutorial CNN with the fused
clipped sum against the same step with the pure-torch one.
On CUDA the same runs on the GPU and also reports achieved bandwidth against
a device-to-device copy of the same bytes.

    python benches/bench_fused_ops.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("KERAS_BACKEND", "torch")

import torch  # noqa: E402
from _timing import interleaved, write_summary  # noqa: E402

from torchdp_keras import ops  # noqa: E402
from torchdp_keras.ops import fused  # noqa: E402

FRACTIONS = (0.5, 0.25, 0.125, 0.125)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def clip_sum_rows(batch, log2_p, device, rounds, warmup):
    total = 1 << log2_p
    grads = [torch.randn(batch, max(1, int(total * f)), device=device) * 0.01 for f in FRACTIONS]

    def naive(_):
        squared = sum((g * g).sum(1, dtype=torch.float64) for g in grads)
        factors = ops.clip_factors(squared, 1.0).float()
        out = [(g * factors[:, None]).sum(0) for g in grads]
        _sync(device)
        return out

    def pure(_):
        # The best unfused formulation: one vector_norm pass, one mv pass.
        squared = sum(torch.linalg.vector_norm(g, dim=1) ** 2 for g in grads)
        factors = ops.clip_factors(squared.double(), 1.0).float()
        out = [torch.mv(g.t(), factors) for g in grads]
        _sync(device)
        return out

    def kernel(_):
        out = torch.ops.torchdp_keras.clipped_sum(grads, 1.0)
        _sync(device)
        return out

    steps = {"torch": pure}
    if log2_p <= 17:  # the naive formulation takes seconds beyond
        steps["naive"] = naive
    if ops.extension_info()[device.type]:
        steps["fused"] = kernel
    times = interleaved(steps, rounds, warmup)
    read = batch * sum(g.shape[1] for g in grads) * 4
    row = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    row["bandwidth_gbs"] = {name: read / (ms * 1e6) for name, ms in row.items()}
    if device.type == "cuda":
        flat = torch.empty(batch * total, device=device)
        copy_ms = 1e3 * statistics.median(
            interleaved({"copy": lambda _: (flat.clone(), _sync(device))}, rounds, warmup)["copy"]
        )
        row["copy_gbs"] = 2 * read / (copy_ms * 1e6)
    return row


def noise_rows(log2_p, device, rounds, warmup):
    tensors = [torch.zeros(1 << log2_p, device=device)]

    def portable(_):
        ops.add_noise_and_scale_(tensors, 1.0, 0.5, seed=1)
        _sync(device)

    def sampler(_):
        ops.add_noise_and_scale_(tensors, 1.0, 0.5, seed=1, portable=False)
        _sync(device)

    times = interleaved({"portable": portable, "torch sampler": sampler}, rounds, warmup)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def end_to_end(rounds, warmup):
    from bench_step_time import DEFAULT_DATA, compile_model, load_batches, tutorial_layers

    import torchdp_keras as tdk

    batches = load_batches(DEFAULT_DATA, 250, rounds + warmup)
    model = compile_model(
        tdk.DPSequential(
            tutorial_layers(), l2_norm_clip=1.5, noise_multiplier=1.3, seed=0, clipping_mode="vmap"
        )
    )
    original = fused._use_kernel

    def with_kernel(i):
        model.train_on_batch(*batches[i])

    def without_kernel(i):
        fused._use_kernel = lambda tensors: False
        try:
            model.train_on_batch(*batches[i])
        finally:
            fused._use_kernel = original

    times = interleaved({"fused": with_kernel, "pure torch": without_kernel}, rounds, warmup)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--min-log2-p", type=int, default=14)
    parser.add_argument("--max-log2-p", type=int, default=22)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-end-to-end", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    info = ops.extension_info()
    print(f"extension: {info['reason']}; device={device}, threads={torch.get_num_threads()}")
    print(
        f"clipped sum, B={args.batch_size}, P split over {len(FRACTIONS)} tensors (ms, GB/s read)"
    )
    print(f"  {'P':>9s} {'naive':>14s} {'torch':>14s} {'fused':>14s} {'fused/torch':>11s}")
    summary = {"clipped_sum": {}}
    for log2_p in range(args.min_log2_p, args.max_log2_p + 1):
        row = clip_sum_rows(args.batch_size, log2_p, device, args.rounds, args.warmup)
        summary["clipped_sum"][str(1 << log2_p)] = row
        cells = [
            f"{row[n]:7.2f} {row['bandwidth_gbs'][n]:5.1f}" if n in row else f"{'-':>13s}"
            for n in ("naive", "torch", "fused")
        ]
        speedup = row["torch"] / row["fused"] if "fused" in row else float("nan")
        extra = f"  copy {row['copy_gbs']:.0f} GB/s" if "copy_gbs" in row else ""
        print(f"  2^{log2_p:<7d} {cells[0]} {cells[1]} {cells[2]} {speedup:10.2f}x{extra}")
    noise = noise_rows(args.max_log2_p, device, args.rounds, args.warmup)
    summary["noise"] = noise
    print(
        f"noise of 2^{args.max_log2_p} values: portable Philox kernel {noise['portable']:.2f} ms, "
        f"torch sampler {noise['torch sampler']:.2f} ms"
    )
    if not args.skip_end_to_end and device.type == "cpu":
        e2e = end_to_end(max(args.rounds, 20), args.warmup)
        summary["end_to_end_vmap_cnn"] = e2e
        print(
            f"tutorial CNN DP step (vmap, batch 250): fused {e2e['fused']:.2f} ms, "
            f"pure torch {e2e['pure torch']:.2f} ms ({e2e['pure torch'] / e2e['fused']:.2f}x)"
        )
    if args.json:
        write_summary(args.json, summary)
    return summary


if __name__ == "__main__":
    main()
