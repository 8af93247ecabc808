"""deel-lipdp's `sensitivity` module: the epoch budget, and checks of the gradient bounds."""

from __future__ import annotations

import logging

import keras
import numpy as np
import torch

from torchdp_keras import _keras_compat as keras_compat
from torchdp_keras._validation import check_int, check_positive
from torchdp_keras.lipschitz.model import get_eps_delta

logger = logging.getLogger(__name__)

__all__ = ["check_layer_gradient_norm", "get_max_epochs", "gradient_norm_check"]


def get_max_epochs(epsilon_max: float, model, epochs_max: int | None = 1024) -> int:
    """The most epochs whose planned epsilon stays `<= epsilon_max` (deel-lipdp's function).

    Bisection on `get_eps_delta(model, epochs)`, which never decreases with
    the epochs. deel-lipdp passes `(epoch + 1) * steps_per_epoch` where
    `get_eps_delta` expects epochs, and returns the last midpoint tried,
    which can be above the budget; this returns the largest whole number of
    epochs within it (0 if even one epoch exceeds it).

    Args:
        epsilon_max: The budget, a finite number `> 0`.
        model: A `DP_Sequential` or `DP_Model`.
        epochs_max: Upper end of the search (an integer `>= 1`), or None to
            double it until the budget is exceeded.

    Returns:
        The number of epochs.
    """
    epsilon_max = check_positive(epsilon_max, "epsilon_max")

    def epsilon(epochs: int) -> float:
        return get_eps_delta(model, epochs)[0] if epochs else 0.0

    if epochs_max is None:
        epochs_max = 1
        while epsilon(epochs_max) <= epsilon_max:
            epochs_max *= 2
    else:
        epochs_max = check_int(epochs_max, "epochs_max")
        if epsilon(epochs_max) <= epsilon_max:
            return epochs_max
    low, high = 0, epochs_max  # epsilon(low) <= budget < epsilon(high)
    while high - low > 1:
        middle = (low + high) // 2
        if epsilon(middle) <= epsilon_max:
            low = middle
        else:
            high = middle
        logger.info("epoch bounds = (%d, %d)", low, high)
    return low


def check_layer_gradient_norm(S: float, layer, examples) -> bool:
    """Whether every example's Jacobian w.r.t. the layer's weight has spectral norm `< S`.

    deel-lipdp's check: the layer alone, its single trainable variable, the
    Jacobian of each example's output with respect to it (output entries by
    weight entries), its largest singular value.

    Args:
        S: The bound to check.
        layer: A built layer with one trainable variable.
        examples: A batch of inputs (numpy or tensor).

    Returns:
        True when the largest singular value over the examples is `< S`.
    """
    variables = layer.trainable_variables
    if len(variables) != 1:
        raise ValueError(
            f"Expected a layer with one trainable variable. Received: {layer.name} with "
            f"{len(variables)}"
        )
    (variable,) = variables
    x = keras.ops.convert_to_tensor(examples)
    largest = 0.0
    for i in range(x.shape[0]):
        xi = x[i : i + 1]

        def output(weight, xi=xi):
            with keras_compat.StatelessScope(state_mapping=[(variable, weight)]):
                return layer(xi)

        jacobian = torch.func.jacrev(output)(variable.value.detach())
        matrix = jacobian.reshape(-1, variable.value.numel()).double()
        largest = max(largest, float(torch.linalg.matrix_norm(matrix, ord=2)))
    return largest < S


def gradient_norm_check(K_list, model, examples) -> None:
    """deel-lipdp's check of per-layer bounds `K_l * max_i ||x_i||` (asserts each).

    Args:
        K_list: One bound factor per layer of `model.layers`.
        model: A model whose layers each have one trainable variable.
        examples: The inputs; the bounds scale with their largest norm.

    Raises:
        AssertionError: a layer's Jacobian exceeds its bound.
    """
    x = np.asarray(examples)
    x_max = float(np.linalg.norm(x.reshape(len(x), -1), axis=1).max())
    bounds = np.asarray(K_list, dtype=np.float64) * x_max
    assert len(model.layers) == len(bounds)
    for layer, bound in zip(model.layers, bounds):
        assert check_layer_gradient_norm(bound, layer, x)
