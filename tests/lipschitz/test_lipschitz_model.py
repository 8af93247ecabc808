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
    accounting_noise_multiplier,
    compute_gradient_bounds,
    get_eps_delta,
    get_noise_multiplier_coefs,
    get_optimal_noise_multiplier_coefs,
    global_noisify,
    local_noisify,
    optimal_noisify,
)
from torchdp_keras.lipschitz import layers as L
from torchdp_keras.lipschitz import losses as LL
from torchdp_keras.per_example import VmapEngine

# The models here fit arrays: the library's warning that they are not Poisson-sampled is
# expected, and not the point ("." stands for ":", the field separator of a filter).
pytestmark = pytest.mark.filterwarnings(
    r"ignore:torchdp_keras. fit\(\) on arrays trains on shuffled"
)

MAX_NORM = 2.0
BATCH = 32


def _example_bounds(model):
    """Per-example bounds C_l: deel-lipdp's batch-mean bounds times the batch size."""
    batch = model.dataset_metadata.batch_size
    return {path: b * batch for path, b in compute_gradient_bounds(model).items()}


def _metadata(n=256, batch_size=32, shape=(8, 8, 1), classes=4):
    return DatasetMetadata(
        input_shape=shape,
        nb_classes=classes,
        nb_samples_train=n,
        nb_samples_test=64,
        class_names=[str(i) for i in range(classes)],
        nb_steps_per_epochs=n // batch_size,
        batch_size=batch_size,
        max_norm=MAX_NORM,
    )


def _conv_net(strategy="per-layer", sigma=1.0, model_cls=DP_Sequential):
    layers = [
        L.DP_BoundedInput(upper_bound=MAX_NORM),
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
        bounds = _example_bounds(model)
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
        [
            keras.Input((8, 8, 1)),
            L.DP_BoundedInput(upper_bound=MAX_NORM),
            L.DP_Flatten(),
            L.DP_SpectralDense(4),
        ],
        dp_parameters=DPParameters("global", 1.0, 1e-5),
        dataset_metadata=_metadata(),
    )
    model.compile(optimizer="sgd", loss=LL.DP_TauCategoricalCrossentropy(tau=50.0))
    x, y = _data(64, seed=3, scale=5.0)
    ((path, bound),) = _example_bounds(model).items()
    assert bound == pytest.approx(MAX_NORM * math.sqrt(2))
    # deel-lipdp's convention: the share of one example in the batch-mean gradient.
    assert compute_gradient_bounds(model)[path] == pytest.approx(bound / BATCH)
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


@pytest.mark.parametrize("strategy", ["global", "per-layer", "optimal-per-layer"])
def test_noise_has_the_stated_scale_per_layer(strategy):
    sigma = 1.7
    model = _conv_net(strategy, sigma)
    model.layers[-1].nm_coef = 2.0  # deel-lipdp's per-layer coefficient of the last layer
    model.compile(optimizer="sgd", loss=LL.DP_TauCategoricalCrossentropy(tau=4.0))
    bounds = compute_gradient_bounds(model)
    variables = model.trainable_variables
    noisify = {"global": global_noisify, "per-layer": local_noisify}.get(strategy, optimal_noisify)
    draws = [noisify(model, bounds, variables, _zero_gradients(model)) for _ in range(600)]
    weighted = [layer for layer in model.layers if layer.trainable_variables]
    per_layer = {layer.name: bounds[layer.trainable_variables[0].path] for layer in weighted}
    total, total_sq = sum(per_layer.values()), sum(c * c for c in per_layer.values())
    coefs = get_noise_multiplier_coefs(model)
    optimal = get_optimal_noise_multiplier_coefs(model)
    for layer in weighted:
        c, path = per_layer[layer.name], layer.trainable_variables[0].path
        assert coefs[path] == (2.0 if layer is model.layers[-1] else 1.0)
        expected = {
            "global": sigma * math.sqrt(total_sq),
            "per-layer": sigma * coefs[path] * c,
            "optimal-per-layer": sigma * math.sqrt(c * total),
        }[strategy]
        assert optimal[path] * c == pytest.approx(math.sqrt(c * total))
        index = [v.path for v in variables].index(path)
        sample = torch.cat([d[index].reshape(-1) for d in draws]).double()
        assert abs(float(sample.std()) / expected - 1) < 0.05, layer.name
        assert abs(float(sample.std()) / (1.5 * expected) - 1) > 0.2  # power against 1.5x
    # The Gaussian mechanism each strategy is accounted as: deel-lipdp composes
    # one per layer (noise multipliers sigma * nm_coef_l); the others are one
    # mechanism of noise multiplier sigma (sum_l C_l^2 / s_l^2 = 1 / sigma^2).
    accounted = accounting_noise_multiplier(model)
    if strategy == "per-layer":
        layer_sigmas = [sigma * coefs[layer.trainable_variables[0].path] for layer in weighted]
        assert accounted == pytest.approx(sum(s**-2 for s in layer_sigmas) ** -0.5)
        assert accounted < sigma / math.sqrt(len(weighted) - 1)  # pays for the composition
    else:
        assert accounted == sigma
    if strategy == "optimal-per-layer":
        s2 = {n: (sigma * math.sqrt(c * total)) ** 2 for n, c in per_layer.items()}
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
    (bound,) = _example_bounds(model).values()
    assert bound == pytest.approx(1.0)  # MAE: L = 1; the bias passes it through
    assert abs(noise.std() / (sigma * bound) - 1) < 0.05
    assert model.dp_steps == 1


