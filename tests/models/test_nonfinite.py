"""Non-finite examples: a NaN or inf gradient contributes zero, the step stays finite."""

import logging

import keras
import numpy as np
import pytest
from helpers import reference_clipped_sum, reference_per_example_gradients
from keras import layers

import torchdp_keras as tdk

CLIP = 0.5


def _model(clipping_mode, noise_multiplier=0.0, dropout=False):
    stack = [keras.Input((6,)), layers.Dense(5, activation="tanh")]
    if dropout:
        stack.append(layers.Dropout(0.3))
    stack.append(layers.Dense(2))
    model = tdk.DPSequential(
        stack,
        l2_norm_clip=CLIP,
        noise_multiplier=noise_multiplier,
        clipping_mode=clipping_mode,
        seed=3,
    )
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    return model


def _data(n=12, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype("float32")
    y = rng.normal(size=(n, 2)).astype("float32")
    return x, y


def _poison(x, y, kind, rows):
    x, y = x.copy(), y.copy()
    for row in rows:
        if kind == "nan_input":
            x[row, 2] = np.nan
        elif kind == "inf_input":
            x[row, 0] = np.inf
        elif kind == "nan_label":
            y[row, 1] = np.nan
        elif kind == "huge_label":  # finite input, the loss overflows float32
            y[row, 0] = 3e38
    return x, y


@pytest.mark.parametrize("mode", ["fast", "vmap"])
@pytest.mark.parametrize("kind", ["nan_input", "inf_input", "nan_label", "huge_label"])
def test_bad_examples_contribute_exactly_zero(mode, kind):
    x, y = _data()
    bad_rows = [1, 7]
    xb, yb = _poison(x, y, kind, bad_rows)
    good = np.setdiff1d(np.arange(len(x)), bad_rows)
    model = _model(mode)
    engine = model._get_dp_engine()
    result = engine.clipped_batch(xb, yb, None, num_units=len(x), l2_norm_clip=CLIP, rng_seed=0)
    assert result.num_nonfinite == len(bad_rows)
    expected = reference_clipped_sum(reference_per_example_gradients(model, x[good], y[good]), CLIP)
    for got, want in zip(result.summed, expected):
        got = got.detach().numpy()
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.isfinite(float(result.loss_sum))


@pytest.mark.parametrize("mode", ["fast", "vmap"])
def test_train_step_stays_finite_and_logs_the_count(mode, caplog):
    x, y = _data(16)
    xb, yb = _poison(x, y, "nan_input", [0, 5, 9])
    model = _model(mode, noise_multiplier=1.0, dropout=True)
    with caplog.at_level(logging.WARNING, logger="torchdp_keras"):
        model.train_on_batch(xb, yb)
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())
    assert model.nonfinite_examples == 3
    messages = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(messages) == 1 and "3 example(s)" in messages[0]
    assert model.dp_steps == 1


@pytest.mark.parametrize("mode", ["fast", "vmap"])
def test_all_examples_bad_gives_a_zero_update(mode):
    x, y = _data(8)
    xb, yb = _poison(x, y, "nan_input", range(8))
    model = _model(mode)  # no noise: the update must be exactly zero
    before = model.get_weights()
    model.train_on_batch(xb, yb)
    for w0, w1 in zip(before, model.get_weights()):
        np.testing.assert_array_equal(w0, w1)
    assert model.nonfinite_examples == 8


@pytest.mark.filterwarnings("ignore:torchdp_keras. only 64 training example")  # "." matches ":"
@pytest.mark.parametrize("mode", ["fast", "vmap"])
def test_poisson_batches_with_a_bad_example(mode):
    x, y = _data(64, seed=1)
    xb, yb = _poison(x, y, "nan_label", [3])
    model = _model(mode, noise_multiplier=0.5)
    model.fit(tdk.PrivateDataLoader(xb, yb, batch_size=32, seed=0), epochs=2, verbose=0)
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())
    assert model.nonfinite_examples >= 1  # example 3 is sampled with prob. 1 - (1/2)^4


def test_finite_batches_take_a_single_pass(monkeypatch):
    model = _model("fast")
    engine = model._get_dp_engine()
    calls = []
    original = engine._clipped_batch
    monkeypatch.setattr(engine, "_clipped_batch", lambda *a: calls.append(1) or original(*a))
    x, y = _data()
    engine.clipped_batch(x, y, None, num_units=len(x), l2_norm_clip=CLIP, rng_seed=0)
    assert len(calls) == 1
    engine.clipped_batch(
        *_poison(x, y, "nan_input", [2]), None, num_units=len(x), l2_norm_clip=CLIP, rng_seed=0
    )
    assert len(calls) == 3
