"""Poisson sampling, padded batches, PrivateDataLoader, accumulation, DataFrames."""

import warnings

import keras
import numpy as np
import pandas as pd
import pytest
import torch
from keras import layers
from scipy import stats

import torchdp_keras as tdk
from torchdp_keras.accounting import PRVAccountant
from torchdp_keras.config import DPKerasConfig
from torchdp_keras.data import POISSON_BATCH_KEY, PoissonSampler, padded_size
from torchdp_keras.data.sampling_plan import SamplingPlan
from torchdp_keras.errors import DPConfigError

N, B, DRAWS = 1000, 50, 500


def test_batch_size_mean_and_variance_are_binomial():
    sampler = PoissonSampler(N, B, seed=0)
    sizes = np.array([len(sampler.sample(0, step)) for step in range(DRAWS)])
    q = B / N
    mean, var = N * q, N * q * (1 - q)
    assert abs(sizes.mean() - mean) < 4 * np.sqrt(var / DRAWS)
    assert abs(sizes.var(ddof=1) - var) < 4 * var * np.sqrt(2 / (DRAWS - 1))


def test_inclusion_counts_pass_a_chi_square_test():
    sampler = PoissonSampler(N, B, seed=1)
    counts = np.zeros(N)
    for step in range(DRAWS):
        counts[sampler.sample(0, step)] += 1
    q = B / N
    expected, var = DRAWS * q, DRAWS * q * (1 - q)
    statistic = np.sum((counts - expected) ** 2 / var)
    p_value = stats.chi2.sf(statistic, df=N)
    # Two-sided: a sampler that spreads examples too evenly (shuffling) fails too.
    assert 1e-4 < p_value < 1 - 1e-4


def test_same_seed_same_batches_in_any_order():
    a, b, c = (
        PoissonSampler(N, B, seed=3),
        PoissonSampler(N, B, seed=3),
        PoissonSampler(N, B, seed=4),
    )
    later_first = b.sample(2, 7)
    assert np.array_equal(a.sample(0, 0), b.sample(0, 0))
    assert np.array_equal(a.sample(2, 7), later_first)
    assert not np.array_equal(a.sample(0, 0), c.sample(0, 0))
    assert not np.array_equal(a.sample(0, 0), a.sample(0, 1))
    assert not np.array_equal(PoissonSampler(N, B).sample(0, 0), PoissonSampler(N, B).sample(0, 0))


def test_padded_sizes_are_few_buckets():
    assert [padded_size(s, 64, 1000) for s in (0, 1, 8, 9, 61, 70)] == [8, 8, 8, 16, 64, 72]
    assert padded_size(1000, 64, 1000) == 1000
    sampler = PoissonSampler(10000, 256, seed=0)
    shapes = {padded_size(len(sampler.sample(0, s)), 256, 10000) for s in range(200)}
    assert len(shapes) <= 6


def _frame(n=200, seed=0):
    rng = np.random.default_rng(seed)
    x = pd.DataFrame(rng.normal(size=(n, 4)).astype("float32"), columns=list("abcd"))
    y = pd.Series(rng.normal(size=n).astype("float32"), name="target")
    return x, y


def test_loader_batches_are_padded_with_a_mask_and_cover_the_epoch():
    x, y = _frame()
    loader = tdk.PrivateDataLoader(feature_df=x, label_df=y, batch_size=20, seed=0)
    assert len(loader) == 10 and loader.sampling_probability == 0.1
    batch = loader[0][POISSON_BATCH_KEY]
    real = int(batch["mask"].sum())
    assert batch["x"].shape[0] == batch["y"].shape[0] == batch["mask"].shape[0] >= real
    assert np.all(batch["mask"][:real] == 1) and np.all(batch["mask"][real:] == 0)
    assert batch["x"].shape[0] == padded_size(real, 20, 200)
    first_epoch = loader[3][POISSON_BATCH_KEY]["x"]
    loader.on_epoch_end()
    assert not np.array_equal(loader[3][POISSON_BATCH_KEY]["x"], first_epoch)


