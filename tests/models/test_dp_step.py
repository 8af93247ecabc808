"""The DP-SGD update: clipping in closed form, microbatches, plain-Keras equality."""

import keras
import numpy as np
import pytest
import torch
from helpers import reference_clipped_sum, reference_per_example_gradients
from keras import layers

import torchdp_keras as tdk
from torchdp_keras.ops import clip_factors, per_unit_squared_norms

# The models here train on a few examples, as arrays: the library's privacy warnings about
# both ("." stands for ":", the field separator of a filter) are expected, and not the point.
pytestmark = [
    pytest.mark.filterwarnings(r"ignore:torchdp_keras. only \d+ training example"),
    pytest.mark.filterwarnings(r"ignore:torchdp_keras. fit\(\) on arrays trains on shuffled"),
]


def _linear_dp(l2_norm_clip, num_microbatches=None, lr=1.0, **kwargs):
    model = tdk.DPSequential(
        [keras.Input((3,)), layers.Dense(1, use_bias=False, kernel_initializer="zeros")],
        l2_norm_clip=l2_norm_clip,
        noise_multiplier=0.0,
        num_microbatches=num_microbatches,
        **kwargs,
    )
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    return model


# With w = 0 and loss (w.x - y)^2 the per-example gradient is -2 y x.
X = np.array([[1.0, 0, 0], [0, 3.0, 4.0], [0, 0, 0.1], [2.0, 2.0, 1.0]], dtype="float32")
Y = np.array([[1.0], [1.0], [1.0], [-1.0]], dtype="float32")


@pytest.mark.parametrize("clip", [0.5, 1.0, 3.0, 100.0])
def test_clipping_in_closed_form(clip):
    model = _linear_dp(clip)
    model.train_on_batch(X, Y)
    grads = -2.0 * Y * X  # norms 2, 10, 0.2, 6
    norms = np.linalg.norm(grads, axis=1, keepdims=True)
    clipped = grads * np.minimum(1.0, clip / norms)
    expected_update = clipped.sum(axis=0) / len(X)
    np.testing.assert_allclose(model.get_weights()[0][:, 0], -expected_update, rtol=2e-6, atol=2e-6)


def test_clipped_norms_never_exceed_clip():
    model = tdk.DPSequential(
        [keras.Input((20,)), layers.Dense(8, activation="tanh"), layers.Dense(1)],
        l2_norm_clip=0.01,
        noise_multiplier=0.0,
        clipping_mode="vmap",
    )
    model.compile(optimizer="sgd", loss="mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 20)).astype("float32") * 10
    y = rng.normal(size=(32, 1)).astype("float32") * 10
    grads, _ = model._get_dp_engine().per_unit_gradients(x, y, None, num_units=32)
    factors = clip_factors(per_unit_squared_norms(grads), 0.01)
    clipped = [g * factors.view(-1, *[1] * (g.ndim - 1)).float() for g in grads]
    norms = torch.sqrt(per_unit_squared_norms(clipped))
    assert float(norms.max()) <= 0.01
    assert float(norms.min()) > 0.0099  # every example was large: all clipped


def test_microbatches_clip_group_means_and_divide_by_k():
    clip = 1.0
    model = _linear_dp(clip, num_microbatches=2)
    model.train_on_batch(X, Y)
    grads = -2.0 * Y * X
    groups = [grads[:2].mean(axis=0), grads[2:].mean(axis=0)]
    clipped = [g * min(1.0, clip / np.linalg.norm(g)) for g in groups]
    expected_update = sum(clipped) / 2
    np.testing.assert_allclose(model.get_weights()[0][:, 0], -expected_update, rtol=2e-6)


def test_microbatch_count_must_divide_batch():
    model = _linear_dp(1.0, num_microbatches=3)
    with pytest.raises(ValueError, match=r"batch_size=4, num_microbatches=3"):
        model.train_on_batch(X, Y)
    assert np.all(model.get_weights()[0] == 0), "a refused step must not update"


def _cnn(model_cls, **dp):
    stack = [
        keras.Input((8, 8, 1)),
        layers.Conv2D(4, 3, activation="relu"),
        layers.Flatten(),
        layers.Dense(10, activation="relu"),
        layers.Dense(3),
    ]
    if model_cls is keras.Sequential:
        return keras.Sequential(stack)
    return tdk.DPSequential(stack, **dp)


def _train(model, x, y, steps, batch_size):
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, batch_size=batch_size, epochs=steps, shuffle=False, verbose=0)
    return model.get_weights()


def _data():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(16, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 3, size=(16,)).astype("int32")
    return x, y


def test_equals_plain_keras_without_noise_and_with_huge_clip():
    x, y = _data()
    plain = _cnn(keras.Sequential)
    dp = _cnn(tdk.DPSequential, l2_norm_clip=1e9, noise_multiplier=0.0)
    dp.set_weights(plain.get_weights())
    expected = _train(plain, x, y, steps=3, batch_size=8)
    actual = _train(dp, x, y, steps=3, batch_size=8)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)


# sigma = 1e-8 is beyond what the PRV accountant discretises: it falls back to RDP, with a warning.
@pytest.mark.filterwarnings("ignore:The PRV computation failed:RuntimeWarning")
@pytest.mark.parametrize(
    "dp",
    [dict(l2_norm_clip=1e-3, noise_multiplier=0.0), dict(l2_norm_clip=1e9, noise_multiplier=1e-8)],
)
def test_differs_from_plain_keras_when_clipping_or_noise_is_on(dp):
    x, y = _data()
    plain = _cnn(keras.Sequential)
    private = _cnn(tdk.DPSequential, seed=0, **dp)
    private.set_weights(plain.get_weights())
    expected = _train(plain, x, y, steps=1, batch_size=8)
    actual = _train(private, x, y, steps=1, batch_size=8)
    assert any(not np.allclose(a, e, rtol=1e-7, atol=0) for a, e in zip(actual, expected))


