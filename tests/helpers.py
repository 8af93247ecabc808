"""Slow, obviously-correct references the tests compare the package against.

Everything here works one example at a time with plain Keras calls and
`torch.autograd`, with no vmap and no torchdp_keras code.
"""

from __future__ import annotations

import keras
import numpy as np
import torch


def reference_unit_loss(model, x, y, sample_weight=None, training=True):
    """The user's loss of one batch (one unit), weight regularizers excluded.

    `model.losses` after an eager call holds the activity losses of that call
    plus the weight-regularizer losses; the latter are subtracted back out.
    """
    y_pred = model(x, training=training)
    loss = model._compile_loss(y, y_pred, sample_weight)
    for extra in model.losses:
        loss = loss + torch.sum(extra)
    for reg in model._get_regularization_losses():
        loss = loss - reg
    return loss


def reference_per_example_gradients(model, x, y, sample_weight=None, unit_size=1):
    """Per-unit gradients: the gradient of the loss of each unit alone.

    Returns a list (one entry per trainable variable) of numpy arrays of shape
    `(num_units, *variable.shape)`.
    """
    variables = model.trainable_variables
    n = len(x) if not isinstance(x, (list, tuple)) else len(x[0])
    per_unit = []
    for start in range(0, n, unit_size):
        window = slice(start, start + unit_size)

        def take(t, w=window):
            if t is None:
                return None
            if isinstance(t, (list, tuple)):
                return [torch.as_tensor(np.asarray(a)[w]) for a in t]
            return torch.as_tensor(np.asarray(t)[w])

        with torch.enable_grad():
            loss = reference_unit_loss(model, take(x), take(y), take(sample_weight))
            grads = torch.autograd.grad(loss, [v.value for v in variables], allow_unused=True)
        per_unit.append(
            [
                np.zeros(v.shape) if g is None else g.detach().cpu().numpy()
                for g, v in zip(grads, variables)
            ]
        )
    return [np.stack(parts) for parts in zip(*per_unit)]


def reference_clipped_sum(per_unit_grads, l2_norm_clip):
    """sum_i min(1, C/||g_i||) g_i in float64 numpy, norms over all variables."""
    flat = np.concatenate(
        [g.reshape(g.shape[0], -1).astype(np.float64) for g in per_unit_grads], axis=1
    )
    norms = np.linalg.norm(flat, axis=1)
    factors = np.minimum(1.0, l2_norm_clip / np.maximum(norms, 1e-300))
    return [np.tensordot(factors, g.astype(np.float64), axes=1) for g in per_unit_grads]


def relative_error(actual, expected):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    scale = max(np.linalg.norm(expected), 1e-12)
    return float(np.linalg.norm(actual - expected) / scale)


def copy_weights(source: keras.Model, target: keras.Model) -> None:
    target.set_weights(source.get_weights())


def mp_subsampled_gaussian_rdp(q, sigma, alpha, dps=50):
    """RDP of the Poisson-subsampled Gaussian by high-precision numerical integration.

    `log(E_{z~N(0,s^2)}[((1-q) + q exp((2z-1)/(2 s^2)))^alpha]) / (alpha - 1)`, the
    definition itself (Mironov, Talwar and Zhang 2019), with mpmath.
    """
    import mpmath

    mpmath.mp.dps = dps

    def integrand(z):
        ratio = (1 - q) + q * mpmath.exp((2 * z - 1) / (2 * sigma**2))
        return mpmath.npdf(z, 0, sigma) * ratio**alpha

    # Split where the integrand's mass sits: around 0 and around the mode of
    # the tilted component, so that the quadrature resolves narrow peaks.
    center = alpha  # the alpha-tilted mixture peaks near z = alpha (in units of 1)
    points = sorted(
        {
            -mpmath.inf,
            -40 * sigma,
            -5 * sigma,
            0,
            0.5,
            1,
            center,
            center + 5 * sigma,
            40 * sigma + center,
            mpmath.inf,
        }
    )
    value = mpmath.quad(integrand, points)
    return float(mpmath.log(value) / (alpha - 1))
