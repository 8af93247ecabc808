"""keras_hub models on the fast path (skipped without the optional `hub` extra)."""

import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub")

import keras  # noqa: E402

import torchdp_keras as tdk  # noqa: E402
from torchdp_keras.per_example import FastEngine, VmapEngine  # noqa: E402

# keras warns that the classifier's dict of keras.Input has keys other than the inputs' names.
pytestmark = pytest.mark.filterwarnings(
    "ignore:When providing `inputs` as a dict, all keys in the dict must match:UserWarning"
)

B, T, V = 4, 8, 50


def _inputs(rng, segments=False):
    x = {
        "token_ids": rng.integers(1, V, (B, T)).astype("int32"),
        "padding_mask": np.ones((B, T), "int32"),
    }
    x["padding_mask"][0, 5:] = 0  # padding in one example
    if segments:
        x["segment_ids"] = np.zeros((B, T), "int32")
    return x


def _classifier(kind, dropout, lora=False):
    config = dict(
        vocabulary_size=V,
        num_layers=2,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=T,
        dropout=dropout,
    )
    if kind == "bert":
        backbone = keras_hub.models.BertBackbone(**config)
        pooled = lambda out: out["pooled_output"]  # noqa: E731
    else:
        backbone = keras_hub.models.GPT2Backbone(**config)
        pooled = keras.layers.GlobalAveragePooling1D()
    if lora:
        backbone.enable_lora(2)
    inputs = {name: keras.Input((T,), dtype="int32") for name in backbone.input}
    outputs = keras.layers.Dense(2)(pooled(backbone(inputs)))
    return keras.Model(inputs, outputs)


def _causal_lm(dropout):
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=V,
        num_layers=2,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=T,
        dropout=dropout,
    )
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)


CASES = {
    "bert": lambda d: (_classifier("bert", d), True, "cce"),
    "gpt2": lambda d: (_classifier("gpt2", d), False, "cce"),
    "gpt2_lora": lambda d: (_classifier("gpt2", d, lora=True), False, "cce"),
    "gpt2_causal_lm": lambda d: (_causal_lm(d), False, "lm"),
}


def _private(name, dropout, rng):
    model, segments, loss = CASES[name](dropout)
    x = _inputs(rng, segments)
    if loss == "lm":
        y, loss = (
            rng.integers(1, V, (B, T)),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    else:
        y, loss = (
            np.eye(2)[rng.integers(0, 2, B)],
            keras.losses.CategoricalCrossentropy(from_logits=True),
        )
    private = tdk.make_private(model, l2_norm_clip=1.0, noise_multiplier=0.0, seed=0)
    private.compile(optimizer="sgd", loss=loss)
    return private, x, y


@pytest.mark.parametrize("name", sorted(CASES))
def test_keras_hub_models_take_the_fast_path_with_their_default_dropout(name):
    private, x, y = _private(name, 0.1, np.random.default_rng(0))
    private.train_on_batch(x, y)
    plan = private.clipping_plan()
    assert plan.engine == "fast" and plan.checked, str(plan)
    assert plan.slow_layers == (), str(plan)


@pytest.mark.parametrize("name", sorted(CASES))
def test_keras_hub_models_match_the_per_example_engine(name):
    rng = np.random.default_rng(1)
    private, x, y = _private(name, 0.0, rng)
    registry = tdk.make_default_layer_registry()
    fast, vmap = FastEngine(private, registry), VmapEngine(private)
    kwargs = dict(num_units=B, l2_norm_clip=0.01, rng_seed=0)
    a = fast.clipped_batch(x, y, None, **kwargs)
    b = vmap.clipped_batch(x, y, None, **kwargs)
    np.testing.assert_allclose(a.unit_norms.numpy(), b.unit_norms.numpy(), rtol=2e-4)
    for s, t in zip(a.summed, b.summed):
        np.testing.assert_allclose(s.numpy(), t.numpy(), rtol=2e-3, atol=2e-6)