def test_update_matches_reference_clipped_mean_with_sample_weights():
    model = tdk.DPSequential(
        [keras.Input((5,)), layers.Dense(6, activation="tanh"), layers.Dense(2)],
        l2_norm_clip=0.3,
        noise_multiplier=0.0,
    )
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    rng = np.random.default_rng(8)
    x = rng.normal(size=(10, 5)).astype("float32")
    y = rng.normal(size=(10, 2)).astype("float32")
    w = rng.uniform(0.2, 2.0, size=(10,)).astype("float32")
    before = [v.numpy().copy() for v in model.trainable_variables]
    per_example = reference_per_example_gradients(model, x, y, w)
    expected = [s / 10 for s in reference_clipped_sum(per_example, 0.3)]
    model.train_on_batch(x, y, sample_weight=w)
    for b, v, e in zip(before, model.trainable_variables, expected):
        np.testing.assert_allclose(b - v.numpy(), e, rtol=1e-5, atol=1e-7)


def test_weight_regularizer_is_added_after_clipping():
    reg = 0.5
    model = tdk.DPSequential(
        [
            keras.Input((3,)),
            layers.Dense(
                1,
                use_bias=False,
                kernel_initializer=keras.initializers.Constant(0.2),
                kernel_regularizer=keras.regularizers.L2(reg),
            ),
        ],
        l2_norm_clip=0.01,
        noise_multiplier=0.0,
    )
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    w0 = model.get_weights()[0][:, 0].copy()
    model.train_on_batch(X, Y)
    residual = X @ w0 - Y[:, 0]
    grads = 2.0 * residual[:, None] * X
    norms = np.linalg.norm(grads, axis=1, keepdims=True)
    data_part = (grads * np.minimum(1.0, 0.01 / norms)).sum(axis=0) / len(X)
    reg_part = 2 * reg * w0  # d/dw of reg * ||w||^2, not clipped
    np.testing.assert_allclose(model.get_weights()[0][:, 0], w0 - data_part - reg_part, rtol=1e-5)


# float() of the regularization loss, which requires grad: torch warns.
@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True:UserWarning")
def test_logged_loss_is_mean_unit_loss_plus_regularization():
    model = tdk.DPSequential(
        [keras.Input((3,)), layers.Dense(1, kernel_regularizer=keras.regularizers.L2(0.1))],
        l2_norm_clip=1.0,
        noise_multiplier=0.0,
    )
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    expected = float(
        keras.ops.mean((model.predict(X, verbose=0) - Y) ** 2)
        + sum(model._get_regularization_losses())
    )
    logs = model.train_on_batch(X, Y, return_dict=True)
    np.testing.assert_allclose(logs["loss"], expected, rtol=1e-5)


@pytest.mark.parametrize("optimizer", ["adam", "rmsprop", "adagrad", "sgd_schedule"])
def test_any_keras_optimizer_and_schedule(optimizer):
    if optimizer == "sgd_schedule":
        optimizer = keras.optimizers.SGD(
            keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=1, decay_rate=0.5)
        )
    model = _linear_dp(1.0)
    model.compile(optimizer=optimizer, loss="mse", metrics=["mae"])
    history = model.fit(np.tile(X, (4, 1)), np.tile(Y, (4, 1)), batch_size=4, epochs=2, verbose=0)
    assert set(history.history) == {"loss", "mae", "epsilon"}
    assert np.all(np.isfinite(history.history["loss"]))
    assert not np.all(model.get_weights()[0] == 0)


def test_mixed_precision_loss_scale_is_undone():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(16, 6)).astype("float32")
    y = rng.normal(size=(16, 3)).astype("float32")

    def one_step(policy, weights=None):
        keras.mixed_precision.set_global_policy(policy)
        try:
            model = tdk.DPSequential(
                [
                    keras.Input((6,)),
                    layers.Dense(8, activation="relu"),
                    layers.Dense(3, dtype="float32"),
                ],
                l2_norm_clip=1e6,  # no clipping: a scale error cannot hide
                noise_multiplier=0.0,
            )
            optimizer = keras.optimizers.SGD(1.0)
            if policy == "mixed_float16":  # a scale that does not overflow fp16
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer, initial_scale=256.0)
            model.compile(optimizer=optimizer, loss="mse")
            if weights is not None:
                model.set_weights(weights)
            before = model.get_weights()
            model.train_on_batch(x, y)
            return model, before, model.get_weights()
        finally:
            keras.mixed_precision.set_global_policy("float32")

    mixed, before, after_mixed = one_step("mixed_float16")
    assert isinstance(mixed.optimizer, keras.optimizers.LossScaleOptimizer)
    assert float(mixed.optimizer.dynamic_scale) > 1  # the scale really is in play
    _, _, after_full = one_step("float32", before)
    for b, m, f in zip(before, after_mixed, after_full):
        # A scale applied twice or not undone would be off by 256x; fp16
        # rounding is a few parts per thousand.
        np.testing.assert_allclose(b - m, b - f, rtol=1e-2, atol=1e-3)
