"""TF Privacy's `privacy.analysis.rdp_accountant`: `compute_rdp` and `get_privacy_spent`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from torchdp_keras.accounting.base import check_delta, check_event
from torchdp_keras.accounting.rdp import (
    _check_orders,
    rdp_to_delta,
    rdp_to_epsilon,
    subsampled_gaussian_rdp,
)
from torchdp_keras.errors import DPConfigError

__all__ = ["compute_rdp", "get_privacy_spent"]


def compute_rdp(
    q: float, noise_multiplier: float, steps: int, orders: Sequence[float] | float
) -> np.ndarray | float:
    """RDP of `steps` steps of the Poisson-subsampled Gaussian mechanism, per order.

    Args:
        q: Sampling probability in [0, 1].
        noise_multiplier: sigma >= 0.
        steps: Number of steps.
        orders: An RDP order > 1, or a sequence of them.

    Returns:
        The RDP values (a float for a single order, else an array).

    Example:
        >>> float(compute_rdp(1.0, 1.0, 3, 2.0))
        3.0
    """
    sigma, q, steps = check_event(noise_multiplier, q, steps)  # q: sampling_probability
    scalar = np.ndim(orders) == 0
    values = _check_orders([orders] if scalar else orders)
    rdp = subsampled_gaussian_rdp(q, sigma, values) * steps
    return float(rdp[0]) if scalar else rdp


def get_privacy_spent(
    orders: Sequence[float] | float,
    rdp: Sequence[float] | float,
    target_eps: float | None = None,
    target_delta: float | None = None,
) -> tuple[float, float, float]:
    """(epsilon, delta, optimal order) from an RDP curve: give exactly one target.

    Uses the improved conversion (Balle et al. 2020) in both directions.

    Args:
        orders: The RDP orders.
        rdp: The RDP value per order (e.g. from `compute_rdp`).
        target_eps: Epsilon for which to compute delta.
        target_delta: Delta for which to compute epsilon.

    Returns:
        `(eps, delta, opt_order)`.

    Example:
        >>> orders = [1.5, 2.0, 4.0, 8.0, 16.0, 32.0]
        >>> rdp = compute_rdp(250 / 60000, 1.3, 3600, orders)
        >>> eps, delta, order = get_privacy_spent(orders, rdp, target_delta=1e-5)
        >>> 0.9 < eps < 1.0, delta, order
        (True, 1e-05, 16.0)
    """
    if (target_eps is None) == (target_delta is None):
        raise DPConfigError(
            "Expected exactly one of target_eps and target_delta. Received: "
            f"target_eps={target_eps!r}, target_delta={target_delta!r}"
        )
    values = _check_orders(np.atleast_1d(orders).tolist())
    curve = np.atleast_1d(np.asarray(rdp, dtype=np.float64))
    if curve.shape != (len(values),):
        raise DPConfigError(
            f"Expected one rdp value per order ({len(values)}). Received: rdp of shape "
            f"{curve.shape}"
        )
    if target_eps is None:  # so target_delta is given (exactly one is, checked above)
        delta = check_delta(target_delta)
        eps, order = rdp_to_epsilon(curve, values, delta)
        return eps, delta, order
    delta, order = rdp_to_delta(curve, values, target_eps)
    return float(target_eps), delta, order
