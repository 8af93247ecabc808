"""The examples' scattering transform against a direct (slow) computation, and the
per-image independence that makes it free in privacy."""

import importlib.util
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_scattering():
    path = os.path.join(ROOT, "examples", "_scattering.py")
    spec = importlib.util.spec_from_file_location("examples_scattering", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


S = _load_scattering()


def circular_convolution(x: np.ndarray, f: np.ndarray) -> np.ndarray:
    """out[p] = sum_q f[q] x[p - q] (indices mod the grid), one shift at a time."""
    out = np.zeros(x.shape, dtype=np.complex128)
    for a in range(f.shape[0]):
        for b in range(f.shape[1]):
            out += f[a, b] * np.roll(x, (a, b), axis=(0, 1))
    return out


def reference_scattering(image: np.ndarray) -> np.ndarray:
    """The 81 coefficients of one 28 x 28 image, from spatial convolutions.

    Order 0 and 1 are computed at full resolution and subsampled at the end;
    order 2 is subsampled by 2 after the j2 = 1 wavelet and averaged on that
    grid with the low-pass filter of the half grid, which is the computation
    the module documents.
    """
    padded = np.pad(image.astype(np.float64), S.PAD, mode="reflect")
    psi = S.wavelets()
    phi, phi_half = S.low_pass(), S.low_pass(S.SIZE // 2)

    def average(u, filt, step):
        return circular_convolution(u, filt).real[::step, ::step][1:-1, 1:-1]

    channels = [average(padded, phi, 4)]
    u1 = {}
    for j1 in range(S.J):
        for l1 in range(S.L):
            full = np.abs(circular_convolution(padded, psi[j1 * S.L + l1]))
            u1[j1, l1] = full
            sub = full[:: 2**j1, :: 2**j1]
            channels.append(average(sub, S.low_pass(S.SIZE // 2**j1), 4 // 2**j1))
    for l1 in range(S.L):
        for l2 in range(S.L):
            u2 = np.abs(circular_convolution(u1[0, l1], psi[S.L + l2]))[::2, ::2]
            channels.append(average(u2, phi_half, 2))
    return np.stack(channels, axis=-1)


def test_filters_are_wavelets_and_an_averaging_filter():
    psi = S.wavelets()
    assert psi.shape == (S.J * S.L, S.SIZE, S.SIZE)
    np.testing.assert_allclose(psi.sum(axis=(1, 2)), 0.0, atol=1e-12)  # zero mean
    for size in (S.SIZE, S.SIZE // 2):
        assert S.low_pass(size).sum() == pytest.approx(1.0, abs=1e-6)
    # Orientations differ: no two wavelets of one scale are the same filter.
    for j in range(S.J):
        bank = psi[j * S.L : (j + 1) * S.L].reshape(S.L, -1)
        gram = np.abs(bank @ bank.conj().T) / np.sum(np.abs(bank) ** 2, axis=1)
        assert np.all(gram[~np.eye(S.L, dtype=bool)] < 0.99)


def test_scattering_equals_the_direct_computation():
    rng = np.random.default_rng(0)
    images = rng.random((2, 28, 28)).astype(np.float32)
    images[1, :6] = 0.0  # a digit-like zero border on one of them
    ours = S.scattering(images)
    assert ours.shape == (2, 7, 7, 81) and ours.dtype == np.float32
    for i in range(2):
        np.testing.assert_allclose(ours[i], reference_scattering(images[i]), rtol=2e-4, atol=2e-5)


def test_each_image_is_transformed_on_its_own():
    """No statistic crosses examples: changing one image changes only its own row."""
    rng = np.random.default_rng(2)
    images = rng.random((5, 28, 28)).astype(np.float32)
    changed = images.copy()
    changed[3] = rng.random((28, 28))
    for transform in (
        lambda x: S.scattering(x, chunk=2),
        lambda x: S.group_normalize(S.scattering(x)),
    ):
        a, b = transform(images), transform(changed)
        np.testing.assert_array_equal(np.delete(a, 3, axis=0), np.delete(b, 3, axis=0))
        assert not np.allclose(a[3], b[3])


def test_scattering_is_positively_homogeneous():
    images = np.random.default_rng(3).random((2, 28, 28)).astype(np.float32)
    np.testing.assert_allclose(
        S.scattering(3.0 * images), 3.0 * S.scattering(images), rtol=1e-4, atol=1e-6
    )


def test_group_normalize_standardises_each_group_of_each_example():
    features = np.random.default_rng(4).normal(2.0, 5.0, size=(3, 7, 7, 81)).astype(np.float32)
    out = S.group_normalize(features, groups=27).reshape(3, 7, 7, 27, 3)
    np.testing.assert_allclose(out.mean(axis=(1, 2, 4)), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.std(axis=(1, 2, 4)), 1.0, atol=1e-4)


def test_group_normalize_names_a_bad_group_count():
    with pytest.raises(ValueError, match="groups=10"):
        S.group_normalize(np.zeros((1, 7, 7, 81), np.float32), groups=10)