# torch.from_numpy of pandas' read-only (copy-on-write) array: torch warns that it is not writable.
@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable:UserWarning")
@pytest.mark.parametrize(
    "features",
    [
        lambda x: x.to_numpy(),
        lambda x: torch.from_numpy(x.to_numpy()),
        lambda x: {"a": x[["a", "b"]], "b": x[["c", "d"]].to_numpy()},
    ],
    ids=["numpy", "torch", "dict"],
)
def test_loader_accepts_arrays_tensors_and_dicts(features):
    x, y = _frame()
    loader = tdk.PrivateDataLoader(features(x), y.to_numpy(), batch_size=20, seed=0)
    assert loader.num_examples == 200
    loader[0]


def test_loader_validation():
    x, y = _frame()
    with pytest.raises(DPConfigError, match="same number of rows"):
        tdk.PrivateDataLoader(x, y.iloc[:10], batch_size=10)
    with pytest.raises(DPConfigError, match="batch_size=0"):
        tdk.PrivateDataLoader(x, y, batch_size=0)
    with pytest.raises(DPConfigError, match="expected_batch_size=400, num_examples=200"):
        tdk.PrivateDataLoader(x, y, batch_size=100, gradient_accumulation_steps=4)


def _dp_model(noise=0.0, seed=0):
    model = tdk.DPSequential(
        [keras.Input((4,)), layers.Dense(3, activation="tanh"), layers.Dense(1)],
        l2_norm_clip=1.0,
        noise_multiplier=noise,
        seed=seed,
    )
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse", metrics=["mae"])
    return model


def test_fit_on_loader_accounts_what_the_sampler_did():
    x, y = _frame()
    model = _dp_model(noise=1.0)
    loader = tdk.PrivateDataLoader(x, y, batch_size=20, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "not Poisson" warning on this path
        history = model.fit(loader, epochs=2, target_delta=1e-5, verbose=0)
    assert model.dp_steps == 20
    assert model.accountant.history == [(1.0, 0.1, 20)]
    by_hand = PRVAccountant()
    by_hand.compose(1.0, 0.1, 20)
    assert history.history["epsilon"][-1] == pytest.approx(by_hand.get_epsilon(1e-5))


def _poisson_batch(x, y, mask):
    return {POISSON_BATCH_KEY: {"x": x, "y": y, "mask": mask.astype("float32")}}


def test_padding_rows_change_nothing_even_when_not_finite():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 4)).astype("float32")
    y = rng.normal(size=(5, 1)).astype("float32")
    loader = tdk.PrivateDataLoader(x, y, batch_size=5)
    plain, padded = _dp_model(), _dp_model()
    padded.set_weights(plain.get_weights())
    for model in (plain, padded):
        model._use_sampling_plan(SamplingPlan.from_loader(loader))
    plain.train_on_batch(_poisson_batch(x, y, np.ones(5)))
    junk_x = np.concatenate([x, np.full((3, 4), np.nan, "float32")])
    junk_y = np.concatenate([y, np.full((3, 1), 1e30, "float32")])
    padded.train_on_batch(_poisson_batch(junk_x, junk_y, np.r_[np.ones(5), np.zeros(3)]))
    for a, b in zip(plain.get_weights(), padded.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert np.isfinite(padded.get_metrics_result()["loss"])


def test_update_is_normalised_by_the_expected_batch_size():
    x = np.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0]], dtype="float32")
    y = np.array([[1.0], [1.0]], dtype="float32")
    base = keras.Sequential(
        [keras.Input((4,)), layers.Dense(1, use_bias=False, kernel_initializer="zeros")]
    )
    model = tdk.make_private(base, l2_norm_clip=100.0, noise_multiplier=0.0)
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    loader = tdk.PrivateDataLoader(np.zeros((40, 4), "float32"), np.zeros((40, 1)), batch_size=8)
    model._use_sampling_plan(SamplingPlan.from_loader(loader))
    model.train_on_batch(_poisson_batch(x, y, np.ones(2)))
    # per-example gradients are -2 y x; their sum over the *expected* batch of 8
    np.testing.assert_allclose(base.get_weights()[0][:, 0], [2 / 8, 2 / 8, 0, 0], rtol=1e-6)


