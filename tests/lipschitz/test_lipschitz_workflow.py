"""deel-lipdp's workflow names: pipeline, sensitivity, the models' methods, its tutorial."""

import math

import keras
import numpy as np
import pytest
import torch
from helpers import ROOT

import torchdp_keras as tdk
from torchdp_keras.lipschitz import DP_Sequential, DPParameters, get_eps_delta
from torchdp_keras.lipschitz import layers as L
from torchdp_keras.lipschitz import losses as LL
from torchdp_keras.lipschitz.pipeline import (
    bound_clip_value,
    bound_normalize,
    default_delta_value,
    load_and_prepare_data,
    load_and_prepare_images_data,
    prepare_tabular_data,
)
from torchdp_keras.lipschitz.sensitivity import (
    check_layer_gradient_norm,
    get_max_epochs,
    gradient_norm_check,
)


def test_image_pipeline_bounds_every_example_and_describes_it(mnist_path):
    ds_train, ds_test, meta = load_and_prepare_images_data(
        "mnist", batch_size=500, bound_fct=bound_clip_value(10.0), path=mnist_path, seed=0
    )
    assert isinstance(ds_train, tdk.PrivateDataLoader)
    assert (meta.batch_size, meta.max_norm, meta.nb_classes) == (500, 10.0, 10)
    assert meta.input_shape == (28, 28, 1) and meta.nb_steps_per_epochs == 60000 // 500
    x, y = ds_test[0]
    assert x.shape == (500, 28, 28, 1) and y.shape == (500, 10)
    assert np.linalg.norm(x.reshape(500, -1), axis=1).max() <= 10.0 * (1 + 1e-6)
    assert load_and_prepare_data is load_and_prepare_images_data  # deel-lipdp's earlier name
    _, _, plain = load_and_prepare_images_data("mnist", batch_size=500, path=mnist_path)
    assert plain.max_norm == pytest.approx(28.0)  # sqrt(28 * 28 * 1): pixels in [0, 1]
    with pytest.raises(tdk.DPConfigError, match="colorspace='HSV' with 1 channel"):
        load_and_prepare_images_data("mnist", colorspace="HSV", path=mnist_path)
    with pytest.raises(tdk.DPConfigError, match="multiplicity=-1"):
        load_and_prepare_images_data("mnist", multiplicity=-1, path=mnist_path)
    with pytest.raises(tdk.DPConfigError, match="dataset_name='svhn'"):
        load_and_prepare_images_data("svhn")


def test_color_images_in_deel_lipdps_colorspaces(tmp_path):
    import colorsys

    rng = np.random.default_rng(0)
    path = str(tmp_path / "rgb.npz")
    np.savez(
        path,
        x_train=rng.integers(0, 256, (20, 4, 4, 3), dtype=np.uint8),
        y_train=rng.integers(0, 3, 20),
        x_test=rng.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8),
        y_test=rng.integers(0, 3, 6),
    )
    _, test, meta = load_and_prepare_images_data("rgb", colorspace="HSV", batch_size=5, path=path)
    x, _ = test[0]
    raw = np.load(path)["x_test"][:5].astype("float32") / 255.0
    expected = np.array([colorsys.rgb_to_hsv(*p) for p in raw.reshape(-1, 3)])
    np.testing.assert_allclose(x.reshape(-1, 3), expected, atol=1e-6)
    assert meta.max_norm == pytest.approx(math.sqrt(4 * 4 * 3))  # HSV stays in [0, 1]
    _, test, _ = load_and_prepare_images_data(
        "rgb", colorspace="YIQ", batch_size=5, path=path, bound_fct=bound_clip_value(3.0)
    )
    x, _ = test[0]
    np.testing.assert_allclose(x[..., 0], (raw * [0.299, 0.587, 0.114]).sum(-1).clip(0), atol=1e-5)
    with pytest.raises(tdk.DPConfigError, match="colorspace='YUV'"):
        load_and_prepare_images_data("rgb", colorspace="YUV", path=path)  # needs a bound


