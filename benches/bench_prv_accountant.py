"""PRV accounting time: torchdp_keras's PRVAccountant against the prv_accountant package.

Both run in this process on the same history (one Poisson-subsampled Gaussian
event composed `--compositions` times) with the same eps_error and
delta_error = 1e-3 * delta:

* the package: `PRVAccountant(prvs=[PoissonSubsampledGaussianMechanism(q, sigma)],
  max_self_compositions=[N], eps_error, delta_error)` then `compute_epsilon`
  (construction and computation are both timed);
* ours: a fresh `torchdp_keras.accounting.PRVAccountant(eps_error)`, `compose`,
  then `get_epsilon_bounds(delta)`.

It prints both (lower, estimate, upper) triples, both wall times and the speed
ratio, and exits with status 1 if ours is less than 10x faster or its upper
bound exceeds the package's by more than eps_error.

    python benches/bench_prv_accountant.py
    python benches/bench_prv_accountant.py --compositions 2250 --q 0.04 --sigma 1.5 --delta 1e-5
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

from prv_accountant import PoissonSubsampledGaussianMechanism  # noqa: E402
from prv_accountant import PRVAccountant as PackagePRVAccountant  # noqa: E402

from torchdp_keras.accounting.prv import PRVAccountant  # noqa: E402

MIN_SPEEDUP = 10.0


def package_bounds(args) -> tuple[tuple[float, float, float], float]:
    start = time.perf_counter()
    accountant = PackagePRVAccountant(
        prvs=[PoissonSubsampledGaussianMechanism(args.q, args.sigma)],
        max_self_compositions=[args.compositions],
        eps_error=args.eps_error,
        delta_error=1e-3 * args.delta,
    )
    bounds = accountant.compute_epsilon(delta=args.delta, num_self_compositions=[args.compositions])
    return tuple(float(v) for v in bounds), time.perf_counter() - start


def our_bounds(args) -> tuple[tuple[float, float, float], float]:
    start = time.perf_counter()
    accountant = PRVAccountant(eps_error=args.eps_error)
    accountant.compose(args.sigma, args.q, args.compositions)
    bounds = accountant.get_epsilon_bounds(args.delta)
    return bounds, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compositions", type=int, default=100_000, help="steps N")
    parser.add_argument("--q", type=float, default=5e-3, help="sampling probability")
    parser.add_argument("--sigma", type=float, default=0.8, help="noise multiplier")
    parser.add_argument("--delta", type=float, default=1e-6, help="target delta")
    parser.add_argument("--eps-error", type=float, default=0.01, help="allowed error in epsilon")
    parser.add_argument("--json", default=None, help="write the bounds and times here")
    args = parser.parse_args(argv)

    print(
        f"history: N={args.compositions}, q={args.q}, sigma={args.sigma}; delta={args.delta}, "
        f"eps_error={args.eps_error}, delta_error={1e-3 * args.delta:.3g}"
    )
    theirs, their_time = package_bounds(args)
    ours, our_time = our_bounds(args)
    ratio = their_time / our_time

    def show(bounds):
        return "(" + ", ".join(f"{v:.6f}" for v in bounds) + ")"

    print(f"prv_accountant (lower, estimate, upper): {show(theirs)}  {their_time:8.3f} s")
    print(f"torchdp_keras  (lower, estimate, upper): {show(ours)}  {our_time:8.3f} s")
    print(f"speed-up: {ratio:.1f}x  upper(ours) - upper(package): {ours[2] - theirs[2]:+.2e}")

    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(
                {
                    "package": [list(theirs), their_time],
                    "ours": [list(ours), our_time],
                    "speedup": ratio,
                },
                f,
            )
    failed = False
    if ratio < MIN_SPEEDUP:
        print(f"FAIL: less than {MIN_SPEEDUP:.0f}x faster")
        failed = True
    if ours[2] > theirs[2] + args.eps_error:
        print("FAIL: our upper bound exceeds the package's by more than eps_error")
        failed = True
    if not failed:
        print("OK")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
