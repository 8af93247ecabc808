"""Planning and reporting functions: epsilon for a run, sigma for a target.

All of them assume DP-SGD with Poisson sampling (each example in each batch
independently with probability q = batch_size / n), Gaussian noise of std
`noise_multiplier * l2_norm_clip`, and add-or-remove-one-example adjacency.
"""

from __future__ import annotations

import math
import numbers
import sys

from torchdp_keras._validation import (
    check_bool,
    check_int,
    check_optional_positive_int,
    check_positive,
    to_float,
)
from torchdp_keras.accounting.base import Accountant, check_delta, check_event
from torchdp_keras.accounting.pairs import MAX_GROUP_SIZE, check_group_size, check_neighboring
from torchdp_keras.accounting.rdp import RDPAccountant
from torchdp_keras.errors import DPConfigError

# The orders TF Privacy's compute_dp_sgd_privacy optimises over; used there so
# that the optimal order it reports is the one TF Privacy users know.
TF_PRIVACY_ORDERS: tuple[float, ...] = tuple(
    [1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0, 3.5, 4.0, 4.5] + list(range(5, 64)) + [128, 256, 512]
)

ACCOUNTANTS = ("prv", "rdp")


def make_accountant(
    accountant: str = "prv", *, neighboring: str = "add_or_remove", group_size: int = 1
) -> Accountant:
    """Returns a fresh accountant by name: "prv" (default, tight) or "rdp".

    `neighboring` and `group_size` are passed to its constructor (see
    `torchdp_keras.accounting.base`).
    """
    if accountant == "prv":
        from torchdp_keras.accounting.prv import PRVAccountant

        return PRVAccountant(neighboring=neighboring, group_size=group_size)
    if accountant == "rdp":
        return RDPAccountant(neighboring=neighboring, group_size=group_size)
    raise DPConfigError(
        f"Expected accountant in {ACCOUNTANTS}. Received: accountant={accountant!r}"
    )


# Below this many training examples no delta is meaningful: any delta that
# is not negligible next to 1/n allows publishing an example outright.
TINY_TRAIN_SIZE = 100


def default_delta(n: int) -> float:
    """The delta used when none is given: 1 / max(n, 2)^1.1.

    For n >= 2 this is 1 / n^1.1, smaller than 1/n (a mechanism that
    publishes one random example outright has delta = 1/n). At n = 1 it is
    2^-1.1 ~ 0.47, which is only there so that a one-example run never
    crashes on an invalid delta: for tiny n (below `TINY_TRAIN_SIZE`), no
    delta is meaningful, and the DP models warn so.

    Example:
        >>> f"{default_delta(60000):.3g}"
        '5.55e-06'
        >>> 0 < default_delta(1) < 1
        True
    """
    return 1.0 / float(max(n, 2)) ** 1.1


def _run_shape(n, batch_size, epochs, names=("n", "batch_size", "epochs")) -> tuple[float, int]:
    """(sampling_probability, steps) of `epochs` epochs of batches of `batch_size` of `n`.

    `names` are the caller's names of the three arguments, for the error messages.
    """
    n_name, batch_name, epochs_name = names
    n = check_int(n, n_name)
    batch_size = check_int(batch_size, batch_name)
    epochs = check_positive(epochs, epochs_name)
    if batch_size > n:
        raise DPConfigError(
            f"Expected {batch_name} <= {n_name}. Received: {batch_name}={batch_size}, {n_name}={n}"
        )
    steps = math.inf
    for exact in (lambda: epochs * n / batch_size, lambda: epochs * (n / batch_size)):
        try:
            steps = exact()
        except OverflowError:  # n beyond float range
            continue
        if math.isfinite(steps):
            break
    if not math.isfinite(steps):
        raise DPConfigError(
            f"Expected a number of steps ({epochs_name} * {n_name} / {batch_name}) "
            f"that fits in a float. Received: {epochs_name}={epochs!r}, {n_name}={n}, "
            f"{batch_name}={batch_size}"
        )
    return batch_size / n, int(math.ceil(steps))


