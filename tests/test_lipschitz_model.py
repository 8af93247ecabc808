"""Lipschitz (clipless) DP models: the gradient-bound guarantee, noise scales, accounting."""

import math

import keras
import numpy as np
import pytest
import torch

import torchdp_keras as tdk
from torchdp_keras.lipschitz import (
    DatasetMetadata,
    DP_Model,
    DP_Sequential,
    DPParameters,
    NoisifyStrategyError,
    compute_gradient_bounds,
    get_eps_delta,
    get_noise_multiplier_coefs,
    global_noisify,
    local_noisify,
)
from torchdp_keras.lipschitz import layers as L
from torchdp_keras.lipschitz import losses as LL
from torchdp_keras.per_example import VmapEngine

MAX_NORM = 2.0


def _metadata(n=256, batch_size=32, shape=(8, 8, 1), classes=4):
    return DatasetMetadata(
        input_shape=shape, nb_classes=classes, nb_samples_train=n, nb_samples_test=64,
        class_names=[str(i) for i in range(classes)], nb_steps_per_epochs=n // batch_size,
        batch_size=batch_size, max_norm=MAX_NORM,
    )


def _conv_net(strategy="per-layer", sigma=1.0, model_cls=DP_Sequential):
    layers = [
        L.DP_BoundedInput(max_norm=MAX_NORM),
        L.DP_SpectralConv2D(6, 3, padding="same"),
        L.DP_AddBias(norm_max=0.5),
        L.DP_GroupSort(2),
        L.DP_ScaledL2NormPooling2D(2),
        L.DP_LayerCentering(),
        L.DP_SpectralConv2D(4, 3, strides=(2, 2), padding="valid"),
        L.DP_FullSort(),
        L.DP_Flatten(),
        L.DP_SpectralDense(10),
        L.DP_AddBias(norm_max=0.3),
        L.DP_GroupSort(2),
        L.DP_SpectralDense(4),
    ]
    kwargs = dict(dp_parameters=DPParameters(strategy, sigma, 1e-5), dataset_metadata=_metadata())
    if model_cls is DP_Sequential:
        model = DP_Sequential([keras.Input((8, 8, 1)), *layers], **kwargs)
    else:
        model = DP_Model(layers, **kwargs)
        model(np.zeros((1, 8, 8, 1), "float32"))
    return model


def _data(n, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8, 8, 1)).astype("float32") * scale
    y = np.eye(4, dtype="float32")[rng.integers(0, 4, size=n)]
    return x, y


LOSSES = [
    LL.DP_TauCategoricalCrossentropy(tau=8.0),
    LL.DP_MulticlassHKR(alpha=5.0, min_margin=0.5),
    LL.DP_KCosineSimilarity(K=0.5),
    LL.DP_MeanAbsoluteError(),
]


def _per_layer_norms(model, x, y):
    grads, _ = VmapEngine(model).per_unit_gradients(x, y, None, num_units=len(x))
    return {
        v.path: torch.linalg.vector_norm(g.reshape(len(x), -1).double(), dim=1)
        for v, g in zip(model.trainable_variables, grads)
    }


@pytest.mark.parametrize("loss", LOSSES, ids=lambda loss: type(loss).__name__)
@pytest.mark.parametrize("model_cls", [DP_Sequential, DP_Model])
def test_every_per_example_gradient_is_within_its_bound(loss, model_cls):
    """The guarantee itself, checked example by example with the per-example engine."""
    model = _conv_net(model_cls=model_cls)
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=loss)
    for step in range(3):  # random weights, then weights after (projected) updates
        # Inputs inside the bound, at it, and far outside (DP_BoundedInput clips them).
        x, y = _data(24, seed=step, scale=[0.05, 0.3, 5.0][step])
        bounds = compute_gradient_bounds(model)
        assert set(bounds) == {v.path for v in model.trainable_variables}
        norms = _per_layer_norms(model, x, y)
        for path, bound in bounds.items():
            assert float(norms[path].max()) <= bound * (1 + 1e-5), (path, step)
        # The whole-model bound (global sensitivity) holds too.
        total = torch.sqrt(sum(n**2 for n in norms.values()))
        assert float(total.max()) <= math.sqrt(sum(b * b for b in bounds.values())) * (1 + 1e-5)
        model.fit(*_data(64, seed=10 + step), batch_size=32, epochs=1, verbose=0)


