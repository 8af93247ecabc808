"""The DPLayer bounds of the Lipschitz layers and the gradient bounds of their losses.

Every check is made one example at a time with plain `torch.autograd` on
`<v, layer(x)>` (a slow, obviously-correct reference): the output norm, the
input-gradient norm and the weight-gradient norm must not exceed what the
layer reports, for inputs of norm up to the bound (some exactly at it, some
tiny, one zero), output gradients of norm up to the bound, and weights that
`project()` left (starting from random, unconstrained values).
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import torch

import torchdp_keras as tdk
from torchdp_keras.errors import DPConfigError
from torchdp_keras.lipschitz.layers import (
    DP_AddBias,
    DP_BoundedInput,
    DP_Flatten,
    DP_FullSort,
    DP_GroupSort,
    DP_Lambda,
    DP_LayerCentering,
    DP_MaxPool2D,
    DP_Permute,
    DP_QuickFrobeniusDense,
    DP_QuickSpectralConv2D,
    DP_QuickSpectralDense,
    DP_ReLU,
    DP_Reshape,
    DP_ScaledGlobalL2NormPooling2D,
    DP_ScaledL2NormPooling1D,
    DP_ScaledL2NormPooling2D,
    DP_SpectralConv2D,
    DP_SpectralDense,
    DPLayer,
    spectral_projection,
)
from torchdp_keras.lipschitz.losses import (
    DP_KCosineSimilarity,
    DP_MeanAbsoluteError,
    DP_MulticlassHinge,
    DP_MulticlassHKR,
    DP_MulticlassKR,
    DP_TauBCE,
    DP_TauCategoricalCrossentropy,
)

RTOL = 1e-5  # the largest relative slack any bound check allows


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The tensors here are tiny: one intra-op thread is several times faster."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _norm(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t.detach().double()))


def _random_batch(shape, bound: float, seed: int, n: int = 10) -> torch.Tensor:
    """`n` examples of `shape` with norms: bound (x3), uniform in (0, bound), tiny, zero."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *shape), generator=gen, dtype=torch.float64)
    norms = torch.rand(n, generator=gen, dtype=torch.float64) * bound
    norms[:3] = bound
    norms[-2] = bound * 1e-6
    norms[-1] = 0.0
    flat = x.reshape(n, -1)
    flat = flat / flat.norm(dim=1, keepdim=True) * norms[:, None]
    return flat.reshape(x.shape).float()


def _built(layer: keras.layers.Layer, shape) -> keras.layers.Layer:
    layer(torch.zeros((1, *shape)))
    return layer


