"""SimpleRNN, GRU, LSTM and Bidirectional on the fast clipping path.

Every case is checked against one-example-at-a-time gradients of the plain
Keras model (`helpers.reference_per_example_gradients`): the per-example
norms and the clipped sums the fast engine forms without per-example model
gradients.
"""

import logging

import keras
import numpy as np
import pytest
import torch
from helpers import reference_clipped_sum, reference_per_example_gradients
from keras import layers

import torchdp_keras as tdk
from torchdp_keras.per_example import FastEngine, make_default_layer_registry

BATCH, STEPS, FEATURES, VOCAB = 6, 7, 5, 11


def _recurrent(kind, **kwargs):
    return {
        "simple": layers.SimpleRNN,
        "gru": layers.GRU,
        "lstm": layers.LSTM,
    }[kind](**kwargs)


CASES = {
    "simple_rnn": lambda h: layers.SimpleRNN(4)(h),
    "simple_rnn_relu_no_bias_backwards_sequences": lambda h: layers.SimpleRNN(
        4, activation="relu", use_bias=False, go_backwards=True, return_sequences=True
    )(h),
    "gru_reset_after": lambda h: layers.GRU(4)(h),
    "gru_reset_before_sequences": lambda h: layers.GRU(4, reset_after=False, return_sequences=True)(
        h
    ),
    "gru_reset_before_no_bias_backwards": lambda h: layers.GRU(
        3, reset_after=False, use_bias=False, go_backwards=True
    )(h),
    "lstm": lambda h: layers.LSTM(4)(h),
    "lstm_sequences_backwards": lambda h: layers.LSTM(3, return_sequences=True, go_backwards=True)(
        h
    ),
    "rnn_of_an_lstm_cell": lambda h: layers.RNN(layers.LSTMCell(4))(h),
    "bidirectional_lstm": lambda h: layers.Bidirectional(layers.LSTM(4))(h),
    "bidirectional_gru_sum_sequences": lambda h: layers.Bidirectional(
        layers.GRU(3, return_sequences=True), merge_mode="sum"
    )(h),
    "bidirectional_simple_mul_reset_before": lambda h: layers.Bidirectional(
        layers.SimpleRNN(3), merge_mode="mul"
    )(h),
    "stacked_lstm_gru": lambda h: layers.GRU(3)(layers.LSTM(4, return_sequences=True)(h)),
    "lstm_return_state": lambda h: layers.Concatenate()(list(layers.LSTM(3, return_state=True)(h))),
}


def _model(case, masked, mode="fast"):
    if masked:
        inputs = keras.Input((STEPS,), dtype="int32")
        h = layers.Embedding(VOCAB, FEATURES, mask_zero=True)(inputs)
    else:
        inputs = keras.Input((STEPS, FEATURES))
        h = inputs
    h = CASES[case](h)
    if len(h.shape) == 3:
        h = layers.GlobalAveragePooling1D()(h)  # follows the mask
    outputs = layers.Dense(2)(h)
    model = tdk.DPModel(
        inputs=inputs, outputs=outputs, l2_norm_clip=1.0, noise_multiplier=0.0, clipping_mode=mode
    )
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    return model


def _data(masked, dtype, seed=0):
    rng = np.random.default_rng(seed)
    if masked:  # zero-padded to lengths 7, 6, ..., 2
        x = rng.integers(1, VOCAB, size=(BATCH, STEPS)).astype("int32")
        for row in range(BATCH):
            x[row, STEPS - row :] = 0
    else:
        x = rng.normal(size=(BATCH, STEPS, FEATURES)).astype(dtype)
    return x, rng.normal(size=(BATCH, 2)).astype(dtype)


def _check_against_reference(model, x, y, clip, rtol, unit_size=1):
    engine = FastEngine(model, make_default_layer_registry())
    assert all(how.endswith("Rule") for _, _, how in engine.plan), engine.plan
    units = BATCH // unit_size
    result = engine.clipped_batch(x, y, None, num_units=units, l2_norm_clip=clip, rng_seed=0)
    reference = reference_per_example_gradients(model, x, y, unit_size=unit_size)
    norms = np.sqrt(sum((g.reshape(units, -1) ** 2).sum(1) for g in reference))
    np.testing.assert_allclose(result.unit_norms.numpy(), norms, rtol=rtol)
    for got, want in zip(result.summed, reference_clipped_sum(reference, clip)):
        np.testing.assert_allclose(got.numpy(), want, rtol=rtol, atol=rtol * clip)