def compute_dp_sgd_privacy(
    n: int,
    batch_size: int,
    noise_multiplier: float,
    epochs: float,
    delta: float,
    *,
    conversion: str = "improved",
) -> tuple[float, float]:
    """Epsilon of DP-SGD by RDP, as TF Privacy's `compute_dp_sgd_privacy` reports it.

    Steps are `ceil(epochs * n / batch_size)` with sampling probability
    `batch_size / n`, RDP over TF Privacy's orders. The RDP curve is
    converted to epsilon with the **improved conversion** (Balle et al. 2020,
    Theorem 21), as current TF Privacy does: 0.942 for the MNIST tutorial's
    run. The tutorial notebook printed **1.18** because the TF Privacy of its
    day used the classic conversion `eps = rdp + log(1/delta) / (alpha - 1)`
    (Mironov 2017); `conversion="classic"` reproduces that number. Both are
    upper bounds on the true epsilon; the PRV accountant (`get_privacy_budget`)
    is tighter still.

    Args:
        n: Number of training examples.
        batch_size: (Expected) batch size.
        noise_multiplier: sigma.
        epochs: Number of epochs (may be fractional).
        delta: Target delta.
        conversion: "improved" (default) or "classic" (the notebook's 1.18).

    Returns:
        `(epsilon, optimal_order)`.

    Example:
        >>> eps, order = compute_dp_sgd_privacy(60000, 250, 1.3, 15, 1e-5)
        >>> round(eps, 3), order
        (0.942, 17.0)
        >>> round(compute_dp_sgd_privacy(60000, 250, 1.3, 15, 1e-5, conversion="classic")[0], 2)
        1.18
    """
    q, steps = _run_shape(n, batch_size, epochs)
    delta = check_delta(delta)
    accountant = RDPAccountant(orders=TF_PRIVACY_ORDERS, conversion=conversion)
    accountant.compose(noise_multiplier, q, steps)
    return accountant.get_epsilon_and_order(delta)


_ADJACENCY = {"add_or_remove": "add-or-remove-one", "replace_one": "replace-one"}


def _epsilon_for(
    sigma, q, steps, delta, accountant, group_size=1, neighboring="add_or_remove"
) -> float:
    acc = make_accountant(accountant, neighboring=neighboring, group_size=group_size)
    acc.compose(sigma, q, steps)
    return acc.get_epsilon(delta)


def get_privacy_budget(
    sample_size: int,
    batch_size: int,
    num_epochs: float,
    noise_multiplier: float,
    target_delta: float,
    accountant: str = "prv",
    *,
    verbose: bool = True,
) -> float:
    """Epsilon a planned run would spend; prints it as `op_tensorflow` does.

    The default accountant is PRV: it composes the privacy loss distribution
    numerically, on a lattice pair that dominates every step, so its value is
    a guaranteed upper bound on the true epsilon (within about 1% of it) and
    much closer to it than RDP. `op_tensorflow`'s numbers are RDP (TF Privacy's
    `compute_dp_sgd_privacy`: improved conversion): RDP bounds every
    order's Renyi divergence and converts with an inequality that is loose
    by design, so it is always higher, often by a factor of several at small
    q. Both are valid upper bounds for the same run; `accountant="rdp"`
    reproduces `op_tensorflow`'s number (0.27788 for its example: n =
    100000, batch 4, 20 epochs, sigma 1.2, delta 1e-5; PRV gives 0.0863).

    Args:
        sample_size: Number of training examples.
        batch_size: Expected batch size (Poisson sampling, q = batch_size / n).
        num_epochs: Number of epochs; steps = ceil(num_epochs * n / batch_size).
        noise_multiplier: sigma.
        target_delta: delta.
        accountant: "prv" (default) or "rdp" (`op_tensorflow`'s numbers).
        verbose: Print the result and the training parameters (to stdout), as
            `op_tensorflow` does.

    Returns:
        The epsilon (an upper bound).

    Example:
        >>> eps = get_privacy_budget(100000, 4, 20, 1.2, 1e-5, accountant="rdp")
        => EPSILON_REQUIRED = 0.27788023962... using TARGET_DELTA = 1e-05
        Training parameters used :-
        SAMPLE_SIZE = 100000
        BATCH_SIZE = 4
        NUM_EPOCHS = 20
        NOISE_MULTIPLIER = 1.2
        ACCOUNTANT = RDP
    """
    q, steps = _run_shape(
        sample_size, batch_size, num_epochs, ("sample_size", "batch_size", "num_epochs")
    )
    epsilon = _epsilon_for(noise_multiplier, q, steps, target_delta, accountant)
    if check_bool(verbose, "verbose"):
        note = (
            " (upper bound, tighter than op_tensorflow's RDP: pass accountant='rdp' for it)"
            if accountant == "prv"
            else ""
        )
        sys.stdout.write(
            f"=> EPSILON_REQUIRED = {epsilon} using TARGET_DELTA = {target_delta}\n"
            "Training parameters used :-\n"
            f"SAMPLE_SIZE = {sample_size}\n"
            f"BATCH_SIZE = {batch_size}\n"
            f"NUM_EPOCHS = {num_epochs}\n"
            f"NOISE_MULTIPLIER = {noise_multiplier}\n"
            f"ACCOUNTANT = {accountant.upper()}{note}\n"
        )
    return epsilon