def test_bounds_tabular_data_and_default_delta():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5)).astype("float32") * 3
    bound, value = bound_normalize()
    out, _ = bound(x, None)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)
    assert value == 1.0
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, 40)]
    train, test, meta = prepare_tabular_data(
        x[:30], x[30:], y[:30], y[30:], 10, bound_clip_value(2.0), seed=0
    )
    assert (meta.nb_classes, meta.max_norm, meta.nb_steps_per_epochs) == (3, 2.0, 3)
    assert len(test) == 1
    with pytest.raises(tdk.DPConfigError, match="bound_fct=None"):
        prepare_tabular_data(x, x, y, y, 10)
    assert default_delta_value(meta) == 0.01  # n = 30 -> 1 / 100
    meta.nb_samples_train = 60000
    assert default_delta_value(meta) == 1e-5


def _tiny_model(sigma=1.5):
    model = DP_Sequential(
        [
            keras.Input((6,)),
            L.DP_BoundedInput(upper_bound=1.0),
            L.DP_SpectralDense(4),
            L.DP_GroupSort(2),
            L.DP_SpectralDense(3),
        ],
        dp_parameters=DPParameters("global", sigma, 1e-5),
        dataset_metadata=tdk.lipschitz.DatasetMetadata(
            (6,), 3, 1000, 100, ["a", "b", "c"], 10, 100, 1.0
        ),
    )
    model.compile(optimizer="sgd", loss=LL.DP_TauCategoricalCrossentropy(tau=4.0))
    return model


def test_get_max_epochs_is_the_largest_budget_within_epsilon():
    model = _tiny_model()
    budget = 3.0
    epochs = get_max_epochs(budget, model)
    assert get_eps_delta(model, epochs)[0] <= budget < get_eps_delta(model, epochs + 1)[0]
    assert get_max_epochs(budget, model, epochs_max=None) == epochs
    assert get_max_epochs(1e6, model, epochs_max=7) == 7
    assert get_max_epochs(1e-6, model) == 0


def test_layer_gradient_norm_checks_bite():
    layer = L.DP_SpectralDense(3)
    x = np.random.default_rng(1).normal(size=(5, 4)).astype("float32")
    layer(x)
    largest = float(np.linalg.norm(x, axis=1).max())  # a dense layer's Jacobian: ||x||
    assert check_layer_gradient_norm(largest * 1.001, layer, x)
    assert not check_layer_gradient_norm(largest * 0.999, layer, x)
    stack = keras.Sequential([keras.Input((4,)), layer])
    gradient_norm_check([1.001], stack, x)
    with pytest.raises(AssertionError):
        gradient_norm_check([0.9], stack, x)


def test_model_methods_of_deel_lipdp():
    model = _tiny_model()
    forward = model.layers_forward_order()
    assert [type(la).__name__ for la in forward] == [
        "DP_BoundedInput",
        "DP_SpectralDense",
        "DP_GroupSort",
        "DP_SpectralDense",
    ]
    assert model.layers_backward_order() == forward[::-1]
    kernel = forward[1].kernel
    kernel.assign(kernel.value * 5.0)
    model.condense()
    assert float(np.linalg.norm(np.asarray(kernel), 2)) <= 1.0
    plain = model.vanilla_export()
    assert not isinstance(plain, DP_Sequential)
    x = np.random.default_rng(2).normal(size=(4, 6)).astype("float32")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(plain(x)), keras.ops.convert_to_numpy(model(x)), rtol=1e-6
    )


# deel-lipdp's code passes input_shape to the first layer, which keras discourages (with a warning).
@pytest.mark.filterwarnings("ignore:Do not pass an `input_shape`/`input_dim` argument:UserWarning")
def test_lipdp_tutorial_smoke(mnist_path, capsys):
    import importlib.util
    import os

    path = os.path.join(ROOT, "examples", "lipdp_tutorial.py")
    spec = importlib.util.spec_from_file_location("lipdp_tutorial", path)
    tutorial = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tutorial)
    result = tutorial.main(["--smoke", "--data", mnist_path, "--seed", "0"])
    assert result["epsilon"] <= 3.0 + 1e-9 and result["epochs"] >= 1
    assert math.isfinite(result["accuracy"])
    assert "lipdp_tutorial:" in capsys.readouterr().out


