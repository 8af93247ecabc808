"""Accountants side by side: our PRVAccountant, dp_accounting's PLD, the prv-accountant package.

On the corners of the issue's grid (q in {1e-5, 0.5}, sigma in {0.5, 20}, steps in
{1, 10^6}, delta in {1e-10, 1e-3}) plus TF Privacy's seed case (q = 4e-5,
sigma = 1.2, 500,000 steps, delta = 1e-5), each contender gets a fresh
accountant for one Poisson-subsampled Gaussian event and reports its upper bound
on epsilon and its wall time (construction included):

* ours: `torchdp_keras.accounting.PRVAccountant()` (default: relative accuracy):
  `get_epsilon(delta)` on a fresh accountant (the upper bound alone: its time is
  the `s` column), then `get_epsilon_bounds(delta)` on another (`bounds s`); the
  certified lower bound shows how far the upper bound can be from the exact
  epsilon: `err/tol` = (upper - lower) / max(0.001, 1% of lower) <= 1 means the
  target is met (a PRV failure that falls back to the RDP bound is shown as
  `rdp`);
* PLD 1e-4 / 1e-5: `privacy_loss_distribution.from_gaussian_mechanism(sigma,
  sampling_prob=q, value_discretization_interval=...)` (pessimistic, connect
  the dots), `self_compose(steps)`, `get_epsilon_for_delta(delta)`;
* prv_accountant: `PRVAccountant(prvs=[PoissonSubsampledGaussianMechanism(q,
  sigma)], eps_error=0.5 * max(0.001, 1% of our estimate), delta_error=1e-3 *
  delta)`, `compute_epsilon` (upper bound).

Each computation runs in a forked child of this process (the packages imported
once, before) with `--timeout` seconds; one that takes longer, fails or runs out
of memory is shown as such.

`--dense` instead runs ours alone on a denser grid (384 points: q in {1e-5, 1e-3,
0.05, 0.5}, sigma in {0.5, 1, 4, 20}, steps in {1, 3, 10, ..., 10^6}, delta in
{1e-10, 1e-6, 1e-3}), in this process, and reports how many points are certified
within the target, the largest err/tol and the time of `get_epsilon_bounds`;
`--neighboring` and `--group-size` choose the accountant's relation there.

    python benches/bench_accountants.py [--timeout 60] [--quick] [--json out.json]
    python benches/bench_accountants.py --dense [--neighboring replace_one] [--group-size k]
"""

from __future__ import annotations

import argparse
import itertools
import logging
import multiprocessing as mp
import os
import sys
import time
import warnings

os.environ.setdefault("KERAS_BACKEND", "torch")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _timing import write_summary  # noqa: E402

SEED = (4e-5, 1.2, 500_000, 1e-5)
CORNERS = list(itertools.product((1e-5, 0.5), (0.5, 20.0), (1, 1_000_000), (1e-10, 1e-3)))
DENSE = list(
    itertools.product(
        (1e-5, 1e-3, 0.05, 0.5),
        (0.5, 1.0, 4.0, 20.0),
        (1, 3, 10, 100, 1000, 10**4, 10**5, 10**6),
        (1e-10, 1e-6, 1e-3),
    )
)


def err_tol(lower: float, upper: float) -> float:
    """`(upper - lower) / max(0.001, 1% of lower)`: at most 1 certifies the target."""
    return (upper - lower) / max(0.001, 0.01 * lower)


def ours(q, sigma, steps, delta, **relation):
    """`relation`: the accountant's `neighboring` and `group_size` (default add/remove)."""
    from torchdp_keras.accounting.prv import PRVAccountant

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        accountant = PRVAccountant(**relation)
        accountant.compose(sigma, q, steps)
        upper = accountant.get_epsilon(delta)
        upper_seconds = time.perf_counter() - start
        start = time.perf_counter()
        accountant = PRVAccountant(**relation)
        accountant.compose(sigma, q, steps)
        bounds = accountant.get_epsilon_bounds(delta)
        bounds_seconds = time.perf_counter() - start
    fallback = any("RDP upper bound" in str(w.message) for w in caught)
    if bounds[2] != upper:
        raise AssertionError(f"get_epsilon {upper} differs from the bounds' upper {bounds[2]}")
    return (*bounds, fallback, upper_seconds, bounds_seconds)


def pld(q, sigma, steps, delta, interval):
    from dp_accounting.pld import privacy_loss_distribution

    logging.disable(logging.WARNING)
    loss = privacy_loss_distribution.from_gaussian_mechanism(
        sigma, sampling_prob=q, value_discretization_interval=interval
    )
    return float(loss.self_compose(steps).get_epsilon_for_delta(delta))


def package(q, sigma, steps, delta, eps_error):
    from prv_accountant import PoissonSubsampledGaussianMechanism, PRVAccountant

    accountant = PRVAccountant(
        prvs=[PoissonSubsampledGaussianMechanism(q, sigma)],
        max_self_compositions=[steps],
        eps_error=eps_error,
        delta_error=1e-3 * delta,
    )
    return float(accountant.compute_epsilon(delta=delta, num_self_compositions=[steps])[2])


def _child(conn, fun, args):
    try:
        start = time.perf_counter()
        value = fun(*args)
        conn.send(("ok", value, time.perf_counter() - start))
    except BaseException as err:  # reported, not raised: the table goes on
        conn.send(("failed", f"{type(err).__name__}: {str(err)[:80]}", None))


