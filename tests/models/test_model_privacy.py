"""Live epsilon, the privacy budget and DPKerasConfig on real DP models."""

import math
import warnings

import keras
import numpy as np
import pytest
from keras import layers

import torchdp_keras as tdk
from torchdp_keras.accounting import PRVAccountant, default_delta
from torchdp_keras.callbacks import DPAccountant
from torchdp_keras.config import DPKerasConfig
from torchdp_keras.errors import DPConfigError, PrivacyBudgetExceededError

# The models here fit arrays: the library's warning that they are not Poisson-sampled is
# expected, and not the point ("." stands for ":", the field separator of a filter).
pytestmark = pytest.mark.filterwarnings(
    r"ignore:torchdp_keras. fit\(\) on arrays trains on shuffled"
)


def _data(n=200, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 4)).astype("float32"), rng.normal(size=(n, 1)).astype("float32")


def _dp(**kwargs):
    model = tdk.DPSequential(
        [keras.Input((4,)), layers.Dense(1)],
        **{"l2_norm_clip": 1.0, "noise_multiplier": 1.0, "seed": 0, **kwargs},
    )
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    return model


def _expected_epsilon(sigma, q, steps, delta):
    acc = PRVAccountant()
    acc.compose(sigma, q, steps)
    return acc.get_epsilon(delta)


def test_fit_logs_epsilon_every_epoch_and_history_is_exact():
    model = _dp()
    x, y = _data()
    with pytest.warns(UserWarning, match="assumes Poisson sampling"):
        history = model.fit(x, y, batch_size=20, epochs=3, verbose=0)
    eps = history.history["epsilon"]
    assert len(eps) == 3 and eps[0] < eps[1] < eps[2]
    delta = default_delta(200)
    assert model.privacy_delta == delta
    assert model.dp_steps == 30
    assert model.accountant.history == [(1.0, 0.1, 30)]
    assert eps[-1] == pytest.approx(_expected_epsilon(1.0, 0.1, 30, delta))
    assert model.get_epsilon() == pytest.approx(eps[-1])
    assert model.get_epsilon(delta=1e-3) < model.get_epsilon(delta=1e-6)


def test_target_delta_and_validation_split_set_n_and_q():
    model = _dp()
    x, y = _data()
    history = model.fit(
        x, y, batch_size=16, epochs=1, validation_split=0.2, target_delta=1e-4, verbose=0
    )
    assert model.privacy_delta == 1e-4
    assert model.accountant.history == [(1.0, 16 / 160, 10)]
    assert history.history["epsilon"][0] == pytest.approx(_expected_epsilon(1.0, 0.1, 10, 1e-4))


def test_large_delta_is_warned():
    with pytest.warns(UserWarning, match="not smaller than 1/n"):
        _dp().fit(*_data(), batch_size=20, epochs=1, target_delta=0.01, verbose=0)


def test_steps_outside_fit_with_unknown_q_report_infinity():
    model = _dp()
    model.train_on_batch(*_data(20))
    with pytest.warns(UserWarning, match="unknown sampling probability"):
        assert model.get_epsilon(delta=1e-5) == float("inf")
    with pytest.raises(DPConfigError, match="Received: delta=None"):
        _dp().get_epsilon()


def test_accounting_survives_save_and_load(tmp_path):
    model = _dp(seed=None)
    model.fit(*_data(), batch_size=20, epochs=2, verbose=0)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.dp_steps == 20
    assert loaded.accountant.history == model.accountant.history
    assert loaded.get_epsilon() == pytest.approx(model.get_epsilon())


def test_dp_accountant_callback_logs_and_stops_at_target(caplog):
    model = _dp()
    records = []
    x, y = _data()
    target = _expected_epsilon(1.0, 0.1, 25, default_delta(200))  # 25 steps fit exactly
    callback = DPAccountant(log_fn=records.append, target_epsilon=target * 1.0000001)
    model.fit(x, y, batch_size=20, epochs=10, callbacks=[callback], verbose=0)
    assert model.dp_steps == 25
    assert model.get_epsilon() <= target * 1.0000001
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert records[-1]["epsilon"] == pytest.approx(model.get_epsilon())
    with pytest.raises(DPConfigError, match="log_fn='print'"):
        DPAccountant(log_fn="print")


def _config(**changes):
    values = dict(
        epsilon=8.0,
        delta=1e-5,
        clipping_norm=1.0,
        batch_size=20,
        gradient_accumulation_steps=1,
        train_steps=15,
        train_size=200,
    )
    values.update(changes)
    return DPKerasConfig(**values)


def _private(config):
    model = tdk.make_private(keras.Sequential([keras.Input((4,)), layers.Dense(1)]), config)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    return model