def test_empty_draws_still_take_a_noisy_step():
    x, y = _frame(n=100)
    model = _dp_model(noise=1.0)
    loader = tdk.PrivateDataLoader(x, y, batch_size=1, seed=0)  # q = 0.01: many empty draws
    sizes = [int(loader[i][POISSON_BATCH_KEY]["mask"].sum()) for i in range(len(loader))]
    assert 0 in sizes
    before = model.get_weights()
    model.fit(loader, epochs=1, target_delta=1e-5, verbose=0)
    assert model.dp_steps == 100
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    model._use_sampling_plan(SamplingPlan.from_loader(loader))
    logs = model.train_on_batch(
        _poisson_batch(x.to_numpy()[:8], y.to_numpy()[:8], np.zeros(8)), return_dict=True
    )
    assert np.all(np.isfinite(list(logs.values())))


def _config(**changes):
    values = dict(
        epsilon=float("inf"),
        delta=1e-5,
        clipping_norm=1.0,
        batch_size=16,
        gradient_accumulation_steps=4,
        train_steps=100,
        train_size=64,
        noise_multiplier=0.0,
        rescale_to_unit_norm=False,
    )
    values.update(changes)
    return DPKerasConfig(**values)


def test_accumulating_4_batches_of_16_equals_one_step_of_64():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = rng.normal(size=(64, 1)).astype("float32")
    weights = {}
    init = None
    for batch, steps in ((16, 4), (64, 1)):
        base = keras.Sequential(
            [keras.Input((4,)), layers.Dense(3, activation="tanh"), layers.Dense(1)]
        )
        init = init or base.get_weights()
        base.set_weights(init)
        model = tdk.make_private(base, _config(batch_size=batch, gradient_accumulation_steps=steps))
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(x, y, epochs=1, shuffle=False, verbose=0)
        assert model.dp_steps == 1
        assert model.accountant.history == [(0.0, 1.0, 1)]
        weights[batch] = base.get_weights()
    for a, b in zip(weights[16], weights[64]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_poisson_sampling_in_fit_with_accumulation():
    x, y = _frame(n=400)
    config = DPKerasConfig(
        epsilon=10.0,
        delta=1e-5,
        clipping_norm=1.0,
        batch_size=10,
        gradient_accumulation_steps=2,
        train_steps=40,
        train_size=400,
        poisson_sampling_in_fit=True,
        seed=5,
    )
    model = tdk.make_private(keras.Sequential([keras.Input((4,)), layers.Dense(1)]), config)
    model.compile(optimizer="sgd", loss="mse")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        history = model.fit(x, y, epochs=1, verbose=0)
    assert model.dp_steps == 20  # 40 physical batches, one update per 2
    assert model.accountant.history == [(model.noise_multiplier, 0.05, 20)]
    by_hand = PRVAccountant()
    by_hand.compose(model.noise_multiplier, 0.05, 20)
    assert history.history["epsilon"][0] == pytest.approx(by_hand.get_epsilon(1e-5))
    with pytest.raises(DPConfigError, match="validation_split"):
        model.fit(x, y, epochs=1, validation_split=0.1, verbose=0)


def test_loader_must_match_the_config():
    x, y = _frame()
    model = tdk.make_private(
        keras.Sequential([keras.Input((4,)), layers.Dense(1)]),
        _config(train_size=200, gradient_accumulation_steps=1),
    )
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(DPConfigError, match=r"batch_size=\(20, 16\)"):
        model.fit(tdk.PrivateDataLoader(x, y, batch_size=20), verbose=0)


class _UserSampled(keras.utils.PyDataset):
    def __init__(self, x, y):
        super().__init__()
        self.x, self.y = x, y

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return self.x[i * 16 : (i + 1) * 16], self.y[i * 16 : (i + 1) * 16]


# torch.from_numpy of pandas' read-only (copy-on-write) array: torch warns that it is not writable.
@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable:UserWarning")
# keras's fit(shuffle=True), its default, on a torch DataLoader, which it cannot shuffle.
@pytest.mark.filterwarnings("ignore:`shuffle=True` was passed, but will be ignored:UserWarning")
def test_user_sampled_inputs_are_used_as_they_are_with_a_warning():
    x, y = _frame(n=64)
    model = tdk.make_private(
        keras.Sequential([keras.Input((4,)), layers.Dense(1)]),
        _config(gradient_accumulation_steps=1),
    )
    model.compile(optimizer="sgd", loss="mse")
    with pytest.warns(UserWarning, match="without resampling"):
        model.fit(_UserSampled(x.to_numpy(), y.to_numpy()), epochs=1, verbose=0)
    assert model.dp_steps == 4
    assert model.accountant.history == [(0.0, 16 / 64, 4)]
    torch_loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(
            torch.from_numpy(x.to_numpy()), torch.from_numpy(y.to_numpy())
        ),
        batch_size=16,
    )
    model.fit(torch_loader, epochs=1, verbose=0)
    assert model.dp_steps == 8