def timed(fun, args, timeout):
    """`(status, value, seconds)` of `fun(*args)` in a forked child."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, fun, args))
    proc.start()
    if parent.poll(timeout):
        result = parent.recv()
        proc.join()
        return result
    proc.kill()
    proc.join()
    return "timeout", None, None


def dense(json_path, points=DENSE, **relation) -> dict:
    """Ours on `points`: the certified err/tol and the time of the bounds at every point."""
    rows, worst, total = [], None, 0.0
    for q, sigma, steps, delta in points:
        lower, _, upper, fallback, upper_seconds, seconds = ours(q, sigma, steps, delta, **relation)
        ratio = err_tol(lower, upper)
        total += seconds
        rows.append(
            {
                "point": [q, sigma, steps, delta],
                "bounds": [lower, upper],
                "err_tol": ratio,
                "rdp": fallback,
                "seconds": seconds,
                "upper_seconds": upper_seconds,
            }
        )
        if worst is None or ratio > worst["err_tol"]:
            worst = rows[-1]
    assert worst is not None
    certified = sum(r["err_tol"] <= 1 + 1e-9 and not r["rdp"] for r in rows)
    slowest = max(rows, key=lambda r: r["seconds"])
    slowest_upper = max(rows, key=lambda r: r["upper_seconds"])
    print(f"{certified} of {len(rows)} points certified within max(0.001, 1% of epsilon)")
    print(f"largest err/tol {worst['err_tol']:.2f} at (q, sigma, steps, delta) = {worst['point']}")
    print(f"RDP fallbacks: {sum(r['rdp'] for r in rows)}")
    print(
        f"get_epsilon_bounds: {total:.1f} s in all, slowest "
        f"{slowest['seconds']:.2f} s at {slowest['point']}"
    )
    print(
        f"get_epsilon alone: {sum(r['upper_seconds'] for r in rows):.1f} s in all, slowest "
        f"{slowest_upper['upper_seconds']:.2f} s at {slowest_upper['point']}"
    )
    summary = {"dense": rows, "certified": certified}
    if json_path:
        write_summary(json_path, summary)
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per computation")
    parser.add_argument("--quick", action="store_true", help="the seed case and 4 corners")
    parser.add_argument("--json", default=None, help="write the table here")
    parser.add_argument("--dense", action="store_true", help="ours alone on 384 points")
    parser.add_argument(
        "--neighboring", default="add_or_remove", help="--dense: the accountant's relation"
    )
    parser.add_argument("--group-size", type=int, default=1, help="--dense: group_size")
    args = parser.parse_args(argv)
    if args.dense:
        dense(args.json, neighboring=args.neighboring, group_size=args.group_size)
        return 0

    # Imported once here, so that the forked children time the computation only.
    import dp_accounting.pld.privacy_loss_distribution  # noqa: F401
    import prv_accountant  # noqa: F401

    import torchdp_keras.accounting.prv  # noqa: F401

    # Warm-up, so that the children time the computation, not lazy imports.
    ours(0.01, 1.0, 10, 1e-5)
    pld(0.01, 1.0, 10, 1e-5, 1e-3)

    points = [SEED] + (CORNERS[::4] if args.quick else CORNERS)
    header = (
        f"{'q':>7} {'sigma':>5} {'steps':>7} {'delta':>6} | {'ours upper':>10} {'s':>6} "
        f"{'err/tol':>7} {'bounds s':>8} | {'PLD 1e-4':>9} {'s':>6} | {'PLD 1e-5':>9} "
        f"{'s':>6} | {'prv_acc':>9} {'s':>6}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for q, sigma, steps, delta in points:
        row: dict = {"q": q, "sigma": sigma, "steps": steps, "delta": delta}
        status, value, seconds = timed(ours, (q, sigma, steps, delta), args.timeout)
        row["ours"] = [status, value, seconds]
        eps_error = 0.005
        if status == "ok" and value[3]:
            row["ours"][0] = status = "rdp"
        if status == "ok":
            lower, estimate, upper, *_ = value
            eps_error = 0.5 * max(0.001, 0.01 * estimate)
            row["within"] = err_tol(lower, upper) <= 1 + 1e-9
        for name, fun, extra in (
            ("pld_1e-4", pld, (1e-4,)),
            ("pld_1e-5", pld, (1e-5,)),
            ("prv_accountant", package, (eps_error,)),
        ):
            row[name] = list(timed(fun, (q, sigma, steps, delta, *extra), args.timeout))
        rows.append(row)

        def show(entry, width=9):
            status, value, seconds = entry
            if status not in ("ok", "rdp"):
                return f"{status:>{width}} {'':>6}"
            value = value[2] if isinstance(value, tuple) else value
            return f"{value:>{width}.5g} {seconds:>6.2f}"

        over, upper_s, bounds_s = "", "", ""
        if row["ours"][0] in ("ok", "rdp"):
            lower, _, upper, _, seconds_upper, seconds_bounds = row["ours"][1]
            upper_s, bounds_s = f"{seconds_upper:6.2f}", f"{seconds_bounds:8.2f}"
            over = "rdp"
            if row["ours"][0] == "ok":
                over = f"{err_tol(lower, upper):7.2f}"
        print(
            f"{q:>7.2g} {sigma:>5.3g} {steps:>7} {delta:>6.0e} | {show(row['ours'], 10)[:10]} "
            f"{upper_s:>6} {over:>7} {bounds_s:>8} | {show(row['pld_1e-4'])} | "
            f"{show(row['pld_1e-5'])} | {show(row['prv_accountant'])}",
            flush=True,
        )
    print(
        "err/tol: (upper - lower) / max(0.001, 1% of lower) of ours, a certified bound on how "
        "far its upper bound is above the exact epsilon, in units of the target (<= 1 meets it)"
    )
    summary = {"rows": rows, "timeout": args.timeout}
    if args.json:
        write_summary(args.json, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
