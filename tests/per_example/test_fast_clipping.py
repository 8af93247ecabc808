"""The fast clipping path against the per-example engine, layer by layer and end to end."""

import logging

import keras
import numpy as np
import pytest
import torch
from helpers import Scale, reference_clipped_sum
from keras import layers

import torchdp_keras as tdk
from torchdp_keras.data.sampling_plan import SamplingPlan
from torchdp_keras.errors import UnsupportedLayerError
from torchdp_keras.per_example import (
    FastEngine,
    LayerRule,
    VmapEngine,
    make_default_layer_registry,
)
from torchdp_keras.per_example.rules.base import identity, sq_norm_rows, weighted

BATCH = 6


def _layers_case(name):
    cases = {
        "dense": ((7,), lambda: [layers.Dense(5, activation="tanh"), layers.Dense(3)]),
        "dense_sequence_ghost": (  # T^2 (d_in + d_out) < d_in d_out
            (2, 40),
            lambda: [layers.Dense(40), layers.Flatten(), layers.Dense(3)],
        ),
        "dense_sequence_explicit": (
            (12, 3),
            lambda: [layers.Dense(40), layers.Flatten(), layers.Dense(3)],
        ),
        "conv1d": (
            (10, 2),
            lambda: [layers.Conv1D(4, 3, activation="relu"), layers.Flatten(), layers.Dense(3)],
        ),
        "conv2d": (
            (9, 9, 2),
            lambda: [
                layers.Conv2D(4, 3, strides=2, activation="relu"),
                layers.Flatten(),
                layers.Dense(3),
            ],
        ),
        "conv2d_ghost": (
            (5, 5, 8),
            lambda: [layers.Conv2D(32, 3, strides=2), layers.Flatten(), layers.Dense(3)],
        ),
        "conv2d_same_dilated": (
            (9, 9, 2),
            lambda: [
                layers.Conv2D(3, 3, padding="same", dilation_rate=2),
                layers.Flatten(),
                layers.Dense(3),
            ],
        ),
        "conv2d_same_strided": (
            (11, 11, 1),
            lambda: [
                layers.Conv2D(4, 4, strides=2, padding="same", activation="relu"),
                layers.Flatten(),
                layers.Dense(3),
            ],
        ),
        "conv2d_valid_dilated": (
            (9, 9, 2),
            lambda: [layers.Conv2D(3, 2, dilation_rate=2), layers.Flatten(), layers.Dense(3)],
        ),
        "conv1d_causal_dilated": (
            (10, 2),
            lambda: [
                layers.Conv1D(4, 3, padding="causal", dilation_rate=2, activation="relu"),
                layers.Flatten(),
                layers.Dense(3),
            ],
        ),
        "conv1d_same_strided": (
            (11, 3),
            lambda: [
                layers.Conv1D(4, 4, strides=3, padding="same"),
                layers.Flatten(),
                layers.Dense(3),
            ],
        ),
        "conv3d": ((5, 5, 5, 1), lambda: [layers.Conv3D(2, 2), layers.Flatten(), layers.Dense(3)]),
        "conv3d_same_strided": (
            (5, 4, 5, 2),
            lambda: [
                layers.Conv3D(3, 2, strides=2, padding="same"),
                layers.Flatten(),
                layers.Dense(3),
            ],
        ),
        "depthwise": (
            (8, 8, 3),
            lambda: [
                layers.DepthwiseConv2D(3, depth_multiplier=2),
                layers.Flatten(),
                layers.Dense(3),
            ],
        ),
        "depthwise_same_strided": (
            (7, 7, 3),
            lambda: [
                layers.DepthwiseConv2D(3, strides=2, padding="same", activation="relu"),
                layers.Flatten(),
                layers.Dense(3),
            ],
        ),
        "depthwise_ghost": (  # one output position: the ghost norm is cheaper
            (6, 6, 2),
            lambda: [
                layers.DepthwiseConv2D(5, strides=3, depth_multiplier=3),
                layers.Flatten(),
                layers.Dense(3),
            ],
        ),
        "depthwise_1d": (
            (9, 2),
            lambda: [
                layers.DepthwiseConv1D(3, depth_multiplier=2, dilation_rate=2),
                layers.Flatten(),
                layers.Dense(3),
            ],
        ),
        "separable_2d": (
            (8, 8, 3),
            lambda: [
                layers.SeparableConv2D(4, 3, depth_multiplier=2, activation="relu"),
                layers.Flatten(),
                layers.Dense(3),
            ],
        ),
        "separable_2d_same_strided": (
            (9, 9, 2),
            lambda: [
                layers.SeparableConv2D(3, 3, strides=2, padding="same", use_bias=False),
                layers.Flatten(),
                layers.Dense(3),
            ],
        ),
        "conv2d_transpose": (
            (4, 4, 3),
            lambda: [
                layers.Conv2DTranspose(2, 3, strides=2, activation="relu"),
                layers.Flatten(),
                layers.Dense(3),
            ],
        ),
        "conv2d_transpose_same": (
            (5, 5, 2),
            lambda: [
                layers.Conv2DTranspose(3, 4, strides=2, padding="same"),
                layers.Flatten(),
                layers.Dense(3),
            ],
        ),
        "conv2d_transpose_output_padding_dilated": (
            (4, 4, 2),
            lambda: [
                layers.Conv2DTranspose(2, 3, strides=2, output_padding=1),
                layers.Conv2DTranspose(2, 2, dilation_rate=2, use_bias=False),
                layers.Flatten(),
                layers.Dense(3),
            ],
        ),
        "conv1d_transpose": (
            (6, 3),
            lambda: [layers.Conv1DTranspose(4, 3, strides=2), layers.Flatten(), layers.Dense(3)],
        ),
        "conv3d_transpose_same": (
            (3, 3, 3, 2),
            lambda: [
                layers.Conv3DTranspose(2, 2, strides=2, padding="same"),
                layers.Flatten(),
                layers.Dense(3),
            ],
        ),
        "separable_1d_dilated": (
            (11, 3),
            lambda: [
                layers.SeparableConv1D(5, 3, dilation_rate=2, activation="tanh"),
                layers.Flatten(),
                layers.Dense(3),
            ],
        ),
        "layer_norm": (
            (5,),
            lambda: [layers.Dense(6), layers.LayerNormalization(), layers.Dense(3)],
        ),
        "group_norm": (
            (5, 2),
            lambda: [
                layers.Conv1D(6, 2),
                layers.GroupNormalization(3),
                layers.Flatten(),
                layers.Dense(3),
            ],
        ),
        "einsum_dense": (
            (4, 5),
            lambda: [
                layers.EinsumDense("abc,cd->abd", (4, 6), bias_axes="d"),
                layers.Flatten(),
                layers.Dense(3),
            ],
        ),
        "einsum_dense_ellipsis_activation": (
            (3, 4, 5),
            lambda: [
                layers.EinsumDense("...c,cd->...d", 6, bias_axes="d", activation="tanh"),
                layers.Flatten(),
                layers.Dense(3),
            ],
        ),
        "einsum_dense_heads_and_broadcast_bias": (  # kernel (c, h, e); bias over h only
            (4, 5),
            lambda: [
                layers.EinsumDense("abc,che->abhe", (4, 2, 3), bias_axes="h"),
                layers.Flatten(),
                layers.Dense(3),
            ],
        ),
        "einsum_dense_contract_two_axes": (
            (4, 2, 3),
            lambda: [
                layers.EinsumDense("abcd,cde->abe", (4, 5), bias_axes="e"),
                layers.Flatten(),
                layers.Dense(3),
            ],
        ),
        "einsum_dense_summed_input_axis": (  # axis b is summed away, not contracted
            (4, 5),
            lambda: [layers.EinsumDense("abc,cd->ad", 6), layers.Dense(3)],
        ),
        "einsum_dense_shared_axis": (  # h in input, kernel and output: explicit route
            (2, 3),
            lambda: [
                layers.EinsumDense("ahc,hcd->ahd", (2, 5), bias_axes="hd"),
                layers.Flatten(),
                layers.Dense(3),
            ],
        ),
        "layer_norm_two_axes_no_center": (
            (4, 5),
            lambda: [
                layers.Dense(5),
                layers.LayerNormalization(axis=(1, 2), center=False),
                layers.Flatten(),
                layers.Dense(3),
            ],
        ),
        "rms_norm": (
            (4, 5),
            lambda: [
                layers.RMSNormalization(axis=(1, 2)),
                layers.Flatten(),
                layers.Dense(3),
            ],
        ),
        "group_norm_2d": (
            (4, 4, 4),
            lambda: [layers.GroupNormalization(2), layers.Flatten(), layers.Dense(3)],
        ),
    }
    return cases[name]


