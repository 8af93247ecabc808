"""Resumable privacy state: save, load, BackupAndRestore, and what is refused.

The reference for a resumed run is the uninterrupted run with the same seeds:
the noise of update u is keyed by (seed, u) and the loader's sample of update
u by (loader seed, u), so a run killed after epoch k and resumed must end
with the very same weights and epsilon. Any noise replayed from update 0, or
any update forgotten by the accountant, changes both.
"""

import json
import warnings

import keras
import numpy as np
import pytest
from keras import layers

import torchdp_keras as tdk
from torchdp_keras.errors import DPError, PrivacyStateError
from torchdp_keras.models.privacy_tracking import PRIVACY_STATE_KEY

DELTA = 1e-5
N = 120


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 6)).astype("float32")
    y = rng.integers(0, 3, size=N)
    return x, y


def _model(units=3, seed=0, **kwargs):
    model = tdk.DPSequential(
        [keras.Input((6,)), layers.Dense(8, activation="tanh"), layers.Dense(units)],
        l2_norm_clip=1.0,
        noise_multiplier=1.1,
        seed=seed,
        **kwargs,
    )
    keras.utils.set_random_seed(0)  # same initial weights for every build
    model.build((None, 6))
    model.set_weights([np.linspace(-1, 1, w.size).reshape(w.shape) for w in model.get_weights()])
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _loader(seed=1):
    x, y = _data()
    return tdk.PrivateDataLoader(x, y, batch_size=20, seed=seed)


def _weights(model):
    return np.concatenate([w.ravel() for w in model.get_weights()])


@pytest.mark.parametrize("how", ["keras-file", "weights-file"])
def test_save_and_load_continue_the_uninterrupted_run(tmp_path, how):
    reference = _model()
    reference.fit(_loader(), epochs=3, verbose=0)

    first = _model()
    first.fit(_loader(), epochs=2, verbose=0)
    if how == "keras-file":
        first.save(tmp_path / "m.keras")
        resumed = keras.models.load_model(tmp_path / "m.keras")
    else:
        first.save_weights(tmp_path / "m.weights.h5")
        resumed = _model()
        resumed.optimizer.build(resumed.trainable_variables)  # to load its state too
        resumed.load_weights(tmp_path / "m.weights.h5")
    assert resumed.dp_steps == first.dp_steps == 12
    assert resumed.get_epsilon(DELTA) == first.get_epsilon(DELTA)
    assert resumed.accountant.state_dict() == first.accountant.state_dict()
    resumed.fit(_loader(), epochs=1, verbose=0)

    assert resumed.dp_steps == reference.dp_steps == 18
    assert resumed.get_epsilon(DELTA) == pytest.approx(reference.get_epsilon(DELTA), rel=1e-12)
    np.testing.assert_allclose(_weights(resumed), _weights(reference), rtol=1e-5, atol=1e-6)


def test_restarting_the_noise_would_be_caught():
    # The check above has power: the same 3rd epoch trained from a model that
    # forgot its history (noise and samples from update 0 again) ends elsewhere.
    reference = _model()
    reference.fit(_loader(), epochs=3, verbose=0)
    first = _model()
    first.fit(_loader(), epochs=2, verbose=0)
    forgetful = _model()
    forgetful.set_weights(first.get_weights())
    forgetful.optimizer.build(forgetful.trainable_variables)
    for mine, theirs in zip(forgetful.optimizer.variables, first.optimizer.variables):
        mine.assign(theirs)
    forgetful.fit(_loader(), epochs=1, verbose=0)
    assert forgetful.dp_steps == 6 < reference.dp_steps
    assert np.abs(_weights(forgetful) - _weights(reference)).max() > 1e-3


class _Crash(keras.callbacks.Callback):
    def __init__(self, at_epoch):
        super().__init__()
        self.at_epoch = at_epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.at_epoch:
            raise RuntimeError("simulated crash")


def test_backup_and_restore_resumes_with_the_exact_epsilon(tmp_path):
    reference = _model()
    expected = reference.fit(_loader(), epochs=4, verbose=0).history["epsilon"]

    backup = str(tmp_path / "backup")
    crashing = _model()
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.fit(
            _loader(),
            epochs=4,
            verbose=0,
            callbacks=[keras.callbacks.BackupAndRestore(backup), _Crash(2)],
        )
    assert crashing.dp_steps == 12
    # A new process: the model and loader are rebuilt from the training script.
    resumed = _model()
    history = resumed.fit(
        _loader(), epochs=4, verbose=0, callbacks=[keras.callbacks.BackupAndRestore(backup)]
    )
    assert len(history.history["epsilon"]) == 2  # epochs 3 and 4 only
    assert resumed.dp_steps == reference.dp_steps == 24
    assert resumed.get_epsilon(DELTA) == pytest.approx(reference.get_epsilon(DELTA), rel=1e-12)
    assert history.history["epsilon"] == pytest.approx(expected[2:], rel=1e-12)
    np.testing.assert_allclose(_weights(resumed), _weights(reference), rtol=1e-5, atol=1e-6)


