"""secure_mode=True: OS-CSPRNG noise and sampling, and the seed it forbids.

Statistical checks use enough values that a noise scale off by 2% fails
(relative standard error of a sample std over n values is 1/sqrt(2n)), and
thresholds at p = 1e-6 so that a correct sampler fails about once in a
million runs.
"""

import math

import keras
import numpy as np
import pytest
import torch
from helpers import zero_gradient_model
from keras import layers
from scipy import stats

import torchdp_keras as tdk
from torchdp_keras import secure_random
from torchdp_keras.data import PoissonSampler, unpack_poisson_batch
from torchdp_keras.errors import DPConfigError
from torchdp_keras.ops import add_secure_noise_and_scale_

P_MIN = 1e-6
WIDTH = 100
BATCH = 50


def _normal_p_values(values: np.ndarray, std: float) -> tuple[float, float]:
    """(KS p-value against N(0, std^2), chi-square p-value of the variance)."""
    n = values.size
    ks = stats.kstest(values / std, "norm").pvalue
    chi2 = float(np.sum((values / std) ** 2))  # ~ chi2(n) when the std is right
    tail = min(stats.chi2.cdf(chi2, n), stats.chi2.sf(chi2, n))
    return ks, 2 * tail


@pytest.mark.parametrize("std", [1.0, 0.37, 25.0])
def test_secure_gaussian_is_normal_with_the_given_std(std):
    values = secure_random.secure_gaussian(200_000, std)
    assert values.dtype == np.float64 and values.shape == (200_000,)
    ks, chi2 = _normal_p_values(values, std)
    assert ks > P_MIN and chi2 > P_MIN
    assert abs(values.mean()) < 6 * std / math.sqrt(values.size)


@pytest.mark.parametrize("factor", [0.98, 1.02, 2.0])
def test_the_variance_check_rejects_a_wrong_scale(factor):
    # The power of the test above: noise 2% too small or large is caught.
    values = secure_random.secure_gaussian(200_000, factor)
    assert _normal_p_values(values, 1.0)[1] < P_MIN


def test_secure_gaussian_sums_four_normals(monkeypatch):
    # Holohan and Braghin's mitigation: each value is a rescaled sum of 4 normals.
    calls = []
    real = secure_random.secure_standard_normal

    def counting(size):
        calls.append(size)
        return real(size)

    monkeypatch.setattr(secure_random, "secure_standard_normal", counting)
    secure_random.secure_gaussian(10, 1.0)
    assert calls == [10] * secure_random.GAUSSIAN_TERMS == [10] * 4


def test_secure_uniform_has_53_bits_and_excludes_the_ends():
    u = secure_random.secure_uniform(100_000)
    assert ((u > 0) & (u < 1)).all()
    k = u * 2.0**53 - 0.5
    np.testing.assert_array_equal(k, np.round(k))  # (k + 1/2) / 2^53 exactly
    assert stats.kstest(u, "uniform").pvalue > P_MIN
    # Two draws are different (fresh OS entropy), not a replayed stream.
    assert not np.array_equal(u[:100], secure_random.secure_uniform(100))


def test_secure_standard_normal_odd_size():
    assert secure_random.secure_standard_normal(7).shape == (7,)
    assert secure_random.secure_gaussian(0, 1.0).shape == (0,)
    np.testing.assert_array_equal(secure_random.secure_gaussian(5, 0.0), np.zeros(5))


@pytest.mark.parametrize("q", [0.01, 0.3])
def test_secure_poisson_sample_keeps_each_index_with_probability_q(q):
    n, draws = 2_000, 200
    counts = np.zeros(n)
    sizes = []
    for _ in range(draws):
        batch = secure_random.secure_poisson_sample(n, q)
        assert (np.diff(batch) > 0).all() and batch.min(initial=0) >= 0 and batch.max() < n
        counts[batch] += 1
        sizes.append(batch.size)
    # Total inclusions ~ Binomial(n * draws, q).
    total = int(np.sum(sizes))
    assert stats.binomtest(total, n * draws, q).pvalue > P_MIN
    # Per-index counts ~ Binomial(draws, q), independent: chi-square over indices.
    expected = draws * q
    chi2 = float(np.sum((counts - expected) ** 2 / (expected * (1 - q))))
    assert stats.chi2.sf(chi2, n) > P_MIN and stats.chi2.cdf(chi2, n) > P_MIN


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: secure_random.secure_gaussian(-1, 1.0), "size"),
        (lambda: secure_random.secure_gaussian(3, -1.0), "std"),
        (lambda: secure_random.secure_gaussian(3, float("nan")), "std"),
        (lambda: secure_random.secure_uniform(2.5), "size"),
        (lambda: secure_random.secure_poisson_sample(10, 1.5), "sampling_probability"),
    ],
)
def test_secure_random_rejects_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_add_secure_noise_and_scale_std_and_in_place():
    t = torch.zeros(300, 700)
    strided = torch.zeros(700, 300).t()  # not contiguous
    out = add_secure_noise_and_scale_([t, strided], 2.0, 0.5)
    assert out[0] is t and out[1] is strided
    for tensor in (t, strided):
        values = tensor.double().numpy().ravel()
        ks, chi2 = _normal_p_values(values, 1.0)  # std 2 * scale 1/2
        assert ks > P_MIN and chi2 > P_MIN
    # noise_std 0: only the scale.
    x = torch.ones(4)
    add_secure_noise_and_scale_([x], 0.0, 3.0)
    torch.testing.assert_close(x, torch.full((4,), 3.0))


