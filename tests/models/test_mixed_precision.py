"""Mixed precision (`mixed_bfloat16`, `mixed_float16`): every DP model, both engines.

What is checked, for an MLP, a small CNN, an LSTM and an attention block, built as
DPSequential, functional DPModel and `make_private` of a subclassed model:

* a training step runs; the weights stay float32 and finite; the gradients handed to
  the optimizer and the clipped sum the noise is added to are float32;
* the per-example norms are float32 or better and agree with the float32 model's
  to bf16 / fp16 accuracy;
* the privacy property: one unit's clipped gradient never has a norm above the clip
  norm, also when the clip norm is just below the unit's norm (where rounding in low
  precision would push it over).
"""

import keras
import numpy as np
import pytest
import torch
from keras import layers

import torchdp_keras as tdk
from torchdp_keras.ops import per_unit_squared_norms

pytestmark = [
    pytest.mark.filterwarnings(r"ignore:torchdp_keras. only \d+ training example"),
    pytest.mark.filterwarnings(r"ignore:torchdp_keras. fit\(\) on arrays trains on shuffled"),
]

POLICIES = ["mixed_bfloat16", "mixed_float16"]
MODES = ["fast", "vmap"]
# Relative accuracy of a norm computed through the low-precision forward and backward.
NORM_RTOL = {"mixed_bfloat16": 0.1, "mixed_float16": 0.02}
BATCH = 6


@pytest.fixture
def policy(request):
    keras.config.set_dtype_policy(request.param)
    yield request.param
    keras.config.set_dtype_policy("float32")


def _mlp():
    return [keras.Input((12,)), layers.Dense(16, activation="relu"), layers.Dense(4)]


def _cnn():  # the tutorial's CNN, smaller
    return [
        keras.Input((10, 10, 1)),
        layers.Conv2D(4, 4, strides=2, padding="same", activation="relu"),
        layers.MaxPool2D(2, 1),
        layers.Conv2D(6, 2, strides=1, padding="valid", activation="relu"),
        layers.Flatten(),
        layers.Dense(8, activation="relu"),
        layers.Dense(4),
    ]


def _lstm():
    return [keras.Input((5, 3)), layers.LSTM(6), layers.Dense(4)]


def _transformer_outputs(inputs):
    h = layers.Embedding(30, 8)(inputs)
    attended = layers.MultiHeadAttention(num_heads=2, key_dim=4)(h, h)
    h = layers.LayerNormalization()(h + attended)
    h = layers.EinsumDense("btd,de->bte", output_shape=(None, 8), bias_axes="e")(h)
    h = layers.GlobalAveragePooling1D()(h)
    return layers.Dense(4)(h)


SEQUENTIAL = {"mlp": _mlp, "cnn": _cnn, "lstm": _lstm}


def _inputs(name, rng, n=BATCH):
    if name == "transformer":
        return rng.integers(0, 30, size=(n, 7)).astype("int32")
    shape = {"mlp": (12,), "cnn": (10, 10, 1), "lstm": (5, 3)}[name]
    return rng.normal(size=(n, *shape)).astype("float32")


def _build(kind, name, mode, clip=1.0):
    dp = dict(l2_norm_clip=clip, noise_multiplier=0.0, clipping_mode=mode)
    if kind == "sequential":
        return tdk.DPSequential(SEQUENTIAL[name](), **dp)
    if name == "transformer":
        inputs = keras.Input((7,), dtype="int32")
        outputs = _transformer_outputs(inputs)
    else:
        stack = SEQUENTIAL[name]()
        inputs = outputs = stack[0]
        for layer in stack[1:]:
            outputs = layer(outputs)
    if kind == "functional":
        return tdk.DPModel(inputs=inputs, outputs=outputs, **dp)

    class Subclassed(keras.Model):
        def __init__(self, inner, **kwargs):
            super().__init__(**kwargs)
            self.inner = inner

        def call(self, x):
            return self.inner(x)

    return tdk.make_private(Subclassed(keras.Model(inputs, outputs)), **dp)


CASES = [
    ("sequential", "mlp"),
    ("sequential", "cnn"),
    ("sequential", "lstm"),
    ("functional", "mlp"),
    ("functional", "cnn"),
    ("functional", "transformer"),
    ("subclassed", "mlp"),
    ("subclassed", "transformer"),
]


def _data(name, seed=0):
    rng = np.random.default_rng(seed)
    x = _inputs(name, rng)
    y = (rng.normal(size=(BATCH, 4)) * 3).astype("float32")
    return x, y