def test_resumed_unseeded_model_draws_new_noise(tmp_path):
    # Without a seed the noise seed is OS entropy, never saved: after loading,
    # the noise of the next update differs from what the saved model would use.
    model = _model(seed=None)
    model.fit(_loader(), epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert loaded.dp_steps == model.dp_steps
    assert loaded._noise_key() != model._noise_key()


def test_noise_keys_are_distinct_per_update():
    model = _model()
    keys = set()
    for step in range(200):
        model.privacy_ledger.steps = step
        keys.add(model._noise_key())
    assert len(keys) == 200


def test_rebuilt_from_config_alone_warns_once_when_seeded():
    model = _model()
    model.fit(_loader(), epochs=1, verbose=0)
    clone = tdk.DPSequential.from_config(model.get_config())
    clone.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(True))
    with pytest.warns(UserWarning, match="without its privacy state"):
        clone.fit(_loader(), epochs=1, verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clone.fit(_loader(), epochs=1, verbose=0)  # once only


def test_loaded_model_does_not_warn(tmp_path):
    model = _model()
    model.fit(_loader(), epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded.fit(_loader(), epochs=1, verbose=0)
    assert not [w for w in caught if "privacy state" in str(w.message)]


# -- refused states --------------------------------------------------------------------
def _state_store(model, **changes):
    state = {**model._privacy_state(), **changes}
    raw = json.dumps(state).encode()
    return {PRIVACY_STATE_KEY: np.frombuffer(raw, dtype=np.uint8).copy()}


def test_state_of_another_model_is_refused(tmp_path):
    model = _model()
    model.fit(_loader(), epochs=1, verbose=0)
    model.save_weights(tmp_path / "m.weights.h5")
    other = _model(units=4)
    with pytest.raises(ValueError, match="belongs to another model"):
        other.load_weights(tmp_path / "m.weights.h5")
    assert other.dp_steps == 0


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"accountant": {"accountant": "rdp", "history": []}}, "'prv' accountant"),
        ({"format": 1}, "format 2"),
        ({"dp_steps_taken": -3}, "dp_steps_taken"),
        ({"dp_steps_taken": "12"}, "dp_steps_taken"),
        ({"weights": [[[6, 8], "float32"]]}, "another model"),
    ],
)
def test_mismatched_or_malformed_state_is_refused(changes, match):
    model = _model()
    model.fit(_loader(), epochs=1, verbose=0)
    target = _model()
    with pytest.raises(PrivacyStateError, match=match):
        target.load_own_variables(_state_store(model, **changes))
    assert target.dp_steps == 0
    assert issubclass(PrivacyStateError, DPError) and issubclass(PrivacyStateError, ValueError)


@pytest.mark.parametrize(
    "raw,match",
    [
        (np.frombuffer(b"\x80\x04\x95 not json", dtype=np.uint8), "not valid JSON"),  # a pickle
        (np.frombuffer(b"[1, 2]", dtype=np.uint8), "JSON object"),
        (np.zeros((2, 2), dtype=np.uint8), "1-D uint8"),
        (np.zeros(4, dtype=np.float32), "1-D uint8"),
    ],
)
def test_undecodable_state_is_refused_without_running_it(raw, match):
    with pytest.raises(PrivacyStateError, match=match):
        _model().load_own_variables({PRIVACY_STATE_KEY: raw})


def test_state_spent_at_another_sampling_probability_is_refused():
    config = tdk.DPKerasConfig(
        epsilon=2.0,
        delta=DELTA,
        clipping_norm=1.0,
        batch_size=20,
        gradient_accumulation_steps=1,
        train_steps=12,
        train_size=N,
    )
    base = keras.Sequential([keras.Input((6,)), layers.Dense(3)])
    private = tdk.make_private(base, config)
    state = {**private._privacy_state(), "sampling_probability": 0.5}
    store = {PRIVACY_STATE_KEY: np.frombuffer(json.dumps(state).encode(), dtype=np.uint8)}
    with pytest.raises(PrivacyStateError, match="sampling probability"):
        private.load_own_variables(store)


def test_plain_keras_model_loads_dp_weights_with_skip_mismatch(tmp_path):
    # The documented way to move DP-trained weights into a plain Keras model.
    model = _model()
    model.fit(_loader(), epochs=1, verbose=0)
    model.save_weights(tmp_path / "m.weights.h5")
    plain = keras.Sequential(
        [keras.Input((6,)), layers.Dense(8, activation="tanh"), layers.Dense(3)]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain.load_weights(tmp_path / "m.weights.h5", skip_mismatch=True)
    np.testing.assert_array_equal(_weights(plain), _weights(model))


@pytest.mark.parametrize("shuffle", [None, True])
def test_fit_keeps_the_physical_batches_of_an_update_together(shuffle):
    # With gradient accumulation, the k physical batches of one update are the
    # k parts of one Poisson draw: Keras must not shuffle the loader's batches
    # (two parts of different draws could hold the same example).
    x, y = _data()
    loader = tdk.PrivateDataLoader(x, y, batch_size=10, seed=1, gradient_accumulation_steps=2)
    model = _model()
    seen = []
    train_step = model.train_step

    def recording_step(data):
        from torchdp_keras.data import unpack_poisson_batch

        bx, _, _, mask = unpack_poisson_batch(data)
        seen.append(np.asarray(bx)[np.asarray(mask) > 0])
        return train_step(data)

    model.train_step = recording_step  # this test's own model instance only
    kwargs = {} if shuffle is None else {"shuffle": shuffle}
    if shuffle:
        with pytest.raises(tdk.DPConfigError, match="shuffle=False"):
            model.fit(loader, epochs=1, verbose=0, **kwargs)
        return
    model.fit(loader, epochs=1, verbose=0, **kwargs)
    assert len(seen) == len(loader) == 12
    for update in range(6):
        drawn = x[loader._sampler.sample(0, update)]
        np.testing.assert_array_equal(np.concatenate(seen[2 * update : 2 * update + 2]), drawn)
