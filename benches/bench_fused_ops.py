"""The fused clip-and-noise ops against the best pure-torch formulation.

For B = 256 examples and P = 2^14 .. 2^22 parameters split over four tensors
(1/2, 1/4, 1/8, 1/8 of P), interleaved round by round:

* `naive`: `(g * factors).sum(0)` per tensor, after the norms (P <= 2^17);
* `torch`: the best pure-torch formulation, one `torch.linalg.vector_norm`
  pass and one `torch.mv` per tensor;
* `fused`: `torch.ops.torchdp_keras.clipped_sum` (csrc/).

Every timed call starts with cold caches (a 128 MiB buffer is written
before it, untimed), as in the issue's model where the B x P data comes from
memory: without it, whichever contender ran before decided what the next one
found in cache (the naive one's temporaries evicted the data, so the row
after it started cold and the others warm).

Reported: median ms, effective read bandwidth (B x P x itemsize / time), the
fused/torch speed-up, and on CPU which kernel the fused op took (one read of
each example while it and the sum fit in the last-level cache, else norms +
gemv). Also times the final noise (`add_noise_and_scale_`) of P values: the
portable Philox kernel and torch's sampler. And, end to end, a
`clipping_mode="vmap"` DP step of the tutorial CNN with the fused clipped
sum against the same step with the pure-torch one.

On CUDA the same runs on the GPU and also reports achieved bandwidth (bytes
read and written over time, the gradients counted twice: both formulations
read them once for the norms and once for the weighted sum) against a
device-to-device copy of the same bytes, and counts kernel launches
(torch.profiler's CUDA events) of one clipped sum, one noise call and one DP
step of the tutorial CNN (fast path and vmap). On CPU the same counts are of
operator calls (ATen ops), the CPU analogue of launches.

    python benches/bench_fused_ops.py
    python benches/bench_fused_ops.py --device cuda --json fused_cuda.json
    python benches/bench_fused_ops.py --contention --skip-end-to-end   # CPU under load
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
FLUSH_BYTES = 128 << 20  # 4x a 32 MiB L3 (this CPU), 2.5x an H100's 50 MiB L2


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def unit_name(device) -> str:
    return "kernel launches" if device.type == "cuda" else "ATen ops"


def count_launches(fn, device) -> int:
    """Kernel launches of one call of `fn` (CUDA), or ATen operator calls (CPU).

    CUDA: the profiler's device-side events (kernels, memsets, copies).
    CPU: the top-level operators (`aten::`, `torchdp_keras::`), not those
    they call inside.
    """
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm: allocator, lazy initialisation
    _sync(device)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    events = prof.events()
    if device.type == "cuda":
        return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return sum(1 for e in events if "::" in e.name and e.cpu_parent is None)


def clip_sum_rows(batch, log2_p, device, rounds, warmup, naive_up_to=17, launches=True):
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
    if log2_p <= naive_up_to:  # the naive formulation takes seconds beyond
        steps["naive"] = naive
    if ops.extension_info()[device.type]:
        steps["fused"] = kernel
    flush = torch.empty(FLUSH_BYTES // 4, device=device)

    def cold_caches():
        flush.fill_(1.0)
        _sync(device)

    times = interleaved(steps, rounds, warmup, before=cold_caches)
    read = batch * sum(g.shape[1] for g in grads) * 4
    written = sum(g.shape[1] for g in grads) * 4
    row = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    row["bandwidth_gbs"] = {name: read / (ms * 1e6) for name, ms in row.items()}
    # The median over rounds of each round's torch/fused ratio: robust to load
    # that comes and goes (another process) while the medians drift apart.
    if "fused" in times:
        row["ratio"] = statistics.median(t / f for t, f in zip(times["torch"], times["fused"]))
    if launches:
        row["launches"] = {
            name: count_launches(lambda f=fn: f(0), device) for name, fn in steps.items()
        }
    if device.type == "cuda":
        flat = torch.empty(batch * total, device=device)
        copy_ms = 1e3 * statistics.median(
            interleaved({"copy": lambda _: (flat.clone(), _sync(device))}, rounds, warmup)["copy"]
        )
        row["copy_gbs"] = 2 * read / (copy_ms * 1e6)
        # Achieved: bytes read and written over time, against the copy's. Both
        # read the gradients twice on CUDA (norms, then the weighted sum; the
        # fused op in its own kernels, torch in vector_norm and mv).
        row["achieved_gbs"] = {
            name: (2 * read + written) / (row[name] * 1e6)
            for name in ("torch", "fused")
            if name in row
        }
    return row


def contention_sweep(log2_ps, thread_counts, rounds, warmup) -> dict:
    """fused/torch on CPU, quiet and with one competing busy process, per thread count.

    Batches of B = min(256, 2^28 / P) examples (at most 1 GiB of gradients).
    The ratio is the median over rounds of each round's torch/fused time: above
    1 the fused op is faster.
    """
    import subprocess

    device = torch.device("cpu")
    before = torch.get_num_threads()
    rows: dict = {}
    try:
        for load in ("quiet", "busy"):
            competitor = None
            if load == "busy":
                # A competing process: one CPU's worth of pure Python work.
                competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            try:
                for threads in thread_counts:
                    torch.set_num_threads(threads)
                    for log2_p in log2_ps:
                        batch = min(256, (1 << 28) >> log2_p)
                        row = clip_sum_rows(
                            batch, log2_p, device, rounds, warmup, naive_up_to=0, launches=False
                        )
                        key = f"{load}/threads={threads}/P=2^{log2_p}"
                        rows[key] = {"batch": batch, **row}
                        print(
                            f"  {load:5s} threads={threads} 2^{log2_p:<3d} B={batch:<4d} "
                            f"torch {row['torch']:8.3f} ms  fused {row['fused']:8.3f} ms  "
                            f"fused/torch {row['ratio']:5.2f}x"
                        )
            finally:
                if competitor is not None:
                    competitor.kill()
                    competitor.wait()
    finally:
        torch.set_num_threads(before)
    return rows


def noise_rows(log2_p, device, rounds, warmup):
    tensors = [torch.zeros(1 << log2_p, device=device)]

    def portable(_):
        ops.add_noise_and_scale_(tensors, 1.0, 0.5, seed=1)
        _sync(device)

    def sampler(_):
        ops.add_noise_and_scale_(tensors, 1.0, 0.5, seed=1, portable=False)
        _sync(device)

    times = interleaved({"portable": portable, "torch sampler": sampler}, rounds, warmup)
    row = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    row["launches"] = {
        "portable": count_launches(lambda: portable(0), device),
        "torch sampler": count_launches(lambda: sampler(0), device),
    }
    return row


def _tutorial_model(clipping_mode):
    from bench_step_time import compile_model, tutorial_layers

    import torchdp_keras as tdk

    return compile_model(
        tdk.DPSequential(
            tutorial_layers(),
            l2_norm_clip=1.5,
            noise_multiplier=1.3,
            seed=0,
            clipping_mode=clipping_mode,
        )
    )


def step_launches(device, data) -> dict:
    """Launches (CUDA) or ATen ops (CPU) of one DP step of the tutorial CNN, batch 250."""
    from bench_step_time import load_batches

    x, y = load_batches(data, 250, 1)[0]
    counts = {}
    for mode in ("auto", "vmap"):
        model = _tutorial_model(mode)
        counts[mode] = count_launches(lambda m=model: m.train_on_batch(x, y), device)
    return counts


def end_to_end(rounds, warmup, data):
    from bench_step_time import load_batches

    batches = load_batches(data, 250, rounds + warmup)
    model = _tutorial_model("vmap")
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
    parser.add_argument("--data", default=None, help="MNIST .npz (default ../shared/data)")
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--contention",
        action="store_true",
        help="CPU only: fused/torch for P = 2^10 .. 2^23, quiet and with one competing busy "
        "process, with 1, 2 and 2 x CPUs threads (the fused op must never lose)",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    info = ops.extension_info()
    print(f"extension: {info['reason']}; device={device}, threads={torch.get_num_threads()}")
    print(
        f"clipped sum, B={args.batch_size}, P split over {len(FRACTIONS)} tensors (ms, GB/s read)"
    )
    limit = info["cpu_one_read_bytes"] if device.type == "cpu" else None
    if limit is not None:
        l2 = info["cpu_l2_bytes"]
        print(
            f"CPU: one read of examples up to {limit >> 10} KiB; "
            f"L2 {l2 >> 10 if l2 else '?'} KiB per core"
        )
    print(f"  {'P':>9s} {'naive':>14s} {'torch':>14s} {'fused':>14s} {'fused/torch':>11s}")
    summary = {"clipped_sum": {}}
    if limit is not None:
        summary["cpu_one_read_bytes"] = limit
        summary["cpu_l2_bytes"] = info["cpu_l2_bytes"]
    for log2_p in range(args.min_log2_p, args.max_log2_p + 1):
        row = clip_sum_rows(args.batch_size, log2_p, device, args.rounds, args.warmup)
        summary["clipped_sum"][str(1 << log2_p)] = row
        cells = [
            f"{row[n]:7.2f} {row['bandwidth_gbs'][n]:5.1f}" if n in row else f"{'-':>13s}"
            for n in ("naive", "torch", "fused")
        ]
        speedup = row["torch"] / row["fused"] if "fused" in row else float("nan")
        extra = ""
        if limit is not None:
            row["kernel"] = "one read" if (1 << log2_p) * 4 <= limit else "two reads"
            extra = f"  {row['kernel']}"
        if "copy_gbs" in row:
            achieved = row["achieved_gbs"].get("fused", float("nan"))
            extra = f"  achieved {achieved:.0f} of copy {row['copy_gbs']:.0f} GB/s"
        print(f"  2^{log2_p:<7d} {cells[0]} {cells[1]} {cells[2]} {speedup:10.2f}x{extra}")
    noise = noise_rows(args.max_log2_p, device, args.rounds, args.warmup)
    summary["noise"] = noise
    print(
        f"noise of 2^{args.max_log2_p} values: portable Philox kernel {noise['portable']:.2f} ms, "
        f"torch sampler {noise['torch sampler']:.2f} ms ({unit_name(device)}: "
        f"{noise['launches']['portable']} and {noise['launches']['torch sampler']})"
    )
    unit = unit_name(device)
    print(
        f"  {unit} per call: "
        + ", ".join(
            f"2^{p.bit_length() - 1}: " + "/".join(f"{k} {v}" for k, v in row["launches"].items())
            for p, row in ((int(p), r) for p, r in summary["clipped_sum"].items())
            if p in (1 << args.min_log2_p, 1 << args.max_log2_p)
        )
    )
    if not args.skip_end_to_end:
        # Keras places the model on the default device: the GPU when there is one.
        from bench_step_time import DEFAULT_DATA

        data = args.data or DEFAULT_DATA
        e2e = end_to_end(max(args.rounds, 20), args.warmup, data)
        summary["end_to_end_vmap_cnn"] = e2e
        print(
            f"tutorial CNN DP step (vmap, batch 250): fused {e2e['fused']:.2f} ms, "
            f"pure torch {e2e['pure torch']:.2f} ms ({e2e['pure torch'] / e2e['fused']:.2f}x)"
        )
        summary["step_launches"] = step_launches(device, data)
        print(
            f"{unit} per DP step (tutorial CNN, batch 250): "
            + ", ".join(f"{mode} {n}" for mode, n in summary["step_launches"].items())
        )
    if args.contention and device.type == "cpu" and info["cpu"]:
        cpus = os.cpu_count() or 1
        threads = sorted({1, min(2, cpus), 2 * cpus})
        print("fused/torch under contention (B = min(256, 2^28 / P), cold caches)")
        rows = contention_sweep(range(10, 24), threads, args.rounds, args.warmup)
        summary["contention"] = rows
        worst = min(rows.items(), key=lambda item: item[1]["ratio"])
        print(f"  worst: {worst[0]} at {worst[1]['ratio']:.2f}x")
    if args.json:
        write_summary(args.json, summary)
    return summary


if __name__ == "__main__":
    main()
