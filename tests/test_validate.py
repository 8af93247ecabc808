"""torchdp_keras.validate (every problem at once, by path) and torchdp_keras.fix."""

import keras
import numpy as np
import pytest
from helpers import Scale
from keras import layers

import torchdp_keras as tdk
from torchdp_keras.errors import DPConfigError, UnsupportedLayerError
from torchdp_keras.model_fix import num_groups

DP = {"l2_norm_clip": 1.0, "noise_multiplier": 1.0}


def _troubled_functional():
    """BatchNormalization, a stateful RNN, a shared layer whose rule cannot share, and a
    rule-less layer."""
    inputs = keras.Input((5, 3), batch_size=4)
    h = layers.SimpleRNN(6, stateful=True, return_sequences=True, name="rnn")(inputs)
    h = layers.BatchNormalization(name="bn")(h)
    h = layers.Flatten()(h)
    shared = layers.LayerNormalization(name="shared")  # Dense could: its uses merge
    h = shared(layers.Dense(4, name="to_four")(h))
    h = shared(h)
    return keras.Model(inputs, Scale(name="scale")(h), name="net")


def test_validate_lists_every_problem_with_reason_and_fix():
    model = _troubled_functional()
    with pytest.raises(UnsupportedLayerError) as info:
        tdk.validate(model, clipping_mode="fast")
    message = str(info.value)
    assert info.value.layer_paths == ("net/rnn", "net/bn", "net/shared", "net/scale")
    assert "stateful=False" in message and "earlier batches" in message
    assert "mean and variance of the whole batch" in message and "GroupNormalization" in message
    assert "called 2 times: shared weights" in message
    assert "net/scale (Scale): no rule in the registry" in message
    assert "clipping_mode='auto'" in message


def test_auto_mode_only_reports_what_no_engine_can_train():
    problems = tdk.validate(_troubled_functional(), strict=False)
    assert [(p.path, p.layer) for p in problems] == [
        ("net/rnn", "SimpleRNN"),
        ("net/bn", "BatchNormalization"),
    ]
    assert all(p.reason and p.fix for p in problems)
    assert "net/bn (BatchNormalization):" in str(problems[1])


def test_clean_model_has_no_problems():
    model = keras.Sequential([keras.Input((4,)), layers.Dense(3), layers.LayerNormalization()])
    for mode in ("auto", "fast", "vmap"):
        assert tdk.validate(model, clipping_mode=mode) == []


def test_dp_model_construction_raises_the_same_complete_error():
    inputs = keras.Input((4,))
    shared = layers.LayerNormalization(name="shared")
    h = layers.BatchNormalization(name="bn")(shared(shared(inputs)))
    with pytest.raises(UnsupportedLayerError) as info:
        tdk.DPModel(inputs=inputs, outputs=h, name="fn", clipping_mode="fast", **DP)
    assert info.value.layer_paths == ("fn/bn", "fn/shared")
    # In auto mode the shared layer trains with per-example gradients.
    with pytest.raises(UnsupportedLayerError) as info:
        tdk.DPModel(inputs=inputs, outputs=h, name="fn2", **DP)
    assert info.value.layer_paths == ("fn2/bn",)


def test_stateful_rnn_is_refused_by_dp_models():
    stack = [keras.Input((5, 3), batch_size=4), layers.LSTM(4, stateful=True, name="lstm")]
    with pytest.raises(UnsupportedLayerError, match="seq/lstm .*stateful"):
        tdk.DPSequential(stack, name="seq", **DP)
    ok = [keras.Input((5, 3)), layers.LSTM(4, name="lstm")]
    assert tdk.validate(tdk.DPSequential(ok, **DP)) == []


def test_validate_uses_the_dp_models_clipping_mode():
    inputs = keras.Input((4,))
    outputs = Scale(name="scale")(inputs)
    model = tdk.DPModel(inputs=inputs, outputs=outputs, name="m", **DP)
    assert model.clipping_mode == "auto" and tdk.validate(model) == []
    assert [p.path for p in tdk.validate(model, clipping_mode="fast", strict=False)] == ["m/scale"]


def test_validate_rejects_bad_arguments():
    with pytest.raises(DPConfigError, match="clipping_mode='quick'"):
        tdk.validate(keras.Sequential([keras.Input((2,))]), clipping_mode="quick")
    with pytest.raises(DPConfigError, match="model=int"):
        tdk.validate(3)


# -- fix ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "channels,groups", [(64, 32), (48, 24), (30, 30), (7, 7), (1, 1), (96, 32)]
)
def test_num_groups_is_the_largest_divisor_up_to_32(channels, groups):
    assert num_groups(channels) == groups
    assert channels % groups == 0


