"""Clip and noise building blocks against closed forms and numpy references."""

import numpy as np
import pytest
import torch
from helpers import reference_clipped_sum

from torchdp_keras.ops import (
    CLIP_SAFETY_MARGIN,
    add_gaussian_noise,
    clip_factors,
    clipped_sum,
    per_unit_squared_norms,
)


def test_squared_norms_span_all_tensors():
    grads = [torch.tensor([[3.0, 0.0], [1.0, 1.0]]), torch.tensor([[[4.0]], [[1.0]]])]
    np.testing.assert_allclose(per_unit_squared_norms(grads).numpy(), [25.0, 3.0], rtol=1e-14)


def test_clip_factors_closed_form_and_zero_gradient():
    sq = torch.tensor([4.0, 0.25, 0.0, 1.0], dtype=torch.float64)
    factors = clip_factors(sq, 1.0).numpy()
    np.testing.assert_allclose(
        factors, [0.5 / (1 + CLIP_SAFETY_MARGIN), 1.0, 1.0, 1 / (1 + CLIP_SAFETY_MARGIN)]
    )


@pytest.mark.parametrize("clip", [1e-4, 0.1, 1.0, 37.0])
def test_clipped_sum_matches_reference_and_respects_the_bound(clip):
    rng = np.random.default_rng(0)
    grads_np = [
        rng.normal(size=(64, 3, 5)).astype("float32") * 3,
        rng.normal(size=(64, 7)).astype("float32"),
    ]
    grads = [torch.from_numpy(g) for g in grads_np]
    factors = clip_factors(per_unit_squared_norms(grads), clip)
    actual = clipped_sum(grads, factors)
    for a, e in zip(actual, reference_clipped_sum(grads_np, clip)):
        np.testing.assert_allclose(a.numpy(), e, rtol=1e-5, atol=1e-6 * clip)
    clipped = [g * factors.view(-1, *[1] * (g.ndim - 1)).float() for g in grads]
    norms = torch.sqrt(per_unit_squared_norms(clipped))
    assert float(norms.max()) <= clip


def test_noise_has_the_requested_std_and_uses_the_generator():
    zeros = [torch.zeros(200, 100), torch.zeros(50)]
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    noisy_a = add_gaussian_noise(zeros, 2.5, gen_a)
    noisy_b = add_gaussian_noise(zeros, 2.5, gen_b)
    for a, b in zip(noisy_a, noisy_b):
        assert torch.equal(a, b)
    flat = torch.cat([t.flatten() for t in noisy_a])
    assert abs(float(flat.std()) / 2.5 - 1) < 0.03
    assert add_gaussian_noise(zeros, 0.0, gen_a)[0] is zeros[0]
    with pytest.raises(ValueError, match="noise_std=-1"):
        add_gaussian_noise(zeros, -1, gen_a)


@pytest.mark.parametrize("width", [1, 7, 8, 8192, 8195])
@pytest.mark.parametrize("spread", [0.0, 12.0])
def test_float32_row_norms_stay_within_the_clipping_margin(width, spread):
    from torchdp_keras.ops.clip_noise import CLIP_SAFETY_MARGIN, squared_row_norms

    rng = np.random.default_rng(width)
    # Values over up to 12 orders of magnitude, as per-example gradients can be.
    values = rng.normal(size=(16, width)) * 10.0 ** rng.uniform(
        -spread / 2, spread / 2, (16, width)
    )
    rows = torch.from_numpy(values.astype("float32"))
    exact = np.sum(rows.double().numpy() ** 2, axis=1)
    got = squared_row_norms(rows.reshape(16, -1, 1) if width % 2 else rows).numpy()
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, exact, rtol=CLIP_SAFETY_MARGIN / 2, atol=0)


def test_inplace_chunked_noise_has_the_requested_std_and_is_reproducible(monkeypatch):
    from torchdp_keras.ops import clip_noise

    monkeypatch.setattr(clip_noise, "_NOISE_CHUNK", 1000)  # several chunks per tensor
    draws = []
    for _ in range(2):
        tensors = [torch.full((300, 70), 5.0), torch.zeros(3)]
        out = add_gaussian_noise(tensors, 2.0, torch.Generator().manual_seed(3), inplace=True)
        assert out[0] is tensors[0] and out[1] is tensors[1]
        draws.append(torch.cat([t.flatten() for t in out]))
    assert torch.equal(draws[0], draws[1])
    noise = draws[0][:21000] - 5.0
    assert abs(float(noise.mean())) < 0.05
    assert abs(float(noise.std()) / 2.0 - 1) < 0.03  # 3/2x or 2/3x the std fails
    # Chunks are independent draws, not one chunk repeated.
    assert not torch.equal(noise[:1000], noise[1000:2000])