def test_dataframe_predictions_with_label_columns():
    x, y = _frame()
    model = _dp_model()
    frame = model.predict(x.iloc[10:15], label_columns=["score"], verbose=0)
    assert isinstance(frame, pd.DataFrame)
    assert list(frame.columns) == ["score"] and list(frame.index) == list(range(10, 15))
    np.testing.assert_allclose(
        frame["score"].to_numpy(), model.predict(x.to_numpy()[10:15], verbose=0)[:, 0], rtol=1e-6
    )
    loader = tdk.PrivateDataLoader(x, y, batch_size=20)
    assert model.predict(loader, verbose=0).shape == (200, 1)
    assert list(model.predict(x, verbose=0).columns) == [0]
    with pytest.raises(DPConfigError, match="label_columns=\\['a', 'b'\\]"):
        model.predict(x, label_columns=["a", "b"], verbose=0)


def test_microbatch_size_bounds_the_chunk_the_engine_differentiates(monkeypatch):
    x, y = _frame(n=64)
    model = tdk.make_private(
        keras.Sequential([keras.Input((4,)), layers.Dense(1)]),
        _config(gradient_accumulation_steps=1, batch_size=64, microbatch_size=8),
        clipping_mode="vmap",
    )
    model.compile(optimizer="sgd", loss="mse")
    engine = model._get_dp_engine()
    seen = []
    original = engine._run_chunk

    def spy(trainable, non_trainable, x_chunk, *args):
        seen.append(int(x_chunk.shape[0]))
        return original(trainable, non_trainable, x_chunk, *args)

    monkeypatch.setattr(engine, "_run_chunk", spy)
    model.train_on_batch(x.to_numpy(), y.to_numpy())
    assert seen == [8] * 8


@pytest.mark.filterwarnings("ignore:torchdp_keras. only 40 training example")  # "." matches ":"
@pytest.mark.parametrize("mode", ["auto", "vmap"])
def test_a_poisson_loader_trains_a_per_position_language_model_loss(mode):
    """The loader's padding weights are per example; the loss is per example and position."""
    rng = np.random.default_rng(0)
    tokens = keras.Input((6,), dtype="int32")
    logits = keras.layers.Dense(9)(keras.layers.Embedding(9, 4)(tokens))
    model = tdk.DPModel(
        inputs=tokens,
        outputs=logits,
        l2_norm_clip=1.0,
        noise_multiplier=0.0,
        clipping_mode=mode,
    )
    model.compile(
        optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    x = rng.integers(0, 9, (40, 6)).astype("int32")
    y = rng.integers(0, 9, (40, 6)).astype("int32")
    history = model.fit(tdk.PrivateDataLoader(x, y, batch_size=8, seed=0), verbose=0)
    assert model.dp_steps == 5 and np.isfinite(history.history["loss"][-1])
