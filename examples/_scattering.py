"""A fixed 2-D wavelet scattering transform (Mallat), for the ScatterNet examples.

Tramer & Boneh (ICLR 2021, "Differentially Private Learning Needs Better
Features") train DP-SGD on top of a scattering transform of the images: a
cascade of Morlet wavelet convolutions, moduli and a Gaussian low-pass
filter, with no learnt weight. Its filters are fixed mathematical
functions, chosen before seeing any data, so computing it is
data-independent preprocessing applied to each image on its own: it costs no
privacy, and the (epsilon, delta) guarantee of the DP training on its
output covers the images.

This module computes the order-2 transform with J = 2 scales and L = 8
orientations on 28 x 28 images, in the configuration of Kymatio's
`Scattering2D(J=2, L=8)` (Morlet filters with sigma = 0.8 * 2**j,
xi = 3 pi / (4 * 2**j), slant 4 / L; Gaussian low-pass with sigma = 0.8 * 2**J;
output subsampled by 2**J), with its own implementation (FFT convolutions
on a 36 x 36 reflection-padded grid; each path is computed at the
resolution 2**j of its last wavelet, as Kymatio does), so its coefficients
are close to, not identical with, Kymatio's. Output: (n, 7, 7, 81) float32,
channels last: 1 order-0, J * L = 16 order-1 and L**2 * J * (J - 1) / 2 = 64 order-2 channels.

Not part of the library: the examples import it as a sibling module.
"""

from __future__ import annotations

import math

import numpy as np
import torch

J, L = 2, 8
PAD = 4  # reflection padding on each side: 28 + 2 * PAD = 36 = 2**J * 9 points per axis
SIZE = 28 + 2 * PAD


def gabor(size: int, sigma: float, theta: float, xi: float, slant: float) -> np.ndarray:
    """A 2-D Gabor filter on a `size` x `size` periodic grid centred at index 0.

    exp(-x^T A x / 2) * exp(i xi (x cos theta + y sin theta)), with A the
    rotation by theta of diag(1, slant^2) / sigma^2, divided by
    2 pi sigma^2 / slant so that its Gaussian envelope sums to about 1.
    """
    coords = np.fft.fftfreq(size, d=1.0 / size)  # 0, 1, ..., -1 (periodic, centred at 0)
    x, y = np.meshgrid(coords, coords, indexing="ij")
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    curvature = rotation @ np.diag([1.0, slant**2]) @ rotation.T / (2 * sigma**2)
    quadratic = curvature[0, 0] * x**2 + 2 * curvature[0, 1] * x * y + curvature[1, 1] * y**2
    phase = xi * (x * math.cos(theta) + y * math.sin(theta))
    return np.exp(-quadratic + 1j * phase) / (2 * math.pi * sigma**2 / slant)


def morlet(size: int, sigma: float, theta: float, xi: float, slant: float) -> np.ndarray:
    """A Morlet wavelet: the Gabor filter minus its envelope times a constant, zero mean."""
    wave = gabor(size, sigma, theta, xi, slant)
    envelope = gabor(size, sigma, theta, 0.0, slant)
    return wave - envelope * (wave.sum() / envelope.sum())