def test_bounds_are_not_vacuous():
    """On a dense network the bound C = max_norm * L is nearly attained: the check has teeth."""
    model = DP_Sequential(
        [keras.Input((8, 8, 1)), L.DP_BoundedInput(max_norm=MAX_NORM), L.DP_Flatten(),
         L.DP_SpectralDense(4)],
        dp_parameters=DPParameters("global", 1.0, 1e-5), dataset_metadata=_metadata(),
    )
    model.compile(optimizer="sgd", loss=LL.DP_TauCategoricalCrossentropy(tau=50.0))
    x, y = _data(64, seed=3, scale=5.0)
    (path, bound), = compute_gradient_bounds(model).items()
    assert bound == pytest.approx(MAX_NORM * math.sqrt(2))
    observed = float(_per_layer_norms(model, x, y)[path].max())
    assert 0.9 * bound < observed <= bound * (1 + 1e-5)


def test_spectral_layers_stay_1_lipschitz_after_every_step():
    model = _conv_net()
    model.compile(optimizer=keras.optimizers.SGD(5.0), loss=LL.DP_MulticlassHKR(alpha=10.0))
    kernels = [layer for layer in model.layers if isinstance(layer, L.DP_SpectralDense)]
    biases = [layer for layer in model.layers if isinstance(layer, L.DP_AddBias)]
    seen = []

    class Check(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            for layer in kernels:
                w = layer.trainable_variables[0].value.detach().double()
                seen.append(float(torch.linalg.matrix_norm(w, ord=2)))
            for layer in biases:
                b = layer.trainable_variables[0].value.detach().double()
                assert float(torch.linalg.vector_norm(b)) <= layer.norm_max * (1 + 1e-6)

    model.fit(*_data(128, seed=0), batch_size=32, epochs=2, verbose=0, callbacks=[Check()])
    assert len(seen) == 2 * 4 * len(kernels)
    assert max(seen) <= 1 + 1e-3


def _zero_gradients(model):
    return [torch.zeros_like(v.value) for v in model.trainable_variables]


@pytest.mark.parametrize("strategy", ["global", "per-layer"])
def test_noise_has_the_stated_scale_per_layer(strategy):
    sigma = 1.7
    model = _conv_net(strategy, sigma)
    model.compile(optimizer="sgd", loss=LL.DP_TauCategoricalCrossentropy(tau=4.0))
    bounds = compute_gradient_bounds(model)
    variables = model.trainable_variables
    noisify = global_noisify if strategy == "global" else local_noisify
    draws = [noisify(model, bounds, variables, _zero_gradients(model)) for _ in range(600)]
    per_layer = {layer.name: bounds[layer.trainable_variables[0].path]
                 for layer in model.layers if layer.trainable_variables}
    total, total_sq = sum(per_layer.values()), sum(c * c for c in per_layer.values())
    coefs = get_noise_multiplier_coefs(model)
    for layer in model.layers:
        if not layer.trainable_variables:
            continue
        c = per_layer[layer.name]
        expected = sigma * (math.sqrt(total_sq) if strategy == "global" else math.sqrt(c * total))
        assert coefs[layer.name] * c == pytest.approx(math.sqrt(c * total))
        index = [v.path for v in variables].index(layer.trainable_variables[0].path)
        sample = torch.cat([d[index].reshape(-1) for d in draws]).double()
        assert abs(float(sample.std()) / expected - 1) < 0.05, layer.name
        assert abs(float(sample.std()) / (1.5 * expected) - 1) > 0.2  # power against 1.5x
    # Per-layer is equivalent to one Gaussian mechanism of noise multiplier sigma:
    # sum_l C_l^2 / s_l^2 = 1 / sigma^2.
    s2 = {n: (sigma * coefs[n] * c) ** 2 for n, c in per_layer.items()}
    assert sum(c * c / s2[n] for n, c in per_layer.items()) == pytest.approx(1 / sigma**2)


def test_train_step_adds_that_noise_to_the_summed_gradient():
    """update = (sum of gradients + noise) / B, with the noise std of the strategy."""
    sigma, width, batch = 1.3, 4000, 16
    model = DP_Sequential(
        [keras.Input((width,)), L.DP_BoundedInput(max_norm=1.0), L.DP_AddBias(norm_max=1e9)],
        dp_parameters=DPParameters("global", sigma, 1e-5),
        dataset_metadata=DatasetMetadata((width,), 2, 1000, 10, ["a", "b"], 62, batch, 1.0),
    )
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss=LL.DP_MeanAbsoluteError())
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, width)).astype("float32")
    y = rng.normal(size=(batch, width)).astype("float32")
    bias = model.trainable_variables[0]
    before = bias.numpy().copy()
    model.train_on_batch(x, y)
    update = before - bias.numpy()
    x_clipped = x * np.minimum(1, 1 / np.linalg.norm(x, axis=1, keepdims=True))
    expected_grad = np.sign(x_clipped + before - y).sum(0) / width  # sum of per-example grads
    noise = update * batch - expected_grad
    (bound,) = compute_gradient_bounds(model).values()
    assert bound == pytest.approx(1.0)  # MAE: L = 1; the bias passes it through
    assert abs(noise.std() / (sigma * bound) - 1) < 0.05
    assert model.dp_steps == 1