def _mlp_mixer(use_residuals, size=16, patch=4):
    """deel-lipdp's CIFAR-10 MLP-Mixer (experiments/CIFAR10/main_MLP_mixer.py), smaller,
    with keras.ops.image.extract_patches where deel-lipdp uses tf.image's."""
    from torchdp_keras.lipschitz.model import DatasetMetadata, DP_Model

    meta = DatasetMetadata(
        (size, size, 3), 10, 5000, 1000, [str(i) for i in range(10)], 5000 / 64, 64, 8.0
    )
    seq_len = (size // patch) ** 2
    layers = [
        L.DP_BoundedInput(input_shape=meta.input_shape, upper_bound=meta.max_norm),
        L.DP_Lambda(
            keras.ops.image.extract_patches,
            arguments=dict(size=patch, strides=patch, padding="valid"),
        ),
        L.DP_Reshape((seq_len, patch * patch * 3)),
        L.DP_QuickSpectralDense(units=seq_len, use_bias=False, kernel_initializer="orthogonal"),
    ]
    token_mixing = [
        L.DP_Permute((2, 1)),
        L.DP_QuickSpectralDense(units=seq_len, use_bias=False),
        L.DP_GroupSort(2),
        L.DP_LayerCentering(),
        L.DP_QuickSpectralDense(units=seq_len, use_bias=False),
        L.DP_Permute((2, 1)),
    ]
    channel_mixing = [
        L.DP_QuickSpectralDense(units=seq_len, use_bias=False),
        L.DP_GroupSort(2),
        L.DP_LayerCentering(),
        L.DP_QuickSpectralDense(units=seq_len, use_bias=False),
    ]
    for block in (token_mixing, channel_mixing):
        layers += L.make_residuals("1-lip-add", block) if use_residuals else block
    layers += [
        L.DP_Flatten(),
        L.DP_QuickSpectralDense(units=10, use_bias=False),
        L.DP_ClipGradient(clip_value=1.0, mode="dynamic"),
    ]
    model = DP_Model(
        layers,
        dp_parameters=DPParameters("per-layer", 3.0, 1e-5),
        dataset_metadata=meta,
        name="mlp_mixer",
    )
    model.build(input_shape=(None, *meta.input_shape))
    return model


# deel-lipdp's code passes input_shape to the first layer, which keras discourages (with a warning).
@pytest.mark.filterwarnings("ignore:Do not pass an `input_shape`/`input_dim` argument:UserWarning")
@pytest.mark.parametrize("use_residuals", [False, True])
def test_deel_lipdps_mlp_mixer_ports_and_keeps_its_bounds(use_residuals):
    from torchdp_keras.per_example import VmapEngine

    model = _mlp_mixer(use_residuals)
    model.compile(
        loss=LL.DP_TauCategoricalCrossentropy(20.0),
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        metrics=["accuracy"],
    )
    rng = np.random.default_rng(3)
    x = rng.random((12, 16, 16, 3)).astype("float32") * 2
    y = np.eye(10, dtype="float32")[rng.integers(0, 10, 12)]
    grads, _ = VmapEngine(model).per_unit_gradients(x, y, None, num_units=12)
    batch = model.dataset_metadata.batch_size
    bounds = tdk.lipschitz.compute_gradient_bounds(model)
    assert len(bounds) == 6
    for variable, g in zip(model.trainable_variables, grads):
        norms = np.linalg.norm(keras.ops.convert_to_numpy(g).reshape(12, -1), axis=1)
        assert norms.max() <= bounds[variable.path] * batch * (1 + 1e-5), variable.path
    loader = tdk.PrivateDataLoader(x, y, batch_size=6, seed=0)
    model.fit(loader, epochs=1, verbose=0)
    assert model.dp_steps == 2


# -- dynamic clipping (deel-lipdp's sparse-vector-technique callback) -------------------
def test_rdp_accountant_composes_pure_dp_releases():
    acc = tdk.RDPAccountant()
    acc.compose(1.2, 0.01, 500)
    acc.compose_pure_dp(0.5, 3)
    hand = tdk.RDPAccountant()
    hand.compose(1.2, 0.01, 500)
    orders = np.asarray(hand.orders)
    expected = hand.get_rdp() + 3 * np.minimum(0.5, orders * 0.25 / 2)
    np.testing.assert_allclose(acc.get_rdp(), expected)
    assert acc.get_epsilon(1e-5) > hand.get_epsilon(1e-5)
    again = tdk.RDPAccountant()
    again.load_state_dict(acc.state_dict())
    assert again.get_epsilon(1e-5) == acc.get_epsilon(1e-5)
    assert again.pure_dp_history == [(0.5, 3)]
    alone = tdk.RDPAccountant()
    alone.compose_pure_dp(1.0, 2)  # no Gaussian step: still accounted
    assert 2.0 <= alone.get_epsilon(1e-5) < 2.1
    with pytest.raises(tdk.DPConfigError, match="epsilon=0"):
        acc.compose_pure_dp(0)


def test_private_clip_value_finds_the_norms_and_is_randomised():
    from torchdp_keras.lipschitz.dynamic import private_clip_value

    norms = np.full(500, 0.6)
    rng = np.random.default_rng(0)
    precise = [private_clip_value(norms, 1.5, 1e6, rng) for _ in range(5)]
    assert all(abs(v - 0.6) <= 2 * 1.5 / 999 for v in precise)  # within a grid step or two
    noisy = [private_clip_value(norms, 1.5, 1e-3, rng) for _ in range(20)]
    # At epsilon 1e-3 the noise decides: the values spread, far from the norms.
    assert len(set(noisy)) > 3 and np.mean(np.abs(np.array(noisy) - 0.6)) > 0.3


def _dynamic_model(patience=2):
    model = DP_Sequential(
        [
            keras.Input((6,)),
            L.DP_BoundedInput(upper_bound=1.0),
            L.DP_SpectralDense(4),
            L.DP_ClipGradient(epsilon=0.5, mode="dynamic_svt", patience=patience),
        ],
        dp_parameters=DPParameters("global", 1.5, 1e-5),
        dataset_metadata=tdk.lipschitz.DatasetMetadata(
            (6,), 4, 200, 50, ["a", "b", "c", "d"], 4, 50, 1.0
        ),
    )
    model.compile(optimizer="sgd", loss=LL.DP_TauCategoricalCrossentropy(tau=4.0))
    return model


def test_dynamic_clipping_is_accounted_as_pure_dp_releases():
    model = _dynamic_model(patience=2)
    assert isinstance(model.accountant, tdk.RDPAccountant)
    hand = tdk.RDPAccountant()
    hand.compose(1.5, 50 / 200, 5 * 4)
    hand.compose_pure_dp(0.5, 3)  # releases at epochs 0, 2 and 4 of 5
    assert get_eps_delta(model, 5)[0] == pytest.approx(hand.get_epsilon(1e-5))
    with pytest.raises(tdk.DPConfigError, match="accountant='prv'"):
        get_eps_delta(model, 5, accountant="prv")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)).astype("float32")
    y = np.eye(4, dtype="float32")[rng.integers(0, 4, 200)]
    loader = tdk.PrivateDataLoader(x, y, batch_size=50, seed=0)
    callback = tdk.lipschitz.AdaptiveLossGradientClipping(ds_train=loader)
    history = model.fit(loader, epochs=3, verbose=0, callbacks=[callback])
    layer = model.layers[-1]
    assert 0 < layer.clip_value <= math.sqrt(2)  # started at L = sqrt 2, then released values
    assert model.accountant.pure_dp_history == [(0.5, 2)]  # epochs 0 and 2
    spent = tdk.RDPAccountant()
    spent.compose(1.5, 50 / 200, model.dp_steps)
    spent.compose_pure_dp(0.5, 2)
    assert history.history["epsilon"][-1] == pytest.approx(spent.get_epsilon(1e-5))
    # The bounds below the layer use its current value.
    (bound,) = tdk.lipschitz.compute_gradient_bounds(model).values()
    assert bound * 50 == pytest.approx(1.0 * layer.clip_value)