def calibrate_noise_multiplier(
    target_epsilon: float,
    target_delta: float,
    sampling_probability: float,
    steps: int,
    accountant: str = "prv",
    *,
    tolerance: float = 0.01,
    neighboring: str = "add_or_remove",
    group_size: int = 1,
) -> float:
    """The noise multiplier that spends a budget to within `tolerance` (relative).

    Guarantee: the returned sigma gives
    `(1 - tolerance) * target_epsilon <= epsilon <= target_epsilon` by the
    chosen accountant (its upper bound, so the budget is never exceeded and
    at most 1% of it is left unspent by default). If the accountant's epsilon
    cannot be resolved that finely (a plateau or a step in its numerical
    bound), the search stops when sigma is pinned to 1e-6 (relative), still
    meeting `epsilon <= target_epsilon`.

    Args:
        target_epsilon: The epsilon not to exceed (> 0).
        target_delta: The delta of the guarantee.
        sampling_probability: q of each step, in (0, 1].
        steps: Number of steps (optimizer updates).
        accountant: "prv" (default) or "rdp".
        tolerance: Relative precision of the search in epsilon (default 1%).
        neighboring: "add_or_remove" (default) or "replace_one": the neighbouring
            relation the budget is about (see `torchdp_keras.accounting.pairs`).
        group_size: k >= 1: a budget about adding or removing k examples at once (one
            user's, with `UserDataLoader`-style user-level sampling use the users' q and
            1 instead: there the unit is already the user).

    Returns:
        sigma; 0.0 when the budget is infinite or nothing is spent (q or
        steps zero).

    Example:
        >>> sigma = calibrate_noise_multiplier(1.0, 1e-5, 0.01, 1000, accountant="rdp")
        >>> 1.45 < sigma < 1.6  # dp_accounting's RDP: epsilon 1.01 at sigma 1.50
        True
    """
    if (
        not isinstance(target_epsilon, numbers.Real)
        or isinstance(target_epsilon, bool)
        or math.isnan(to_float(target_epsilon))
        or target_epsilon <= 0
    ):
        raise DPConfigError(
            f"Expected target_epsilon > 0. Received: target_epsilon={target_epsilon!r}"
        )
    delta = check_delta(target_delta)
    _, q, steps = check_event(1.0, sampling_probability, steps)
    tolerance = check_positive(tolerance, "tolerance")
    if accountant not in ACCOUNTANTS:
        raise DPConfigError(
            f"Expected accountant in {ACCOUNTANTS}. Received: accountant={accountant!r}"
        )
    neighboring = check_neighboring(neighboring)
    group_size = check_group_size(group_size, neighboring)
    if math.isinf(to_float(target_epsilon)) or q == 0 or steps == 0:
        return 0.0

    target = to_float(target_epsilon)
    floor = (1.0 - min(tolerance, 1.0)) * target

    def epsilon(sigma):
        return _epsilon_for(sigma, q, steps, delta, accountant, group_size, neighboring)

    high = 1.0
    eps_high = epsilon(high)
    while not eps_high <= target:
        high *= 2.0
        if high > 1e6:
            raise DPConfigError(
                "No noise_multiplier up to 1e6 reaches the budget. Received: "
                f"target_epsilon={target_epsilon}, target_delta={delta}, "
                f"sampling_probability={q}, steps={steps}"
            )
        eps_high = epsilon(high)
    low, eps_low = high / 2.0, math.inf
    while eps_high < floor and low > 1e-6:
        eps_low = epsilon(low)
        if eps_low > target:
            break
        high, eps_high, low = low, eps_low, low / 2.0
    # Invariant: epsilon(high) <= target < epsilon(low) (or low is negligible). Regula falsi
    # on log(epsilon) against log(sigma), guarded by bisection.
    while eps_high < floor and high / low > 1.0 + 1e-6:
        mid = math.sqrt(high * low)
        if math.isfinite(eps_low) and eps_high > 0:
            slope = math.log(eps_low / eps_high) / math.log(high / low)
            aim = target - 0.25 * (target - floor)
            guess = high * math.exp(-math.log(aim / eps_high) / slope)
            if low * (high / low) ** 0.05 < guess < high / (high / low) ** 0.05:
                mid = guess
        eps_mid = epsilon(mid)
        if eps_mid <= target:
            high, eps_high = mid, eps_mid
        else:
            low, eps_low = mid, eps_mid
    return high