# -- the seed it forbids, everywhere ---------------------------------------------------
def _stack():
    return [keras.Input((WIDTH,)), layers.Dense(WIDTH)]


DP = {"l2_norm_clip": 1.0, "noise_multiplier": 1.0}


@pytest.mark.parametrize(
    "build",
    [
        lambda **k: tdk.DPSequential(_stack(), **DP, **k),
        lambda **k: tdk.make_private(keras.Sequential(_stack()), **DP, **k),
        lambda **k: tdk.PrivateDataLoader(np.zeros((100, 3)), np.zeros(100), batch_size=10, **k),
        lambda **k: PoissonSampler(100, 10, **k),
        lambda **k: tdk.DPKerasConfig(
            epsilon=1.0,
            delta=1e-5,
            clipping_norm=1.0,
            batch_size=10,
            gradient_accumulation_steps=1,
            train_steps=10,
            train_size=100,
            **k,
        ),
    ],
    ids=["DPSequential", "make_private", "PrivateDataLoader", "PoissonSampler", "DPKerasConfig"],
)
def test_a_seed_in_secure_mode_is_an_error(build):
    with pytest.raises(DPConfigError, match=r"seed=None with secure_mode=True.*Received: seed=3"):
        build(seed=3, secure_mode=True)
    assert build(secure_mode=True).secure_mode is True
    with pytest.raises(DPConfigError, match="secure_mode"):
        build(secure_mode="yes")


def test_dp_model_with_secure_config_is_secure():
    config = tdk.DPKerasConfig(
        epsilon=1.0,
        delta=1e-5,
        clipping_norm=1.0,
        batch_size=10,
        gradient_accumulation_steps=1,
        train_steps=10,
        train_size=100,
        secure_mode=True,
    )
    model = tdk.make_private(keras.Sequential(_stack()), config)
    assert model.secure_mode is True
    with pytest.raises(DPConfigError, match="secure_mode"):
        tdk.make_private(keras.Sequential(_stack()), config, secure_mode=True)


def _zero_gradient_model(**kwargs):
    return zero_gradient_model(WIDTH, **kwargs)


def _update(model, x, y):
    before = np.concatenate([w.ravel() for w in model.get_weights()])
    model.train_on_batch(x, y)
    return before - np.concatenate([w.ravel() for w in model.get_weights()])


def test_secure_model_update_std_is_sigma_c_over_b():
    # Zero weights and targets: the gradient is 0 and the update is noise / B.
    sigma, clip = 1.3, 1.5
    model = _zero_gradient_model(l2_norm_clip=clip, noise_multiplier=sigma, secure_mode=True)
    x = np.random.default_rng(0).normal(size=(BATCH, WIDTH)).astype("float32")
    y = np.zeros((BATCH, WIDTH), dtype="float32")
    first, second = _update(model, x, y), _update(model, x, y)
    expected = sigma * clip / BATCH
    assert abs(first.std() / expected - 1) < 0.05  # 10,100 values: 7 standard errors
    assert stats.kstest(first / expected, "norm").pvalue > P_MIN
    assert np.corrcoef(first, second)[0, 1] < 0.05  # fresh noise every update


def test_secure_models_are_not_reproducible():
    x = np.random.default_rng(0).normal(size=(BATCH, WIDTH)).astype("float32")
    y = np.zeros((BATCH, WIDTH), dtype="float32")
    updates = [
        _update(
            _zero_gradient_model(l2_norm_clip=1.0, noise_multiplier=1.0, secure_mode=True), x, y
        )
        for _ in range(2)
    ]
    assert not np.allclose(updates[0], updates[1])


def test_secure_loader_draws_fresh_samples_and_fits_a_secure_model():
    x = np.random.default_rng(1).normal(size=(200, WIDTH)).astype("float32")
    y = np.zeros((200, WIDTH), dtype="float32")
    loader = tdk.PrivateDataLoader(x, y, batch_size=20, secure_mode=True)
    assert loader.secure_mode

    def draws(source):
        return [unpack_poisson_batch(source[i])[3].sum() for i in range(len(source))]

    # Each update's sample is drawn once (so its physical batches agree) ...
    np.testing.assert_array_equal(
        unpack_poisson_batch(loader[0])[0], unpack_poisson_batch(loader[0])[0]
    )
    # ... and the realised batch sizes vary across updates and loaders.
    sizes = draws(loader) + draws(tdk.PrivateDataLoader(x, y, batch_size=20, secure_mode=True))
    assert len(set(sizes)) > 1
    model = _zero_gradient_model(l2_norm_clip=1.0, noise_multiplier=1.0, secure_mode=True)
    model.fit(loader, epochs=1, verbose=0)
    assert model.dp_steps == len(loader)
    assert math.isfinite(model.get_epsilon(1e-5))


def test_secure_model_refuses_a_seedable_loader():
    x = np.zeros((100, WIDTH), dtype="float32")
    model = _zero_gradient_model(l2_norm_clip=1.0, noise_multiplier=1.0, secure_mode=True)
    loader = tdk.PrivateDataLoader(x, x, batch_size=10, seed=0)
    with pytest.raises(DPConfigError, match=r"PrivateDataLoader\(secure_mode=True\)"):
        model.fit(loader, epochs=1, verbose=0)
    assert model.dp_steps == 0


def test_secure_mode_survives_save_and_load(tmp_path):
    model = _zero_gradient_model(l2_norm_clip=1.0, noise_multiplier=1.0, secure_mode=True)
    path = tmp_path / "secure.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.secure_mode is True and loaded.get_config()["seed"] is None
