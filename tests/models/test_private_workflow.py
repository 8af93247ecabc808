"""The op_tensorflow workflow end to end: JSON + weights, PrivateKerasModel, loader, DataFrames."""

import keras
import numpy as np
import pytest
from keras import layers

import torchdp_keras as tdk

pd = pytest.importorskip("pandas")


def _frames(n=120, seed=0):
    rng = np.random.default_rng(seed)
    x = pd.DataFrame(
        rng.normal(size=(n, 2)).astype("float32"),
        columns=["feature1", "feature2"],
        index=np.arange(1000, 1000 + n),
    )
    y = pd.Series((x["feature1"] + x["feature2"] > 0).astype("float32"), name="target")
    return x, y


@pytest.mark.filterwarnings("ignore:torchdp_keras")
def test_imported_model_trained_on_a_loader_reports_epsilon_and_predicts_frames():
    local = keras.Sequential(
        [
            keras.Input((2,)),
            layers.Dense(16, activation="relu"),
            layers.Dense(8, activation="relu"),
            layers.Dense(1, activation="sigmoid"),
        ]
    )
    model = keras.models.model_from_json(local.to_json())
    model.set_weights(local.get_weights())
    dp_model = tdk.PrivateKerasModel(model=model, l2_norm_clip=1, noise_multiplier=1.2, seed=0)
    dp_model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse", metrics=["accuracy"])
    x, y = _frames()
    loader = tdk.PrivateDataLoader(feature_df=x, label_df=y, batch_size=4, seed=0)
    history = dp_model.fit(x=loader, epochs=3, target_delta=1e-5, verbose=0)
    epsilons = history.history["epsilon"]
    assert len(epsilons) == 3 and epsilons[0] < epsilons[1] < epsilons[2]
    assert epsilons[-1] == pytest.approx(dp_model.get_epsilon(1e-5))
    # The same number as planning the run up front (30 Poisson steps per epoch, q = 4/120).
    planned = tdk.PRVAccountant()
    planned.compose(1.2, 4 / 120, 3 * 30)
    assert epsilons[-1] == pytest.approx(planned.get_epsilon(1e-5), rel=1e-6)
    # The wrapped model shares the trained weights.
    for a, b in zip(model.get_weights(), dp_model.get_weights()):
        np.testing.assert_array_equal(a, b)
    result = dp_model.predict(x=x, label_columns=["result"], verbose=0)
    assert list(result.columns) == ["result"] and (result.index == x.index).all()
    np.testing.assert_allclose(
        result["result"].to_numpy(), model.predict(x.to_numpy(), verbose=0)[:, 0], rtol=1e-6
    )


@pytest.mark.parametrize("mode", ["vmap", "fast"])
def test_private_keras_model_keeps_its_clipping_mode_and_registry(mode, tmp_path):
    registry = tdk.make_default_layer_registry()
    base = keras.Sequential([keras.Input((2,)), layers.Dense(1)])
    dp_model = tdk.make_private(
        base, l2_norm_clip=1.0, noise_multiplier=1.0, clipping_mode=mode, layer_registry=registry
    )
    assert dp_model.clipping_mode == mode and dp_model.layer_registry is registry
    dp_model.compile(optimizer="sgd", loss="mse")
    path = tmp_path / "p.keras"
    dp_model.save(path)
    assert keras.models.load_model(path).clipping_mode == mode
