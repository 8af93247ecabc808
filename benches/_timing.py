"""Shared helpers of the step-time benchmarks: interleaved timing and a report.

Every round runs one step of every contender, in an order that rotates from
round to round, so all of them see the same machine state (thermal state,
other load, allocator state). The report gives each contender's median step
time and the median over rounds of its per-round ratio to the baseline,
which is robust to slow drifts of the machine.

`--tuned-malloc` (every step-time bench) restarts the bench with glibc's
allocator told to keep freed memory (`TUNED_MALLOC_ENV`), as PyTorch's CPU
tuning guides recommend (or jemalloc/tcmalloc). With glibc's defaults, large
temporaries are returned to the system when freed and page-faulted back in
on the next step; that costs every contender, and the DP step (which holds
more temporaries at once) more.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable


def interleaved(
    steps: dict[str, Callable[[int], object]],
    rounds: int,
    warmup: int,
    before: Callable[[], object] | None = None,
) -> dict[str, list[float]]:
    """Seconds per step of each contender; `steps[name](i)` runs round i.

    `before`, if given, runs (untimed) before every step: e.g. a cache flush,
    so that no contender finds its data left in cache by the one before it.
    """
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + rounds):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            if before is not None:
                before()
            start = time.perf_counter()
            steps[name](i)
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[name].append(elapsed)
    return times


def summarize(times: dict[str, list[float]], baseline: str) -> dict[str, tuple[float, float]]:
    """`{name: (median ms per step, median per-round ratio to baseline)}`."""
    base = times[baseline]
    return {
        name: (
            1e3 * statistics.median(values),
            statistics.median(v / b for v, b in zip(values, base)),
        )
        for name, values in times.items()
    }


def print_table(title: str, summary: dict[str, tuple[float, float]], baseline: str) -> None:
    print(f"{title}, malloc={'tuned' if tuned_malloc_active() else 'default'}")
    print(f"  {'':34s} {'ms/step':>9s} {'x ' + baseline:>14s}")
    for name, (ms, ratio) in summary.items():
        print(f"  {name:34s} {ms:9.2f} {ratio:13.2f}x")


TUNED_MALLOC_ENV = {
    # glibc: serve large blocks from the heap and never hand them back, so a
    # step's temporaries are not page-faulted in afresh every step.
    "MALLOC_MMAP_THRESHOLD_": str(1 << 32),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 36),
}


def add_timing_arguments(
    parser: argparse.ArgumentParser, *, steps: int, warmup: int, max_ratio: float | None
) -> None:
    """The options every step-time bench shares: rounds, warm-up, target, allocator, JSON.

    `max_ratio=None` leaves out `--max-ratio` (a bench with no target of its own).
    """
    parser.add_argument("--steps", type=int, default=steps, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=warmup)
    if max_ratio is not None:
        parser.add_argument("--max-ratio", type=float, default=max_ratio)
    parser.add_argument("--tuned-malloc", action="store_true", help="see _timing.py")
    parser.add_argument("--json", default=None, help="also write the summary to this file")


def tuned_malloc_active() -> bool:
    return all(os.environ.get(k) == v for k, v in TUNED_MALLOC_ENV.items())


def reexec_with_tuned_malloc() -> None:
    """Restarts this script with `TUNED_MALLOC_ENV` (glibc reads it at start-up)."""
    if tuned_malloc_active():
        return
    env = dict(os.environ, **TUNED_MALLOC_ENV)
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def write_summary(path: str, summary: dict) -> None:
    """Writes a bench's summary (and the allocator mode) as JSON."""
    with open(path, "w") as f:
        json.dump({"malloc": "tuned" if tuned_malloc_active() else "default", **summary}, f)


def finish(summary: dict, key: str, max_ratio: float, what: str, json_path: str | None) -> dict:
    """Marks `summary` passed when `summary[key]`'s ratio is within `max_ratio`
    (printing why not), writes it to `json_path` if given, and returns it."""
    ratio = summary[key][1]
    if ratio > max_ratio:
        print(f"FAIL: {what} {ratio:.2f}x is above --max-ratio {max_ratio}")
    summary["passed"] = ratio <= max_ratio
    if json_path:
        write_summary(json_path, summary)
    return summary
