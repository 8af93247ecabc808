"""Gaussian noise of the DP step: scale, freshness, reproducibility.

The model below has zero gradients (zero weights, zero targets), so one SGD
step with learning rate 1 moves the weights by exactly -noise / k. With about
10,000 weights the sample standard deviation has a relative standard error
of 1/sqrt(2n) ~= 0.7%: the 5% tolerance used here rejects a noise scale off
by 2/3x or 3/2x with overwhelming power (the tests check that too).
"""

import warnings

import keras
import numpy as np
import pytest
from keras import layers
from scipy import stats

import torchdp_keras as tdk

BATCH = 50
WIDTH = 100


def _zero_gradient_model(noise_multiplier, l2_norm_clip, seed=None, num_microbatches=None):
    model = tdk.DPSequential(
        [
            keras.Input((WIDTH,)),
            layers.Dense(WIDTH, kernel_initializer="zeros", bias_initializer="zeros"),
        ],
        l2_norm_clip=l2_norm_clip,
        noise_multiplier=noise_multiplier,
        num_microbatches=num_microbatches,
        seed=seed,
    )
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    return model


def _one_step_update(model):
    x = np.random.default_rng(0).normal(size=(BATCH, WIDTH)).astype("float32")
    y = np.zeros((BATCH, WIDTH), dtype="float32")
    before = np.concatenate([w.ravel() for w in model.get_weights()])
    model.train_on_batch(x, y)
    after = np.concatenate([w.ravel() for w in model.get_weights()])
    return before - after  # = noise / k


@pytest.mark.parametrize(
    "noise_multiplier,l2_norm_clip,num_microbatches",
    [(1.3, 1.5, None), (0.7, 4.0, None), (2.0, 0.5, 10)],
)
def test_update_noise_std_is_sigma_c_over_k(noise_multiplier, l2_norm_clip, num_microbatches):
    model = _zero_gradient_model(
        noise_multiplier, l2_norm_clip, seed=3, num_microbatches=num_microbatches
    )
    update = _one_step_update(model)
    units = num_microbatches or BATCH
    expected_std = noise_multiplier * l2_norm_clip / units
    observed_std = update.std()
    assert abs(observed_std / expected_std - 1) < 0.05
    # Power: a wrong scale of 2/3x or 3/2x is far outside the tolerance.
    for wrong in (2 / 3, 3 / 2):
        assert abs(observed_std / (wrong * expected_std) - 1) > 0.25
    # Centred Gaussian (Kolmogorov-Smirnov against the exact distribution).
    assert stats.kstest(update / expected_std, "norm").pvalue > 1e-4
    assert abs(update.mean()) < 5 * expected_std / np.sqrt(update.size)


def test_no_noise_when_noise_multiplier_is_zero():
    update = _one_step_update(_zero_gradient_model(0.0, 1.0))
    assert np.all(update == 0)


def test_fresh_noise_every_step():
    model = _zero_gradient_model(1.0, 1.0, seed=5)
    first = _one_step_update(model)
    second = _one_step_update(model)
    assert abs(np.corrcoef(first, second)[0, 1]) < 0.05


def test_same_seed_same_run_and_other_seed_other_run():
    a = _one_step_update(_zero_gradient_model(1.0, 1.0, seed=11))
    b = _one_step_update(_zero_gradient_model(1.0, 1.0, seed=11))
    c = _one_step_update(_zero_gradient_model(1.0, 1.0, seed=12))
    np.testing.assert_array_equal(a, b)
    assert abs(np.corrcoef(a, c)[0, 1]) < 0.05


def test_no_seed_uses_fresh_entropy():
    a = _one_step_update(_zero_gradient_model(1.0, 1.0))
    b = _one_step_update(_zero_gradient_model(1.0, 1.0))
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.05


@pytest.mark.filterwarnings("ignore:torchdp_keras. only 32 training example")  # "." matches ":"
@pytest.mark.filterwarnings(r"ignore:torchdp_keras. fit\(\) on arrays trains on shuffled")
def test_seeded_training_with_dropout_is_reproducible():
    def run():
        keras.utils.set_random_seed(0)
        model = tdk.DPSequential(
            [keras.Input((6,)), layers.Dense(16), layers.Dropout(0.5), layers.Dense(2)],
            l2_norm_clip=1.0,
            noise_multiplier=0.5,
            seed=21,
        )
        model.compile(optimizer="sgd", loss="mse")
        rng = np.random.default_rng(1)
        x = rng.normal(size=(32, 6)).astype("float32")
        y = rng.normal(size=(32, 2)).astype("float32")
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        return model.get_weights()

    for a, b in zip(run(), run()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("poisson", [False, True], ids=["arrays", "poisson-loader"])
def test_noise_is_added_once_per_accumulated_update(poisson):
    from torchdp_keras.config import DPKerasConfig

    batch, steps, sigma, clip = 10, 4, 1.3, 1.5
    config = DPKerasConfig(
        epsilon=float("inf"),
        delta=1e-5,
        clipping_norm=clip,
        batch_size=batch,
        gradient_accumulation_steps=steps,
        train_steps=1,
        train_size=batch * steps,
        noise_multiplier=sigma,
        rescale_to_unit_norm=False,
        seed=7,
        poisson_sampling_in_fit=poisson,
    )
    base = keras.Sequential(
        [
            keras.Input((WIDTH,)),
            layers.Dense(WIDTH, kernel_initializer="zeros", bias_initializer="zeros"),
        ]
    )
    model = tdk.make_private(base, config)
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    x = np.random.default_rng(0).normal(size=(batch * steps, WIDTH)).astype("float32")
    y = np.zeros((batch * steps, WIDTH), dtype="float32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # arrays: the "not Poisson" warning
        model.fit(x, y, epochs=1, shuffle=False, verbose=0)
    assert model.dp_steps == 1
    update = -np.concatenate([w.ravel() for w in base.get_weights()])
    expected_std = sigma * clip / (batch * steps)  # once, over the effective batch
    assert abs(update.std() / expected_std - 1) < 0.05
