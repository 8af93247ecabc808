"""Bad input gets a clear error naming the argument and its value."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import layers

import torchdp_keras as tdk
from torchdp_keras.errors import DPConfigError, DPError, UnsupportedLayerError

GOOD = dict(l2_norm_clip=1.0, noise_multiplier=1.0)


def _stack():
    return [keras.Input((4,)), layers.Dense(2)]


BAD_ARGUMENTS = [
    (dict(l2_norm_clip=-1), r"Expected l2_norm_clip > 0 and finite. Received: l2_norm_clip=-1"),
    (dict(l2_norm_clip=0), r"Received: l2_norm_clip=0"),
    (dict(l2_norm_clip=float("inf")), r"Received: l2_norm_clip=inf"),
    (dict(l2_norm_clip=float("nan")), r"Received: l2_norm_clip=nan"),
    (dict(l2_norm_clip="1"), r"Received: l2_norm_clip='1' of type str"),
    (dict(l2_norm_clip=True), r"Received: l2_norm_clip=True of type bool"),
    (
        dict(noise_multiplier=-0.5),
        r"Expected noise_multiplier >= 0 and finite. Received: noise_multiplier=-0.5",
    ),
    (dict(noise_multiplier=float("inf")), r"Received: noise_multiplier=inf"),
    (dict(noise_multiplier=None), r"Received: noise_multiplier=None of type NoneType"),
    (dict(num_microbatches=2.5), r"Received: num_microbatches=2.5 of type float"),
    (dict(num_microbatches=0), r"Expected num_microbatches >= 1. Received: num_microbatches=0"),
    (dict(num_microbatches=True), r"Received: num_microbatches=True of type bool"),
    (dict(seed=-3), r"Expected seed >= 0. Received: seed=-3"),
    (dict(seed=1.5), r"Received: seed=1.5 of type float"),
    (dict(use_xla="yes"), r"Expected use_xla to be True or False. Received: use_xla='yes'"),
]


def _build(kind, **dp):
    if kind == "DPSequential":
        return tdk.DPSequential(_stack(), **dp)
    if kind == "DPModel":
        inputs = keras.Input((4,))
        return tdk.DPModel(inputs=inputs, outputs=layers.Dense(2)(inputs), **dp)
    dp.pop("use_xla", None)
    return tdk.make_private(keras.Sequential(_stack()), **dp)


@pytest.mark.parametrize(
    "kind,bad,message",
    [
        (kind, bad, message)
        for kind in ("DPSequential", "DPModel", "make_private")
        for bad, message in BAD_ARGUMENTS
        # make_private has no use_xla; its None settings mean "take them from a config".
        if not (kind == "make_private" and ("use_xla" in bad or None in bad.values()))
    ],
)
def test_bad_dp_arguments(kind, bad, message):
    with pytest.raises(DPConfigError, match=message):
        _build(kind, **{**GOOD, **bad})


def test_dp_config_error_is_a_value_error_and_a_dp_error():
    assert issubclass(DPConfigError, ValueError) and issubclass(DPConfigError, DPError)
    assert issubclass(UnsupportedLayerError, ValueError)


def test_missing_dp_arguments_are_a_type_error():
    with pytest.raises(TypeError, match="noise_multiplier"):
        tdk.DPSequential(_stack(), l2_norm_clip=1.0)


def test_compile_without_loss():
    model = tdk.DPSequential(_stack(), **GOOD)
    with pytest.raises(DPConfigError, match="Received: loss=None"):
        model.compile(optimizer="sgd")


def test_no_trainable_weights():
    model = tdk.DPSequential(_stack(), **GOOD)
    model.layers[0].trainable = False
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(DPConfigError, match="has no trainable weights"):
        model.train_on_batch(np.zeros((2, 4), "float32"), np.zeros((2, 2), "float32"))


def test_make_private_needs_a_keras_model():
    with pytest.raises(DPConfigError, match="Expected model to be a keras.Model"):
        tdk.make_private(layers.Dense(3), **GOOD)


def test_batch_normalization_is_reported_by_path():
    block = keras.Sequential(
        [layers.Dense(4), layers.BatchNormalization(name="bn_inner")], name="block"
    )
    stack = [keras.Input((4,)), layers.BatchNormalization(name="bn_top"), block, layers.Dense(2)]
    with pytest.raises(UnsupportedLayerError) as info:
        tdk.DPSequential(stack, name="net", **GOOD)
    message = str(info.value)
    assert "net/bn_top" in message and "net/block/bn_inner" in message
    assert "GroupNormalization" in message and "LayerNormalization" in message
    assert info.value.layer_paths == ("net/bn_top", "net/block/bn_inner")


def test_batch_normalization_reported_for_every_model_kind():
    inputs = keras.Input((4,))
    outputs = layers.Dense(2)(layers.BatchNormalization(name="bn")(inputs))
    with pytest.raises(UnsupportedLayerError, match="fn/bn"):
        tdk.DPModel(inputs=inputs, outputs=outputs, name="fn", **GOOD)
    base = keras.Sequential([keras.Input((4,)), layers.BatchNormalization(name="bn")], name="seq")
    with pytest.raises(UnsupportedLayerError, match="private_seq/seq/bn"):
        tdk.make_private(base, **GOOD)
    model = tdk.DPSequential(_stack(), name="grow", **GOOD)
    with pytest.raises(UnsupportedLayerError, match="grow/late_bn"):
        model.add(layers.BatchNormalization(name="late_bn"))
    assert len(model.layers) == 1, "the refused layer must not be added"


def test_batch_normalization_in_subclassed_model_is_reported_at_training():
    class WithBN(tdk.DPModel):
        def __init__(self):
            super().__init__(name="sub", **GOOD)
            self.norm = layers.BatchNormalization(name="norm")
            self.out = layers.Dense(2)

        def call(self, x):
            return self.out(self.norm(x))

    model = WithBN()
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(UnsupportedLayerError, match="sub/norm"):
        model.train_on_batch(np.zeros((2, 4), "float32"), np.zeros((2, 2), "float32"))


def test_frozen_batch_normalization_is_allowed():
    bn = layers.BatchNormalization()
    bn.trainable = False
    model = tdk.DPSequential([keras.Input((4,)), bn, layers.Dense(2)], **GOOD)
    model.compile(optimizer="sgd", loss="mse")
    model.train_on_batch(np.ones((4, 4), "float32"), np.zeros((4, 2), "float32"))


def test_layer_updating_state_from_data_is_refused():
    @keras.saving.register_keras_serializable(package="tests")
    class RunningMean(layers.Layer):
        def build(self, input_shape):
            self.mean = self.add_weight(
                shape=(input_shape[-1],), initializer="zeros", trainable=False, name="mean"
            )

        def call(self, x, training=False):
            if training:
                self.mean.assign(0.9 * self.mean + 0.1 * keras.ops.mean(x, axis=0))
            return x

    model = tdk.DPSequential(
        [keras.Input((4,)), RunningMean(name="running"), layers.Dense(2)], **GOOD
    )
    model.compile(optimizer="sgd", loss="mse")
    before = model.get_weights()
    with pytest.raises(UnsupportedLayerError, match="running/mean"):
        model.train_on_batch(np.ones((4, 4), "float32"), np.zeros((4, 2), "float32"))
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_subclass_passing_inputs_and_outputs_is_explained():
    class Sneaky(tdk.DPModel):
        def __init__(self):
            inputs = keras.Input((4,))
            super().__init__(inputs=inputs, outputs=layers.Dense(2)(inputs), **GOOD)

    with pytest.raises(DPConfigError, match="must define `call\\(\\)`"):
        Sneaky()


@pytest.mark.parametrize("backend", ["jax", "tensorflow"])
def test_other_backend_is_refused_before_keras_import(backend):
    env = {**os.environ, "KERAS_BACKEND": backend}
    result = subprocess.run(
        [sys.executable, "-c", "import torchdp_keras"],
        env=env,
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(tdk.__file__))),
    )
    assert result.returncode != 0
    assert "BackendError" in result.stderr
    assert f"Received: KERAS_BACKEND='{backend}'" in result.stderr
    assert "KERAS_BACKEND=torch" in result.stderr


@pytest.mark.parametrize("keras_json", [None, "jax", "tensorflow"])
def test_an_unset_backend_is_set_to_torch_before_keras_starts(tmp_path, keras_json):
    """`import torchdp_keras` first, then `import keras`: Keras starts on torch, and says so."""
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env["KERAS_HOME"] = str(tmp_path)
    if keras_json is not None:
        (tmp_path / "keras.json").write_text(json.dumps({"backend": keras_json}))
    code = (
        "import logging; logging.basicConfig(level=logging.INFO); "
        "import torchdp_keras, keras; print(keras.backend.backend()); "
        "torchdp_keras.DPSequential"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "torch"
    assert "set KERAS_BACKEND=torch for this process" in result.stderr
    assert f"keras.json's backend {keras_json!r} is not used" in result.stderr


def test_accounting_needs_neither_torch_nor_keras():
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    code = (
        "import sys, torchdp_keras.accounting as a; "
        "acc = a.RDPAccountant(); acc.compose(1.0, 0.01, 10); acc.get_epsilon(1e-5); "
        "print(sorted(m for m in ('torch', 'keras') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