@pytest.mark.parametrize(
    "channels,positions,groups",
    [(64, 1024, 32), (1280, 1, 20), (96, 4, 6), (8, 4, 1), (48, 16, 12), (7, 100, 7), (5, 1, 1)],
)
def test_num_groups_keeps_enough_values_in_every_group(channels, positions, groups):
    assert num_groups(channels, positions) == groups
    # The largest divisor up to 32 with at least MIN_GROUP_VALUES values a group.
    ok = [g for g in range(1, 33) if channels % g == 0 and channels // g * positions >= 64]
    assert groups == (max(ok) if ok else 1)


def test_fix_mobilenet_at_32x32_has_no_tiny_groups():
    model = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10
    )
    fixed = tdk.fix(model)
    sizes = []
    for _, layer in tdk.model_checks.iter_layers(fixed):
        if isinstance(layer, layers.GroupNormalization):
            shape = layer.input.shape
            sizes.append((shape[1] * shape[2] * shape[3] // layer.groups, layer.groups))
    # Every group holds >= 64 values, or the layer is one group (56 channels at 1x1).
    assert len(sizes) > 40 and all(values >= 64 or groups == 1 for values, groups in sizes)
    assert min(values for values, _ in sizes) >= 56


def _bn_convnet():
    inner = keras.Sequential(
        [
            keras.Input((6, 6, 8)),
            layers.Conv2D(12, 3, padding="same"),
            layers.BatchNormalization(name="bn_inner"),
        ],
        name="inner",
    )
    inputs = keras.Input((6, 6, 3))
    h = layers.Conv2D(8, 3, padding="same", name="conv")(inputs)
    h = layers.BatchNormalization(name="bn", center=False)(h)
    h = inner(layers.ReLU()(h))
    outputs = layers.Dense(2, name="head")(layers.GlobalAveragePooling2D()(h))
    return keras.Model(inputs, outputs, name="net")


def test_fix_replaces_batch_normalization_and_keeps_the_rest():
    model = _bn_convnet()
    bn = model.get_layer("bn")
    bn.gamma.assign(np.linspace(0.5, 1.5, 8))
    before = [w.copy() for w in model.get_weights()]
    fixed = tdk.fix(model)
    assert fixed is not model
    kinds = [type(layer).__name__ for _, layer in tdk.model_checks.iter_layers(fixed)]
    assert "BatchNormalization" not in kinds and kinds.count("GroupNormalization") == 2
    norms = [
        layer
        for _, layer in tdk.model_checks.iter_layers(fixed)
        if isinstance(layer, layers.GroupNormalization)
    ]
    # 6 x 6 positions: 8 channels in 4 groups of 72 values, 12 in 6 groups of 72.
    assert [n.groups for n in norms] == [4, 6]
    assert norms[0].center is False and norms[0].scale is True
    np.testing.assert_allclose(np.asarray(norms[0].gamma), np.linspace(0.5, 1.5, 8), rtol=1e-6)
    for name in ("conv", "head"):
        for a, b in zip(fixed.get_layer(name).get_weights(), model.get_layer(name).get_weights()):
            np.testing.assert_array_equal(a, b)
    # The original is untouched, and the copy passes validation.
    for a, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(a, b)
    assert tdk.validate(fixed, clipping_mode="fast") == []


def test_fixed_model_treats_every_example_on_its_own():
    fixed = tdk.fix(_bn_convnet())
    x = np.random.default_rng(0).normal(size=(5, 6, 6, 3)).astype("float32")

    def run(batch):
        return keras.ops.convert_to_numpy(fixed(batch, training=True))

    together = run(x)
    alone = np.concatenate([run(x[i : i + 1]) for i in range(5)])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:torchdp_keras. only 40 training example")  # "." matches ":"
@pytest.mark.filterwarnings(r"ignore:torchdp_keras. fit\(\) on arrays trains on shuffled")
def test_fixed_model_trains_privately_and_sequential_stays_sequential():
    model = keras.Sequential(
        [keras.Input((6,)), layers.Dense(8), layers.BatchNormalization(), layers.Dense(3)]
    )
    with pytest.raises(UnsupportedLayerError):
        tdk.make_private(model, **DP)
    fixed = tdk.fix(model)
    assert isinstance(fixed, keras.Sequential)
    private = tdk.make_private(fixed, **DP, seed=0)
    private.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(True))
    x = np.random.default_rng(0).normal(size=(40, 6)).astype("float32")
    private.fit(x, np.arange(40) % 3, batch_size=10, verbose=0)
    assert all(np.isfinite(w).all() for w in private.get_weights())


def test_fix_keeps_frozen_batch_normalization():
    frozen = layers.BatchNormalization(name="frozen")
    frozen.trainable = False
    model = keras.Sequential([keras.Input((4,)), layers.Dense(4), frozen], name="s")
    fixed = tdk.fix(model)
    assert isinstance(fixed.layers[-1], layers.BatchNormalization)
    assert fixed.layers[-1].trainable is False


def test_fix_refuses_what_it_cannot_rebuild():
    with pytest.raises(DPConfigError, match="already a DP model"):
        tdk.fix(tdk.DPSequential([keras.Input((4,)), layers.Dense(2)], **DP))

    class Sub(keras.Model):
        def __init__(self):
            super().__init__(name="sub")
            self.norm = layers.BatchNormalization(name="norm")

        def call(self, x):
            return self.norm(x)

    sub = Sub()
    sub(np.zeros((2, 4), "float32"))
    with pytest.raises(DPConfigError, match="subclassed model.*sub/norm"):
        tdk.fix(sub)
    with pytest.raises(DPConfigError, match="built model"):
        tdk.fix(keras.Sequential([layers.Dense(2)]))
    with pytest.raises(DPConfigError, match="model=Dense"):
        tdk.fix(layers.Dense(2))