def _engines(model, registry=None):
    registry = registry or make_default_layer_registry()
    return FastEngine(model, registry), VmapEngine(model)


def _compare(model, x, y, sample_weight=None, clip=0.05, tol=1e-4, atol=None, registry=None):
    fast, vmap = _engines(model, registry)
    kwargs = dict(num_units=BATCH, l2_norm_clip=clip, rng_seed=0)
    a = fast.clipped_batch(x, y, sample_weight, **kwargs)
    b = vmap.clipped_batch(x, y, sample_weight, **kwargs)
    np.testing.assert_allclose(a.unit_norms.numpy(), b.unit_norms.numpy(), rtol=tol)
    for s, t in zip(a.summed, b.summed):
        np.testing.assert_allclose(
            s.numpy(), t.numpy(), rtol=tol, atol=tol * clip if atol is None else atol
        )
    np.testing.assert_allclose(float(a.loss_sum), float(b.loss_sum), rtol=tol)


@pytest.mark.parametrize("precision", ["float32", "float64"])
@pytest.mark.parametrize(
    "case",
    [
        "dense",
        "dense_sequence_ghost",
        "dense_sequence_explicit",
        "conv1d",
        "conv2d",
        "conv2d_ghost",
        "conv2d_same_dilated",
        "conv2d_same_strided",
        "conv2d_valid_dilated",
        "conv1d_causal_dilated",
        "conv1d_same_strided",
        "conv3d",
        "conv3d_same_strided",
        "depthwise",
        "depthwise_same_strided",
        "depthwise_ghost",
        "depthwise_1d",
        "separable_2d",
        "separable_2d_same_strided",
        "separable_1d_dilated",
        "conv2d_transpose",
        "conv2d_transpose_same",
        "conv2d_transpose_output_padding_dilated",
        "conv1d_transpose",
        "conv3d_transpose_same",
        "layer_norm",
        "group_norm",
        "group_norm_2d",
        "layer_norm_two_axes_no_center",
        "rms_norm",
        "einsum_dense",
        "einsum_dense_ellipsis_activation",
        "einsum_dense_heads_and_broadcast_bias",
        "einsum_dense_contract_two_axes",
        "einsum_dense_summed_input_axis",
        "einsum_dense_shared_axis",
    ],
)
def test_rule_norms_and_clipped_sums_match_per_example_engine(case, precision, request):
    if precision == "float64":
        request.getfixturevalue("float64")
    input_shape, stack = _layers_case(case)
    model = tdk.DPSequential(
        [keras.Input(input_shape), *stack()], l2_norm_clip=1.0, noise_multiplier=0.0
    )
    model.compile(optimizer="sgd", loss="mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, *input_shape)).astype(precision)
    y = rng.normal(size=(BATCH, 3)).astype(precision)
    _compare(model, x, y, tol=1e-5 if precision == "float64" else 1e-4)


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_embedding_and_attention_match(precision, request):
    if precision == "float64":
        request.getfixturevalue("float64")
    tokens = keras.Input((5,), dtype="int32")
    embedded = layers.Embedding(11, 8)(tokens)
    attended = layers.MultiHeadAttention(num_heads=2, key_dim=4)(embedded, embedded)
    outputs = layers.Dense(3)(layers.GlobalAveragePooling1D()(attended))
    model = tdk.DPModel(inputs=tokens, outputs=outputs, l2_norm_clip=1.0, noise_multiplier=0.0)
    model.compile(optimizer="sgd", loss="mse")
    rng = np.random.default_rng(1)
    x = rng.integers(0, 11, size=(BATCH, 5)).astype("int32")  # repeated ids: sparse collisions
    y = rng.normal(size=(BATCH, 3)).astype(precision)
    _compare(model, x, y, tol=1e-5 if precision == "float64" else 1e-4)


@pytest.mark.parametrize("variant", ["cross_attention_masks", "causal_dropout"])
def test_multi_head_attention_through_its_projections(variant):
    query_in = keras.Input((5, 6))
    value_in = keras.Input((4, 6))
    if variant == "cross_attention_masks":
        mask_in = keras.Input((5, 4), dtype="bool")
        attention = layers.MultiHeadAttention(num_heads=2, key_dim=3, value_dim=2, name="mha")
        h = attention(query_in, value_in, attention_mask=mask_in)
        inputs = [query_in, value_in, mask_in]
    else:
        attention = layers.MultiHeadAttention(
            num_heads=2, key_dim=3, dropout=0.5, seed=4, name="mha"
        )
        h = attention(query_in, query_in, use_causal_mask=True)
        inputs = [query_in, value_in]
    outputs = layers.Dense(3)(layers.Flatten()(layers.LayerNormalization()(h)))
    model = tdk.DPModel(inputs=inputs, outputs=outputs, l2_norm_clip=1.0, noise_multiplier=0.0)
    model.compile(optimizer="sgd", loss="mse")
    rng = np.random.default_rng(2)
    x = [
        rng.normal(size=(BATCH, 5, 6)).astype("float32"),
        rng.normal(size=(BATCH, 4, 6)).astype("float32"),
    ]
    if variant == "cross_attention_masks":
        x.append(rng.random(size=(BATCH, 5, 4)) > 0.3)
    y = rng.normal(size=(BATCH, 3)).astype("float32")
    fast, _ = _engines(model)
    assert not fast.slow_layers
    _compare(model, x, y)
    hooks = [len(sub._forward_hooks) for sub in attention._flatten_layers(include_self=False)]
    assert hooks == [0] * len(hooks)  # the taps are gone after the step


def test_sublayer_rule_refuses_sublayers_called_twice_or_weights_read_directly():
    class TwiceDense(layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            # A rule without shared uses (Dense has them: see the shared-weights tests).
            self.inner = layers.LayerNormalization(name="inner")

        def call(self, x):
            return self.inner(self.inner(x))

    class OwnWeight(layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.inner = layers.Dense(4)

        def build(self, input_shape):
            self.scale = self.add_weight(shape=(4,), initializer="ones")

        def call(self, x):
            return self.inner(x) * self.scale

    registry = make_default_layer_registry()
    registry.insert(TwiceDense, tdk.SublayerRule())
    registry.insert(OwnWeight, tdk.SublayerRule())
    for layer, message in [
        (TwiceDense(name="twice"), "twice/inner ran 2 times"),
        (OwnWeight(name="own"), "do not own each of its trainable weights"),
    ]:
        # Weights outside the sublayers are seen when the model is built; a
        # sublayer called twice only when the step runs.
        with pytest.raises(UnsupportedLayerError, match=message):
            model = tdk.DPSequential(
                [keras.Input((4,)), layer, layers.Dense(1)],
                l2_norm_clip=1.0,
                noise_multiplier=0.0,
                clipping_mode="fast",
                layer_registry=registry,
            )
            model.compile(optimizer="sgd", loss="mse")
            model.train_on_batch(np.ones((2, 4), "float32"), np.ones((2, 1), "float32"))
        assert all(not sub._forward_hooks for sub in layer._flatten_layers())


def test_composite_user_layer_through_sublayer_rule():
    class Block(layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.up = layers.Dense(8, activation="relu")
            self.down = layers.Dense(4)
            self.norm = layers.LayerNormalization()

        def call(self, x):
            return self.norm(x + self.down(self.up(x)))

    registry = make_default_layer_registry()
    registry.insert(Block, tdk.SublayerRule())
    model = tdk.DPSequential(
        [keras.Input((4,)), Block(), layers.Dense(3)],
        l2_norm_clip=1.0,
        noise_multiplier=0.0,
        clipping_mode="fast",
        layer_registry=registry,
    )
    model.compile(optimizer="sgd", loss="mse")
    rng = np.random.default_rng(8)
    x = rng.normal(size=(BATCH, 4)).astype("float32")
    y = rng.normal(size=(BATCH, 3)).astype("float32")
    _compare(model, x, y, atol=1e-6, registry=registry)


@pytest.mark.parametrize(
    "pooling",
    [
        layers.MaxPooling1D(2, 1),
        layers.MaxPooling2D((2, 3), (1, 2)),
        layers.MaxPooling3D(2),
        layers.AveragePooling1D(3),
        layers.AveragePooling2D(2, 1),
        layers.AveragePooling3D((1, 2, 2)),
    ],
)
def test_layout_preserving_pooling_equals_keras(pooling):
    from torchdp_keras.per_example.layout import layout_preserving_forward

    rank = len(pooling.pool_size)
    x = np.random.default_rng(0).normal(size=(3, *[6] * rank, 4)).astype("float32")
    a = keras.ops.convert_to_tensor(x).requires_grad_()
    b = keras.ops.convert_to_tensor(x).requires_grad_()
    ours, theirs = layout_preserving_forward(pooling)(a), pooling(b)
    np.testing.assert_array_equal(ours.detach().numpy(), theirs.detach().numpy())
    weights = keras.ops.convert_to_tensor(np.random.default_rng(1).normal(size=ours.shape))
    (ours * weights).sum().backward()
    (theirs * weights).sum().backward()
    np.testing.assert_allclose(a.grad.numpy(), b.grad.numpy(), rtol=1e-6)
    assert layout_preserving_forward(layers.MaxPooling2D(2, padding="same")) is None
    assert layout_preserving_forward(layers.MaxPooling2D(2, data_format="channels_first")) is None


@pytest.mark.parametrize(
    "shape, explicit",
    [
        ((4, 1, 6, 5), False),  # one position: ||a||^2 ||g||^2
        ((4, 2, 40, 40), False),  # T^2 (d_in + d_out) < d_in d_out: ghost
        ((4, 12, 3, 40), True),  # explicit products are cheaper
        ((4, 25, 256, 32), True),  # the tutorial CNN's second convolution
    ],
)
def test_matmul_norms_choose_the_cheaper_route_and_agree(shape, explicit, monkeypatch):
    from torchdp_keras.per_example.rules import dense

    batch, steps, d_in, d_out = shape
    rng = np.random.default_rng(0)
    a = keras.ops.convert_to_tensor(rng.normal(size=(batch, steps, d_in)))
    g = keras.ops.convert_to_tensor(rng.normal(size=(batch, steps, d_out)))
    brute = [float(np.sum((a[i].numpy().T @ g[i].numpy()) ** 2)) for i in range(batch)]
    cache = {}
    np.testing.assert_allclose(dense.matmul_squared_norms(a, g, cache).numpy(), brute, rtol=1e-10)
    assert ("per_example" in cache) is explicit
    if explicit:  # over what is left of the step's budget the ghost norm is used instead
        from torchdp_keras.per_example.memory import BUDGET_KEY, StepBudget

        needed = batch * d_in * d_out * 8
        budget = StepBudget(2 * needed - 1)  # room for one layer's products, not two
        first, second = {BUDGET_KEY: budget}, {BUDGET_KEY: budget}
        for cache, kept in ((first, True), (second, False)):
            norms = dense.matmul_squared_norms(a, g, cache).numpy()
            np.testing.assert_allclose(norms, brute, rtol=1e-10)
            assert ("per_example" in cache) is kept
        assert budget.remaining == needed - 1
        tdk.set_explicit_memory_budget(needed - 1)  # the setting, without a step budget
        try:
            cache = {}
            dense.matmul_squared_norms(a, g, cache)
            assert "per_example" not in cache
        finally:
            tdk.set_explicit_memory_budget(tdk.per_example.DEFAULT_EXPLICIT_MEMORY_BUDGET)


@pytest.mark.parametrize(
    "input_shape,kwargs",
    [
        ((8, 8, 3), dict(kernel_size=3, depth_multiplier=2)),
        ((6, 6, 2), dict(kernel_size=5, strides=3, depth_multiplier=3)),
        ((9, 7, 4), dict(kernel_size=(3, 2), padding="same", dilation_rate=2)),
        ((10, 3), dict(kernel_size=4, strides=2, padding="same")),
    ],
)
def test_windowed_depthwise_kernels_equal_each_examples_autograd(input_shape, kwargs, float64):
    from torchdp_keras.per_example.rules.conv import DepthwiseConvRule

    rule = DepthwiseConvRule()
    conv = layers.DepthwiseConv1D if len(input_shape) == 2 else layers.DepthwiseConv2D
    layer = conv(**kwargs)
    rng = np.random.default_rng(0)
    x = keras.ops.convert_to_tensor(rng.normal(size=(3, *input_shape)))
    layer(x)  # builds the kernel
    z = rule.forward(layer, (x,), {}).z
    g = torch.as_tensor(rng.normal(size=tuple(z.shape)))
    factors = torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64)
    norms = rule.squared_norms(layer, (x,), {}, g, {})
    sums = rule.clipped_sums(layer, (x,), {}, g, factors, {})
    expected = []
    for i in range(3):
        kernel = layer.kernel.value.detach().clone().requires_grad_(True)
        with keras.src.backend.StatelessScope(state_mapping=[(layer.kernel, kernel)]):
            out = layer(x[i : i + 1])
        expected.append(torch.autograd.grad((out * g[i : i + 1]).sum(), kernel)[0])
    bias = g.reshape(3, -1, g.shape[-1]).sum(1)
    np.testing.assert_allclose(
        norms.numpy(),
        [float((e**2).sum() + (b**2).sum()) for e, b in zip(expected, bias)],
        rtol=1e-10,
    )
    np.testing.assert_allclose(
        sums[0].numpy(), sum(f * e for f, e in zip(factors, expected)).numpy(), rtol=1e-10
    )


def test_sample_weights_and_classification_loss_match():
    model = tdk.DPSequential(
        [keras.Input((5,)), layers.Dense(8, activation="relu"), layers.Dense(4)],
        l2_norm_clip=1.0,
        noise_multiplier=0.0,
    )
    model.compile(
        optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    rng = np.random.default_rng(2)
    x = rng.normal(size=(BATCH, 5)).astype("float32")
    y = rng.integers(0, 4, size=(BATCH,)).astype("int32")
    w = rng.uniform(0.1, 3.0, size=(BATCH,)).astype("float32")
    _compare(model, x, y, w)


def _conv_graph():
    inputs = keras.Input((8, 8, 1))
    h = layers.Conv2D(4, 3, activation="relu")(inputs)
    h = layers.LayerNormalization()(h)
    h = layers.Flatten()(h)
    h = layers.Dense(16, activation="relu")(h)
    h = layers.Dropout(0.0)(h)
    return inputs, layers.Dense(3)(h)


def _depthwise_graph():
    inputs = keras.Input((8, 8, 1))
    h = layers.Conv2D(4, 3, padding="same")(inputs)
    h = layers.MaxPooling2D(2)(h)
    h = layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", activation="relu")(h)
    h = layers.GroupNormalization(4)(h)
    h = layers.AveragePooling2D(2)(h)
    return inputs, layers.Dense(3)(layers.Flatten()(h))


def _attention_graph():
    inputs = keras.Input((8, 8, 1))
    h = layers.Reshape((8, 8))(inputs)
    h = layers.EinsumDense("abc,cd->abd", (8, 6), bias_axes="d")(h)
    attended = layers.MultiHeadAttention(2, 3)(h, h)
    h = layers.RMSNormalization()(layers.Add()([h, attended]))
    return inputs, layers.Dense(3)(layers.GlobalAveragePooling1D()(h))


MIXED_GRAPHS = {"conv": _conv_graph, "depthwise": _depthwise_graph, "attention": _attention_graph}


def _mixed_model(mode, seed_weights=None, graph="conv"):
    inputs, outputs = MIXED_GRAPHS[graph]()
    model = tdk.DPModel(
        inputs=inputs, outputs=outputs, l2_norm_clip=0.1, noise_multiplier=0.0, clipping_mode=mode
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    if seed_weights is not None:
        model.set_weights(seed_weights)
    return model


@pytest.mark.parametrize("graph", sorted(MIXED_GRAPHS))
def test_updates_are_identical_across_modes(graph):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(16, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 3, size=(16,)).astype("int32")
    init = _mixed_model("vmap", graph=graph).get_weights()
    results = {}
    for mode in ("fast", "auto", "vmap"):
        model = _mixed_model(mode, init, graph)
        for _ in range(2):
            model.train_on_batch(x, y)
        results[mode] = model.get_weights()
        if mode != "vmap":
            assert isinstance(model._get_dp_engine(), FastEngine)
            assert not model._get_dp_engine().slow_layers
    for mode in ("fast", "auto"):
        for a, b in zip(results[mode], results["vmap"]):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert not all(np.allclose(a, b) for a, b in zip(init, results["fast"]))


def _shared_model(mode):
    inputs = keras.Input((4,))
    shared = layers.LayerNormalization(name="shared")  # a rule without shared uses
    outputs = layers.Dense(1)(shared(shared(inputs)))
    model = tdk.DPModel(
        inputs=inputs,
        outputs=outputs,
        l2_norm_clip=0.1,
        noise_multiplier=0.0,
        clipping_mode=mode,
        name="twice",
    )
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    return model


def test_shared_layers_are_refused_by_fast_and_routed_to_vmap_by_auto(caplog):
    with pytest.raises(
        UnsupportedLayerError, match=r"twice/shared \(LayerNormalization\): called 2 times"
    ):
        _shared_model("fast").train_on_batch(np.ones((4, 4), "float32"), np.ones((4, 1)))
    auto, vmap = _shared_model("auto"), _shared_model("vmap")
    vmap.set_weights(auto.get_weights())
    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    y = np.ones((8, 1), "float32")
    with caplog.at_level(logging.WARNING):
        auto.train_on_batch(x, y)
    assert "uses per-example gradients" in caplog.text
    assert isinstance(auto._get_dp_engine(), VmapEngine)
    vmap.train_on_batch(x, y)
    for a, b in zip(auto.get_weights(), vmap.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5)


def test_padding_and_sample_weights_on_the_fast_path():
    from torchdp_keras.data import POISSON_BATCH_KEY

    rng = np.random.default_rng(4)
    x = rng.normal(size=(8, 4)).astype("float32")
    y = rng.normal(size=(8, 1)).astype("float32")
    w = rng.uniform(0.5, 2.0, size=(8,)).astype("float32")
    mask = np.r_[np.ones(5), np.zeros(3)].astype("float32")
    loader = tdk.PrivateDataLoader(x, y, batch_size=5)
    results = {}
    init = None
    for mode in ("fast", "vmap"):
        model = tdk.DPSequential(
            [keras.Input((4,)), layers.Dense(3, activation="tanh"), layers.Dense(1)],
            l2_norm_clip=0.2,
            noise_multiplier=0.0,
            clipping_mode=mode,
        )
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
        init = init or model.get_weights()
        model.set_weights(init)
        model._use_sampling_plan(SamplingPlan.from_loader(loader))
        batch = {"x": x, "y": y, "sample_weight": w, "mask": mask}
        logs = model.train_on_batch({POISSON_BATCH_KEY: batch}, return_dict=True)
        results[mode] = (model.get_weights(), logs["loss"])
    for a, b in zip(results["fast"][0], results["vmap"][0]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert results["fast"][1] == pytest.approx(results["vmap"][1], rel=1e-5)


class ScaleRule(LayerRule):
    def forward(self, layer, args, kwargs):
        return args[0] * layer.w, identity

    def squared_norms(self, layer, args, kwargs, grad, cache):
        return sq_norm_rows(args[0] * grad)

    def clipped_sums(self, layer, args, kwargs, grad, factors, cache):
        return [weighted(args[0] * grad, factors).sum(0)]


def _scale_model(mode, registry=None):
    model = tdk.DPSequential(
        [keras.Input((4,)), Scale(name="scale"), layers.Dense(1)],
        l2_norm_clip=0.3,
        noise_multiplier=0.0,
        clipping_mode=mode,
        layer_registry=registry,
        name="custom",
    )
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    return model


def test_user_registered_custom_layer(caplog):
    with pytest.raises(UnsupportedLayerError, match=r"custom/scale \(Scale\): no rule"):
        _scale_model("fast").train_on_batch(np.ones((2, 4), "float32"), np.ones((2, 1)))
    registry = make_default_layer_registry()
    registry.insert(Scale, ScaleRule())
    assert registry.is_elem(Scale()) and not registry.is_elem(layers.Dropout(0.1))
    fast, vmap = _scale_model("fast", registry), _scale_model("vmap")
    vmap.set_weights(fast.get_weights())
    rng = np.random.default_rng(5)
    x = rng.normal(size=(8, 4)).astype("float32")
    y = rng.normal(size=(8, 1)).astype("float32")
    fast.train_on_batch(x, y)
    vmap.train_on_batch(x, y)
    for a, b in zip(fast.get_weights(), vmap.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5)
    auto = _scale_model("auto")
    with caplog.at_level(logging.WARNING):
        auto.train_on_batch(x, y)
    assert "custom/scale (Scale: no rule in the registry)" in caplog.text  # named, once


class _Block(layers.Layer):
    """A block of layers with no rule of its own: walked, its layers tapped."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = layers.Conv2D(3, 3, activation="relu", name="conv")
        self.norm = layers.LayerNormalization(name="norm")
        self.dropout = layers.Dropout(0.3, seed=1)

    def call(self, x, training=None):
        return self.dropout(self.norm(self.conv(x)), training=training)


class _Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.block = _Block(name="block")
        self.pool = layers.MaxPooling2D()
        self.flatten = layers.Flatten()
        self.hidden = layers.Dense(8, activation="tanh", name="hidden")
        self.out = layers.Dense(3, name="out")

    def call(self, x, training=None):
        h = self.flatten(self.pool(self.block(x, training=training)))
        return self.out(self.hidden(h))


class _DPSubclassed(tdk.DPModel):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.embed = layers.Embedding(12, 4, name="embed")
        self.attention = layers.MultiHeadAttention(2, 3, name="attention")
        self.flatten = layers.Flatten()
        self.out = layers.Dense(3, name="out")

    def call(self, x):
        h = self.embed(x)
        return self.out(self.flatten(self.attention(h, h)))


@pytest.mark.parametrize("kind", ["make_private", "dp_model_subclass"])
def test_subclassed_models_take_the_fast_path_and_match_the_per_example_engine(kind, float64):
    rng = np.random.default_rng(5)
    if kind == "make_private":
        base = _Subclassed(name="sub")
        x = rng.normal(size=(BATCH, 8, 8, 2))
        base(x[:1])
        model = tdk.make_private(base, l2_norm_clip=1.0, noise_multiplier=0.0)
        expected = {"block/conv", "block/norm", "hidden", "out"}
    else:
        model = _DPSubclassed(l2_norm_clip=1.0, noise_multiplier=0.0, name="sub")
        x = rng.integers(0, 12, size=(BATCH, 5)).astype("int32")
        model(x[:1])
        expected = {
            "embed",
            "attention/query",
            "attention/key",
            "attention/value",
            "attention/attention_output",
            "out",
        }
    model.compile(optimizer="sgd", loss="mse")
    y = rng.normal(size=(BATCH, 3))
    fast, _ = _engines(model)
    tapped = {path.split("/", 1)[1] if "/" in path else path for path, _, _ in fast.plan}
    assert {p.split("sub/")[-1] for p in tapped} == expected
    assert not fast.slow_layers
    _compare(model, x, y, tol=1e-6)
    if kind == "make_private":
        # Dropout inside the walked block: a step through the DP model runs.
        model.train_on_batch(x, y)
        assert isinstance(model._get_dp_engine(), FastEngine)
    hooks = [len(layer._forward_hooks) for layer in model._flatten_layers()]
    assert hooks == [0] * len(hooks)  # the taps are gone after the step


class _ReadsAWeightDirectly(keras.Model):
    """Uses its embedding matrix again as the output projection (tied weights)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.embed = layers.Embedding(10, 4, name="embed")
        self.hidden = layers.Dense(4, name="hidden")

    def call(self, x):
        h = keras.ops.mean(self.hidden(self.embed(x)), axis=1)
        return keras.ops.matmul(h, keras.ops.transpose(self.embed.embeddings))


class _CallsALayerTwice(keras.Model):
    """A layer whose rule cannot merge uses (Dense can: see the shared-weights tests)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = layers.LayerNormalization(name="dense")

    def call(self, x):
        return self.dense(self.dense(x))


@pytest.mark.parametrize(
    "make, x, message",
    [
        (_ReadsAWeightDirectly, np.arange(12).reshape(4, 3) % 10, r"embed/embeddings"),
        (_CallsALayerTwice, np.ones((4, 4)), r"dense ran 2 times"),
    ],
)
def test_subclassed_models_that_share_weights_are_refused_by_fast_and_use_vmap_in_auto(
    make, x, message, caplog
):
    y = np.ones((4, 10 if make is _ReadsAWeightDirectly else 4), "float32")
    fast = tdk.make_private(
        make(name="m"), l2_norm_clip=1.0, noise_multiplier=0.0, clipping_mode="fast"
    )
    fast.compile(optimizer="sgd", loss="mse")
    with pytest.raises(UnsupportedLayerError, match=message):
        fast.train_on_batch(x, y)
    auto = tdk.make_private(make(name="m"), l2_norm_clip=1.0, noise_multiplier=0.0)
    auto.compile(optimizer="sgd", loss="mse")
    with caplog.at_level(logging.WARNING):
        auto.train_on_batch(x, y)
    assert isinstance(auto._get_dp_engine(), VmapEngine)
    assert "uses per-example gradients" in caplog.text


def test_masked_sequences_through_embedding_and_lstm():
    tokens = keras.Input((6,), dtype="int32")
    h = layers.Embedding(10, 4, mask_zero=True)(tokens)
    h = layers.LSTM(3)(h)
    outputs = layers.Dense(1)(h)
    results = {}
    init = None
    x = np.array([[1, 2, 3, 0, 0, 0], [4, 5, 0, 0, 0, 0], [7, 8, 9, 1, 2, 0]] * 2, "int32")
    y = np.ones((6, 1), "float32")
    for mode in ("auto", "vmap"):
        model = tdk.DPModel(
            inputs=tokens,
            outputs=outputs,
            l2_norm_clip=0.1,
            noise_multiplier=0.0,
            clipping_mode=mode,
        )
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
        init = init or model.get_weights()
        model.set_weights(init)
        model.train_on_batch(x, y)
        results[mode] = model.get_weights()
    for a, b in zip(results["auto"], results["vmap"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_bad_registry_arguments():
    registry = make_default_layer_registry()
    with pytest.raises(ValueError, match="layer_class"):
        registry.insert(int, ScaleRule())
    with pytest.raises(ValueError, match="rule"):
        registry.insert(Scale, object())
    with pytest.raises(ValueError, match="clipping_mode='ghost'"):
        tdk.DPSequential(
            [keras.Input((2,)), layers.Dense(1)],
            l2_norm_clip=1.0,
            noise_multiplier=1.0,
            clipping_mode="ghost",
        )


def test_results_of_a_step_survive_the_next_step():
    """Rules reuse scratch memory across steps: no returned tensor may alias it."""
    tokens = keras.Input((6,), dtype="int32")
    h = layers.Embedding(12, 8)(tokens)
    h = layers.Dense(16)(h)  # T=6 < d_in*d_out/(d_in+d_out): explicit products
    h = layers.Reshape((6, 4, 4))(h)
    h = layers.Conv2D(5, 2)(h)
    h = layers.DepthwiseConv2D(2, depth_multiplier=2)(h)
    outputs = layers.Dense(3)(layers.Flatten()(h))
    model = tdk.DPModel(inputs=tokens, outputs=outputs, l2_norm_clip=1.0, noise_multiplier=0.0)
    model.compile(optimizer="sgd", loss="mse")
    fast = FastEngine(model, make_default_layer_registry())
    rng = np.random.default_rng(4)
    kwargs = dict(num_units=BATCH, l2_norm_clip=0.5, rng_seed=0)
    first = fast.clipped_batch(
        rng.integers(0, 12, (BATCH, 6)).astype("int32"), rng.normal(size=(BATCH, 3)), None, **kwargs
    )
    kept = [t.clone() for t in first.summed] + [first.unit_norms.clone()]
    fast.clipped_batch(
        rng.integers(0, 12, (BATCH, 6)).astype("int32"), rng.normal(size=(BATCH, 3)), None, **kwargs
    )
    for before, after in zip(kept, list(first.summed) + [first.unit_norms]):
        assert torch.equal(before, after)


class _DenseThenDropout(layers.Layer):
    """A layer with no rule (so "auto" gives it per-layer per-example gradients) and dropout."""

    def __init__(self, units, rate, **kwargs):
        super().__init__(**kwargs)
        self.units, self.rate = units, rate
        self.dropout = layers.Dropout(rate)

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units), name="kernel")
        self.bias = self.add_weight(shape=(self.units,), initializer="ones", name="bias")

    def call(self, x, training=None):
        return self.dropout(keras.ops.matmul(x, self.kernel) + self.bias, training=training)


@pytest.mark.parametrize("clip", [0.05, 100.0])
def test_a_fallback_layer_with_dropout_clips_the_gradient_of_the_evaluated_masks(clip, float64):
    """One mask per example, drawn once: the loss and the clipped gradients both use it."""
    inputs = keras.Input((5,))
    layer = _DenseThenDropout(4, 0.5, name="noisy")
    model = tdk.DPModel(
        inputs=inputs, outputs=layer(inputs), l2_norm_clip=1.0, noise_multiplier=0.0
    )
    model.compile(optimizer="sgd", loss="mse")
    engine = FastEngine(
        model, make_default_layer_registry(), fallback=tdk.per_example.PerExampleGradientRule()
    )
    assert [s.split("/")[-1] for s in engine.slow_layers] == [
        "noisy (_DenseThenDropout: no rule in the registry)"
    ]
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(BATCH, 5)), rng.normal(size=(BATCH, 4))
    result = engine.clipped_batch(x, y, None, num_units=BATCH, l2_norm_clip=clip, rng_seed=3)
    y_pred = result.y_pred.numpy()
    keep = y_pred != 0  # the masks of the forward pass whose loss was reported
    assert 0 < keep.sum() < keep.size  # some dropped, some kept: masks differ across examples
    assert float(result.loss_sum) == pytest.approx(((y_pred - y) ** 2).mean(1).sum())
    # Reference: one example at a time, its own mask fixed.
    kernel = torch.tensor(layer.kernel.numpy(), requires_grad=True)
    bias = torch.tensor(layer.bias.numpy(), requires_grad=True)
    per_example = [[], []]
    for i in range(BATCH):
        mask = torch.tensor(keep[i] / 0.5)
        # keras.ops.matmul as the layer computes it (Keras's torch matmul rounds
        # float64 through float32).
        out = (keras.ops.matmul(torch.tensor(x[i : i + 1]), kernel)[0] + bias) * mask
        loss = ((out - torch.tensor(y[i])) ** 2).mean()
        for rows, g in zip(per_example, torch.autograd.grad(loss, [kernel, bias])):
            rows.append(g.numpy())
    per_example = [np.stack(rows) for rows in per_example]
    norms = np.sqrt(sum((g.reshape(BATCH, -1) ** 2).sum(1) for g in per_example))
    np.testing.assert_allclose(result.unit_norms.numpy(), norms, rtol=1e-10)
    # rtol 1e-5: the clip factors carry a 1e-6 safety margin; another mask is off by O(1).
    for got, want in zip(result.summed, reference_clipped_sum(per_example, clip)):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-12)


def test_a_dp_step_through_a_fallback_layer_with_dropout_runs():
    """Was: "vmap: called random operation while in randomness error mode"."""
    inputs = keras.Input((5,))
    h = _DenseThenDropout(4, 0.1, name="noisy")(inputs)
    model = tdk.DPModel(
        inputs=inputs, outputs=layers.Dense(2)(h), l2_norm_clip=1.0, noise_multiplier=1.0, seed=0
    )
    model.compile(optimizer="sgd", loss="mse")
    model.train_on_batch(np.ones((4, 5), "float32"), np.zeros((4, 2), "float32"))
    assert model.dp_steps == 1


def test_clipping_plan_says_which_engine_clips_each_layer_and_why():
    base = _Subclassed(name="sub")
    base(np.ones((1, 8, 8, 2), "float32"))
    model = tdk.make_private(base, l2_norm_clip=1.0, noise_multiplier=0.0)
    model.compile(optimizer="sgd", loss="mse")
    plan = model.clipping_plan()
    assert plan.engine == "fast" and not plan.checked and plan.reason is None
    assert [(p.split("/")[-1], cls, how) for p, cls, how in plan.layers] == [
        ("conv", "Conv2D", "ConvRule"),
        ("norm", "LayerNormalization", "NormalizationRule"),
        ("hidden", "Dense", "DenseRule"),
        ("out", "Dense", "DenseRule"),
    ]
    model.train_on_batch(np.ones((4, 8, 8, 2), "float32"), np.ones((4, 3), "float32"))
    assert model.clipping_plan().checked
    assert "engine: fast (checked on a training step)" in str(model.clipping_plan())

    twice = tdk.make_private(_CallsALayerTwice(name="t"), l2_norm_clip=1.0, noise_multiplier=0.0)
    twice.compile(optimizer="sgd", loss="mse")
    twice.train_on_batch(np.ones((4, 4), "float32"), np.ones((4, 4), "float32"))
    plan = twice.clipping_plan()
    assert plan.engine == "vmap" and "t/dense ran 2 times" in plan.reason
    assert plan.slow_layers == ("private_t/t/dense",)  # a LayerNormalization called twice

    inputs = keras.Input((3,))
    scaled = Scale(name="scale")(layers.Dense(2, name="dense")(inputs))
    mixed = tdk.DPModel(inputs=inputs, outputs=scaled, l2_norm_clip=1.0, noise_multiplier=0.0)
    mixed.compile(optimizer="sgd", loss="mse")
    plan = mixed.clipping_plan()
    assert plan.slow_layers == (f"{mixed.name}/scale",)
    assert "per-layer per-example gradients" in str(plan)
    vmap = tdk.DPModel(
        inputs=inputs, outputs=scaled, l2_norm_clip=1.0, noise_multiplier=0.0, clipping_mode="vmap"
    )
    vmap.compile(optimizer="sgd", loss="mse")
    assert vmap.clipping_plan().engine == "vmap" and vmap.clipping_plan().reason is None


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid", "elu", "softplus", "gelu"])
@pytest.mark.parametrize("padding", ["valid", "same"])
def test_layers_tapped_from_their_output_match_the_per_example_engine(activation, padding, float64):
    """Inside a subclassed model a layer is tapped from its finished output: the
    pre-activation gradient is read off the output (or, for gelu, recomputed)."""

    class Net(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.conv = layers.Conv2D(3, 3, padding=padding, activation=activation)
            self.pool = layers.AveragePooling2D(2)
            self.dense = layers.Dense(4, activation=activation)
            self.out = layers.Dense(2)

        def call(self, x):
            h = self.pool(self.conv(x))
            return self.out(self.dense(keras.ops.reshape(h, (keras.ops.shape(h)[0], -1))))

    rng = np.random.default_rng(8)
    x = rng.normal(size=(BATCH, 6, 6, 2))
    base = Net()
    base(x[:1])
    model = tdk.make_private(base, l2_norm_clip=1.0, noise_multiplier=0.0)
    model.compile(optimizer="sgd", loss="mse")
    _compare(model, x, rng.normal(size=(BATCH, 2)), tol=1e-6)


@pytest.mark.parametrize("activation", ["relu", "gelu", None])
@pytest.mark.parametrize(
    "make",
    [
        lambda a: layers.SeparableConv2D(3, 3, padding="same", activation=a),
        lambda a: layers.DepthwiseConv2D(3, depth_multiplier=2, activation=a),
        lambda a: layers.Conv2DTranspose(3, 3, strides=2, activation=a),
        lambda a: layers.SeparableConv1D(3, 2, activation=a),
    ],
    ids=["separable2d", "depthwise", "transpose", "separable1d"],
)
def test_conv_family_inside_a_subclassed_model_matches_the_per_example_engine(
    make, activation, float64
):
    """Tapped through hooks, with or without an activation after the tap."""

    class Net(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.conv = make(activation)
            self.out = layers.Dense(2)

        def call(self, x):
            h = self.conv(x)
            return self.out(keras.ops.reshape(h, (keras.ops.shape(h)[0], -1)))

    rng = np.random.default_rng(9)
    shape = (6, 2) if "1D" in type(make(None)).__name__ else (6, 6, 2)
    x = rng.normal(size=(BATCH, *shape))
    base = Net()
    base(x[:1])
    model = tdk.make_private(base, l2_norm_clip=1.0, noise_multiplier=0.0, clipping_mode="fast")
    model.compile(optimizer="sgd", loss="mse")
    _compare(model, x, rng.normal(size=(BATCH, 2)), tol=1e-6)


def test_num_microbatches_equal_to_the_batch_takes_the_fast_path():
    """TF Privacy's tutorial clips microbatches of one example (num_microbatches=250)."""
    model = tdk.DPSequential(
        [keras.Input((4,)), layers.Dense(3)],
        l2_norm_clip=1.0,
        noise_multiplier=0.0,
        num_microbatches=4,
    )
    model.compile(optimizer="sgd", loss="mse")
    model.train_on_batch(np.ones((4, 4), "float32"), np.ones((4, 3), "float32"))
    assert model.clipping_plan().engine == "fast"


def _randomise_lora(model, rng):
    for layer in model._flatten_layers():
        if getattr(layer, "lora_enabled", False):
            names = ("lora_kernel_a", "lora_kernel_b", "lora_embeddings_a", "lora_embeddings_b")
            for name in names:
                weight = getattr(layer, name, None)
                if weight is not None:
                    weight.assign(rng.normal(size=weight.shape) * 0.3)


@pytest.mark.parametrize("case", ["dense", "dense_sequence", "einsum_attention", "embedding"])
def test_lora_factors_take_the_fast_path_and_match_the_per_example_engine(case, float64):
    """Keras's enable_lora: W frozen, the factors A and B (and the bias) trained."""
    rng = np.random.default_rng(11)
    if case == "embedding":
        inputs = keras.Input((7,), dtype="int32")
        lora = layers.Embedding(9, 6, name="lora")
        h = layers.Flatten()(lora(inputs))
        x = rng.integers(0, 9, size=(BATCH, 7)).astype("int32")  # repeated ids
    elif case == "einsum_attention":
        inputs = keras.Input((5, 6))
        attention = layers.MultiHeadAttention(2, 3, name="mha")
        h = layers.Flatten()(attention(inputs, inputs))
        lora = None
        x = rng.normal(size=(BATCH, 5, 6))
    else:
        shape = (6,) if case == "dense" else (4, 6)
        inputs = keras.Input(shape)
        lora = layers.Dense(5, activation="tanh", name="lora")
        h = layers.Flatten()(lora(inputs))
        x = rng.normal(size=(BATCH, *shape))
    model = tdk.DPModel(
        inputs=inputs, outputs=layers.Dense(3)(h), l2_norm_clip=1.0, noise_multiplier=0.0
    )
    if case == "einsum_attention":
        attention.query_dense.enable_lora(2)
        attention.value_dense.enable_lora(2, lora_alpha=4)
        lora_layers = [attention.query_dense, attention.value_dense]
    else:
        lora.enable_lora(2, lora_alpha=3)
        lora_layers = [lora]
    _randomise_lora(model, rng)
    model.compile(optimizer="sgd", loss="mse")
    fast, _ = _engines(model)
    assert not fast.slow_layers
    frozen = {
        id(layer._kernel if hasattr(layer, "_kernel") else layer._embeddings)
        for layer in lora_layers
    }
    assert not frozen & {id(w) for w in model.trainable_weights}
    _compare(model, x, rng.normal(size=(BATCH, 3)), tol=1e-6)


@pytest.mark.parametrize("units", [1, 2, 3])
@pytest.mark.parametrize("case", ["dense", "embedding_einsum", "fallback_lora", "conv"])
def test_num_microbatches_on_the_fast_path_match_the_per_example_engine(case, units, float64):
    """A unit is a group of consecutive examples: its loss the group's mean, its
    gradient the sum of the group's, clipped as one."""
    rng = np.random.default_rng(21)
    if case == "dense":
        inputs = keras.Input((4, 5))
        h = layers.Dense(6, activation="relu")(inputs)
        outputs = layers.Dense(3)(layers.Flatten()(h))
        x = rng.normal(size=(BATCH, 4, 5))
    elif case == "conv":
        inputs = keras.Input((7, 7, 2))
        h = layers.Conv2D(3, 3, strides=2, padding="same", activation="relu")(inputs)
        outputs = layers.Dense(3)(layers.Flatten()(layers.Conv1D(2, 2)(layers.Reshape((16, 3))(h))))
        x = rng.normal(size=(BATCH, 7, 7, 2))
    elif case == "embedding_einsum":
        inputs = keras.Input((5,), dtype="int32")
        h = layers.Embedding(7, 4)(inputs)
        h = layers.EinsumDense("btc,cde->btde", output_shape=(5, 2, 3), bias_axes="de")(h)
        outputs = layers.Dense(3)(layers.Flatten()(h))
        x = rng.integers(0, 7, size=(BATCH, 5)).astype("int32")
    else:
        inputs = keras.Input((5,))
        lora = layers.Dense(4, name="lora")
        h = Scale(name="scale")(lora(inputs))
        outputs = layers.Dense(3)(h)
        x = rng.normal(size=(BATCH, 5))
    model = tdk.DPModel(inputs=inputs, outputs=outputs, l2_norm_clip=1.0, noise_multiplier=0.0)
    if case == "fallback_lora":
        lora.enable_lora(2)
        _randomise_lora(model, rng)
    model.compile(optimizer="sgd", loss="mse")
    y = rng.normal(size=(BATCH, 3))
    fast = FastEngine(
        model, make_default_layer_registry(), fallback=tdk.per_example.PerExampleGradientRule()
    )
    vmap = VmapEngine(model)
    kwargs = dict(num_units=units, l2_norm_clip=0.05, rng_seed=0)
    a = fast.clipped_batch(x, y, None, **kwargs)
    b = vmap.clipped_batch(x, y, None, **kwargs)
    assert a.unit_norms.shape == (units,)
    np.testing.assert_allclose(a.unit_norms.numpy(), b.unit_norms.numpy(), rtol=1e-6)
    for s, t in zip(a.summed, b.summed):
        np.testing.assert_allclose(s.numpy(), t.numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(float(a.loss_sum), float(b.loss_sum), rtol=1e-6)


def test_num_microbatches_with_a_rule_that_cannot_group_uses_the_per_example_engine(caplog):
    model = tdk.DPSequential(
        [keras.Input((6, 6, 1)), layers.LayerNormalization(), layers.Flatten(), layers.Dense(2)],
        l2_norm_clip=1.0,
        noise_multiplier=0.0,
        num_microbatches=2,
    )
    model.compile(optimizer="sgd", loss="mse")
    with caplog.at_level(logging.WARNING):
        model.train_on_batch(np.ones((4, 6, 6, 1), "float32"), np.zeros((4, 2), "float32"))
    plan = model.clipping_plan()
    assert plan.engine == "vmap" and "cannot clip groups of examples" in plan.reason


def test_a_frozen_block_whose_lora_projections_train_is_walked(float64):
    """keras_hub's enable_lora sets trainable=False on the attention layer while its
    LoRA-enabled projections train: the engine follows the weights the optimizer trains."""
    rng = np.random.default_rng(3)
    inputs = keras.Input((5, 6))
    attention = layers.MultiHeadAttention(2, 3, name="mha")
    h = layers.LayerNormalization(name="norm")(attention(inputs, inputs))
    model = tdk.DPModel(
        inputs=inputs,
        outputs=layers.Dense(3)(layers.Flatten()(h)),
        l2_norm_clip=1.0,
        noise_multiplier=0.0,
    )
    attention.trainable = False  # keras_hub's Backbone.enable_lora: freeze, then
    attention.query_dense.trainable = True  # unfreeze the targets and enable LoRA
    attention.query_dense.enable_lora(2)
    _randomise_lora(model, rng)
    assert attention.trainable_weights == []
    lora = {id(attention.query_dense.lora_kernel_a), id(attention.query_dense.lora_kernel_b)}
    assert lora <= {id(w) for w in model.trainable_variables}
    model.compile(optimizer="sgd", loss="mse")
    fast, _ = _engines(model)
    assert any(path.endswith("mha/query") for path, _, _ in fast.plan)
    _compare(model, rng.normal(size=(BATCH, 5, 6)), rng.normal(size=(BATCH, 3)), tol=1e-6)


class _TiedLanguageModel(keras.Model):
    """Tokens -> tied embedding -> Dense used twice -> the same embedding, reversed."""

    def __init__(self, tie_weights=True, **kwargs):
        super().__init__(**kwargs)
        self.embed = layers.ReversibleEmbedding(11, 4, tie_weights=tie_weights, name="embed")
        self.mix = layers.Dense(4, activation="tanh", name="mix")

    def call(self, ids):
        h = self.embed(ids)
        h = self.mix(self.mix(h) + h)  # one Dense, two uses
        return self.embed(h, reverse=True)


@pytest.mark.parametrize("units", [None, 2])
@pytest.mark.parametrize("tie_weights", [True, False])
def test_shared_weights_tied_embeddings_and_a_dense_used_twice_match_the_per_example_engine(
    tie_weights, units, float64
):
    """The per-example gradient of a shared weight is the sum over its uses: the
    cross terms between uses are in the norm (never undercounted)."""
    rng = np.random.default_rng(17)
    x = rng.integers(0, 11, size=(BATCH, 5)).astype("int32")
    x[:, 3] = x[:, 1]  # repeated ids within examples
    base = _TiedLanguageModel(tie_weights=tie_weights, name="lm")
    base(x[:1])
    model = tdk.make_private(base, l2_norm_clip=1.0, noise_multiplier=0.0)
    model.compile(
        optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    y = rng.integers(0, 11, size=(BATCH, 5))
    fast, vmap = _engines(model)
    assert not fast.slow_layers
    kwargs = dict(num_units=units or BATCH, l2_norm_clip=0.05, rng_seed=0)
    a = fast.clipped_batch(x, y, None, **kwargs)
    b = vmap.clipped_batch(x, y, None, **kwargs)
    # rtol 1e-4: Keras's torch matmul rounds the float64 logits through float32.
    np.testing.assert_allclose(a.unit_norms.numpy(), b.unit_norms.numpy(), rtol=1e-4)
    for s_, t in zip(a.summed, b.summed):
        np.testing.assert_allclose(s_.numpy(), t.numpy(), rtol=1e-4, atol=1e-8)


def test_a_dense_shared_in_a_functional_graph_takes_the_fast_path(float64):
    rng = np.random.default_rng(2)
    inputs = keras.Input((4,))
    shared = layers.Dense(4, activation="relu", name="shared")
    outputs = layers.Dense(2)(shared(shared(inputs)))
    model = tdk.DPModel(inputs=inputs, outputs=outputs, l2_norm_clip=1.0, noise_multiplier=0.0)
    model.compile(optimizer="sgd", loss="mse")
    fast, _ = _engines(model)
    assert not fast.slow_layers
    _compare(model, rng.normal(size=(BATCH, 4)), rng.normal(size=(BATCH, 2)), tol=1e-6)


def test_wide_convolutions_take_the_conv_rule(float64):
    """3x3 over 512 channels (ResNet's last stage, VGG): no fan-in limit sends it elsewhere."""
    rng = np.random.default_rng(9)
    inputs = keras.Input((4, 4, 512))
    h = layers.Conv2D(4, 3, padding="same", activation="relu", name="wide")(inputs)
    outputs = layers.Dense(2)(layers.Flatten()(h))
    model = tdk.DPModel(inputs=inputs, outputs=outputs, l2_norm_clip=1.0, noise_multiplier=0.0)
    model.compile(optimizer="sgd", loss="mse")
    fast, _ = _engines(model)
    assert "ConvRule" in [how for path, _, how in fast.plan if path.endswith("wide")]
    _compare(model, rng.normal(size=(BATCH, 4, 4, 512)), rng.normal(size=(BATCH, 2)), tol=1e-6)
