"""Per-example gradients of the vmap engine against a one-example-at-a-time loop."""

import keras
import numpy as np
import pytest
import torch
from helpers import reference_per_example_gradients
from keras import layers

import torchdp_keras as tdk
from torchdp_keras.per_example import VmapEngine
from torchdp_keras.per_example.keras_patches import per_example_call_context

BATCH = 6


def _dp_sequential(stack, input_shape, loss="mse"):
    model = tdk.DPSequential(
        [keras.Input(input_shape), *stack], l2_norm_clip=1.0, noise_multiplier=0.0
    )
    model.compile(optimizer="sgd", loss=loss)
    return model


def _flat(per_var):
    return np.concatenate([np.asarray(g).reshape(BATCH, -1) for g in per_var], axis=1)


def _assert_per_unit_close(actual, expected, tol=1e-5):
    """Relative error of every unit's whole gradient vector is below `tol`."""
    a, e = _flat(actual), _flat(expected)
    err = np.linalg.norm(a - e, axis=1) / np.maximum(np.linalg.norm(e, axis=1), 1e-12)
    assert err.max() <= tol, err


def _engine_grads(model, x, y, sample_weight=None, rng_seed=0):
    grads, _ = VmapEngine(model).per_unit_gradients(
        x, y, sample_weight, num_units=BATCH, rng_seed=rng_seed
    )
    return [g.numpy() for g in grads]


SEQUENTIAL_CASES = {
    "dense": (lambda: [layers.Dense(5, activation="tanh"), layers.Dense(3)], (7,)),
    "conv1d": (
        lambda: [layers.Conv1D(4, 3, activation="relu"), layers.Flatten(), layers.Dense(3)],
        (10, 2),
    ),
    "conv2d": (
        lambda: [
            layers.Conv2D(4, 3, strides=2, padding="same", activation="relu"),
            layers.MaxPool2D(2, 1),
            layers.Flatten(),
            layers.Dense(3),
        ],
        (9, 9, 2),
    ),
    "depthwise_conv2d": (
        lambda: [layers.DepthwiseConv2D(3, depth_multiplier=2), layers.Flatten(), layers.Dense(3)],
        (8, 8, 3),
    ),
    "layer_normalization": (
        lambda: [layers.Dense(6), layers.LayerNormalization(), layers.Dense(3)],
        (5,),
    ),
    "group_normalization": (
        lambda: [
            layers.Conv1D(6, 2),
            layers.GroupNormalization(groups=3),
            layers.Flatten(),
            layers.Dense(3),
        ],
        (5, 2),
    ),
    "lstm": (lambda: [layers.LSTM(4), layers.Dense(3)], (6, 3)),
    "gru": (
        lambda: [layers.GRU(4, return_sequences=True), layers.Flatten(), layers.Dense(3)],
        (6, 3),
    ),
}


@pytest.mark.parametrize("case", sorted(SEQUENTIAL_CASES))
def test_sequential_layers_match_one_example_at_a_time(case):
    stack, input_shape = SEQUENTIAL_CASES[case]
    model = _dp_sequential(stack(), input_shape)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, *input_shape)).astype("float32")
    y = rng.normal(size=(BATCH, 3)).astype("float32")
    _assert_per_unit_close(_engine_grads(model, x, y), reference_per_example_gradients(model, x, y))


def test_embedding_and_multi_head_attention_match_reference():
    tokens = keras.Input((5,), dtype="int32")
    embedded = layers.Embedding(11, 8)(tokens)
    attended = layers.MultiHeadAttention(num_heads=2, key_dim=4)(embedded, embedded)
    outputs = layers.Dense(3)(layers.GlobalAveragePooling1D()(attended))
    model = tdk.DPModel(inputs=tokens, outputs=outputs, l2_norm_clip=1.0, noise_multiplier=0.0)
    model.compile(optimizer="sgd", loss="mse")
    rng = np.random.default_rng(1)
    x = rng.integers(0, 11, size=(BATCH, 5)).astype("int32")
    y = rng.normal(size=(BATCH, 3)).astype("float32")
    _assert_per_unit_close(_engine_grads(model, x, y), reference_per_example_gradients(model, x, y))


