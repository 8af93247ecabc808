"""TF Privacy's names, positions and module paths, as TF Privacy users write them."""

import importlib

import keras
import numpy as np
import pytest
from keras import layers

import torchdp_keras as tdk
from torchdp_keras import optimizers as dpo
from torchdp_keras.errors import DPConfigError


def _stack():
    return [keras.Input((3,)), layers.Dense(2)]


def _settings(model):
    return (model.l2_norm_clip, model.noise_multiplier, model.num_microbatches, model.use_xla)


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: tdk.DPSequential(1.0, 0.5, layers=_stack()), (1.0, 0.5, None, False)),
        (lambda: tdk.DPSequential(1.0, 0.5, 2, True, None, _stack()), (1.0, 0.5, 2, True)),
        (
            lambda: tdk.DPSequential(1.0, 0.5, None, False, None, _stack(), True, "named"),
            (1.0, 0.5, None, False),
        ),
        (
            lambda: tdk.DPSequential(_stack(), l2_norm_clip=1.0, noise_multiplier=0.5),
            (1.0, 0.5, None, False),
        ),
        (lambda: tdk.DPSequential(2.0, 1.5, num_microbatches=4), (2.0, 1.5, 4, False)),
    ],
)
def test_dp_sequential_takes_tf_privacys_positional_order_and_keras_order(make, expected):
    model = make()
    assert _settings(model) == expected
    if model.layers:
        assert len(model.layers) == 1


def test_positional_order_keeps_keras_arguments():
    model = tdk.DPSequential(1.0, 0.5, None, False, None, _stack(), True, "named")
    assert model.name == "named" and model.trainable


def test_dp_model_takes_tf_privacys_positional_order():
    inputs = keras.Input((3,))
    outputs = layers.Dense(2)(inputs)
    model = tdk.DPModel(1.0, 0.5, inputs=inputs, outputs=outputs)
    assert isinstance(model, keras.Model) and type(model).__name__ == "DPFunctional"
    assert _settings(model) == (1.0, 0.5, None, False)


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: tdk.DPSequential(_stack(), 1.0, 0.5),
            r"Received: a number in second position, 1.0, after list",
        ),
        (
            lambda: tdk.DPSequential(1.0, 0.5, l2_norm_clip=2.0),
            r"l2_norm_clip=1.0 and l2_norm_clip=2.0",
        ),
        (
            lambda: tdk.DPSequential(1.0, 0.5, 2, num_microbatches=2),
            r"num_microbatches both by position",
        ),
    ],
)
def test_ambiguous_positions_are_refused(make, message):
    with pytest.raises(DPConfigError, match=message):
        make()


def test_missing_noise_multiplier_by_position_is_a_type_error():
    with pytest.raises(TypeError, match="noise_multiplier"):
        tdk.DPSequential(1.0)


@pytest.mark.parametrize(
    "module, names",
    [
        (
            "torchdp_keras.privacy.analysis.compute_dp_sgd_privacy",
            ["compute_dp_sgd_privacy", "compute_dp_sgd_privacy_statement"],
        ),
        (
            "torchdp_keras.privacy.analysis.compute_dp_sgd_privacy_lib",
            ["compute_dp_sgd_privacy", "compute_dp_sgd_privacy_statement"],
        ),
        ("torchdp_keras.privacy.analysis.rdp_accountant", ["compute_rdp", "get_privacy_spent"]),
        (
            "torchdp_keras.privacy.optimizers.dp_optimizer",
            [
                "DPGradientDescentGaussianOptimizer",
                "DPAdamGaussianOptimizer",
                "DPAdagradGaussianOptimizer",
                "make_gaussian_optimizer_class",
            ],
        ),
        (
            "torchdp_keras.privacy.optimizers.dp_optimizer_keras",
            [
                "DPKerasSGDOptimizer",
                "DPKerasAdamOptimizer",
                "DPKerasAdagradOptimizer",
                "make_keras_optimizer_class",
            ],
        ),
        (
            "torchdp_keras.privacy.optimizers.dp_optimizer_keras_vectorized",
            [
                "VectorizedDPKerasSGDOptimizer",
                "VectorizedDPKerasAdamOptimizer",
                "VectorizedDPKerasAdagradOptimizer",
                "make_vectorized_keras_optimizer_class",
            ],
        ),
        (
            "torchdp_keras.privacy.optimizers.dp_optimizer_vectorized",
            ["VectorizedDPSGD", "VectorizedDPAdam", "VectorizedDPAdagrad"],
        ),
        (
            "torchdp_keras.privacy.keras_models.dp_keras_model",
            ["DPModel", "DPSequential", "make_dp_model_class"],
        ),
        (
            "torchdp_keras.privacy.fast_gradient_clipping.layer_registry",
            ["LayerRegistry", "make_default_layer_registry"],
        ),
    ],
)
def test_tf_privacy_module_paths_hold_tf_privacys_names(module, names):
    loaded = importlib.import_module(module)
    for name in names:
        assert callable(getattr(loaded, name)), name
    assert sorted(loaded.__all__) == sorted(names)


@pytest.mark.parametrize(
    "name, base",
    [
        ("DPGradientDescentGaussianOptimizer", dpo.DPKerasSGDOptimizer),
        ("DPAdamGaussianOptimizer", dpo.DPKerasAdamOptimizer),
        ("DPAdagradGaussianOptimizer", dpo.DPKerasAdagradOptimizer),
        ("VectorizedDPKerasSGDOptimizer", dpo.DPKerasSGDOptimizer),
        ("VectorizedDPSGD", dpo.DPKerasSGDOptimizer),
    ],
)
def test_a_dp_optimizer_in_a_plain_model_is_named_as_the_user_wrote_it(name, base):
    cls = getattr(dpo, name)
    optimizer = cls(1.0, 1.1, learning_rate=0.1)
    assert isinstance(optimizer, base)
    plain = keras.Sequential(_stack())
    plain.compile(optimizer=optimizer, loss="mse")
    before = [w.copy() for w in plain.get_weights()]
    with pytest.raises(DPConfigError, match=rf"^{name} is being built"):
        plain.fit(np.ones((4, 3)), np.ones((4, 2)), verbose=0)
    for a, b in zip(before, plain.get_weights()):
        np.testing.assert_array_equal(a, b)
    again = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(again) is cls and again.dp_settings == optimizer.dp_settings