@pytest.mark.parametrize("strategy", ["global", "per-layer", "optimal-per-layer"])
def test_get_eps_delta_matches_a_hand_computation(strategy):
    model = _conv_net(strategy=strategy, sigma=1.1)
    model.compile(optimizer="sgd", loss=LL.DP_TauCategoricalCrossentropy(tau=4.0))
    # deel-lipdp's per-layer strategy composes one Gaussian per weighted layer (6 here).
    sigma = 1.1 / math.sqrt(6) if strategy == "per-layer" else 1.1
    assert accounting_noise_multiplier(model) == pytest.approx(sigma)
    for accountant, hand in (("rdp", tdk.RDPAccountant()), ("prv", tdk.PRVAccountant())):
        hand.compose(sigma, 32 / 256, 3 * 8)
        epsilon, delta = get_eps_delta(model, epochs=3, accountant=accountant)
        assert (epsilon, delta) == (pytest.approx(hand.get_epsilon(1e-5)), 1e-5)
    assert get_eps_delta(model, 3)[0] == get_eps_delta(model, 3, accountant="rdp")[0]
    assert get_eps_delta(model, 0) == (0.0, 1e-5)
    with pytest.raises(tdk.DPConfigError, match="accountant='moments'"):
        get_eps_delta(model, 1, accountant="moments")
    # A fractional number of steps per epoch (deel-lipdp's n / batch_size) rounds up.
    model.dataset_metadata.nb_steps_per_epochs = 256 / 30
    rounded = tdk.RDPAccountant()
    rounded.compose(sigma, 32 / 256, math.ceil(3 * 256 / 30))
    assert get_eps_delta(model, 3)[0] == pytest.approx(rounded.get_epsilon(1e-5))


