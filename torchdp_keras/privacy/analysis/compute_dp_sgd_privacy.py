"""TF Privacy's `privacy.analysis.compute_dp_sgd_privacy`, the MNIST tutorial's module.

The tutorial calls `compute_dp_sgd_privacy.compute_dp_sgd_privacy(n=60000,
batch_size=250, noise_multiplier=1.3, epochs=15, delta=1e-5)`, which prints
its statement and returns `(epsilon, optimal_order)`; so does this one.
"""

from __future__ import annotations

import sys

from torchdp_keras.accounting import analysis
from torchdp_keras.accounting.analysis import compute_dp_sgd_privacy_statement

__all__ = ["compute_dp_sgd_privacy", "compute_dp_sgd_privacy_statement"]


def compute_dp_sgd_privacy(
    n: int,
    batch_size: int,
    noise_multiplier: float,
    epochs: float,
    delta: float,
    *,
    conversion: str = "improved",
    verbose: bool = True,
) -> tuple[float, float]:
    """Epsilon of DP-SGD by RDP; prints TF Privacy's statement (unless `verbose=False`).

    The RDP curve over TF Privacy's orders is converted with the **improved
    conversion** (Balle et al. 2020): 0.942 for the tutorial's run. The
    notebook printed **1.18** because the TF Privacy of its day used the
    classic conversion (Mironov 2017); pass `conversion="classic"` to get it.
    Both are upper bounds; `torchdp_keras.get_privacy_budget` (PRV) is tighter.
    See `torchdp_keras.compute_dp_sgd_privacy` for the arguments.

    Returns:
        `(epsilon, optimal_order)`.

    Example:
        >>> eps, order = compute_dp_sgd_privacy(
        ...     n=60000, batch_size=250, noise_multiplier=1.3, epochs=15, delta=1e-5,
        ...     conversion="classic", verbose=False)
        >>> round(eps, 2), order
        (1.18, 17.0)
    """
    eps, order = analysis.compute_dp_sgd_privacy(
        n, batch_size, noise_multiplier, epochs, delta, conversion=conversion
    )
    if verbose:
        q, steps = analysis._run_shape(n, batch_size, epochs)
        sys.stdout.write(
            f"DP-SGD with sampling rate = {100 * q:.3g}% and noise_multiplier = "
            f"{noise_multiplier} iterated over {steps} steps satisfies differential privacy "
            f"with eps = {eps:.3g} and delta = {delta}.\n"
            f"The optimal RDP order is {order}. (RDP, {conversion} conversion; "
            "conversion='classic' gives the number older TF Privacy printed.)\n"
        )
    return eps, order