def test_dynamic_clipping_must_be_the_last_layer():
    with pytest.raises(tdk.UnsupportedLayerError, match="last layer"):
        DP_Sequential(
            [
                keras.Input((6,)),
                L.DP_BoundedInput(upper_bound=1.0),
                L.DP_ClipGradient(epsilon=1.0),
                L.DP_SpectralDense(4),
            ],
            dp_parameters=DPParameters("global", 1.5, 1e-5),
            dataset_metadata=tdk.lipschitz.DatasetMetadata(
                (6,), 4, 200, 50, ["a", "b", "c", "d"], 4, 50, 1.0
            ),
        )


def test_remaining_deel_lipdp_names():
    from torchdp_keras.lipschitz.pipeline import get_colorspace_function

    # DP_GNP_Factory: deel-lipdp's trusted wrapper, here with the norm check.
    padding = L.DP_GNP_Factory(keras.layers.ZeroPadding1D)(1)
    assert type(padding).__name__ == "DP_ZeroPadding1D" and padding.propagate_inputs(2.0) == 2.0
    x = torch.randn(3, 4, 2)
    np.testing.assert_allclose(np.asarray(padding(x))[:, 1:-1], np.asarray(x))
    doubling = L.DP_GNP_Factory(keras.layers.Rescaling)(2.0)
    with pytest.raises(tdk.DPError, match="increased an example's norm"):
        doubling(x)
    with pytest.raises(tdk.DPConfigError, match="layer_cls=3"):
        L.DP_GNP_Factory(3)
    # clip_gradient: identity forward, rows of the gradient clipped to the value.
    z = torch.randn(4, 3, requires_grad=True)
    (g,) = torch.autograd.grad((L.clip_gradient(z, 0.5) * torch.ones(4, 3) * 3).sum(), z)
    np.testing.assert_allclose(torch.linalg.vector_norm(g, dim=1).numpy(), 0.5, rtol=1e-6)
    # DP_Loss: the base of the losses, for a loss of one's own.
    assert isinstance(LL.DP_TauCategoricalCrossentropy(2.0), LL.DP_Loss)

    class Half(LL.DP_Loss):
        def call(self, y_true, y_pred):
            return 0.5 * keras.ops.sum(keras.ops.abs(y_pred - y_true), axis=-1)

        def get_L(self):
            return 0.5 * math.sqrt(3)

    model = _tiny_model()
    model.compile(optimizer="sgd", loss=Half())
    (first, *_) = tdk.lipschitz.compute_gradient_bounds(model).values()
    assert first * 100 == pytest.approx(0.5 * math.sqrt(3) * 1.0)
    with pytest.raises(NotImplementedError):
        LL.DP_Loss().get_L()
    rgb = np.random.default_rng(0).random((2, 3, 3, 3)).astype("float32")
    x_yuv, y = get_colorspace_function("YUV")(rgb, "labels")
    assert y == "labels" and x_yuv.shape == rgb.shape
    x_gray, _ = get_colorspace_function("grayscale")(rgb, None)
    assert x_gray.shape == (2, 3, 3, 1)
    with pytest.raises(tdk.DPConfigError, match="colorspace='LAB'"):
        get_colorspace_function("LAB")