def test_accounting_matches_a_hand_computation():
    model = _conv_net(sigma=1.1)
    model.compile(optimizer="sgd", loss=LL.DP_TauCategoricalCrossentropy(tau=4.0))
    epsilon, delta = get_eps_delta(model, epochs=3)
    hand = tdk.PRVAccountant()
    hand.compose(1.1, 32 / 256, 3 * 8)
    assert (epsilon, delta) == (pytest.approx(hand.get_epsilon(1e-5)), 1e-5)
    # Training on the Poisson loader: the accountant composes what the sampler did.
    x, y = _data(256, seed=1)
    loader = tdk.PrivateDataLoader(x, y, batch_size=32, seed=0)
    history = model.fit(loader, epochs=2, verbose=0)
    done = tdk.PRVAccountant()
    done.compose(1.1, 32 / 256, model.dp_steps)
    assert model.dp_steps == 2 * 8
    assert history.history["epsilon"][-1] == pytest.approx(done.get_epsilon(1e-5))


def test_shuffled_batches_say_what_epsilon_assumes():
    model = _conv_net()
    model.compile(optimizer="sgd", loss=LL.DP_TauCategoricalCrossentropy(tau=4.0))
    with pytest.warns(UserWarning, match="assumes Poisson sampling"):
        model.fit(*_data(64, seed=0), epochs=1, verbose=0)


def test_dp_accountant_callback_is_the_deel_lipdp_one():
    from torchdp_keras.lipschitz import DP_Accountant

    records = []
    model = _conv_net()
    model.compile(optimizer="sgd", loss=LL.DP_TauCategoricalCrossentropy(tau=4.0))
    model.fit(*_data(64, seed=0), epochs=2, verbose=0, callbacks=[DP_Accountant(records.append)])
    assert [r["epoch"] for r in records] == [0, 1]
    assert records[-1]["epsilon"] == pytest.approx(model.get_epsilon())


def test_invalid_strategy_is_a_type_error():
    with pytest.raises(TypeError, match=r"noisify_strategy='local'"):
        _conv_net(strategy="local")
    assert issubclass(NoisifyStrategyError, tdk.DPError)