@pytest.mark.parametrize("precision", ["float32", "float64"])
@pytest.mark.parametrize("masked", [False, True], ids=["dense_inputs", "masked_tokens"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_recurrent_rules_match_one_example_at_a_time(case, masked, precision, request):
    if precision == "float64":
        request.getfixturevalue("float64")
    model = _model(case, masked)
    x, y = _data(masked, precision)
    # Keras's torch matmul rounds float64 through float32: 1e-5 there.
    _check_against_reference(model, x, y, clip=0.05, rtol=1e-5 if precision == "float64" else 2e-4)


@pytest.mark.parametrize("unit_size", [2, 3])
@pytest.mark.parametrize("case", ["gru_reset_before_sequences", "bidirectional_lstm"])
def test_recurrent_rules_clip_groups_of_examples(case, unit_size, float64):
    model = _model(case, masked=True)
    x, y = _data(True, "float64")
    _check_against_reference(model, x, y, clip=0.05, rtol=1e-5, unit_size=unit_size)


def test_initial_state_and_its_gradient_through_another_layer(float64):
    inputs = keras.Input((STEPS, FEATURES))
    context = keras.Input((3,))
    h0 = layers.Dense(4, name="init_h")(context)
    c0 = layers.Dense(4, name="init_c")(context)
    h = layers.LSTM(4)(inputs, initial_state=[h0, c0])
    model = tdk.DPModel(
        inputs=[inputs, context],
        outputs=layers.Dense(2)(h),
        l2_norm_clip=1.0,
        noise_multiplier=0.0,
    )
    model.compile(optimizer="sgd", loss="mse")
    rng = np.random.default_rng(1)
    x = [rng.normal(size=(BATCH, STEPS, FEATURES)), rng.normal(size=(BATCH, 3))]
    y = rng.normal(size=(BATCH, 2))
    _check_against_reference(model, x, y, clip=0.05, rtol=1e-5)


@pytest.mark.parametrize("case", ["bidirectional_lstm", "gru_reset_after", "simple_rnn"])
def test_updates_are_identical_across_clipping_modes(case, float64):
    x, y = _data(True, "float64", seed=3)
    weights = None
    results = {}
    for mode in ("fast", "auto", "vmap"):
        model = _model(case, masked=True, mode=mode)
        weights = weights or model.get_weights()
        model.set_weights(weights)
        model.train_on_batch(x, y)
        model.train_on_batch(x, y)
        results[mode] = model.get_weights()
        assert model.clipping_plan().engine == ("vmap" if mode == "vmap" else "fast")
    for mode in ("auto", "vmap"):
        for a, b in zip(results["fast"], results[mode]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)


class _Tagger(keras.Model):
    """A subclassed sequence model: its layers are tapped from its own call."""

    def __init__(self):
        super().__init__()
        self.embed = layers.Embedding(VOCAB, FEATURES, mask_zero=True)
        self.encode = layers.Bidirectional(layers.GRU(3, return_sequences=True))
        self.head = layers.Dense(2)

    def call(self, tokens):
        return self.head(layers.GlobalAveragePooling1D()(self.encode(self.embed(tokens))))


def test_subclassed_model_with_a_recurrent_layer(float64):
    model = tdk.make_private(_Tagger(), l2_norm_clip=1.0, noise_multiplier=0.0)
    model.compile(optimizer="sgd", loss="mse")
    x, y = _data(True, "float64")
    model(x[:2])
    _check_against_reference(model, x, y, clip=0.05, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:torchdp_keras. only 6 training example")  # "." matches ":"
@pytest.mark.filterwarnings(r"ignore:torchdp_keras. fit\(\) on arrays trains on shuffled")
@pytest.mark.parametrize("kind", ["simple", "gru", "lstm"])
def test_dropout_runs_on_the_fast_path_and_leaves_no_mask_behind(kind):
    inputs = keras.Input((STEPS, FEATURES))
    recurrent = _recurrent(kind, units=4, dropout=0.3, recurrent_dropout=0.3)
    model = tdk.DPModel(
        inputs=inputs,
        outputs=layers.Dense(2)(recurrent(inputs)),
        l2_norm_clip=1.0,
        noise_multiplier=0.0,
    )
    model.compile(optimizer="sgd", loss="mse")
    x, y = _data(False, "float32")
    engine = FastEngine(model, make_default_layer_registry())
    # The first step checks the clipped sums (factors 1) against autograd's
    # gradient of the same forward pass, dropout masks included.
    first = engine.clipped_batch(x, y, None, num_units=BATCH, l2_norm_clip=1e6, rng_seed=1)
    second = engine.clipped_batch(x, y, None, num_units=BATCH, l2_norm_clip=1e6, rng_seed=2)
    assert not np.allclose(first.unit_norms.numpy(), second.unit_norms.numpy())  # new masks
    assert recurrent.cell._dropout_mask is None and recurrent.cell._recurrent_dropout_mask is None
    model.fit(x, y, batch_size=3, epochs=1, verbose=0)
    assert model.clipping_plan().engine == "fast"


class _CustomCell(layers.Layer):
    state_size = 3

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], 3))

    def call(self, inputs, states):
        out = keras.ops.tanh(keras.ops.matmul(inputs, self.kernel) + states[0])
        return out, [out]