def test_adbench_loader_reads_a_local_copy(tmp_path):
    from torchdp_keras.lipschitz.pipeline import load_adbench_data

    folder = tmp_path / "datasets" / "Classical"
    folder.mkdir(parents=True)
    x = np.random.default_rng(0).normal(size=(30, 4)) * 3 + 1
    np.savez(folder / "toy.npz", X=x, y=np.arange(30) % 2)
    features, labels = load_adbench_data("toy", str(tmp_path))
    np.testing.assert_allclose(features, (x - x.mean()) / x.std())
    assert labels.shape == (30,)
    with pytest.raises(tdk.DPConfigError, match="redownload=True"):
        load_adbench_data("toy", str(tmp_path), redownload=True)


def test_private_clip_value_noise_scales_give_epsilon_dp():
    """Each noise term at the scale AboveThreshold needs (sensitivity: one grid step).

    Half the epsilon releases the threshold's query (Laplace, scale step / (eps/2));
    the other half runs AboveThreshold (threshold noise 2 step / (eps/2), query noise
    4 step / (eps/2); Dwork and Roth, Algorithm 1).
    """
    from torchdp_keras.lipschitz.dynamic import GRID_POINTS, private_clip_value

    class Recording:
        def __init__(self):
            self.scales = []

        def laplace(self, scale, size=None):
            self.scales.append((scale, size))
            return np.zeros(size) if size is not None else 0.0

        def integers(self, low, high):
            return low

    rng = Recording()
    upper, epsilon = 1.5, 0.8
    private_clip_value(np.array([0.2, 0.9, 1.4]), upper, epsilon, rng)
    step = upper / (GRID_POINTS - 1)
    half = epsilon / 2
    assert [s for s, _ in rng.scales] == pytest.approx(
        [step / half, 2 * step / half, 4 * step / half]
    )
    assert rng.scales[2][1] == GRID_POINTS  # one noise draw per query


