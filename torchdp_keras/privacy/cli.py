"""Command line: the privacy statement of a DP-SGD run, or the sigma for a budget.

    python -m torchdp_keras.privacy --n 60000 --batch-size 250 \\
        --noise-multiplier 1.3 --epochs 15 --delta 1e-5
    python -m torchdp_keras.privacy --n 60000 --batch-size 250 \\
        --epochs 15 --delta 1e-5 --target-epsilon 1.0

Needs neither torch nor keras.
"""

from __future__ import annotations

import argparse
import math
import sys

from torchdp_keras.accounting import (
    calibrate_noise_multiplier,
    compute_dp_sgd_privacy_statement,
    make_accountant,
)
from torchdp_keras.errors import DPError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m torchdp_keras.privacy",
        description="Privacy statement of a DP-SGD run (Poisson sampling, Gaussian noise), "
        "or, with --target-epsilon, the noise multiplier that meets a budget.",
    )
    parser.add_argument("--n", type=int, required=True, help="number of training examples")
    parser.add_argument("--batch-size", type=int, required=True, help="(expected) batch size")
    parser.add_argument("--epochs", type=float, required=True, help="number of epochs")
    parser.add_argument("--delta", type=float, required=True, help="target delta")
    parser.add_argument("--noise-multiplier", type=float, help="sigma (for the statement)")
    parser.add_argument("--target-epsilon", type=float, help="calibrate sigma for this epsilon")
    parser.add_argument(
        "--accountant", choices=("prv", "rdp"), default="prv", help="for --target-epsilon"
    )
    parser.add_argument(
        "--used-microbatching",
        action="store_true",
        help="microbatches of several examples were clipped (TF Privacy's doubled "
        "sensitivity); torchdp_keras clips every example on its own by default",
    )
    parser.add_argument(
        "--max-examples-per-user",
        type=int,
        default=None,
        help="also state user-level DP for users with at most this many examples; with "
        "--target-epsilon, calibrate for that user-level budget",
    )
    parser.add_argument(
        "--neighboring",
        choices=("add_or_remove", "replace_one"),
        default="add_or_remove",
        help="the example-level neighbouring relation (default add_or_remove)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.noise_multiplier is None) == (args.target_epsilon is None):
        parser.error("give exactly one of --noise-multiplier and --target-epsilon")
    try:
        if args.target_epsilon is not None:
            steps = int(math.ceil(args.epochs * args.n / args.batch_size))
            q = args.batch_size / args.n
            group_size = args.max_examples_per_user or 1
            sigma = calibrate_noise_multiplier(
                args.target_epsilon,
                args.delta,
                q,
                steps,
                accountant=args.accountant,
                neighboring=args.neighboring,
                group_size=group_size,
            )
            accountant = make_accountant(
                args.accountant, neighboring=args.neighboring, group_size=group_size
            )
            accountant.compose(sigma, q, steps)
            spent = accountant.get_epsilon(args.delta)
            unit = "example" if group_size == 1 else f"user of at most {group_size} examples"
            print(
                f"noise_multiplier = {sigma:.4f} gives epsilon = {spent:.4f} <= "
                f"{args.target_epsilon} at delta = {args.delta} ({args.accountant.upper()}, "
                f"{steps} steps, sampling probability {q:.4g}, {args.neighboring} of one "
                f"{unit})"
            )
        else:
            print(
                compute_dp_sgd_privacy_statement(
                    number_of_examples=args.n,
                    batch_size=args.batch_size,
                    num_epochs=args.epochs,
                    noise_multiplier=args.noise_multiplier,
                    delta=args.delta,
                    used_microbatching=args.used_microbatching,
                    max_examples_per_user=args.max_examples_per_user,
                    neighboring=args.neighboring,
                )
            )
    except DPError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