def test_accounting_of_training_follows_the_strategy():
    model = _conv_net(sigma=1.1)  # "per-layer": six layers of sigma 1.1 composed
    model.compile(optimizer="sgd", loss=LL.DP_TauCategoricalCrossentropy(tau=4.0))
    # Training on the Poisson loader: the accountant composes what the sampler did.
    x, y = _data(256, seed=1)
    loader = tdk.PrivateDataLoader(x, y, batch_size=32, seed=0)
    history = model.fit(loader, epochs=2, verbose=0)
    done = tdk.PRVAccountant()
    done.compose(1.1 / math.sqrt(6), 32 / 256, model.dp_steps)
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
            [
                keras.Input((8, 8, 1)),
                L.DP_BoundedInput(upper_bound=MAX_NORM),
                L.DP_Flatten(),
                keras.layers.Dense(4, name="dense"),
                keras.layers.Dropout(0.5, name="dropout"),
            ],
            name="net",
            **kwargs,
        )
    assert info.value.layer_paths == ("net/dense", "net/dropout")
    with pytest.raises(tdk.UnsupportedLayerError, match="DP_BoundedInput"):
        DP_Sequential([keras.Input((8, 8, 1)), L.DP_Flatten(), L.DP_SpectralDense(4)], **kwargs)
    # As deel-lipdp, the bounds start from the layer's upper_bound, whatever the metadata says.
    model = DP_Sequential(
        [
            keras.Input((8, 8, 1)),
            L.DP_BoundedInput(upper_bound=10 * MAX_NORM),
            L.DP_Flatten(),
            L.DP_SpectralDense(4),
        ],
        **kwargs,
    )
    model.compile(optimizer="sgd", loss=LL.DP_MeanAbsoluteError())
    (bound,) = _example_bounds(model).values()
    assert bound == pytest.approx(10 * MAX_NORM)


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
    """deel-lipdp's meanings: per-example arrays, and ratios to the per-example bound."""
    model = _conv_net()
    model.compile(optimizer="sgd", loss=LL.DP_TauCategoricalCrossentropy(tau=4.0))
    x, y = _data(32, seed=0, scale=5.0)
    paths = {v.path for v in model.trainable_variables}
    bounds_c = _example_bounds(model)
    ratios, norms, bounds = model.signal_to_noise_elementwise((x[:5], y[:5]))
    assert set(ratios) == set(norms) == set(bounds) == paths
    reference = _per_layer_norms(model, x[:5], y[:5])
    for path in paths:
        assert bounds[path] == pytest.approx(bounds_c[path])
        assert norms[path].shape == (5,)
        np.testing.assert_allclose(norms[path], reference[path].numpy(), rtol=1e-4)
        np.testing.assert_allclose(ratios[path], norms[path] / bounds[path])
        assert np.all(ratios[path] <= 1 + 1e-5)  # the guarantee, example by example
    ratios, norms, bounds = model.signal_to_noise_average((x, y))
    grads, _ = VmapEngine(model).per_unit_gradients(x, y, None, num_units=len(x))
    for v, g in zip(model.trainable_variables, grads):
        path = v.path
        mean_norm = float(torch.linalg.vector_norm(g.double().mean(0)))
        assert norms[path] == pytest.approx(mean_norm, rel=1e-4)
        assert ratios[path] == pytest.approx(norms[path] / bounds_c[path])
        assert 0 <= ratios[path] <= 1 + 1e-5  # a mean of vectors within the bound
    with pytest.raises(tdk.DPConfigError, match="batch_size=32"):
        model.signal_to_noise_average((x[:5], y[:5]))


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
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6
    )
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
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6
    )


def test_deel_lipdp_layer_arguments_nm_coef_and_use_bias():
    with pytest.raises(tdk.DPConfigError, match="use_bias=True"):
        L.DP_SpectralDense(4, use_bias=True)
    with pytest.raises(tdk.DPConfigError, match="use_bias=True"):
        L.DP_SpectralConv2D(4, 3, use_bias=True)
    with pytest.raises(tdk.DPConfigError, match="nm_coef"):
        L.DP_SpectralDense(4, nm_coef=0)
    for layer in (
        L.DP_SpectralDense(4, use_bias=False, nm_coef=3.0),
        L.DP_SpectralConv2D(4, 3, nm_coef=3.0),
        L.DP_AddBias(1.0, nm_coef=3.0),
    ):
        assert layer.nm_coef == 3.0
        assert type(layer).from_config(layer.get_config()).nm_coef == 3.0


def test_dp_parameters_are_read_at_every_step():
    """deel-lipdp's DPParameters is a plain dataclass; a change applies to later steps."""
    model = _conv_net(strategy="global", sigma=1.0)
    model.compile(optimizer="sgd", loss=LL.DP_TauCategoricalCrossentropy(tau=4.0))
    x, y = _data(32, seed=0)
    model.train_on_batch(x, y)
    model.dp_parameters.noise_multiplier = 2.0
    assert model.noise_multiplier == 2.0
    model.train_on_batch(x, y)
    hand = tdk.PRVAccountant()
    hand.compose(1.0, 32 / 256, 1)
    hand.compose(2.0, 32 / 256, 1)
    assert model.get_epsilon() == pytest.approx(hand.get_epsilon(1e-5))
    model.dp_parameters.noisify_strategy = "local"
    with pytest.raises(NoisifyStrategyError, match="noisify_strategy='local'"):
        model.train_on_batch(x, y)


