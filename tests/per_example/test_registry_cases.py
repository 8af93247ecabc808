"""Every layer class of the default registry has a case, checked one example at a time.

`CASES` maps each key of `make_default_layer_registry()` (a layer class, or
the import path of one in an optional package) to a tiny model that contains
the layer. The registry is built from the rules' own `@handles` declarations,
so a new rule, or a new class declared by a rule, fails
`test_every_registered_layer_has_a_case` until a case is added here; each case
then checks, in float64, the fast path's per-example norms and clipped sum
against gradients taken one example at a time with plain torch autograd
(`helpers.reference_per_example_gradients`).
"""

import keras
import numpy as np
import pytest
from helpers import reference_clipped_sum, reference_per_example_gradients
from keras import layers
from test_fast_clipping import _layers_case, _TiedLanguageModel

import torchdp_keras as tdk
from torchdp_keras.per_example import FastEngine, make_default_layer_registry

BATCH, STEPS, FEATURES, VOCAB = 6, 5, 4, 11
POSITION_EMBEDDING = "keras_hub.src.layers.modeling.position_embedding.PositionEmbedding"


def _dp_model(inputs, outputs, loss="mse"):
    model = tdk.DPModel(inputs=inputs, outputs=outputs, l2_norm_clip=1.0, noise_multiplier=0.0)
    model.compile(optimizer="sgd", loss=loss)
    return model


def _stack(name):
    """A case of `test_fast_clipping`'s layer stacks (float inputs, 3 regression targets)."""

    def build(rng):
        input_shape, stack = _layers_case(name)
        model = tdk.DPSequential(
            [keras.Input(input_shape), *stack()], l2_norm_clip=1.0, noise_multiplier=0.0
        )
        model.compile(optimizer="sgd", loss="mse")
        return model, rng.normal(size=(BATCH, *input_shape)), rng.normal(size=(BATCH, 3))

    return build


def _sequence(make_layer):
    """(STEPS, FEATURES) float inputs -> the layer -> Flatten -> Dense(3)."""

    def build(rng):
        inputs = keras.Input((STEPS, FEATURES))
        outputs = layers.Dense(3)(layers.Flatten()(make_layer()(inputs)))
        model = _dp_model(inputs, outputs)
        return model, rng.normal(size=(BATCH, STEPS, FEATURES)), rng.normal(size=(BATCH, 3))

    return build


def _embedding(rng):
    tokens = keras.Input((STEPS,), dtype="int32")
    outputs = layers.Dense(3)(layers.Flatten()(layers.Embedding(VOCAB, FEATURES)(tokens)))
    x = rng.integers(0, VOCAB, size=(BATCH, STEPS)).astype("int32")
    x[:, 3] = x[:, 1]  # repeated ids within examples: rows that collide
    return _dp_model(tokens, outputs), x, rng.normal(size=(BATCH, 3))


def _attention(rng):
    inputs = keras.Input((STEPS, FEATURES))
    h = layers.MultiHeadAttention(num_heads=2, key_dim=3)(inputs, inputs)
    outputs = layers.Dense(3)(layers.Flatten()(h))
    return (
        _dp_model(inputs, outputs),
        rng.normal(size=(BATCH, STEPS, FEATURES)),
        rng.normal(size=(BATCH, 3)),
    )


