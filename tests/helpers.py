"""Slow, obviously-correct references the tests compare the package against.

Everything here works one example at a time with plain Keras calls and
`torch.autograd`, with no vmap and no torchdp_keras code.
"""

from __future__ import annotations

import os

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


# ---------------------------------------------------------------- Philox noise --
# A slow, numpy-only transcription of csrc/clip_noise.h, operation by operation
# (numpy float64 ufuncs round every operation, as the kernels do), to check
# the kernels' noise bit for bit.
_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
_MASK32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(counter_words, key_words):
    """Philox4x32-10 on arrays: counter (c0..c3) and key (k0, k1) as uint64 arrays."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) & _MASK32 for c in counter_words)
    k0, k1 = (np.asarray(k, dtype=np.uint64) & _MASK32 for k in key_words)
    for _ in range(10):
        p0 = _M0 * c0
        p1 = _M1 * c2
        hi0, lo0 = p0 >> np.uint64(32), p0 & _MASK32
        hi1, lo1 = p1 >> np.uint64(32), p1 & _MASK32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
    return c0, c1, c2, c3


def _uniform53(high, low):
    bits = ((high << np.uint64(32)) | low) >> np.uint64(11)
    return (bits.astype(np.int64).astype(np.float64) + 1.0) * (1.0 / 9007199254740992.0)


def _log_basic(u):
    m, e = np.frexp(u)  # u = m 2^e, m in [0.5, 1)
    m, e = m * 2.0, e - 1  # m in [1, 2), as the kernel's bit manipulation
    high = m >= 1.41421356237309504880
    m = np.where(high, m * 0.5, m)
    e = np.where(high, e + 1, e)
    s = (m - 1.0) / (m + 1.0)
    s2 = s * s
    series = np.full_like(s, 1.0 / 19.0)
    for c in (17, 15, 13, 11, 9, 7, 5, 3):
        series = series * s2 + 1.0 / c
    series = series * s2 + 1.0
    log_m = 2.0 * s * series
    ln2_hi, ln2_lo = 6.93147180369123816490e-01, 1.90821492927058770002e-10
    e = e.astype(np.float64)
    return e * ln2_hi + (log_m + e * ln2_lo)


def _sin_small(t):
    t2 = t * t
    p = np.full_like(t, 1.0 / 6227020800.0)
    for c in (-1.0 / 39916800.0, 1.0 / 362880.0, -1.0 / 5040.0, 1.0 / 120.0, -1.0 / 6.0):
        p = p * t2 + c
    return t + t * (t2 * p)


def _cos_small(t):
    t2 = t * t
    p = np.full_like(t, 1.0 / 87178291200.0)
    for c in (-1.0 / 479001600.0, 1.0 / 3628800.0, -1.0 / 40320.0, 1.0 / 720.0, -1.0 / 24.0):
        p = p * t2 + c
    p = p * t2 + 0.5
    return 1.0 - t2 * p


def philox_normals(seed: int, first: int, count: int) -> np.ndarray:
    """Normals number first .. first + count - 1 of the kernels' stream `seed`."""
    n = np.arange(first, first + count, dtype=np.uint64)
    counter = n >> np.uint64(1)
    seed = np.uint64(seed)
    x0, x1, x2, x3 = philox4x32_10(
        (counter & _MASK32, counter >> np.uint64(32), np.zeros_like(n), np.zeros_like(n)),
        (seed & _MASK32, seed >> np.uint64(32)),
    )
    u1, u2 = _uniform53(x0, x1), _uniform53(x2, x3)
    radius = np.sqrt(-2.0 * _log_basic(u1))
    quarters = u2 * 4.0
    q = np.select(
        [quarters >= 3.5, quarters >= 2.5, quarters >= 1.5, quarters >= 0.5], [4, 3, 2, 1], 0
    )
    t = (u2 - 0.25 * q.astype(np.float64)) * 6.28318530717958647692
    s, c = _sin_small(t), _cos_small(t)
    q = q & 3
    sin = np.select([q == 0, q == 1, q == 2], [s, c, -s], -c)
    cos = np.select([q == 0, q == 1, q == 2], [c, -s, -c], s)
    return np.where((n & np.uint64(1)) == 1, radius * sin, radius * cos)


@keras.saving.register_keras_serializable(package="tests")
class Scale(keras.layers.Layer):
    """A weighted layer that no built-in fast-clipping rule covers: x * w."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="w")

    def call(self, x):
        return x * self.w


def zero_gradient_model(width: int = 100, **dp) -> keras.Model:
    """A compiled DPSequential whose MSE gradient on zero targets is exactly 0.

    Zero weights and targets: one SGD(1.0) step moves the weights by minus
    the noise over the normaliser, so the update *is* the noise.
    """
    import torchdp_keras as tdk

    model = tdk.DPSequential(
        [
            keras.Input((width,)),
            keras.layers.Dense(width, kernel_initializer="zeros", bias_initializer="zeros"),
        ],
        **dp,
    )
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    return model


# The repository root (tests/ is one level below it, whichever subfolder imports this).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_MNIST = os.path.join(
    ROOT,
    os.pardir,
    "shared",
    "data",
    "mnist.npz",
)


def write_synthetic_mnist(path: str, seed: int = 0) -> str:
    """Writes a learnable stand-in for MNIST in keras layout (uint8, 60000/10000 x 28 x 28).

    Used when `../shared/data/mnist.npz` is absent (a bare clone): the
    examples and benchmarks then run on data of MNIST's shapes and dtypes,
    each class a fixed random template plus noise, without any download.
    """
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, 2, size=(10, 28, 28), dtype=np.uint8) * np.uint8(160)

    def split(n):
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        noise = rng.integers(0, 96, size=(n, 28, 28), dtype=np.uint8)
        return templates[labels] + noise, labels

    x_train, y_train = split(60000)
    x_test, y_test = split(10000)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path