def test_clip_gradient_lowers_the_bounds_and_they_hold_per_example():
    clip = 0.05
    layers_ = [
        L.DP_BoundedInput(upper_bound=MAX_NORM),
        L.DP_SpectralConv2D(4, 3, padding="same"),
        L.DP_GroupSort(2),
        L.DP_Flatten(),
        L.DP_SpectralDense(4),
        L.DP_ClipGradient(clip),
    ]
    model = DP_Sequential(
        [keras.Input((8, 8, 1)), *layers_],
        dp_parameters=DPParameters("global", 1.0, 1e-5),
        dataset_metadata=_metadata(),
    )
    model.compile(optimizer="sgd", loss=LL.DP_TauCategoricalCrossentropy(tau=8.0))
    bounds = _example_bounds(model)
    assert max(bounds.values()) == pytest.approx(MAX_NORM * clip)  # min(sqrt 2, clip) * X
    x, y = _data(24, seed=5, scale=5.0)
    norms = _per_layer_norms(model, x, y)
    for path, bound in bounds.items():
        assert float(norms[path].max()) <= bound * (1 + 1e-5)
    # The same network without the clipping: larger gradients, which the clip cut.
    unclipped = DP_Sequential(
        [keras.Input((8, 8, 1)), *[type(la).from_config(la.get_config()) for la in layers_[:-1]]],
        dp_parameters=DPParameters("global", 1.0, 1e-5),
        dataset_metadata=_metadata(),
    )
    unclipped.compile(optimizer="sgd", loss=LL.DP_TauCategoricalCrossentropy(tau=8.0))
    unclipped.set_weights(model.get_weights())
    raw = _per_layer_norms(unclipped, x, y)
    for v_clip, v_raw in zip(model.trainable_variables, unclipped.trainable_variables):
        assert bool((norms[v_clip.path] <= raw[v_raw.path] * (1 + 1e-5)).all())
        assert float(raw[v_raw.path].max()) > 2 * float(norms[v_clip.path].max())
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    with pytest.raises(tdk.DPConfigError, match="epsilon=None"):
        L.DP_ClipGradient(None)  # the dynamic mode needs the epsilon of its releases
    with pytest.raises(tdk.DPConfigError, match="clip_value=0.5"):
        L.DP_ClipGradient(0.5, epsilon=1.0, mode="dynamic_svt")
    assert L.DP_ClipGradient.from_config(layers_[-1].get_config()).clip_value == clip


@pytest.mark.parametrize("policy", ["add", "1-lip-add"])
def test_residual_blocks_keep_every_per_example_gradient_within_its_bound(policy):
    dp_layers = [
        L.DP_BoundedInput(upper_bound=MAX_NORM),
        L.DP_Flatten(),
        L.DP_SpectralDense(8),
        *L.make_residuals(
            policy, [L.DP_SpectralDense(8), L.DP_GroupSort(2), L.DP_SpectralDense(8, nm_coef=2.0)]
        ),
        L.DP_GroupSort(2),
        L.DP_SpectralDense(4),
    ]
    model = DP_Model(
        dp_layers,
        dp_parameters=DPParameters("per-layer", 1.0, 1e-5),
        dataset_metadata=_metadata(),
    )
    model.compile(optimizer="sgd", loss=LL.DP_TauCategoricalCrossentropy(tau=8.0))
    x, y = _data(16, seed=2, scale=5.0)
    model(x[:2])
    bounds = _example_bounds(model)
    assert len(bounds) == 4 and set(bounds) == {v.path for v in model.trainable_variables}
    # The merge doubles ("add") or keeps the bound of the paths it joins.
    after_merge = bounds[model.layers[-1].trainable_variables[0].path]
    assert after_merge == pytest.approx(
        (2 if policy == "add" else 1) * MAX_NORM * math.sqrt(2), rel=1e-6
    )
    norms = _per_layer_norms(model, x, y)
    for path, bound in bounds.items():
        assert float(norms[path].max()) <= bound * (1 + 1e-5)
    assert 2.0 in get_noise_multiplier_coefs(model).values()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    with pytest.raises(tdk.DPConfigError, match="merge_policy='mul'"):
        L.DP_MergeResidual("mul")
    with pytest.raises(tdk.DPConfigError, match="block=Dense"):
        L.DP_WrappedResidual(keras.layers.Dense(3))