@keras.saving.register_keras_serializable(package="torchdp_keras_tests")
class _CountingLSTM(layers.LSTM):
    def call(self, sequences, initial_state=None, mask=None, training=False):
        return super().call(sequences, initial_state, mask, training) * 2.0


@pytest.mark.parametrize(
    "make_layer,reason",
    [
        (lambda: layers.RNN(_CustomCell()), "cell _CustomCell is not a SimpleRNNCell"),
        (
            lambda: layers.RNN([layers.LSTMCell(3), layers.GRUCell(3)]),
            "cell StackedRNNCells is not",
        ),
        (lambda: _CountingLSTM(3), "_CountingLSTM overrides the call of LSTM"),
        # Declined as a whole, then walked: each direction is named.
        (
            lambda: layers.Bidirectional(_CountingLSTM(3)),
            "/backward___counting_lstm",
        ),
    ],
)
def test_declined_recurrent_layers_are_logged_with_the_reason(make_layer, reason, caplog):
    inputs = keras.Input((STEPS, FEATURES))
    model = tdk.DPModel(
        inputs=inputs,
        outputs=layers.Dense(2)(make_layer()(inputs)),
        l2_norm_clip=1.0,
        noise_multiplier=0.0,
    )
    model.compile(optimizer="sgd", loss="mse")
    x, y = _data(False, "float32")
    with caplog.at_level(logging.WARNING):
        model.train_on_batch(x, y)
    assert reason in caplog.text
    plan = model.clipping_plan()
    assert plan.engine == "fast" and plan.slow_layers


def test_stateful_recurrent_layers_are_declined_with_the_reason():
    rule = make_default_layer_registry()
    layer = layers.LSTM(3, stateful=True)
    layer(np.zeros((2, STEPS, FEATURES), "float32"))
    found, reason = rule.explain(layer)
    assert found is None and "stateful=True" in reason


def test_declined_options_of_other_layers_are_named():
    registry = make_default_layer_registry()
    grouped = layers.Conv2D(4, 3, groups=2)
    grouped.build((None, 8, 8, 4))
    assert registry.explain(grouped) == (
        None,
        "ConvRule declines it: groups=2 (grouped convolution)",
    )
    first = layers.Conv2D(4, 3, data_format="channels_first")
    first.build((None, 4, 8, 8))
    assert "data_format='channels_first'" in registry.explain(first)[1]
    assert registry.explain(layers.Dense(2))[1] is None
    from torchdp_keras.per_example.rules.conv import ConvRule, SeparableConvRule

    narrow = tdk.LayerRegistry()
    narrow.insert(layers.Conv2D, ConvRule(max_patch_size=10))
    narrow.insert(layers.SeparableConv2D, SeparableConvRule(max_patch_size=10))
    conv = layers.Conv2D(4, 3)
    conv.build((None, 8, 8, 2))  # 3 * 3 * 2 = 18 > 10
    assert "patch width 18 over the rule's max_patch_size=10" in narrow.explain(conv)[1]
    separable = layers.SeparableConv2D(4, 3)
    separable.build((None, 8, 8, 2))
    assert "patch width 18" in narrow.explain(separable)[1]


def test_recurrent_rule_forward_equals_keras(float64):
    """The rule's own cell loop computes the layer's output (all options at once)."""
    from torchdp_keras.per_example.rules.recurrent import BidirectionalRule, RecurrentRule

    rng = np.random.default_rng(4)
    x = torch.as_tensor(rng.normal(size=(BATCH, STEPS, FEATURES)))
    mask = torch.as_tensor(np.arange(STEPS)[None, :] < np.arange(2, 2 + BATCH)[:, None])
    for layer, rule in [
        (layers.GRU(3, reset_after=False, return_sequences=True, go_backwards=True), None),
        (layers.LSTM(3, return_state=True, zero_output_for_mask=True), None),
        (layers.Bidirectional(layers.LSTM(2, return_sequences=True), merge_mode=None), "bi"),
        (layers.Bidirectional(layers.GRU(2, return_state=True)), "bi"),
    ]:
        expected = layer(x, mask=mask)
        rule = BidirectionalRule() if rule else RecurrentRule()
        z, finish, _ = rule.forward(layer, (x,), {"mask": mask})
        got = finish(z)
        for a, b in zip(keras.tree.flatten(got), keras.tree.flatten(expected)):
            np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=1e-5, atol=1e-7)