def _record(model):
    """Records the dtypes reaching the noise and the optimizer during the steps."""
    seen = {"noised": [], "applied": []}
    noise, apply = model._add_noise_and_scale, model.optimizer.apply

    def add_noise_and_scale(noise_std, scale):
        seen["noised"] += [g.dtype for g in model._dp_step.accum_grads]
        return noise(noise_std, scale)

    def optimizer_apply(grads, variables=None):
        seen["applied"] += [g.dtype for g in grads]
        return apply(grads, variables)

    model._add_noise_and_scale = add_noise_and_scale
    model.optimizer.apply = optimizer_apply
    return seen


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("policy", POLICIES, indirect=True)
@pytest.mark.parametrize(("kind", "name"), CASES)
def test_step_keeps_float32_and_norms_match_float32(policy, mode, kind, name):
    x, y = _data(name)
    model = _build(kind, name, mode)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    if policy == "mixed_float16":
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    seen = _record(model)
    model.train_on_batch(x, y)
    model.train_on_batch(x, y)
    assert seen["noised"] and set(seen["noised"]) == {torch.float32}
    assert seen["applied"] and set(seen["applied"]) == {torch.float32}
    for v in model.trainable_variables:
        assert v.dtype == "float32", v.path
        assert np.all(np.isfinite(keras.ops.convert_to_numpy(v.value))), v.path

    engine = model._get_dp_engine()
    assert type(engine).__name__ == {"fast": "FastEngine", "vmap": "VmapEngine"}[mode]
    result = engine.clipped_batch(x, y, None, num_units=BATCH, l2_norm_clip=1.0, rng_seed=0)
    assert result.unit_norms.dtype in (torch.float32, torch.float64)
    assert all(g.dtype == torch.float32 for g in result.summed)

    # The same weights in float32: the norms agree to the low precision's accuracy.
    keras.config.set_dtype_policy("float32")
    reference = _build(kind, name, mode)
    reference.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    reference.train_on_batch(x, y)  # builds what a first step builds
    reference.set_weights(model.get_weights())
    expected = reference._get_dp_engine().clipped_batch(
        x, y, None, num_units=BATCH, l2_norm_clip=1.0, rng_seed=0
    )
    np.testing.assert_allclose(
        result.unit_norms.double().numpy(),
        expected.unit_norms.double().numpy(),
        rtol=NORM_RTOL[policy],
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("policy", POLICIES, indirect=True)
@pytest.mark.parametrize(("kind", "name"), [("functional", n) for n in ("mlp", "cnn")])
def test_one_unit_never_exceeds_clip_norm(policy, mode, kind, name):
    """Clip norms at, just below and far below a unit's norm: never over C."""
    x, y = _data(name, seed=1)
    model = _build(kind, name, mode)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    model.train_on_batch(x, y)
    engine = model._get_dp_engine()
    for i in range(3):
        one_x, one_y = x[i : i + 1], y[i : i + 1] * 100  # large gradients
        norm = float(
            engine.clipped_batch(
                one_x, one_y, None, num_units=1, l2_norm_clip=1e30, rng_seed=0
            ).unit_norms[0]
        )
        for clip in (norm, norm * (1 - 1e-7), norm * (1 - 1e-4), norm * 0.99, norm / 7):
            result = engine.clipped_batch(
                one_x, one_y, None, num_units=1, l2_norm_clip=clip, rng_seed=0
            )
            assert result.unit_norms.dtype in (torch.float32, torch.float64)
            clipped = float(torch.sqrt(per_unit_squared_norms([g[None] for g in result.summed])))
            assert clipped <= clip, (clip, clipped, norm)
            assert clipped >= clip * 0.98  # it was clipped, not zeroed


@pytest.mark.parametrize("mode", MODES)
def test_float16_overflow_lowers_the_loss_scale(mode):
    """An fp16 overflow under loss scaling: the unit is left out, the scale halves."""
    keras.config.set_dtype_policy("mixed_float16")
    x, y = _data("mlp", seed=2)
    x[0] *= 1e4  # with the scale, this example's gradients overflow float16
    model = _build("functional", "mlp", mode)
    optimizer = keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(0.01), initial_scale=2.0**15
    )
    model.compile(optimizer=optimizer, loss="mse")
    model.train_on_batch(x, y)
    assert model.privacy_ledger.nonfinite_examples >= 1
    assert float(model.optimizer.dynamic_scale) == 2.0**14
    for v in model.trainable_variables:
        assert np.all(np.isfinite(keras.ops.convert_to_numpy(v.value))), v.path


def test_float16_fast_path_check_sees_finite_gradients(monkeypatch):
    """The one-time tied-weight check of the fast path compares finite gradients.

    The batch's whole gradient at the default loss scale (2**15) times the sum of a
    batch of 64 per-example losses overflows float16; the check takes it at the scale
    of a plain Keras step instead (before, it compared NaNs, which passed unnoticed).
    """
    from torchdp_keras.per_example.fast_engine import FastEngine

    keras.config.set_dtype_policy("mixed_float16")
    seen = []
    verify = FastEngine._verify

    def spy(self, entries, full, *args):
        seen.append(all(g is None or bool(torch.isfinite(g).all()) for g in full))
        return verify(self, entries, full, *args)

    monkeypatch.setattr(FastEngine, "_verify", spy)
    rng = np.random.default_rng(3)
    x = rng.uniform(size=(64, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, size=(64,)).astype("int32")
    model = tdk.DPSequential(
        [
            keras.Input((28, 28, 1)),
            layers.Conv2D(16, 8, strides=2, padding="same", activation="relu"),
            layers.MaxPool2D(2, 1),
            layers.Conv2D(32, 4, strides=2, padding="valid", activation="relu"),
            layers.MaxPool2D(2, 1),
            layers.Flatten(),
            layers.Dense(32, activation="relu"),
            layers.Dense(10),
        ],
        l2_norm_clip=1.5,
        noise_multiplier=0.0,
        clipping_mode="fast",
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.25),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.train_on_batch(x, y)
    assert seen == [True]
    assert model._get_dp_engine()._verified
    assert model.privacy_ledger.nonfinite_examples == 0
