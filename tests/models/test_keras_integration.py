"""DP models behave as Keras models: fit, evaluate, predict, callbacks, save/load."""

import warnings

import keras
import numpy as np
import pytest
import torch
from keras import layers

import torchdp_keras as tdk

pytestmark = [
    # The models here train on a few examples, as arrays: the library's privacy warnings about
    # both are expected, and not the point ("." stands for ":", the field separator).
    pytest.mark.filterwarnings(r"ignore:torchdp_keras. only \d+ training example"),
    pytest.mark.filterwarnings(r"ignore:torchdp_keras. fit\(\) on arrays trains on shuffled"),
]

DP = dict(l2_norm_clip=1.0, noise_multiplier=0.5)


def _data(n=40, features=6, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    y = rng.integers(0, classes, size=(n,)).astype("int32")
    return x, y


def _compile(model):
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def _stack():
    return [keras.Input((6,)), layers.Dense(8, activation="relu"), layers.Dense(3)]


def _sequential(**kwargs):
    return tdk.DPSequential(_stack(), **{**DP, **kwargs})


def _functional(**kwargs):
    inputs = keras.Input((6,))
    hidden = layers.Dense(8, activation="relu")(inputs)
    return tdk.DPModel(inputs=inputs, outputs=layers.Dense(3)(hidden), **{**DP, **kwargs})


@keras.saving.register_keras_serializable(package="tests")
class SubclassedDP(tdk.DPModel):
    def __init__(self, units=8, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.hidden = layers.Dense(units, activation="relu")
        self.out = layers.Dense(3)

    def call(self, x):
        return self.out(self.hidden(x))

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def _subclassed(**kwargs):
    model = SubclassedDP(**{**DP, **kwargs})
    model(np.zeros((1, 6), "float32"))
    return model


def _private_sequential(**kwargs):
    return tdk.make_private(keras.Sequential(_stack()), **{**DP, **kwargs})


def _private_functional(**kwargs):
    inputs = keras.Input((6,))
    outputs = layers.Dense(3)(layers.Dense(8, activation="relu")(inputs))
    return tdk.PrivateKerasModel(model=keras.Model(inputs, outputs), **{**DP, **kwargs})


@keras.saving.register_keras_serializable(package="tests")
class PlainSubclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = layers.Dense(8, activation="relu")
        self.out = layers.Dense(3)

    def call(self, x):
        return self.out(self.hidden(x))


def _private_subclassed(**kwargs):
    base = PlainSubclassed()
    base(np.zeros((1, 6), "float32"))
    return tdk.make_private(base, **{**DP, **kwargs})


BUILDERS = {
    "DPSequential": _sequential,
    "DPModel-functional": _functional,
    "DPModel-subclassed": _subclassed,
    "make_private-sequential": _private_sequential,
    "PrivateKerasModel-functional": _private_functional,
    "make_private-subclassed": _private_subclassed,
}


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_keras_workflow(kind, tmp_path):
    model = _compile(BUILDERS[kind](seed=1))
    x, y = _data()
    seen = []
    history = model.fit(
        x,
        y,
        batch_size=10,
        epochs=2,
        validation_data=_data(20, seed=1),
        callbacks=[keras.callbacks.LambdaCallback(on_batch_end=lambda b, logs: seen.append(b))],
        verbose=0,
    )
    assert set(history.history) == {"loss", "accuracy", "val_loss", "val_accuracy", "epsilon"}
    assert len(seen) == 8
    assert np.isfinite(model.evaluate(x, y, verbose=0)).all()
    assert model.predict(x, verbose=0).shape == (40, 3)
    logs = model.train_on_batch(x[:10], y[:10], return_dict=True)
    assert set(logs) == {"loss", "accuracy"}
    assert np.isfinite(model.test_on_batch(x[:10], y[:10])).all()
    model.summary(print_fn=lambda *a, **k: None)

    path = tmp_path / "model.keras"
    model.save(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = keras.models.load_model(path)
    assert not [w for w in caught if "noise" in str(w.message)]
    assert type(loaded) is type(model)
    # The privacy state travels in the file: the update count and the epsilon.
    assert loaded.dp_steps == model.dp_steps > 0
    assert loaded.get_epsilon(1e-5) == model.get_epsilon(1e-5)
    assert (loaded.l2_norm_clip, loaded.noise_multiplier, loaded.num_microbatches) == (
        1.0,
        0.5,
        None,
    )
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)
    loaded.fit(x, y, batch_size=10, epochs=1, verbose=0)  # trains privately again


def test_make_private_shares_layers_and_weights():
    base = keras.Sequential(_stack())
    before = [w.copy() for w in base.get_weights()]
    private = _compile(tdk.make_private(base, **DP, seed=0))
    assert private.model is base
    private.fit(*_data(), batch_size=10, epochs=1, verbose=0)
    assert any(not np.array_equal(a, b) for a, b in zip(before, base.get_weights()))
    np.testing.assert_array_equal(
        private.predict(_data()[0], verbose=0), base.predict(_data()[0], verbose=0)
    )


def test_make_private_refuses_a_private_model():
    with pytest.raises(ValueError, match="already a DPSequential"):
        tdk.make_private(_sequential(), **DP)


def test_dp_settings_are_read_only_and_round_trip_in_config():
    model = _sequential(num_microbatches=5, seed=3)
    assert (model.l2_norm_clip, model.noise_multiplier, model.num_microbatches) == (1.0, 0.5, 5)
    for name in ("l2_norm_clip", "noise_multiplier", "num_microbatches"):
        with pytest.raises(AttributeError):
            setattr(model, name, 2)
    config = model.get_config()
    assert {k: config[k] for k in ("l2_norm_clip", "noise_multiplier", "num_microbatches")} == {
        "l2_norm_clip": 1.0,
        "noise_multiplier": 0.5,
        "num_microbatches": 5,
    }
    clone = tdk.DPSequential.from_config(config)
    assert clone.num_microbatches == 5 and len(clone.layers) == 2
    # Rebuilt from the config alone (no privacy state), a seeded model would
    # replay its noise stream from update 0: training says so.
    with pytest.warns(UserWarning, match="seed=3"):
        _compile(clone).fit(*_data(), batch_size=10, epochs=1, verbose=0)


def test_add_and_pop():
    model = tdk.DPSequential(**DP)
    model.add(keras.Input((6,)))
    model.add(layers.Dense(8))
    model.add(layers.Dense(3))
    model.pop()
    model.add(layers.Dense(3))
    assert [type(layer).__name__ for layer in model.layers] == ["Dense", "Dense"]
    _compile(model).fit(*_data(), batch_size=10, epochs=1, verbose=0)


def test_multi_input_multi_output_functional_model():
    a, b = keras.Input((4,), name="a"), keras.Input((2,), name="b")
    merged = layers.Concatenate()([layers.Dense(5)(a), b])
    model = tdk.DPModel(
        inputs=[a, b],
        outputs={
            "cls": layers.Dense(3, name="cls")(merged),
            "reg": layers.Dense(1, name="reg")(merged),
        },
        **DP,
    )
    model.compile(
        optimizer="sgd",
        loss={"cls": keras.losses.SparseCategoricalCrossentropy(from_logits=True), "reg": "mse"},
        metrics={"cls": ["accuracy"]},
    )
    rng = np.random.default_rng(0)
    xa, xb = rng.normal(size=(20, 4)).astype("float32"), rng.normal(size=(20, 2)).astype("float32")
    y = {
        "cls": rng.integers(0, 3, 20).astype("int32"),
        "reg": rng.normal(size=(20, 1)).astype("float32"),
    }
    history = model.fit([xa, xb], y, batch_size=5, epochs=1, verbose=0)
    assert {"loss", "cls_loss", "reg_loss", "cls_accuracy"} <= set(history.history)
    assert all(np.isfinite(v[-1]) for v in history.history.values())


def test_jit_compile_gives_the_same_step_as_eager():
    x, y = _data(16)
    eager = _compile(_sequential(noise_multiplier=0.0, seed=0, clipping_mode="vmap"))
    compiled = tdk.DPSequential(
        _stack(), l2_norm_clip=1.0, noise_multiplier=0.0, use_xla=True, clipping_mode="vmap"
    )
    compiled.set_weights(eager.get_weights())
    _compile(compiled)
    assert compiled.jit_compile is True
    eager.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    compiled.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(eager.get_weights(), compiled.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_jit_compile_failure_warns_once_and_runs_eagerly(monkeypatch):
    def broken_compile(fn, *args, **kwargs):
        def run(*a, **k):
            raise RuntimeError("backend compiler failed")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    model = _compile(_sequential(seed=0, clipping_mode="vmap"))
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy", jit_compile=True)
    with pytest.warns(UserWarning, match="running it eagerly") as caught:
        model.fit(*_data(), batch_size=10, epochs=1, verbose=0)
    assert sum("running it eagerly" in str(w.message) for w in caught) == 1
