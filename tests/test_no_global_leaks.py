"""A DP step leaves Keras, torch and the global RNGs exactly as it found them."""

import keras
import numpy as np
import pytest
import torch
from keras import layers
from keras.src.backend.torch import nn as keras_torch_nn
from keras.src.backend.torch import random as keras_torch_random

import torchdp_keras as tdk
from torchdp_keras.per_example.keras_patches import per_example_call_context


def _conv_dp(**kwargs):
    model = tdk.DPSequential(
        [
            keras.Input((6, 6, 1)),
            layers.Conv2D(2, 3),
            layers.Dropout(0.3, seed=1),
            layers.Flatten(),
            layers.Dense(2),
        ],
        l2_norm_clip=1.0,
        noise_multiplier=1.0,
        seed=0,
        **kwargs,
    )
    model.compile(optimizer="sgd", loss="mse")
    return model


def _snapshot():
    return (
        keras_torch_nn._maybe_convert_to_channels_last,
        keras_torch_random.torch_seed_generator,
        torch.get_rng_state().clone(),
    )


def test_dp_step_restores_patches_and_global_rng():
    model = _conv_dp()
    x, y = np.ones((4, 6, 6, 1), "float32"), np.zeros((4, 2), "float32")
    before = _snapshot()
    model.train_on_batch(x, y)
    after = _snapshot()
    assert after[0] is before[0] and after[1] is before[1]
    assert torch.equal(after[2], before[2]), "the global torch RNG must be untouched"


def test_patches_are_restored_when_the_step_fails():
    before = _snapshot()
    with pytest.raises(RuntimeError, match="boom"):
        with per_example_call_context(torch.device("cpu"), 5):
            assert keras_torch_nn._maybe_convert_to_channels_last is not before[0]
            raise RuntimeError("boom")
    after = _snapshot()
    assert after[0] is before[0] and after[1] is before[1]
    assert torch.equal(after[2], before[2])


def test_plain_keras_behaviour_is_unchanged_after_dp_training():
    x = np.random.default_rng(0).normal(size=(4, 6, 6, 1)).astype("float32")
    plain = keras.Sequential(
        [keras.Input((6, 6, 1)), layers.Conv2D(2, 3), layers.Dropout(0.5, seed=3)]
    )
    keras.utils.set_random_seed(9)
    reference = keras.ops.convert_to_numpy(plain(x, training=True))
    _conv_dp().train_on_batch(x, np.zeros((4, 2), "float32"))
    plain.layers[-1].seed_generator.state.assign(np.array([3, 0], "int32"))
    keras.utils.set_random_seed(9)
    again = keras.ops.convert_to_numpy(plain(x, training=True))
    np.testing.assert_array_equal(reference, again)


def test_lipschitz_step_leaves_threads_and_global_rng_alone():
    from torchdp_keras.lipschitz import DatasetMetadata, DP_Sequential, DPParameters
    from torchdp_keras.lipschitz import layers as L
    from torchdp_keras.lipschitz.losses import DP_MeanAbsoluteError

    model = DP_Sequential(
        [
            keras.Input((6, 6, 1)),
            L.DP_BoundedInput(max_norm=1.0),
            L.DP_SpectralConv2D(2, 3),
            L.DP_Flatten(),
            L.DP_SpectralDense(2),
        ],
        dp_parameters=DPParameters("global", 1.0, 1e-5),
        dataset_metadata=DatasetMetadata((6, 6, 1), 2, 100, 10, ["a", "b"], 25, 4, 1.0),
    )
    model.compile(optimizer="sgd", loss=DP_MeanAbsoluteError())
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    x = np.random.default_rng(0).normal(size=(4, 6, 6, 1)).astype("float32")
    model.train_on_batch(x, np.zeros((4, 2), "float32"))
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.get_rng_state(), rng), "the global torch RNG must be untouched"


def test_a_subclassed_step_restores_kerass_pooling_and_convolution_ops():
    """The fast path's channels_last views of Keras's ops exist only during the step."""
    from torchdp_keras.per_example.layout import layout_preserving_ops

    class Net(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.conv = layers.Conv2D(2, 3, padding="same", activation="relu")
            self.pool = layers.MaxPooling2D()
            self.out = layers.Dense(2)

        def call(self, x):
            return self.out(layers.Flatten()(self.pool(self.conv(x))))

    ops = (keras_torch_nn.max_pool, keras_torch_nn.average_pool, keras_torch_nn.conv)
    model = tdk.make_private(Net(), l2_norm_clip=1.0, noise_multiplier=1.0, seed=0)
    model.compile(optimizer="sgd", loss="mse")
    model.train_on_batch(np.ones((4, 6, 6, 1), "float32"), np.zeros((4, 2), "float32"))
    assert model.clipping_plan().engine == "fast"
    assert (keras_torch_nn.max_pool, keras_torch_nn.average_pool, keras_torch_nn.conv) == ops
    with pytest.raises(RuntimeError, match="boom"):
        with layout_preserving_ops():
            assert keras_torch_nn.conv is not ops[2]
            raise RuntimeError("boom")
    assert (keras_torch_nn.max_pool, keras_torch_nn.average_pool, keras_torch_nn.conv) == ops


def test_a_subclassed_step_convolves_on_views_not_through_kerass_copying_conv(monkeypatch):
    """A layer hands Keras's conv its kernel *variable*: the view-based conv must take it."""
    calls = []
    original = keras_torch_nn.conv

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(keras_torch_nn, "conv", counting)

    class Net(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.conv = layers.Conv2D(2, 3, padding="same", activation="relu")
            self.out = layers.Dense(2)

        def call(self, x):
            return self.out(layers.Flatten()(self.conv(x)))

    model = tdk.make_private(Net(), l2_norm_clip=1.0, noise_multiplier=1.0, seed=0)
    model.compile(optimizer="sgd", loss="mse")
    model.train_on_batch(np.ones((4, 6, 6, 1), "float32"), np.zeros((4, 2), "float32"))
    calls.clear()
    model.train_on_batch(np.ones((4, 6, 6, 1), "float32"), np.zeros((4, 2), "float32"))
    assert calls == []