def test_only_lipschitz_layers_are_allowed_and_named_by_path():
    kwargs = dict(dp_parameters=DPParameters("global", 1.0, 1e-5), dataset_metadata=_metadata())
    with pytest.raises(tdk.UnsupportedLayerError, match=r"net/dense.*net/dropout") as info:
        DP_Sequential(
            [keras.Input((8, 8, 1)), L.DP_BoundedInput(max_norm=MAX_NORM), L.DP_Flatten(),
             keras.layers.Dense(4, name="dense"), keras.layers.Dropout(0.5, name="dropout")],
            name="net", **kwargs,
        )
    assert info.value.layer_paths == ("net/dense", "net/dropout")
    with pytest.raises(tdk.UnsupportedLayerError, match="DP_BoundedInput"):
        DP_Sequential([keras.Input((8, 8, 1)), L.DP_Flatten(), L.DP_SpectralDense(4)], **kwargs)
    with pytest.raises(tdk.UnsupportedLayerError, match="max_norm <= dataset_metadata"):
        DP_Sequential(
            [keras.Input((8, 8, 1)), L.DP_BoundedInput(max_norm=10 * MAX_NORM), L.DP_Flatten()],
            **kwargs,
        )


def test_a_loss_without_lipschitz_constant_is_refused():
    model = _conv_net()
    with pytest.raises(tdk.DPConfigError, match="known Lipschitz constant"):
        model.compile(optimizer="sgd", loss="categorical_crossentropy")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(noisify_strategy="global", noise_multiplier=-1.0, delta=1e-5), "noise_multiplier"),
        (dict(noisify_strategy="global", noise_multiplier=1.0, delta=1.5), "delta=1.5"),
    ],
)
def test_bad_dp_parameters(kwargs, match):
    with pytest.raises(tdk.DPConfigError, match=match):
        DPParameters(**kwargs)


def test_bad_dataset_metadata():
    with pytest.raises(tdk.DPConfigError, match="max_norm"):
        DatasetMetadata((4,), 2, 100, 10, ["a", "b"], 10, 10, max_norm=0.0)
    with pytest.raises(tdk.DPConfigError, match="batch_size=200"):
        DatasetMetadata((4,), 2, 100, 10, ["a", "b"], 10, 200, max_norm=1.0)


def test_signal_to_noise_diagnostics():
    model = _conv_net()
    model.compile(optimizer="sgd", loss=LL.DP_TauCategoricalCrossentropy(tau=4.0))
    batch = _data(32, seed=0)
    for method in (model.signal_to_noise_average, model.signal_to_noise_elementwise):
        ratios, norms, bounds = method(batch)
        assert set(ratios) == set(norms) == set(bounds) == {v.path for v in
                                                           model.trainable_variables}
        assert all(r >= 0 and math.isfinite(r) for r in ratios.values())
        # The batch gradient's norm never exceeds batch_size times the per-example bound.
        assert all(norms[p] <= 32 * bounds[p] * (1 + 1e-5) for p in norms)


def test_save_and_load_keeps_bounds_and_privacy_state(tmp_path):
    model = _conv_net()
    model.compile(optimizer="sgd", loss=LL.DP_TauCategoricalCrossentropy(tau=4.0))
    x, y = _data(64, seed=0)
    model.fit(x, y, epochs=1, verbose=0)
    path = tmp_path / "lip.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, DP_Sequential)
    assert loaded.dp_steps == model.dp_steps
    assert loaded.get_epsilon() == pytest.approx(model.get_epsilon())
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)
    # Layer names are renumbered on load; the bounds, in order, are the same.
    assert list(compute_gradient_bounds(loaded).values()) == pytest.approx(
        list(compute_gradient_bounds(model).values())
    )


def test_dp_model_saves_and_loads(tmp_path):
    model = _conv_net(model_cls=DP_Model)
    model.compile(optimizer="sgd", loss=LL.DP_KCosineSimilarity(K=0.5))
    x, y = _data(64, seed=0)
    model.fit(x, y, epochs=1, verbose=0)
    path = tmp_path / "lip_model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, DP_Model) and loaded.dp_steps == model.dp_steps
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)