def test_the_notebooks_compute_dp_sgd_privacy_prints_and_documents_its_conversion(capsys):
    from torchdp_keras.privacy.analysis import compute_dp_sgd_privacy

    eps, order = compute_dp_sgd_privacy.compute_dp_sgd_privacy(
        n=60000, batch_size=250, noise_multiplier=1.3, epochs=15, delta=1e-5
    )
    out = capsys.readouterr().out
    assert (round(eps, 3), order) == (0.942, 17.0)
    assert "iterated over 3600 steps satisfies differential privacy with eps = 0.942" in out
    assert "improved conversion" in out
    eps, order = compute_dp_sgd_privacy.compute_dp_sgd_privacy(
        n=60000,
        batch_size=250,
        noise_multiplier=1.3,
        epochs=15,
        delta=1e-5,
        conversion="classic",
    )
    assert "with eps = 1.18 and delta = 1e-05." in capsys.readouterr().out  # the notebook's
    assert (round(eps, 2), order) == (1.18, 17.0)
    for function in (compute_dp_sgd_privacy.compute_dp_sgd_privacy, tdk.compute_dp_sgd_privacy):
        doc = " ".join(function.__doc__.replace("*", "").split())
        assert "improved conversion" in doc and 'conversion="classic"' in doc and "1.18" in doc


def test_compute_rdp_and_get_privacy_spent_agree_with_the_accountant():
    from torchdp_keras.privacy.analysis.rdp_accountant import compute_rdp, get_privacy_spent

    orders = list(tdk.RDPAccountant().orders)
    rdp = compute_rdp(250 / 60000, 1.3, 3600, orders)
    accountant = tdk.RDPAccountant()
    accountant.compose(1.3, 250 / 60000, 3600)
    np.testing.assert_allclose(rdp, accountant.get_rdp(), rtol=1e-12)
    eps, delta, order = get_privacy_spent(orders, rdp, target_delta=1e-5)
    assert delta == 1e-5 and eps == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-12)
    # The inverse direction: at that epsilon, delta is at most the target (same order).
    eps_back, delta_back, order_back = get_privacy_spent(orders, rdp, target_eps=eps)
    assert eps_back == eps and order_back == order
    assert delta_back == pytest.approx(1e-5, rel=1e-9)
    # A larger epsilon needs a smaller delta; zero epsilon a larger one.
    assert get_privacy_spent(orders, rdp, target_eps=2 * eps)[1] < 1e-5
    assert get_privacy_spent(orders, rdp, target_eps=0.0)[1] > 1e-5
    assert compute_rdp(1.0, 1.0, 3, 2.0) == pytest.approx(3.0)
    with pytest.raises(DPConfigError, match="exactly one of target_eps and target_delta"):
        get_privacy_spent(orders, rdp)
    with pytest.raises(DPConfigError, match="one rdp value per order"):
        get_privacy_spent(orders, rdp[:3], target_delta=1e-5)


class _Residual(keras.Model):
    def __init__(self, width=2, **kwargs):
        super().__init__(**kwargs)
        self.width = width
        self.dense = layers.Dense(width)

    def call(self, x):
        return self.dense(x)


@pytest.mark.filterwarnings("ignore:torchdp_keras. only 4 training example")  # "." matches ":"
@pytest.mark.filterwarnings(r"ignore:torchdp_keras. fit\(\) on arrays trains on shuffled")
def test_make_dp_model_class():
    assert tdk.make_dp_model_class(keras.Sequential) is tdk.DPSequential
    assert tdk.make_dp_model_class(keras.Model) is tdk.DPModel
    dp_cls = tdk.make_dp_model_class(_Residual)
    assert dp_cls is tdk.make_dp_model_class(_Residual)
    assert issubclass(dp_cls, _Residual) and issubclass(dp_cls, tdk.DPModel)
    model = dp_cls(1.0, 0.0, width=2, seed=0)  # TF Privacy's order, then the class's own
    assert model.width == 2 and _settings(model) == (1.0, 0.0, None, False)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.fit(np.ones((4, 3), "float32"), np.zeros((4, 2), "float32"), batch_size=2, verbose=0)
    assert model.dp_steps == 2
    for bad in (int, tdk.DPSequential, keras.layers.Dense):
        with pytest.raises(DPConfigError, match="cls"):
            tdk.make_dp_model_class(bad)


def test_use_xla_warnings_name_use_xla():
    model = tdk.DPSequential(_stack(), l2_norm_clip=1.0, noise_multiplier=0.5, use_xla=True)
    model.compile(optimizer="sgd", loss="mse")
    with pytest.warns(UserWarning, match=r"use_xla=True compiles the per-example engine"):
        model.train_on_batch(np.ones((2, 3), "float32"), np.ones((2, 2), "float32"))
    plain = tdk.DPSequential(_stack(), l2_norm_clip=1.0, noise_multiplier=0.5)
    plain.compile(optimizer="sgd", loss="mse", jit_compile=True)
    with pytest.warns(UserWarning, match=r"jit_compile=True compiles the per-example engine"):
        plain.train_on_batch(np.ones((2, 3), "float32"), np.ones((2, 2), "float32"))