def test_make_private_with_config_calibrates_and_enforces_the_budget():
    config = _config()
    model = _private(config)
    calibrated = config.update_with_calibrated_noise_multiplier().noise_multiplier
    assert model.noise_multiplier == calibrated
    assert model.l2_norm_clip == 1.0
    x, y = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(x, y, epochs=1, verbose=0)  # 10 steps, batch size from the config
        assert model.dp_steps == 10
        with pytest.raises(PrivacyBudgetExceededError, match="train_steps=15"):
            model.fit(x, y, epochs=1, verbose=0)  # the 16th update is refused
    assert model.dp_steps == 15
    assert isinstance(PrivacyBudgetExceededError("x"), RuntimeError)
    assert model.get_epsilon() <= 8.0
    assert model.privacy_delta == 1e-5


def test_config_batch_size_must_match_fit():
    model = _private(_config())
    with pytest.raises(DPConfigError, match="Received: batch_size=50"):
        model.fit(*_data(), batch_size=50, epochs=1, verbose=0)


def test_rescale_to_unit_norm_divides_by_the_clipping_norm():
    x = np.array([[1.0, 0, 0, 0], [0, 3.0, 4.0, 0]], dtype="float32")
    y = np.array([[1.0], [1.0]], dtype="float32")
    updates = {}
    for rescale in (False, True):
        config = _config(
            epsilon=float("inf"),
            noise_multiplier=0.0,
            clipping_norm=2.0,
            batch_size=2,
            rescale_to_unit_norm=rescale,
        )
        base = keras.Sequential(
            [keras.Input((4,)), layers.Dense(1, use_bias=False, kernel_initializer="zeros")]
        )
        model = tdk.make_private(base, config)
        model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
        model.train_on_batch(x, y)
        updates[rescale] = -base.get_weights()[0][:, 0]
    grads = -2.0 * y * x  # norms 2 and 10 -> clipped to 2
    clipped = grads * np.minimum(1.0, 2.0 / np.linalg.norm(grads, axis=1, keepdims=True))
    np.testing.assert_allclose(updates[False], clipped.sum(0) / 2, rtol=1e-5)
    np.testing.assert_allclose(updates[True], clipped.sum(0) / 2 / 2.0, rtol=1e-5)


def test_microbatch_size_does_not_change_the_result():
    weights = {}
    for size in (None, 1, 7):
        config = _config(
            epsilon=float("inf"), noise_multiplier=0.0, microbatch_size=size, batch_size=20
        )
        base = keras.Sequential(
            [keras.Input((4,)), layers.Dense(3, activation="tanh"), layers.Dense(1)]
        )
        base.set_weights(weights.get("init") or base.get_weights())
        weights.setdefault("init", base.get_weights())
        model = tdk.make_private(base, config, clipping_mode="vmap")
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        if size is not None:
            assert model._get_dp_engine().units_per_chunk(20) == size
        model.train_on_batch(*_data(20))
        weights[size] = base.get_weights()
    for size in (1, 7):
        for a, b in zip(weights[None], weights[size]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_config_and_dp_arguments_are_exclusive():
    base = keras.Sequential([keras.Input((4,)), layers.Dense(1)])
    with pytest.raises(DPConfigError, match="Received also: l2_norm_clip=1.0"):
        tdk.make_private(base, _config(), l2_norm_clip=1.0)
    with pytest.raises(DPConfigError, match="Expected either a DPKerasConfig"):
        tdk.make_private(base)


def test_private_model_with_config_round_trips(tmp_path):
    model = _private(_config())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(*_data(), epochs=1, verbose=0)
    path = tmp_path / "p.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.dp_keras_config == model.dp_keras_config
    assert loaded.dp_steps == 10
    with pytest.raises(PrivacyBudgetExceededError):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded.fit(*_data(), epochs=1, verbose=0)
    assert loaded.dp_steps == 15


@pytest.mark.parametrize("loader", [False, True])
def test_a_one_example_dataset_trains_and_reports_epsilon(loader):
    model = tdk.DPSequential(
        [keras.Input((3,)), keras.layers.Dense(2)], l2_norm_clip=1.0, noise_multiplier=0.3, seed=0
    )
    model.compile(optimizer="sgd", loss="mse")
    x, y = np.ones((1, 3), "float32"), np.zeros((1, 2), "float32")
    with pytest.warns(UserWarning, match=r"only 1 training example\(s\): no delta is meaningful"):
        if loader:
            history = model.fit(tdk.PrivateDataLoader(x, y, batch_size=1, seed=0), verbose=0)
        else:
            history = model.fit(x, y, batch_size=1, epochs=2, verbose=0)
    assert 0 < model.privacy_delta < 1
    # sigma = 0.3: delta(eps=0) of one full-batch step is 2 Phi(1 / 0.6) - 1 = 0.90 > delta.
    epsilon = history.history["epsilon"][-1]
    assert 0 < epsilon < math.inf and epsilon == model.get_epsilon()