def _randomize_weights(layer: keras.layers.Layer, seed: int, scale: float = 3.0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for w in layer.trainable_weights:
        w.assign(scale * torch.randn(tuple(w.shape), generator=gen))


def _check_bounds_per_example(layer, x: torch.Tensor, input_bound: float, gradient_bound: float):
    """Checks the three bounds of `layer`, one example at a time. Returns the largest ratios."""
    prop = layer.propagate_inputs(input_bound)
    back_in = layer.backpropagate_inputs(input_bound, gradient_bound)
    back_params = layer.backpropagate_params(input_bound, gradient_bound)
    weights = [w.value for w in layer.trainable_weights]
    gen = torch.Generator().manual_seed(7)
    ratios = [0.0, 0.0, 0.0]
    for i in range(x.shape[0]):
        xi = x[i : i + 1].clone().requires_grad_(True)
        y = layer(xi)
        out_norm = _norm(y)
        assert out_norm <= prop * (1 + RTOL), (i, out_norm, prop)
        v = torch.randn(y.shape, generator=gen, dtype=torch.float64)
        v_norm = (
            gradient_bound if i % 2 == 0 else gradient_bound * float(torch.rand(1, generator=gen))
        )
        v = (v / v.norm() * v_norm).to(y.dtype)
        grads = torch.autograd.grad((v * y).sum(), [xi, *weights], allow_unused=True)
        gx = grads[0] if grads[0] is not None else torch.zeros_like(xi)
        gx_norm = _norm(gx)
        assert gx_norm <= back_in * (1 + RTOL), (i, gx_norm, back_in)
        gw_sq = sum(float(g.double().square().sum()) for g in grads[1:] if g is not None)
        gw_norm = math.sqrt(gw_sq)
        assert gw_norm <= back_params * (1 + RTOL), (i, gw_norm, back_params)
        ratios = [
            max(ratios[0], out_norm / prop if prop else 0.0),
            max(ratios[1], gx_norm / back_in if back_in else 0.0),
            max(ratios[2], gw_norm / back_params if back_params else 0.0),
        ]
    return ratios


# (id, factory, input shape, randomize the weights before project())
LAYER_CASES = [
    ("bounded_vec", lambda: DP_BoundedInput(max_norm=1.0), (6,), False),
    ("bounded_img", lambda: DP_BoundedInput(max_norm=2.5), (3, 3, 2), False),
    ("dense_tall", lambda: DP_SpectralDense(5), (8,), True),
    ("dense_wide", lambda: DP_SpectralDense(6), (4,), True),
    ("dense_3d", lambda: DP_SpectralDense(5), (3, 4), True),
    ("dense_init", lambda: DP_SpectralDense(5), (8,), False),
    ("conv_k3_same", lambda: DP_SpectralConv2D(3, 3), (6, 6, 2), True),
    ("conv_k3_s2_same", lambda: DP_SpectralConv2D(3, 3, strides=2), (7, 7, 2), True),
    ("conv_k23_s21_valid", lambda: DP_SpectralConv2D(4, (2, 3), (2, 1), "valid"), (6, 5, 2), True),
    (
        "conv_k2_s2_valid",
        lambda: DP_SpectralConv2D(3, 2, strides=2, padding="valid"),
        (4, 4, 2),
        True,
    ),
    ("conv_k1", lambda: DP_SpectralConv2D(2, 1), (3, 3, 3), True),
    ("conv_init", lambda: DP_SpectralConv2D(3, 3), (5, 5, 2), False),
    ("groupsort2", lambda: DP_GroupSort(2), (8,), False),
    ("groupsort_whole_axis", lambda: DP_GroupSort(), (8,), False),
    ("groupsort3_img", lambda: DP_GroupSort(3), (2, 2, 6), False),
    ("fullsort", lambda: DP_FullSort(), (7,), False),
    ("fullsort_3d", lambda: DP_FullSort(), (2, 5), False),
    ("flatten", lambda: DP_Flatten(), (3, 4), False),
    ("reshape", lambda: DP_Reshape((6, 2)), (3, 4), False),
    ("permute", lambda: DP_Permute((2, 1)), (3, 4), False),
    ("l2pool2", lambda: DP_ScaledL2NormPooling2D(), (4, 6, 2), False),
    ("l2pool3_leftover_eps", lambda: DP_ScaledL2NormPooling2D(3, eps=0.1), (7, 8, 1), False),
    ("l2pool_21", lambda: DP_ScaledL2NormPooling2D((2, 1), strides=(2, 1)), (4, 3, 2), False),
    ("global_l2pool", lambda: DP_ScaledGlobalL2NormPooling2D(), (3, 4, 2), False),
    ("global_l2pool_eps", lambda: DP_ScaledGlobalL2NormPooling2D(eps=0.05), (3, 4, 2), False),
    ("bias_vec", lambda: DP_AddBias(norm_max=0.5), (5,), True),
    ("bias_img", lambda: DP_AddBias(norm_max=2.0), (2, 3, 4), True),
    ("centering_vec", lambda: DP_LayerCentering(), (6,), False),
    ("centering_img", lambda: DP_LayerCentering(), (3, 3, 2), False),
    (
        "centering_img_pixelwise",
        lambda: DP_LayerCentering(pixelwise=True, channelwise=False),
        (3, 3, 2),
        False,
    ),
    ("relu", lambda: DP_ReLU(), (3, 4), False),
    ("leaky_relu", lambda: DP_ReLU(negative_slope=0.3), (7,), False),
    ("maxpool", lambda: DP_MaxPool2D(), (4, 5, 3), False),
    ("maxpool_same", lambda: DP_MaxPool2D(pool_size=3, padding="same"), (4, 5, 2), False),
    ("l2pool1d", lambda: DP_ScaledL2NormPooling1D(), (3, 5), False),
    ("l2pool1d_axis1", lambda: DP_ScaledL2NormPooling1D(axis=1, eps=0.01), (3, 5), False),
    (
        "l2pool2d_deel_lip_args",
        lambda: DP_ScaledL2NormPooling2D(
            pool_size=(2, 2), data_format="channels_last", k_coef_lip=2.0, eps_grad_sqrt=1e-6
        ),
        (4, 4, 2),
        False,
    ),
    ("lambda_sign_flip", lambda: DP_Lambda(lambda x: -x), (6,), False),
    ("quick_dense", lambda: DP_QuickSpectralDense(5, nm_coef=2.0), (8,), True),
    ("quick_frobenius", lambda: DP_QuickFrobeniusDense(4), (6,), True),
    ("quick_conv", lambda: DP_QuickSpectralConv2D(3, 3, strides=2), (5, 5, 2), True),
    ("quick_conv_plain", lambda: DP_QuickSpectralConv2D(2, 2, orthogonal=False), (4, 4, 3), True),
]


@pytest.mark.parametrize(
    "factory, shape, randomize", [c[1:] for c in LAYER_CASES], ids=[c[0] for c in LAYER_CASES]
)
@pytest.mark.parametrize("input_bound, gradient_bound", [(1.0, 1.0), (3.0, 0.3)])
def test_bounds_hold_per_example(factory, shape, randomize, input_bound, gradient_bound):
    layer = _built(factory(), shape)
    assert isinstance(layer, DPLayer)
    if randomize:
        _randomize_weights(layer, seed=len(shape) + 11)
    layer.project()
    assert layer.has_parameters() == bool(layer.trainable_weights)
    if not layer.has_parameters():
        assert layer.backpropagate_params(input_bound, gradient_bound) == 0.0
    x = _random_batch(shape, input_bound, seed=sum(shape))
    _check_bounds_per_example(layer, x, input_bound, gradient_bound)


@pytest.mark.parametrize(
    "factory, shape",
    [
        (lambda: DP_SpectralDense(4), (6,)),
        (lambda: DP_SpectralConv2D(3, 3, strides=2), (5, 5, 2)),
        (lambda: DP_AddBias(norm_max=0.5), (2, 3)),
    ],
)
def test_bounds_hold_in_float64(float64, factory, shape):
    layer = factory()
    layer(torch.zeros((1, *shape), dtype=torch.float64))
    _randomize_weights(layer, seed=2)
    layer.project()
    assert all(w.dtype == "float64" for w in layer.trainable_weights)
    x = _random_batch(shape, 2.0, seed=1).double()
    _check_bounds_per_example(layer, x, 2.0, 0.5)


def test_bounded_input_projects_onto_the_ball():
    layer = _built(DP_BoundedInput(max_norm=1.5), (4,))
    x = _random_batch((4,), 4.0, seed=3)
    y = layer(x)
    for xi, yi in zip(x, y):
        if _norm(xi) > 1.5:
            assert _norm(yi) == pytest.approx(1.5, rel=1e-6)
            np.testing.assert_allclose(yi * _norm(xi) / 1.5, xi, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_allclose(yi, xi, rtol=0, atol=0)
    assert layer.propagate_inputs(4.0) == 1.5
    assert layer.propagate_inputs(1.0) == 1.0


def test_dense_params_bound_is_tight_and_propagation_nearly_attained():
    layer = _built(DP_SpectralDense(5), (8,))
    _randomize_weights(layer, seed=5)
    layer.project()
    w = layer.kernel.value.detach().double()
    u, s, _ = torch.linalg.svd(w)
    x = (u[:, 0] * 2.0).float()[None].requires_grad_(True)  # top singular direction, norm 2
    y = layer(x)
    assert _norm(y) <= layer.propagate_inputs(2.0) * (1 + RTOL)
    assert _norm(y) >= 0.99 * 2.0  # Bjorck made the singular values ~1
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(y.shape, generator=gen)
    v = v / v.norm() * 0.7
    (gw,) = torch.autograd.grad((v * y).sum(), [layer.kernel.value])
    assert _norm(gw) == pytest.approx(layer.backpropagate_params(2.0, 0.7), rel=1e-5)


def test_dense_3d_params_bound_attained_by_aligned_positions():
    layer = _built(DP_SpectralDense(3), (4, 5))
    gen = torch.Generator().manual_seed(1)
    a = torch.rand(4, generator=gen) + 0.1
    u = torch.randn(5, generator=gen)
    u = u / u.norm()
    vdir = torch.randn(3, generator=gen)
    vdir = vdir / vdir.norm()
    x = (a[:, None] * u[None]) / a.norm() * 1.3  # x_t = a_t u, ||x|| = 1.3
    g = (a[:, None] * vdir[None]) / a.norm() * 0.4  # g_t = a_t v, ||g|| = 0.4
    y = layer(x[None])
    (gw,) = torch.autograd.grad((g[None] * y).sum(), [layer.kernel.value])
    assert _norm(gw) == pytest.approx(layer.backpropagate_params(1.3, 0.4), rel=1e-5)


def test_bias_params_bound_attained_by_equal_gradients():
    layer = _built(DP_AddBias(norm_max=1.0), (2, 3, 4))
    g = torch.ones((1, 2, 3, 4)) * 0.1
    y = layer(torch.zeros((1, 2, 3, 4)))
    (gb,) = torch.autograd.grad((g * y).sum(), [layer.bias.value])
    assert _norm(gb) == pytest.approx(layer.backpropagate_params(1.0, _norm(g)), rel=1e-5)
    assert layer.propagate_inputs(1.0) == pytest.approx(1.0 + math.sqrt(6) * 1.0)


def test_bias_projection():
    layer = _built(DP_AddBias(norm_max=0.5), (3,))
    layer.bias.assign(torch.tensor([0.1, -0.2, 0.3]))
    layer.project()  # inside the ball: unchanged
    np.testing.assert_array_equal(layer.bias.numpy(), np.array([0.1, -0.2, 0.3], np.float32))
    layer.bias.assign(torch.tensor([30.0, -40.0, 0.0]))
    layer.project()
    assert float(np.linalg.norm(layer.bias.numpy().astype(np.float64))) <= 0.5
    np.testing.assert_allclose(layer.bias.numpy(), [0.3, -0.4, 0.0], rtol=1e-5)


def test_pooling_propagation_is_attained_at_zero_input():
    layer = _built(DP_ScaledL2NormPooling2D(2, eps=0.25), (4, 6, 3))
    n = 2 * 3 * 3
    assert layer.propagate_inputs(0.0) == pytest.approx(math.sqrt(n * 0.25))
    assert _norm(layer(torch.zeros((1, 4, 6, 3)))) == pytest.approx(math.sqrt(n * 0.25), rel=1e-6)
    glob = _built(DP_ScaledGlobalL2NormPooling2D(eps=0.25), (4, 6, 3))
    assert glob.propagate_inputs(2.0) == pytest.approx(math.sqrt(4.0 + 3 * 0.25))


def test_pooling_bounds_need_a_built_layer():
    with pytest.raises(ValueError, match="built"):
        DP_ScaledL2NormPooling2D().propagate_inputs(1.0)
    with pytest.raises(ValueError, match="built"):
        DP_AddBias(1.0).propagate_inputs(1.0)


def test_pooling_values():
    x = torch.arange(1.0, 1 + 4 * 4 * 2).reshape(1, 4, 4, 2)
    y = _built(DP_ScaledL2NormPooling2D(2), (4, 4, 2))(x)
    xn = x.numpy()[0]
    expected = np.sqrt(
        (xn.reshape(2, 2, 2, 2, 2) ** 2).sum(axis=(1, 3)) + 1e-12
    )  # (ho, ph, wo, pw, c)
    np.testing.assert_allclose(y.detach().numpy()[0], expected, rtol=1e-6)
    g = _built(DP_ScaledGlobalL2NormPooling2D(), (4, 4, 2))(x)
    np.testing.assert_allclose(g.detach().numpy()[0], np.sqrt((xn**2).sum(axis=(0, 1))), rtol=1e-6)


def test_sort_and_centering_values():
    x = torch.tensor([[3.0, 1.0, -2.0, 5.0, 0.0, 0.0]])
    np.testing.assert_array_equal(
        _built(DP_GroupSort(2), (6,))(x).numpy(), [[1.0, 3.0, -2.0, 5.0, 0.0, 0.0]]
    )
    np.testing.assert_array_equal(
        _built(DP_GroupSort(3), (6,))(x).numpy(), [[-2.0, 1.0, 3.0, 0.0, 0.0, 5.0]]
    )
    np.testing.assert_array_equal(
        _built(DP_FullSort(), (6,))(x).numpy(), [[-2.0, 0.0, 0.0, 1.0, 3.0, 5.0]]
    )
    np.testing.assert_allclose(_built(DP_LayerCentering(), (6,))(x).numpy(), x.numpy() - 7 / 6)
    img = torch.randn(2, 3, 3, 2)
    # deel-lipdp's default (channelwise): each pixel over its channels.
    centred = _built(DP_LayerCentering(), (3, 3, 2))(img)
    np.testing.assert_allclose(centred.numpy().mean(axis=3), 0.0, atol=1e-6)
    centred = _built(DP_LayerCentering(pixelwise=True, channelwise=False), (3, 3, 2))(img)
    np.testing.assert_allclose(centred.numpy().mean(axis=(1, 2)), 0.0, atol=1e-6)
    centred = _built(DP_LayerCentering(channelwise=False), (3, 3, 2))(img)
    np.testing.assert_allclose(centred.numpy().mean(axis=(1, 2, 3)), 0.0, atol=1e-6)
    with pytest.raises(DPConfigError, match="pixelwise=True, channelwise=True"):
        DP_LayerCentering(pixelwise=True)
    # A vector is centred within the example, never over the batch (deel-lipdp's axis 0).
    batch = torch.randn(4, 6)
    out = _built(DP_LayerCentering(), (6,))(batch).numpy()
    np.testing.assert_allclose(out[0], (batch[0] - batch[0].mean()).numpy(), atol=1e-6)
    layer = DP_LayerCentering(pixelwise=True, channelwise=False)
    again = DP_LayerCentering.from_config(layer.get_config())
    assert (again.pixelwise, again.channelwise) == (True, False)


# ---------------------------------------------------------------- spectral projection


def test_spectral_projection_dense_exact_svd():
    for seed, shape in [(0, (8, 5)), (1, (4, 6)), (2, (30, 30)), (3, (1, 7))]:
        layer = _built(DP_SpectralDense(shape[1]), (shape[0],))
        _randomize_weights(layer, seed=seed, scale=10.0)
        assert float(torch.linalg.matrix_norm(layer.kernel.value.detach().double(), 2)) > 1.0
        layer.project()
        svals = torch.linalg.svdvals(layer.kernel.value.detach().double())
        assert float(svals.max()) <= 1.0  # exact, not only up to 1e-3
        assert float(svals.min()) >= 0.99  # orthonormal within the 1e-2 tolerance


def test_spectral_projection_helper_edge_cases():
    zero = torch.zeros(3, 4)
    assert torch.equal(spectral_projection(zero), zero)
    with pytest.raises(FloatingPointError):
        spectral_projection(torch.full((2, 2), float("nan")))
    # No Bjorck: a pure rescaling by the exact spectral norm.
    m = torch.diag(torch.tensor([4.0, 2.0]))
    np.testing.assert_allclose(spectral_projection(m, 0).numpy(), np.diag([1.0, 0.5]), rtol=2e-6)


def _power_iteration(fn, shape, iters: int = 250) -> float:
    """Largest singular value of the linear map `fn` by power iteration on `fn^T fn`."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    x = x / x.norm()
    sigma = 0.0
    for _ in range(iters):
        xr = x.clone().requires_grad_(True)
        y = fn(xr)
        (ata,) = torch.autograd.grad(y, xr, grad_outputs=y.detach())
        sigma = math.sqrt(_norm(ata))
        x = ata / ata.norm()
    return sigma


@pytest.mark.parametrize(
    "kwargs, shape, tight",
    [
        ({"filters": 3, "kernel_size": 3}, (6, 6, 2), False),
        ({"filters": 4, "kernel_size": 3, "strides": 2}, (7, 7, 2), False),
        (
            {"filters": 2, "kernel_size": (2, 3), "strides": (2, 1), "padding": "valid"},
            (6, 5, 3),
            False,
        ),
        ({"filters": 3, "kernel_size": 2, "strides": 2, "padding": "valid"}, (4, 4, 2), True),
        ({"filters": 3, "kernel_size": 1}, (3, 3, 4), True),
    ],
)
def test_spectral_conv_operator_norm_by_power_iteration(kwargs, shape, tight):
    layer = _built(DP_SpectralConv2D(**kwargs), shape)
    _randomize_weights(layer, seed=4, scale=5.0)
    layer.project()
    k_mat = layer.kernel.value.detach().double().reshape(-1, kwargs["filters"])
    assert float(torch.linalg.matrix_norm(k_mat, 2)) <= 1.0
    sigma = _power_iteration(layer.call, (1, *shape))  # call(): the map without Keras overhead
    assert sigma <= 1.0 + 1e-3
    if tight:  # windows do not overlap (m = 1): the layer is exactly the kernel matrix per patch
        assert sigma >= 0.99


def test_spectral_conv_overlap_factor_and_dilation():
    assert DP_SpectralConv2D(2, 3).overlap == 9
    assert DP_SpectralConv2D(2, 3, strides=2).overlap == 4
    assert DP_SpectralConv2D(2, (5, 2), strides=(2, 3)).overlap == 3
    with pytest.raises(DPConfigError, match="dilation_rate"):
        DP_SpectralConv2D(2, 3, dilation_rate=2)


@pytest.mark.parametrize(
    "factory, shape",
    [
        (lambda: DP_SpectralDense(5), (8,)),
        (lambda: DP_SpectralDense(7), (3,)),
        (lambda: DP_SpectralConv2D(3, 3), (5, 5, 2)),
    ],
)
def test_projection_keeps_constrained_weights(factory, shape):
    layer = _built(factory(), shape)
    x = _random_batch(shape, 1.0, seed=2)
    # (a) projecting twice: the second projection leaves the output unchanged.
    _randomize_weights(layer, seed=9)
    layer.project()
    before = layer(x).detach()
    layer.project()
    np.testing.assert_allclose(layer(x).detach(), before, rtol=1e-5, atol=1e-6)
    # (b) an exactly orthogonal kernel is (up to the 1e-6 margin) a fixed point.
    rows = math.prod(layer.kernel.shape[:-1])
    cols = layer.kernel.shape[-1]
    gen = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols), generator=gen).double())
    q = q if rows >= cols else q.T
    layer.kernel.assign(q.float().reshape(tuple(layer.kernel.shape)))
    before = layer(x).detach()
    layer.project()
    np.testing.assert_allclose(layer(x).detach(), before, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- losses


def _one_hot(labels: np.ndarray, k: int) -> torch.Tensor:
    return torch.tensor(np.eye(k, dtype=np.float32)[labels])


def _logit_cases(k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    cases = [torch.randn(6, k, generator=gen) * s for s in (1e-8, 1e-3, 1.0, 30.0, 1e4)]
    cases.append(torch.zeros(2, k))  # all tied
    tied = torch.randn(2, k, generator=gen)
    tied[:, 1] = tied[:, 0] = tied.max() + 1.0  # two tied maxima
    cases.append(tied)
    return torch.cat(cases)


def _check_loss_gradients(loss, z: torch.Tensor, y: torch.Tensor) -> float:
    """Per example: `||d loss_i / d z_i|| <= get_L()`. Returns the largest ratio."""
    bound = loss.get_L()
    worst = 0.0
    for i in range(z.shape[0]):
        zi = z[i : i + 1].clone().requires_grad_(True)
        li = loss.call(y[i : i + 1], zi)
        assert tuple(li.shape) == (1,)
        (g,) = torch.autograd.grad(li.sum(), zi)
        assert torch.isfinite(g).all()
        gnorm = _norm(g)
        assert gnorm <= bound * (1 + RTOL), (i, gnorm, bound)
        worst = max(worst, gnorm / bound)
    return worst


LOSS_CASES = [
    ("tau0.5", lambda: DP_TauCategoricalCrossentropy(0.5)),
    ("tau10", lambda: DP_TauCategoricalCrossentropy(10.0)),
    ("tau100", lambda: DP_TauCategoricalCrossentropy(100.0)),
    ("hkr", lambda: DP_MulticlassHKR()),
    ("hkr_a0", lambda: DP_MulticlassHKR(alpha=0.0, min_margin=0.5)),
    ("hkr_a2", lambda: DP_MulticlassHKR(alpha=2.0, min_margin=3.0)),
    ("cos1", lambda: DP_KCosineSimilarity()),
    ("cos0.1", lambda: DP_KCosineSimilarity(K=0.1)),
    ("cos5", lambda: DP_KCosineSimilarity(K=5.0)),
    ("mae", lambda: DP_MeanAbsoluteError()),
    ("hinge", lambda: DP_MulticlassHinge(min_margin=2.0)),
    ("kr", lambda: DP_MulticlassKR()),
    ("tau_bce", lambda: DP_TauBCE(tau=3.0)),
]


@pytest.mark.parametrize("factory", [c[1] for c in LOSS_CASES], ids=[c[0] for c in LOSS_CASES])
@pytest.mark.parametrize("k", [2, 5])
def test_loss_gradient_bounded_by_get_L(factory, k):
    loss = factory()
    z = _logit_cases(k, seed=k)
    labels = np.random.default_rng(k).integers(0, k, size=z.shape[0])
    y = _one_hot(labels, k)
    _check_loss_gradients(loss, z, y)
    if isinstance(loss, DP_MeanAbsoluteError):
        _check_loss_gradients(loss, z, z.clone())  # z == y: ties of |.|


def test_kcosine_norm_at_K_and_tiny():
    loss = DP_KCosineSimilarity(K=2.0)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(4, 3, generator=gen)
    z = z / z.norm(dim=1, keepdim=True) * torch.tensor([[2.0], [1e-10], [2.0 + 1e-6], [0.0]])
    y = _one_hot(np.array([0, 1, 2, 0]), 3)
    worst = _check_loss_gradients(loss, z, y)
    assert worst >= 0.5  # inside the floor the gradient is -u / K: of norm exactly 1 / K


def test_mae_on_higher_rank_targets():
    loss = DP_MeanAbsoluteError()
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(3, 2, 3, generator=gen)
    y = torch.randn(3, 2, 3, generator=gen)
    per_example = loss.call(y, z)
    assert tuple(per_example.shape) == (3,)
    np.testing.assert_allclose(
        per_example.numpy(), (z - y).abs().numpy().mean(axis=(1, 2)), rtol=1e-6
    )
    _check_loss_gradients(loss, z, y)


def test_hkr_and_tau_bounds_are_attained():
    # KR alone attains sqrt(2) with two classes: deel-lipdp's alpha + 1 would be exceeded.
    kr = DP_MulticlassHKR(alpha=0.0, min_margin=1.0)
    z = torch.tensor([[0.0, 0.5]], requires_grad=True)
    (g,) = torch.autograd.grad(kr.call(_one_hot(np.array([0]), 2), z).sum(), z)
    assert _norm(g) == pytest.approx(math.sqrt(2), rel=1e-6) and _norm(g) > 0.0 + 1.0
    for alpha in (1.0, 10.0):
        hkr = DP_MulticlassHKR(alpha=alpha, min_margin=4.0)
        # With one output (binary labels) KR has gradient norm 1 and the hinge 1 too.
        z = torch.tensor([[0.5]], requires_grad=True)
        (g,) = torch.autograd.grad(hkr.call(torch.ones(1, 1), z).sum(), z)
        assert _norm(g) == pytest.approx(1.0 + alpha, rel=1e-6) and _norm(g) <= hkr.get_L()
    tau = DP_TauCategoricalCrossentropy(5.0)
    z = torch.tensor([[-10.0, 10.0, 0.0]], requires_grad=True)
    (g,) = torch.autograd.grad(tau.call(_one_hot(np.array([0]), 3), z).sum(), z)
    assert _norm(g) == pytest.approx(tau.get_L(), rel=1e-6)


def _np_softmax(a):
    e = np.exp(a - a.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_loss_values_match_numpy():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(4, 3)).astype(np.float32) * 3
    labels = np.array([0, 2, 1, 1])
    y = np.eye(3, dtype=np.float32)[labels]
    zt, yt = torch.tensor(z), torch.tensor(y)
    z64 = z.astype(np.float64)

    for tau in (0.5, 4.0):
        expected = -np.log(_np_softmax(tau * z64)[np.arange(4), labels]) / tau
        got = DP_TauCategoricalCrossentropy(tau).call(yt, zt).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-5)
        reduced = DP_TauCategoricalCrossentropy(tau)(yt, zt)
        np.testing.assert_allclose(float(reduced), expected.mean(), rtol=1e-5)

    alpha, margin = 3.0, 1.5
    expected_hinge, expected_kr = [], []
    for zi, c in zip(z64, labels):
        sign = -np.ones(3)
        sign[c] = 1.0
        expected_hinge.append(np.maximum(0.0, margin / 2 - sign * zi).mean())  # deel-lip's
        expected_kr.append(zi[c] - np.delete(zi, c).mean())
    expected_hinge, expected_kr = np.array(expected_hinge), np.array(expected_kr)
    got = DP_MulticlassHKR(alpha, margin).call(yt, zt).numpy()
    np.testing.assert_allclose(got, alpha * expected_hinge - expected_kr, rtol=1e-5, atol=1e-6)
    got = DP_MulticlassHinge(margin).call(yt, zt).numpy()
    np.testing.assert_allclose(got, expected_hinge, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(DP_MulticlassKR().call(yt, zt).numpy(), expected_kr, rtol=1e-5)
    # deel-lip's batch-normalised KR equals the per-example one on a balanced batch.
    balanced = np.eye(3)[[0, 1, 2]]
    b, n_pos = 3, balanced.sum(0)
    deel = (b * z64[:3] * (balanced / n_pos - (1 - balanced) / (b - n_pos))).mean(axis=1)
    got = DP_MulticlassKR().call(torch.tensor(balanced), zt[:3].double()).numpy()
    np.testing.assert_allclose(got, deel, rtol=1e-6)
    bce = DP_TauBCE(tau=2.0).call(yt, zt).numpy()
    sig = 1 / (1 + np.exp(-2.0 * z64))
    expected = -(y * np.log(sig) + (1 - y) * np.log(1 - sig)).mean(axis=1) / 2.0
    np.testing.assert_allclose(bce, expected, rtol=1e-5)

    for k in (0.5, 10.0):
        # deel-lipdp: both y and z divided by max(norm, K); K**2 stored as loss.K.
        y_scaled = y * 2.0
        y_n = y_scaled / np.maximum(np.linalg.norm(y_scaled, axis=1, keepdims=True), k)
        expected = -(y_n * z64).sum(axis=1) / np.maximum(np.linalg.norm(z64, axis=1), k)
        loss = DP_KCosineSimilarity(k)
        np.testing.assert_allclose(loss.call(yt * 2.0, zt).numpy(), expected, rtol=1e-5)
        assert loss.K == pytest.approx(k**2) and loss.get_L() == pytest.approx(1 / k)
    assert float(DP_KCosineSimilarity().call(torch.zeros(1, 3), zt[:1])[0]) == 0.0

    expected = np.abs(z64 - y).mean(axis=1)
    np.testing.assert_allclose(DP_MeanAbsoluteError().call(yt, zt).numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("factory", [c[1] for c in LOSS_CASES], ids=[c[0] for c in LOSS_CASES])
def test_loss_serialization_round_trip(factory):
    loss = factory()
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(restored) is type(loss)
    assert restored.get_config() == loss.get_config()
    assert restored.get_L() == loss.get_L()


# ---------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    "factory, argument",
    [
        (lambda: DP_BoundedInput(max_norm=-1), "max_norm"),
        (lambda: DP_BoundedInput(max_norm=float("inf")), "max_norm"),
        (lambda: DP_SpectralDense(units=0), "units"),
        (lambda: DP_SpectralDense(units=2.5), "units"),
        (lambda: DP_SpectralDense(4, bjorck_iterations=-1), "bjorck_iterations"),
        (lambda: DP_SpectralConv2D(filters=0, kernel_size=3), "filters"),
        (lambda: DP_SpectralConv2D(2, kernel_size=0), "kernel_size"),
        (lambda: DP_SpectralConv2D(2, 3, strides=(1, 0)), "strides"),
        (lambda: DP_SpectralConv2D(2, 3, padding="causal"), "padding"),
        (lambda: DP_SpectralConv2D(2, 3, dilation_rate=(1, 2)), "dilation_rate"),
        (lambda: DP_GroupSort(n=0), "n"),
        (lambda: DP_GroupSort(group_size=0), "n"),
        (lambda: DP_GroupSort(2, group_size=2), "n"),
        (lambda: DP_BoundedInput(upper_bound=0.0), "upper_bound"),
        (lambda: DP_BoundedInput(upper_bound=1.0, max_norm=1.0), "upper_bound"),
        (lambda: DP_ScaledL2NormPooling2D(pool_size=2, strides=1), "strides"),
        (lambda: DP_ScaledL2NormPooling2D(padding="same"), "padding"),
        (lambda: DP_ScaledL2NormPooling2D(eps=-1.0), "eps"),
        (lambda: DP_ScaledGlobalL2NormPooling2D(eps=0), "eps"),
        (lambda: DP_AddBias(norm_max=0), "norm_max"),
        (lambda: DP_TauCategoricalCrossentropy(tau=0), "tau"),
        (lambda: DP_MulticlassHKR(alpha=-1.0), "alpha"),
        (lambda: DP_MulticlassHKR(min_margin=0.0), "min_margin"),
        (lambda: DP_KCosineSimilarity(K=-2.0), "K"),
    ],
)
def test_bad_arguments_raise_dp_config_error(factory, argument):
    with pytest.raises(DPConfigError, match=rf"\b{argument}="):
        factory()


def test_group_sort_needs_divisible_last_axis():
    with pytest.raises(DPConfigError, match="n=3"):
        _built(DP_GroupSort(3), (8,))


def test_deel_lipdp_pooling_and_activation_options():
    with pytest.raises(DPConfigError, match="strides=1"):
        DP_MaxPool2D(pool_size=2, strides=1)
    with pytest.raises(DPConfigError, match="negative_slope=2"):
        DP_ReLU(negative_slope=2)
    with pytest.raises(DPConfigError, match="eps_grad_sqrt"):
        DP_ScaledL2NormPooling2D(eps=1e-6, eps_grad_sqrt=1e-6)
    with pytest.raises(DPConfigError, match="data_format='channels_first'"):
        DP_ScaledL2NormPooling2D(data_format="channels_first")
    pool = _built(DP_ScaledL2NormPooling2D(k_coef_lip=2.0), (4, 4, 1))
    x = torch.ones(1, 4, 4, 1)
    np.testing.assert_allclose(np.asarray(pool(x)), 2 * np.sqrt(4 + pool.eps), rtol=1e-6)
    assert pool.backpropagate_inputs(1.0, 0.5) == 1.0
    again = DP_ScaledL2NormPooling2D.from_config(pool.get_config())
    assert again.k_coef_lip == 2.0
    assert _built(DP_ScaledL2NormPooling1D(), (3, 5)).compute_output_shape((None, 3, 5)) == (
        None,
        3,
    )


# float() of a kernel, which requires grad: torch warns.
@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True:UserWarning")
def test_quick_layers_take_deel_lipdp_arguments():
    frob = _built(DP_QuickFrobeniusDense(4, nm_coef=2.0), (6,))
    _randomize_weights(frob, seed=1, scale=5.0)
    frob.project()
    assert float(torch.linalg.vector_norm(frob.kernel.value.double())) <= 1.0
    frob.project()  # idempotent on the ball
    assert frob.nm_coef == 2.0
    conv = DP_QuickSpectralConv2D(filters=4, kernel_size=3, orthogonal=False)
    assert conv.bjorck_iterations == 0 and conv.orthogonal is False
    again = DP_QuickSpectralConv2D.from_config(conv.get_config())
    assert again.orthogonal is False and again.bjorck_iterations == 0
    with pytest.raises(DPConfigError, match="activation='relu'"):
        DP_QuickSpectralDense(4, activation="relu")
    with pytest.raises(DPConfigError, match="use_bias=True"):
        DP_QuickSpectralDense(4, use_bias=True)


def test_certified_spectral_bound_is_an_upper_bound_and_tight_near_orthonormal():
    from torchdp_keras.lipschitz.layers.spectral import certified_spectral_bound

    gen = torch.Generator().manual_seed(0)
    for shape in [(40, 30), (30, 40), (200, 7)]:
        m = torch.randn(shape, generator=gen)
        exact = float(torch.linalg.matrix_norm(m.double(), 2))
        assert certified_spectral_bound(m) >= exact
        q, _ = torch.linalg.qr(torch.randn(max(shape), min(shape), generator=gen).double())
        q = q if shape[0] >= shape[1] else q.T
        assert 1.0 <= certified_spectral_bound(q.float()) <= 1.0 + 1e-5


def test_lambda_that_grows_an_example_is_refused():
    layer = DP_Lambda(lambda x: 2 * x)
    with pytest.raises(tdk.DPError, match="increased an example's norm"):
        layer(torch.ones(2, 3))


def test_group_sort_default_sorts_the_whole_axis_as_deel_lip():
    layer = DP_GroupSort()
    x = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    np.testing.assert_array_equal(np.asarray(layer(x)), [[0.0, 1.0, 2.0, 3.0]])
    assert layer.n == 4 and DP_GroupSort(2)(x).tolist() == [[1.0, 3.0, 0.0, 2.0]]
    assert DP_GroupSort.from_config(DP_GroupSort(2).get_config()).n == 2


# deel-lipdp's layers take input_shape, which keras discourages (with a warning).
@pytest.mark.filterwarnings("ignore:Do not pass an `input_shape`/`input_dim` argument:UserWarning")
def test_bounded_input_takes_deel_lipdp_arguments():
    layer = DP_BoundedInput(input_shape=(3,), upper_bound=2.0)
    assert layer.upper_bound == layer.max_norm == 2.0 and layer.propagate_inputs(None) == 2.0
    x = torch.tensor([[3.0, 4.0, 0.0], [0.3, 0.4, 0.0]])
    np.testing.assert_allclose(np.asarray(layer(x)), [[1.2, 1.6, 0.0], [0.3, 0.4, 0.0]])
    trusting = DP_BoundedInput(upper_bound=1.0, enforce_clipping=False)
    np.testing.assert_array_equal(np.asarray(trusting(x[1:])), np.asarray(x[1:]))
    # Unlike deel-lipdp, an input above the bound is an error, not weaker privacy.
    with pytest.raises(tdk.DPError, match="norm 5 > upper_bound=1"):
        trusting(x)
    again = DP_BoundedInput.from_config(trusting.get_config())
    assert again.upper_bound == 1.0 and again.enforce_clipping is False


def test_kcosine_axis_other_than_the_last_is_refused():
    with pytest.raises(DPConfigError, match="axis=0"):
        DP_KCosineSimilarity(axis=0)


# ---------------------------------------------------------------- saving


def test_sequential_saves_and_loads(tmp_path):
    model = keras.Sequential(
        [
            keras.Input((8, 8, 2)),
            DP_BoundedInput(1.0),
            DP_SpectralConv2D(4, 3),
            DP_GroupSort(2),
            DP_ScaledL2NormPooling2D(2),
            DP_LayerCentering(),
            DP_AddBias(0.3),
            DP_SpectralConv2D(4, 2, strides=2, padding="valid"),
            DP_FullSort(),
            DP_Flatten(),
            DP_SpectralDense(6),
            DP_Reshape((3, 2)),
            DP_Permute((2, 1)),
            DP_Flatten(),
            DP_SpectralDense(3),
        ]
    )
    for layer in model.layers:
        if layer.trainable_weights:
            _randomize_weights(layer, seed=1, scale=0.5)
            layer.project()
    model.compile(optimizer="sgd", loss=DP_MulticlassHKR(alpha=5.0, min_margin=0.5))
    x = _random_batch((8, 8, 2), 2.0, seed=0)
    expected = model.predict(x, verbose=0)
    path = tmp_path / "lipschitz.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), expected, rtol=1e-6, atol=1e-7)
    assert [type(a) for a in loaded.layers] == [type(b) for b in model.layers]
    assert loaded.loss.get_config() == model.loss.get_config()
    bound = 2.0
    for a, b in zip(loaded.layers, model.layers):
        assert a.propagate_inputs(bound) == pytest.approx(b.propagate_inputs(bound))
        bound = b.propagate_inputs(bound)

    glob = keras.Sequential([keras.Input((4, 4, 3)), DP_ScaledGlobalL2NormPooling2D(eps=0.01)])
    glob.save(tmp_path / "glob.keras")
    loaded = keras.models.load_model(tmp_path / "glob.keras")
    assert loaded.layers[0].propagate_inputs(1.0) == pytest.approx(math.sqrt(1 + 3 * 0.01))
    np.testing.assert_allclose(
        loaded.predict(x[:, :4, :4, :1].repeat(1, 1, 1, 3), verbose=0),
        glob.predict(x[:, :4, :4, :1].repeat(1, 1, 1, 3), verbose=0),
    )