def wavelets(size: int = SIZE) -> np.ndarray:
    """(J * L, size, size) complex Morlet wavelets; index j * L + l has scale 2**j and
    orientation theta_l = (L // 2 - 1 - l) * pi / L."""
    return np.stack(
        [
            morlet(
                size,
                0.8 * 2**j,
                (L // 2 - 1 - l) * math.pi / L,
                3.0 * math.pi / 4.0 / 2**j,
                4.0 / L,
            )
            for j in range(J)
            for l in range(L)  # noqa: E741 (the orientation's usual name)
        ]
    )


def low_pass(size: int = SIZE) -> np.ndarray:
    """The Gaussian low-pass filter of scale 2**J, on a grid `size / SIZE` as fine."""
    return gabor(size, 0.8 * 2**J * size / SIZE, 0.0, 0.0, 1.0).real


def _spectrum(filters: np.ndarray) -> torch.Tensor:
    return torch.fft.fft2(torch.from_numpy(filters).to(torch.complex64))


def _subsample(spectrum: torch.Tensor, k: int) -> torch.Tensor:
    """The spectrum of the signal subsampled by k per axis (its aliases summed)."""
    if k == 1:
        return spectrum
    m, n = spectrum.shape[-2] // k, spectrum.shape[-1] // k
    total = spectrum[..., :m, :n].clone()
    for a in range(k):
        for b in range(k):
            if a or b:
                total += spectrum[..., a * m : (a + 1) * m, b * n : (b + 1) * n]
    return total / (k * k)


def scattering(images: np.ndarray, chunk: int = 1000) -> np.ndarray:
    """The scattering coefficients of (n, 28, 28[, 1]) images: (n, 7, 7, 81) float32.

    Channels: order 0; order 1 by (j1, l1); order 2 by (l1, l2) for j1 = 0,
    j2 = 1. Coefficient (i, k) is centred on pixel (4 i, 4 k).

    Args:
        images: pixel values (the transform is positively homogeneous: scaling
            the images scales the coefficients).
        chunk: images per FFT batch (memory: about chunk * 700 KiB).
    """
    x = np.asarray(images, dtype=np.float32).reshape(len(images), 28, 28)
    psi = _spectrum(wavelets()).reshape(J, L, SIZE, SIZE)
    phi = {size: _spectrum(low_pass(size)) for size in (SIZE, SIZE // 2)}
    step = 2**J

    def averaged(signal_hat, size):
        """Low-pass at grid `size`, subsampled to the 9 x 9 grid, border dropped: 7 x 7."""
        out = torch.fft.ifft2(_subsample(signal_hat * phi[size], step * size // SIZE)).real
        return out[..., 1:-1, 1:-1].flatten(1, -3)

    out = []
    for start in range(0, len(x), chunk):
        batch = torch.from_numpy(x[start : start + chunk])
        padded = torch.nn.functional.pad(batch[:, None], (PAD,) * 4, mode="reflect")
        x_hat = torch.fft.fft2(padded.to(torch.complex64))  # (b, 1, 36, 36)
        parts = [averaged(x_hat, SIZE)]
        for j1 in range(J):
            # U1 = |x * psi_{j1}| at resolution 2**j1
            u1 = torch.fft.ifft2(_subsample(x_hat * psi[j1], 2**j1)).abs()
            size = SIZE // 2**j1
            u1_hat = torch.fft.fft2(u1.to(torch.complex64))
            parts.append(averaged(u1_hat, size))
            if j1 == 0:
                # U2 = |U1 * psi_{j2 = 1}| at resolution 2: (b, L, L, 18, 18)
                u2 = torch.fft.ifft2(_subsample(u1_hat[:, :, None] * psi[1][None, None], 2))
                u2_hat = torch.fft.fft2(u2.abs().to(torch.complex64))
                second = averaged(u2_hat.flatten(1, 2), SIZE // 2)
        parts.append(second)
        coefficients = torch.cat(parts, dim=1)  # (b, 81, 7, 7)
        out.append(coefficients.permute(0, 2, 3, 1).numpy().astype(np.float32))
    return np.concatenate(out)


def group_normalize(features: np.ndarray, groups: int = 27, eps: float = 1e-5) -> np.ndarray:
    """Normalises each example's (7, 7, C) coefficients per group of C / groups channels.

    Mean and variance are taken over one example's own coefficients (its
    spatial positions and the channels of a group), never across examples:
    like the transform, it is a fixed function applied to each image on its
    own, so it needs no privacy budget (Tramer & Boneh use GroupNorm here).
    """
    n, h, w, c = features.shape
    if c % groups:
        raise ValueError(f"Expected groups to divide {c} channels. Received: groups={groups}")
    blocks = features.reshape(n, h, w, groups, c // groups).astype(np.float64)
    mean = blocks.mean(axis=(1, 2, 4), keepdims=True)
    var = blocks.var(axis=(1, 2, 4), keepdims=True)
    return ((blocks - mean) / np.sqrt(var + eps)).reshape(n, h, w, c).astype(np.float32)
