"""DP optimizers (TF Privacy's style): settings on the optimizer, the DP step in the model."""

import keras
import numpy as np
import pytest
from helpers import reference_clipped_sum, reference_per_example_gradients
from keras import layers

import torchdp_keras as tdk
from torchdp_keras import optimizers as dpo

X = np.random.default_rng(0).normal(size=(8, 6)).astype("float32")
Y = np.eye(3, dtype="float32")[np.random.default_rng(1).integers(0, 3, size=8)]
VECTOR_LOSS = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)


class Classifier(tdk.Model):
    """The tutorial's shape: a subclassed model, DP settings from the optimizer."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = layers.Dense(5, activation="tanh")
        self.out = layers.Dense(3)

    def call(self, x):
        return self.out(self.hidden(x))


def _stack():
    return [keras.Input((6,)), layers.Dense(5, activation="tanh"), layers.Dense(3)]


def _weights_after_one_step(model, optimizer, loss, batch_size=8):
    model.compile(optimizer=optimizer, loss=loss)
    model.fit(X, Y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
    return model.get_weights()


@pytest.mark.filterwarnings("ignore:torchdp_keras")
@pytest.mark.parametrize("num_microbatches", [None, 8, 4])
@pytest.mark.parametrize("kind", ["subclassed", "functional"])
def test_dp_optimizer_update_equals_dp_model_update_without_noise(kind, num_microbatches):
    reference = tdk.DPSequential(
        _stack(), l2_norm_clip=0.3, noise_multiplier=0.0, num_microbatches=num_microbatches
    )
    if kind == "subclassed":
        model = Classifier()
        model(X[:1])
    else:
        inputs = keras.Input((6,))
        hidden = layers.Dense(5, activation="tanh")(inputs)
        model = tdk.Model(inputs=inputs, outputs=layers.Dense(3)(hidden))
    model.set_weights(reference.get_weights())
    expected = _weights_after_one_step(
        reference,
        keras.optimizers.SGD(0.5),
        keras.losses.CategoricalCrossentropy(from_logits=True),
    )
    actual = _weights_after_one_step(
        model,
        dpo.DPKerasSGDOptimizer(
            l2_norm_clip=0.3,
            noise_multiplier=0.0,
            num_microbatches=num_microbatches,
            learning_rate=0.5,
        ),
        VECTOR_LOSS,
    )
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-7)


@pytest.mark.filterwarnings("ignore:torchdp_keras")
def test_dp_optimizer_update_matches_the_per_example_reference():
    model = Classifier()
    model(X[:1])
    model.compile(
        optimizer=dpo.DPGradientDescentGaussianOptimizer(
            l2_norm_clip=0.2, noise_multiplier=0.0, learning_rate=1.0
        ),
        loss=VECTOR_LOSS,
    )
    before = model.get_weights()
    # The reference takes one example at a time with the reduced loss.
    reference = keras.Sequential(_stack())
    reference.set_weights(before)
    reference.compile(loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    clipped = reference_clipped_sum(reference_per_example_gradients(reference, X, Y), 0.2)
    model.train_on_batch(X, Y)
    for b, a, c in zip(before, model.get_weights(), clipped):
        np.testing.assert_allclose(b - a, c / len(X), rtol=2e-5, atol=1e-7)


def test_fast_path_takes_unreduced_losses():
    """A vector loss on a functional model stays on the fast path, with the same update."""
    results = {}
    for mode in ("fast", "vmap"):
        keras.utils.set_random_seed(3)
        model = tdk.DPSequential(
            [keras.Input((4, 6)), layers.Dense(5, activation="tanh"), layers.Dense(3)],
            l2_norm_clip=0.1,
            noise_multiplier=0.0,
            clipping_mode=mode,
        )
        model.compile(
            optimizer=keras.optimizers.SGD(1.0),
            loss=keras.losses.MeanSquaredError(reduction=None),  # (B, 4): row means
        )
        x = np.random.default_rng(2).normal(size=(8, 4, 6)).astype("float32")
        y = np.random.default_rng(3).normal(size=(8, 4, 3)).astype("float32")
        model.train_on_batch(x, y)
        results[mode] = model.get_weights()
    for a, b in zip(results["fast"], results["vmap"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_plain_keras_model_refuses_a_dp_optimizer_and_says_the_fix():
    model = keras.Sequential(_stack())
    model.compile(
        optimizer=dpo.DPKerasAdamOptimizer(l2_norm_clip=1.0, noise_multiplier=1.1),
        loss=VECTOR_LOSS,
    )
    before = model.get_weights()
    with pytest.raises(tdk.DPConfigError, match=r"torchdp_keras\.Model.*No weight was updated"):
        model.train_on_batch(X, Y)
    for b, a in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_model_without_dp_settings_or_dp_optimizer_is_refused():
    model = Classifier()
    with pytest.raises(tdk.DPConfigError, match=r"no DP settings.*optimizer=SGD"):
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=VECTOR_LOSS)


def test_conflicting_settings_between_model_and_optimizer_are_refused():
    model = tdk.DPSequential(_stack(), l2_norm_clip=1.0, noise_multiplier=1.1)
    with pytest.raises(tdk.DPConfigError, match=r"noise_multiplier=\(1\.1, 0\.5\)"):
        model.compile(
            optimizer=dpo.DPKerasSGDOptimizer(l2_norm_clip=1.0, noise_multiplier=0.5),
            loss=VECTOR_LOSS,
        )
    # The same settings in both places are fine.
    model.compile(
        optimizer=dpo.DPKerasSGDOptimizer(l2_norm_clip=1.0, noise_multiplier=1.1),
        loss=VECTOR_LOSS,
    )
    assert model.noise_multiplier == 1.1


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(l2_norm_clip=-1, noise_multiplier=1.0), r"l2_norm_clip > 0.*l2_norm_clip=-1"),
        (dict(l2_norm_clip=1.0, noise_multiplier=-0.5), r"noise_multiplier=-0.5"),
        (dict(l2_norm_clip=1.0, noise_multiplier=1.0, num_microbatches=0), r"num_microbatches"),
        (
            dict(l2_norm_clip=1.0, noise_multiplier=1.0, gradient_accumulation_steps=0),
            r"gradient_accumulation_steps=0",
        ),
    ],
)
def test_bad_optimizer_arguments_name_the_argument(kwargs, match):
    with pytest.raises(tdk.DPConfigError, match=match):
        dpo.DPKerasSGDOptimizer(**kwargs)


def test_make_keras_optimizer_class():
    rmsprop = dpo.make_keras_optimizer_class(keras.optimizers.RMSprop)
    assert rmsprop is dpo.make_keras_optimizer_class(keras.optimizers.RMSprop)
    assert rmsprop.__name__ == "DPKerasRMSpropOptimizer"
    # TF Privacy's positional order, then the base optimizer's own arguments.
    opt = rmsprop(1.5, 1.3, 5, 2, learning_rate=0.01, rho=0.8)
    assert (opt.l2_norm_clip, opt.noise_multiplier, opt.num_microbatches) == (1.5, 1.3, 5)
    assert opt.dp_gradient_accumulation_steps == 2
    assert opt.gradient_accumulation_steps is None  # Keras's own stays off
    assert opt.rho == 0.8
    for bad in (keras.optimizers.Optimizer.__init__, dpo.DPKerasSGDOptimizer, int):
        with pytest.raises(tdk.DPConfigError, match="cls"):
            dpo.make_keras_optimizer_class(bad)


def test_dp_optimizer_config_round_trips():
    opt = dpo.DPKerasAdagradOptimizer(
        l2_norm_clip=2.0,
        noise_multiplier=0.7,
        num_microbatches=4,
        gradient_accumulation_steps=3,
        learning_rate=0.2,
    )
    again = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert type(again) is dpo.DPKerasAdagradOptimizer
    assert again.dp_settings == opt.dp_settings
    assert again.get_config() == opt.get_config()


@pytest.mark.filterwarnings("ignore:torchdp_keras")
def test_model_with_dp_optimizer_saves_and_loads(tmp_path):
    inputs = keras.Input((6,))
    model = tdk.Model(inputs=inputs, outputs=layers.Dense(3)(inputs))
    model.compile(
        optimizer=dpo.DPKerasSGDOptimizer(
            l2_norm_clip=1.5, noise_multiplier=1.3, learning_rate=0.1
        ),
        loss=VECTOR_LOSS,
    )
    model.fit(X, Y, batch_size=4, epochs=1, verbose=0)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, tdk.Model)
    assert (loaded.l2_norm_clip, loaded.noise_multiplier) == (1.5, 1.3)
    assert loaded.dp_steps == model.dp_steps == 2
    np.testing.assert_allclose(loaded.predict(X, verbose=0), model.predict(X, verbose=0))
    loaded.fit(X, Y, batch_size=4, epochs=1, verbose=0)
    assert loaded.dp_steps == 4


def _zero_gradient_model(accumulation):
    inputs = keras.Input((100,))
    dense = layers.Dense(100, kernel_initializer="zeros", bias_initializer="zeros")
    model = tdk.Model(inputs=inputs, outputs=dense(inputs))
    model.compile(
        optimizer=dpo.DPKerasSGDOptimizer(
            l2_norm_clip=1.5,
            noise_multiplier=1.3,
            gradient_accumulation_steps=accumulation,
            learning_rate=1.0,
        ),
        loss=keras.losses.MeanSquaredError(reduction=None),
    )
    return model


@pytest.mark.filterwarnings("ignore:torchdp_keras")
def test_accumulation_adds_noise_once_per_update_of_k_batches():
    """k=4 batches of 25: one update whose noise std is sigma*C/100 (not /25, not x2)."""
    model = _zero_gradient_model(4)
    x = np.random.default_rng(0).normal(size=(100, 100)).astype("float32")
    y = np.zeros((100, 100), dtype="float32")
    model.fit(x, y, batch_size=25, epochs=1, shuffle=False, verbose=0)
    assert model.dp_steps == 1
    update = -np.concatenate([w.ravel() for w in model.get_weights()])
    expected = 1.3 * 1.5 / 100
    assert abs(update.std() / expected - 1) < 0.05
    for wrong in (2.0, 0.5):  # noise per batch (x2) or normalised per batch (x4 / x2)
        assert abs(update.std() / (wrong * expected) - 1) > 0.25
    # Accounting: one event per update, q = k * batch_size / n.
    ((sigma, q, steps),) = model.accountant.history
    assert (sigma, q, steps) == (1.3, 1.0, 1)


@pytest.mark.filterwarnings("ignore:torchdp_keras")
def test_accumulation_equals_one_large_batch_without_noise():
    def run(batch_size, accumulation):
        keras.utils.set_random_seed(0)
        model = Classifier()
        model(X[:1])
        model.compile(
            optimizer=dpo.DPKerasSGDOptimizer(
                l2_norm_clip=0.3,
                noise_multiplier=0.0,
                gradient_accumulation_steps=accumulation,
                learning_rate=0.5,
            ),
            loss=VECTOR_LOSS,
        )
        model.fit(X, Y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
        return model.get_weights(), model.dp_steps

    (accumulated, steps_a), (single, steps_s) = run(2, 4), run(8, 1)
    assert steps_a == steps_s == 1
    for a, s in zip(accumulated, single):
        np.testing.assert_allclose(a, s, rtol=1e-5, atol=1e-7)


@pytest.mark.filterwarnings("ignore:torchdp_keras. only 40 training example")  # "." matches ":"
def test_accumulation_must_match_the_poisson_loader():
    model = _zero_gradient_model(2)
    x = np.zeros((40, 100), dtype="float32")
    loader = tdk.PrivateDataLoader(x, x, batch_size=10, seed=0)
    with pytest.raises(tdk.DPConfigError, match=r"gradient_accumulation_steps=2.*=1\)"):
        model.fit(loader, epochs=1, verbose=0)
    loader = tdk.PrivateDataLoader(x, x, batch_size=10, seed=0, gradient_accumulation_steps=2)
    model.fit(loader, epochs=1, verbose=0)
    assert model.dp_steps == 2  # 40 // (10 * 2)


def test_accumulation_must_match_the_dp_keras_config():
    config = tdk.DPKerasConfig(
        epsilon=3.0,
        delta=1e-5,
        clipping_norm=1.0,
        batch_size=4,
        gradient_accumulation_steps=2,
        train_steps=10,
        train_size=100,
        noise_multiplier=5.0,
    )
    model = tdk.make_private(keras.Sequential(_stack()), config)
    with pytest.raises(tdk.DPConfigError, match=r"=3 \(optimizer\), 2 \(config\)"):
        model.compile(
            optimizer=dpo.DPKerasSGDOptimizer(
                l2_norm_clip=1.0, noise_multiplier=5.0, gradient_accumulation_steps=3
            ),
            loss=VECTOR_LOSS,
        )


def _config_model(config_steps, optimizer_steps, batch_size=2, train_size=400):
    config = tdk.DPKerasConfig(
        epsilon=float("inf"),
        delta=1e-5,
        clipping_norm=0.3,
        batch_size=batch_size,
        gradient_accumulation_steps=config_steps,
        train_steps=10**6,
        train_size=train_size,
        noise_multiplier=0.0,
        rescale_to_unit_norm=False,
        seed=0,
    )
    keras.utils.set_random_seed(0)
    model = tdk.make_private(keras.Sequential(_stack()), config)
    model.compile(
        optimizer=keras.optimizers.SGD(0.5, gradient_accumulation_steps=optimizer_steps),
        loss=VECTOR_LOSS,
    )
    return model


@pytest.mark.parametrize("config_steps,optimizer_steps", [(1, 10), (10, 4), (3, 2)])
def test_optimizer_accumulation_that_disagrees_with_the_config_is_refused(
    config_steps, optimizer_steps
):
    with pytest.raises(
        tdk.DPConfigError,
        match=rf"gradient_accumulation_steps={optimizer_steps} \(SGD\), "
        rf"gradient_accumulation_steps={config_steps} \(DPKerasConfig\)",
    ):
        _config_model(config_steps, optimizer_steps)


@pytest.mark.filterwarnings("ignore:torchdp_keras")
def test_optimizer_accumulation_equal_to_the_config_accumulates_once():
    """Both at 4 (JAX Privacy's way): an update every 4 batches, not every 16."""
    x = np.tile(X, (5, 1))[:40]
    y = np.tile(Y, (5, 1))[:40]
    keras_and_dp = _config_model(4, 4)
    dp_only = _config_model(4, None)
    initial = keras_and_dp.get_weights()
    keras_and_dp.fit(x[:8], y[:8], batch_size=2, epochs=1, shuffle=False, verbose=0)
    changed = [not np.allclose(a, b) for a, b in zip(initial, keras_and_dp.get_weights())]
    assert keras_and_dp.dp_steps == 1 and all(changed)  # applied after 4 batches, once
    keras_and_dp.fit(x[8:], y[8:], batch_size=2, epochs=1, shuffle=False, verbose=0)
    dp_only.fit(x[:8], y[:8], batch_size=2, epochs=1, shuffle=False, verbose=0)
    dp_only.fit(x[8:], y[8:], batch_size=2, epochs=1, shuffle=False, verbose=0)
    assert keras_and_dp.dp_steps == dp_only.dp_steps == 5
    assert int(keras_and_dp.optimizer.iterations) == 5
    for a, b in zip(keras_and_dp.get_weights(), dp_only.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:torchdp_keras")
def test_a_keras_optimizers_accumulation_becomes_the_dp_accumulation():
    """A DPSequential with SGD(gradient_accumulation_steps=4): one noised update per 4 batches."""
    model = tdk.DPSequential(_stack(), l2_norm_clip=1.0, noise_multiplier=1.0, seed=0)
    model.compile(optimizer=keras.optimizers.SGD(0.1, gradient_accumulation_steps=4), loss="mse")
    model.fit(np.tile(X, (2, 1)), np.tile(Y, (2, 1)), batch_size=2, epochs=1, verbose=0)
    assert model.dp_steps == 2
    ((sigma, q, steps),) = model.accountant.history
    assert (sigma, q, steps) == (1.0, 0.5, 2)  # q = 4 * 2 / 16
