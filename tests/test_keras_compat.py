"""The installed Keras is one torchdp_keras was checked against, and every private touch point
in `torchdp_keras._keras_compat` resolves on it."""

from __future__ import annotations

import inspect

import keras
import pytest

from torchdp_keras import _keras_compat as compat


def test_installed_keras_is_in_the_checked_range():
    low, high = compat.CHECKED_KERAS_RANGE
    try:
        compat.check_keras_version()
    except compat.UnsupportedKerasVersionError as error:
        pytest.fail(
            f"Installed Keras {keras.__version__} is outside the checked range "
            f">={low},<{high}: {error}"
        )


@pytest.mark.parametrize("version", ["3.4.0", "3.10.1", "3.16.0", "4.0.0", "4.0.0rc1"])
def test_out_of_range_versions_raise_a_clear_message(version):
    low, high = compat.CHECKED_KERAS_RANGE
    with pytest.raises(compat.UnsupportedKerasVersionError) as info:
        compat.check_keras_version(version)
    message = str(info.value)
    assert version in message
    assert f">={low},<{high}" in message
    assert "pip install" in message
    assert isinstance(info.value, ImportError)


@pytest.mark.parametrize("version", ["3.11.0", "3.15.1", "3.15.2.dev2025", "3.15"])
def test_in_range_versions_pass(version):
    compat.check_keras_version(version)


def test_every_public_name_resolves():
    for name in compat.__all__:
        assert getattr(compat, name, None) is not None, name


def _model():
    inputs = keras.Input((3,))
    hidden = keras.layers.Dense(4, activity_regularizer="l2")(inputs)
    outputs = keras.layers.Dense(2, kernel_regularizer="l2")(hidden)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="sgd", loss="mse", metrics=["mae"])
    return model


def test_layer_and_model_accessors():
    model = _model()
    dense = model.layers[1]
    assert isinstance(model, compat.Functional)
    assert isinstance(model, compat.Trainer)
    assert [layer.name for layer in compat.flatten_layers(model, include_self=False)] == [
        layer.name for layer in model.layers
    ]
    assert compat.kernel_variable(dense) is dense.kernel
    assert compat.call_has_training_arg(model) is True
    assert compat.call_has_training_arg(object()) is False
    assert compat.convert_input_args(dense) in (True, False)
    assert compat.seed_generators(keras.layers.Dropout(0.5, seed=1))
    assert compat.build_shapes_dict(dense) is not None

    embedding = keras.layers.Embedding(5, 2)
    embedding.build((None, 3))
    assert compat.embeddings_variable(embedding) is embedding.embeddings

    assert isinstance(compat.graph_nodes_by_depth(model), dict)
    x = keras.ops.ones((2, 3))
    out = compat.run_through_graph(
        model, compat.standardize_graph_inputs(model, x), operation_fn=lambda op: op
    )
    assert tuple(out.shape) == (2, 2)

    sequential = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    assert isinstance(compat.sequential_graph(sequential), compat.Functional)


def test_trainer_accessors():
    model = _model()
    x, y = keras.ops.ones((4, 3)), keras.ops.zeros((4, 2))
    assert compat.needs_symbolic_build(model)
    model.evaluate(x, y, verbose=0)
    assert not compat.needs_symbolic_build(model)
    loss = compat.compile_loss(model)
    assert loss is not None and loss.built
    assert compat.compile_metrics(model) is not None
    assert {getattr(fn, "reduction", None) for _, fn, *_ in compat.compiled_losses(loss)} == {
        "sum_over_batch_size"
    }
    assert isinstance(compat.loss_tracker(model), keras.metrics.Mean)
    assert len(compat.regularization_losses(model)) == 1
    assert compat.aggregate_additional_loss(model, keras.ops.ones(())) is not None


def test_first_data_batch_takes_pairs_and_triples():
    batch = ("x", "y")
    assert compat.first_data_batch(iter([(0, 0, [batch])])) == batch
    assert compat.first_data_batch(iter([(0, iter([batch]))])) == batch
    assert compat.first_data_batch(iter([])) is None


def test_backend_names():
    tensor = keras.ops.ones((2, 3))
    compat.set_keras_mask(tensor, keras.ops.ones((2,), dtype="bool"))
    assert compat.get_keras_mask(tensor) is not None
    assert compat.standardize_data_format(None) in ("channels_last", "channels_first")
    assert str(compat.to_torch_dtype("float32")) == "torch.float32"
    variable = keras.Variable(1.0)
    with compat.StatelessScope(
        state_mapping=[(variable, keras.ops.ones(()) * 2)], collect_losses=True
    ) as scope:
        assert float(scope.get_current_value(variable)) == 2.0
        assert scope.losses == []
    with compat.AutocastScope("float16"):
        pass
    generator = keras.random.SeedGenerator(1)
    assert compat.draw_seed(generator) is not None
    assert callable(compat.keras_torch_random.torch_seed_generator)
    for name in ("conv", "max_pool", "average_pool"):
        assert callable(getattr(compat.keras_torch_nn, name))
    target = compat.channels_last_conversion_target()
    assert target is not None  # present since 3.14
    assert callable(getattr(*target))


def test_keras_functions_keep_their_signatures():
    assert compat.functional_init_arguments((1, 2), {})
    assert not compat.functional_init_arguments((), {})
    assert compat.unpack_x_y_sample_weight((1, 2, 3)) == (1, 2, 3)
    assert "custom_objects" in inspect.signature(compat.deserialize_keras_object).parameters


@pytest.mark.parametrize(
    ("method", "parameters"),
    [
        ("_symbolic_build", ["self", "iterator", "data_batch"]),
        ("test_step", ["self", "data"]),
        ("train_step", ["self", "data"]),
        ("make_train_function", ["self", "force"]),
        ("compile_from_config", ["self", "config"]),
    ],
)
def test_overridden_model_methods_keep_their_signatures(method, parameters):
    """torchdp_keras's models override these keras.Model methods and call `super()`."""
    assert list(inspect.signature(getattr(keras.Model, method)).parameters) == parameters