def test_sample_weight_and_classification_loss():
    model = _dp_sequential(
        [layers.Dense(8, activation="relu"), layers.Dense(4)],
        (5,),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(2)
    x = rng.normal(size=(BATCH, 5)).astype("float32")
    y = rng.integers(0, 4, size=(BATCH,)).astype("int32")
    w = rng.uniform(0.1, 3.0, size=(BATCH,)).astype("float32")
    actual = _engine_grads(model, x, y, w)
    _assert_per_unit_close(actual, reference_per_example_gradients(model, x, y, w))
    unweighted = reference_per_example_gradients(model, x, y)
    assert not np.allclose(_flat(actual), _flat(unweighted), rtol=1e-3)


def test_activity_regularizer_belongs_to_the_example():
    model = _dp_sequential(
        [layers.Dense(6, activity_regularizer=keras.regularizers.L2(0.3)), layers.Dense(3)], (4,)
    )
    rng = np.random.default_rng(3)
    x = rng.normal(size=(BATCH, 4)).astype("float32")
    y = rng.normal(size=(BATCH, 3)).astype("float32")
    _assert_per_unit_close(_engine_grads(model, x, y), reference_per_example_gradients(model, x, y))


@pytest.mark.parametrize("seeded", [False, True], ids=["unseeded", "seeded"])
def test_dropout_masks_are_per_example_and_match_reference(seeded):
    dense_in, dense_out = layers.Dense(8), layers.Dense(3)
    dropout = layers.Dropout(0.5, seed=7 if seeded else None)
    model = _dp_sequential([dense_in, dropout, dense_out], (5,))
    rng = np.random.default_rng(4)
    x = rng.normal(size=(BATCH, 5)).astype("float32")
    y = rng.normal(size=(BATCH, 3)).astype("float32")
    state_before = dropout.seed_generator.state.numpy().copy()
    actual = _engine_grads(model, x, y, rng_seed=99)

    # Under vmap(randomness="different") each example draws its own slice of
    # one batched draw from the forked default generator: redo that draw.
    with per_example_call_context(torch.device("cpu"), 99):
        if seeded:
            mask = torch.bernoulli(torch.full((BATCH, 1, 8), 0.5)) / 0.5
        else:
            mask = torch.nn.functional.dropout(torch.ones(BATCH, 1, 8), 0.5, training=True)
    assert len({tuple(m.flatten().tolist()) for m in mask}) > 1, "masks must differ"
    expected = []
    for i in range(BATCH):
        with torch.enable_grad():
            out = dense_out(dense_in(torch.as_tensor(x[i : i + 1])) * mask[i])
            loss = torch.mean((out - torch.as_tensor(y[i : i + 1])) ** 2)
            grads = torch.autograd.grad(loss, [v.value for v in model.trainable_variables])
        expected.append([g.numpy() for g in grads])
    expected = [np.stack(parts) for parts in zip(*expected)]
    _assert_per_unit_close(actual, expected)
    state_after = dropout.seed_generator.state.numpy()
    if seeded:
        assert not np.array_equal(state_before, state_after), "seed state must advance"


def test_microbatch_units_are_group_means():
    model = _dp_sequential([layers.Dense(4, activation="tanh"), layers.Dense(2)], (3,))
    rng = np.random.default_rng(5)
    x = rng.normal(size=(BATCH, 3)).astype("float32")
    y = rng.normal(size=(BATCH, 2)).astype("float32")
    grads, _ = VmapEngine(model).per_unit_gradients(x, y, None, num_units=3)
    expected = reference_per_example_gradients(model, x, y, unit_size=2)
    for g, e in zip(grads, expected):
        np.testing.assert_allclose(g.numpy(), e, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("max_chunk_elements", [1, 50, 10**9])
def test_chunking_gives_the_same_clipped_sum(max_chunk_elements):
    model = _dp_sequential([layers.Dense(4, activation="tanh"), layers.Dense(2)], (3,))
    rng = np.random.default_rng(6)
    x = rng.normal(size=(BATCH, 3)).astype("float32")
    y = rng.normal(size=(BATCH, 2)).astype("float32")
    whole = VmapEngine(model).clipped_batch(
        x, y, None, num_units=BATCH, l2_norm_clip=0.1, rng_seed=0
    )
    engine = VmapEngine(model, max_chunk_elements=max_chunk_elements)
    chunked = engine.clipped_batch(x, y, None, num_units=BATCH, l2_norm_clip=0.1, rng_seed=0)
    if max_chunk_elements == 1:
        assert engine.units_per_chunk(BATCH) == 1
    for a, b in zip(whole.summed, chunked.summed):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(whole.unit_losses.numpy(), chunked.unit_losses.numpy(), rtol=1e-6)