def compute_dp_sgd_privacy_statement(
    number_of_examples: int,
    batch_size: int,
    num_epochs: float,
    noise_multiplier: float,
    delta: float,
    used_microbatching: bool = True,
    max_examples_per_user: int | None = None,
    *,
    neighboring: str = "add_or_remove",
) -> str:
    """A privacy statement for a DP-SGD run, ready to publish with the model.

    It states example-level (epsilon, delta) with add-or-remove-one adjacency
    by the PRV accountant (tight) and the RDP accountant (for comparison),
    both under the Poisson-sampling assumption, and the weaker but
    assumption-free bound for shuffled fixed-size batches (each example once
    per epoch, no amplification by sampling). With `max_examples_per_user=k`,
    it adds the user-level guarantee (add or remove all of a user's examples)
    of the accountants' `group_size=k` option: the privacy loss of the k-fold
    neighbour itself (the number of a user's examples in a batch is
    Binomial(k, q)), not a conversion of the example-level guarantee. For
    TF Privacy's example run (10000 examples, batch 64, 5 epochs, noise 2.0
    with microbatching, delta 1e-6, k = 2) it gives 2.534 (PRV) and 3.39 (RDP),
    where TF Privacy's group-privacy conversion gives 3.71 and the former
    conversion here (one event of probability 1-(1-q)^k with sensitivity k)
    gave 17.0; `dp_accounting`'s PLD of the same mixture gives 2.53.

    Args:
        number_of_examples: Training set size n.
        batch_size: (Expected) batch size.
        num_epochs: Number of epochs.
        noise_multiplier: sigma.
        delta: Target delta.
        used_microbatching: TF Privacy's meaning: with microbatches of several
            examples and add-or-remove adjacency, one example can move across
            microbatch boundaries and change two clipped terms, so the
            sensitivity is doubled (sigma is halved for the accounting).
            Set False when every microbatch holds one example.
        max_examples_per_user: If set, also report user-level DP for users
            contributing at most this many examples.
        neighboring: "add_or_remove" (default) or "replace_one" for the example-level
            lines (replace-one adjacency; user-level needs add_or_remove).

    Returns:
        The statement, several lines of text.
    """
    names = ("number_of_examples", "batch_size", "num_epochs")
    q, steps = _run_shape(number_of_examples, batch_size, num_epochs, names)
    delta = check_delta(delta)
    sigma, _, _ = check_event(noise_multiplier, q, steps)
    used_microbatching = check_bool(used_microbatching, "used_microbatching")
    k = check_optional_positive_int(max_examples_per_user, "max_examples_per_user")
    neighboring = check_neighboring(neighboring)
    if k is not None and neighboring != "add_or_remove":
        raise DPConfigError(
            "Expected neighboring='add_or_remove' with max_examples_per_user (user-level "
            "DP adds or removes a user). Received: "
            f"neighboring={neighboring!r}, max_examples_per_user={max_examples_per_user!r}"
        )
    effective_sigma = sigma / 2.0 if used_microbatching else sigma
    epochs_rounded = int(math.ceil(num_epochs))

    def eps(accountant, sampling_probability, n_steps, group_size=1):
        if group_size > MAX_GROUP_SIZE:
            # Beyond the exact group accounting: the user's examples as one event of
            # probability 1-(1-q)^k and sensitivity k (valid by joint convexity, loose).
            k_float = to_float(group_size)
            sampling_probability = (
                1.0
                if sampling_probability == 1
                else -math.expm1(k_float * math.log1p(-sampling_probability))
            )
            return _epsilon_for(
                effective_sigma / k_float, sampling_probability, n_steps, delta, accountant
            )
        return _epsilon_for(
            effective_sigma,
            sampling_probability,
            n_steps,
            delta,
            accountant,
            group_size,
            "add_or_remove" if group_size > 1 else neighboring,
        )

    lines = [
        "DP-SGD performed over "
        f"{number_of_examples} examples with {batch_size} examples per iteration, "
        f"noise multiplier {sigma} for {num_epochs} epochs "
        f"({steps} steps, sampling probability {q:.4g}) "
        + ("with microbatching" if used_microbatching else "without microbatching")
        + (
            f", and at most {max_examples_per_user} examples per user."
            if k is not None
            else ", and no bound on the number of examples per user."
        ),
        "",
        "This privacy guarantee protects the release of all model checkpoints in "
        "addition to the final model.",
        "",
        f"Example-level DP with {_ADJACENCY[neighboring]} adjacency at delta = {delta}:",
    ]
    if used_microbatching:
        lines.append(
            "    (microbatching doubles the sensitivity: accounted with noise "
            f"multiplier {effective_sigma})"
        )
    lines += [
        f"    Epsilon assuming Poisson sampling (*), PRV accountant: {eps('prv', q, steps):.3f}",
        f"    Epsilon assuming Poisson sampling (*), RDP accountant: {eps('rdp', q, steps):.3f}",
        "    Epsilon with each example occurring once per epoch (shuffled batches, "
        f"no amplification): {eps('prv', 1.0, epochs_rounded):.3f}",
    ]
    if k is not None:
        # A user's k examples are each in a batch independently with probability q:
        # the accountants' group_size=k pair, the Binomial(k, q) mixture of Gaussians
        # against N(0) in both directions (tight; see accounting/pairs.py). Without
        # sampling, the k examples can all be in every step: sensitivity k per step.
        lines += [
            "",
            f"User-level DP with add-or-remove-one-user adjacency at delta = {delta}, "
            f"users contributing at most {k} examples "
            + (
                "(tight group accounting of the subsampled Gaussian, not a group-privacy "
                "conversion):"
                if k <= MAX_GROUP_SIZE
                else f"(more than {MAX_GROUP_SIZE} examples: a loose group-privacy bound):"
            ),
            "    Epsilon assuming Poisson sampling (*), PRV accountant: "
            f"{eps('prv', q, steps, group_size=k):.3f}",
            "    Epsilon assuming Poisson sampling (*), RDP accountant: "
            f"{eps('rdp', q, steps, group_size=k):.3f}",
            "    Epsilon with each example occurring once per epoch (shuffled batches, "
            f"no amplification): {eps('prv', 1.0, epochs_rounded, group_size=k):.3f}",
        ]
    else:
        lines += [
            "",
            "User-level caveat: these guarantees protect one example. A person who "
            "contributed several examples is protected only by group privacy, which "
            "degrades with the number of examples; pass max_examples_per_user to "
            "report a user-level guarantee.",
        ]
    lines += [
        "",
        "(*) Poisson sampling is not usually done in training pipelines, but "
        "assuming that the data was randomly shuffled, it is believed that the "
        "actual epsilon should be closer to this value than the conservative "
        "assumption of an arbitrary data order. Chua et al. (2024) showed that "
        "shuffled fixed-size batches can be noticeably less private than this "
        "estimate; use torchdp_keras's Poisson sampling to make it exact.",
    ]
    return "\n".join(lines)