# -- augmentation multiplicity -----------------------------------------------------------
def test_augmult_views_of_one_image():
    from torchdp_keras.lipschitz.augmult import (
        AugmultConfig,
        apply_augmult,
        default_augmult_config,
        padding_input,
    )

    image = np.arange(4 * 4 * 1, dtype=np.float32).reshape(4, 4, 1)
    padded = padding_input(image, 2)
    assert padded.shape == (8, 8, 1)
    np.testing.assert_array_equal(padded[2:6, 2:6], image)
    np.testing.assert_array_equal(padded[:2, 2:6], image[:2][::-1])  # mirrored border
    rng = np.random.default_rng(0)
    views, labels = apply_augmult(
        image,
        3,
        augmult=5,
        random_flip=True,
        random_crop=True,
        random_color=False,
        crop_size=(4, 4, 1),
        pad=2,
        rng=rng,
    )
    assert views.shape == (5, 4, 4, 1) and labels.tolist() == [3] * 5
    assert len({v.tobytes() for v in views}) > 1  # random crops and flips differ
    for view in views:  # every view is a window of the padded image, maybe flipped
        windows = [padded[i : i + 4, j : j + 4] for i in range(5) for j in range(5)]
        assert any(np.array_equal(view, w) or np.array_equal(view, w[:, ::-1]) for w in windows)
    same, _ = apply_augmult(
        image,
        0,
        augmult=0,
        random_flip=True,
        random_crop=True,
        random_color=False,
        crop_size=(4, 4, 1),
        pad=4,
    )
    np.testing.assert_array_equal(same[0], image)
    config = default_augmult_config(2)
    assert config == AugmultConfig(
        augmult=2, random_crop=True, random_flip=True, random_color=False, pad=4
    )
    colour = np.random.default_rng(1).random((6, 6, 3)).astype("float32")
    jittered, _ = AugmultConfig(1, False, False, True).apply(
        colour, 0, crop_size=(6, 6, 3), rng=rng
    )
    assert jittered.shape == (1, 6, 6, 3) and not np.allclose(jittered[0], colour)


def test_augmult_loader_weighs_an_example_s_views_as_one_example(mnist_path):
    ds_train, _, meta = load_and_prepare_images_data(
        "mnist",
        batch_size=64,
        bound_fct=bound_clip_value(5.0),
        multiplicity=3,
        path=mnist_path,
        seed=0,
    )
    from torchdp_keras.data.loader import unpack_poisson_batch

    x, y, weights, mask = unpack_poisson_batch(ds_train[0])
    assert len(x) == len(mask) == len(weights) and len(x) % 3 == 0
    real = mask > 0
    np.testing.assert_allclose(weights[real], 1 / 3)
    assert (weights[~real] == 0).all()
    assert np.linalg.norm(x.reshape(len(x), -1), axis=1).max() <= 5.0 * (1 + 1e-6)
    assert meta.batch_size == 64 and ds_train.expected_batch_size == 64  # examples, not views
    model = DP_Sequential(
        [
            keras.Input((28, 28, 1)),
            L.DP_BoundedInput(upper_bound=5.0),
            L.DP_Flatten(),
            L.DP_SpectralDense(10),
        ],
        dp_parameters=DPParameters("global", 1.5, 1e-5),
        dataset_metadata=meta,
    )
    model.compile(optimizer="sgd", loss=LL.DP_TauCategoricalCrossentropy(tau=4.0))
    # One example's three views, weighted 1/3: its gradient is within the example's bound.
    first = np.flatnonzero(real)[:3]
    trainable, grads, *_ = model._summed_loss_gradients(
        x[first], y[first], None, torch.as_tensor(weights[first])
    )
    bounds = tdk.lipschitz.compute_gradient_bounds(model)
    for variable, g in zip(trainable, grads):
        norm = float(np.linalg.norm(keras.ops.convert_to_numpy(g)))
        assert norm <= bounds[variable.path] * meta.batch_size * (1 + 1e-5)
    ds_train.updates_per_epoch = 2
    model.fit(ds_train, epochs=1, verbose=0)
    hand = tdk.PRVAccountant()
    hand.compose(1.5, 64 / meta.nb_samples_train, 2)
    assert model.get_epsilon() == pytest.approx(hand.get_epsilon(1e-5))
    with pytest.raises(tdk.DPConfigError, match=r"sample weights in \[0, 1\]"):
        model.train_on_batch(x[:4], y[:4], sample_weight=np.full(4, 2.0, "float32"))