def _reversible_embedding(rng):
    x = rng.integers(0, VOCAB, size=(BATCH, STEPS)).astype("int32")
    x[:, 3] = x[:, 1]
    base = _TiedLanguageModel(tie_weights=True, name="lm")
    base(x[:1])
    model = tdk.make_private(base, l2_norm_clip=1.0, noise_multiplier=0.0)
    model.compile(
        optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    return model, x, rng.integers(0, VOCAB, size=(BATCH, STEPS))


def _position_embedding(rng):
    keras_hub = pytest.importorskip("keras_hub")
    inputs = keras.Input((STEPS, FEATURES))
    h = layers.Add()([inputs, keras_hub.layers.PositionEmbedding(STEPS)(inputs)])
    outputs = layers.Dense(3)(layers.Flatten()(h))
    return (
        _dp_model(inputs, outputs),
        rng.normal(size=(BATCH, STEPS, FEATURES)),
        rng.normal(size=(BATCH, 3)),
    )


# Registry key -> (builder(rng) -> (model, x, y), rtol of the float64 comparison).
CASES = {
    layers.Dense: (_stack("dense"), 1e-5),
    layers.Embedding: (_embedding, 1e-5),
    layers.Conv1D: (_stack("conv1d"), 1e-5),
    layers.Conv2D: (_stack("conv2d"), 1e-5),
    layers.Conv3D: (_stack("conv3d"), 1e-5),
    layers.DepthwiseConv1D: (_stack("depthwise_1d"), 1e-5),
    layers.DepthwiseConv2D: (_stack("depthwise"), 1e-5),
    layers.Conv1DTranspose: (_stack("conv1d_transpose"), 1e-5),
    layers.Conv2DTranspose: (_stack("conv2d_transpose"), 1e-5),
    layers.Conv3DTranspose: (_stack("conv3d_transpose_same"), 1e-5),
    layers.SeparableConv1D: (_stack("separable_1d_dilated"), 1e-5),
    layers.SeparableConv2D: (_stack("separable_2d"), 1e-5),
    layers.RNN: (_sequence(lambda: layers.RNN(layers.GRUCell(3))), 1e-5),
    layers.SimpleRNN: (_sequence(lambda: layers.SimpleRNN(3, return_sequences=True)), 1e-5),
    layers.GRU: (_sequence(lambda: layers.GRU(3, reset_after=False)), 1e-5),
    layers.LSTM: (_sequence(lambda: layers.LSTM(3)), 1e-5),
    layers.Bidirectional: (_sequence(lambda: layers.Bidirectional(layers.LSTM(2))), 1e-5),
    layers.EinsumDense: (_stack("einsum_dense"), 1e-5),
    layers.LayerNormalization: (_stack("layer_norm"), 1e-5),
    layers.GroupNormalization: (_stack("group_norm"), 1e-5),
    layers.RMSNormalization: (_stack("rms_norm"), 1e-5),
    layers.MultiHeadAttention: (_attention, 1e-5),
    # rtol 1e-4: Keras's torch matmul rounds the float64 logits through float32.
    getattr(layers, "ReversibleEmbedding", None): (_reversible_embedding, 1e-4),
    POSITION_EMBEDDING: (_position_embedding, 1e-5),
}
CASES.pop(None, None)  # Keras < 3.12 has no ReversibleEmbedding (nor a rule for it)


def _key_id(key):
    return key if isinstance(key, str) else key.__name__


def _is_instance_of_key(layer, key) -> bool:
    """Whether `layer`'s class is `key` or derives from it (by class or import path)."""
    return any(
        cls is key or f"{cls.__module__}.{cls.__qualname__}" == key for cls in type(layer).__mro__
    )


def test_every_registered_layer_has_a_case():
    registered = {_key_id(key) for key in make_default_layer_registry()}
    cased = {_key_id(key) for key in CASES}
    assert not registered - cased, (
        f"Registered layer classes without a case in CASES: {sorted(registered - cased)}"
    )
    assert not cased - registered, (
        f"CASES names layer classes the default registry lacks: {sorted(cased - registered)}"
    )


@pytest.mark.parametrize("key", list(make_default_layer_registry()), ids=_key_id)
def test_registered_layer_matches_one_example_at_a_time(key, float64):
    if key not in CASES:
        pytest.fail(f"No case in CASES for the registered layer {_key_id(key)}")
    build, rtol = CASES[key]
    rng = np.random.default_rng(0)
    model, x, y = build(rng)
    registry = make_default_layer_registry()
    rule = registry.rule_for(key)
    found = [layer for layer in model._flatten_layers() if _is_instance_of_key(layer, key)]
    assert found, f"the case's model has no {_key_id(key)}"
    assert all(registry.lookup(layer) is rule for layer in found), [
        registry.explain(layer) for layer in found
    ]
    engine = FastEngine(model, registry)  # no fallback: every weighted layer takes a rule
    assert not engine.slow_layers, engine.slow_layers

    reference = reference_per_example_gradients(model, x, y)
    norms = np.sqrt(sum((g.reshape(BATCH, -1) ** 2).sum(1) for g in reference))
    clip = float(np.median(norms))  # about half of the examples are clipped
    result = engine.clipped_batch(x, y, None, num_units=BATCH, l2_norm_clip=clip, rng_seed=0)
    np.testing.assert_allclose(result.unit_norms.numpy(), norms, rtol=rtol)
    want = reference_clipped_sum(reference, clip)
    assert len(result.summed) == len(want)
    for got, expected in zip(result.summed, want):
        np.testing.assert_allclose(got.numpy(), expected, rtol=rtol, atol=rtol * clip)


def test_handles_declares_on_the_rule_class_only_and_registries_are_fresh(monkeypatch):
    from torchdp_keras.errors import DPConfigError
    from torchdp_keras.per_example import registry as registry_module
    from torchdp_keras.per_example.rules.base import handled_layers, handles
    from torchdp_keras.per_example.rules.embedding import EmbeddingRule
    from torchdp_keras.per_example.rules.reversible_embedding import ReversibleEmbeddingRule

    # A subclass of a declared rule declares nothing of its base's.
    assert handled_layers(EmbeddingRule) == (layers.Embedding,)
    assert layers.Embedding not in handled_layers(ReversibleEmbeddingRule)
    assert handled_layers(type("Undeclared", (EmbeddingRule,), {})) == ()
    with pytest.raises(TypeError, match="already declares"):
        handles(layers.Dense)(EmbeddingRule)
    with pytest.raises(TypeError, match="LayerRule subclasses"):
        handles(layers.Dense)(object)
    with pytest.raises(TypeError, match="import paths"):
        handles("Dense")
    # Each call builds a registry of its own: changing one changes no other.
    first = make_default_layer_registry()
    first.insert(layers.PReLU, first.rule_for(layers.Dense))
    assert layers.PReLU not in make_default_layer_registry()
    # Two rules that claim one class are an error, not a silent override.

    @handles(layers.Dense)
    class OtherDenseRule(first.rule_for(layers.Dense).__class__):
        pass

    monkeypatch.setattr(registry_module, "RULES", (*registry_module.RULES, OtherDenseRule))
    with pytest.raises(DPConfigError, match="OtherDenseRule and DenseRule both declare"):
        make_default_layer_registry()
