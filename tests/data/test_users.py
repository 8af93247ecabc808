"""User-level DP-SGD: `UserDataLoader`, per-user clipping in both engines, user-level accounting."""

import keras
import numpy as np
import pytest
import torch

import torchdp_keras as tdk
from torchdp_keras.accounting import PRVAccountant
from torchdp_keras.data import POISSON_BATCH_KEY, UserDataLoader
from torchdp_keras.errors import DPConfigError


def _data(num_users=60, seed=0):
    """Users with 1 to 6 examples each, interleaved in the dataset."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 7, size=num_users)
    users = np.repeat(np.arange(num_users), counts)
    rng.shuffle(users)
    x = rng.normal(size=(len(users), 4)).astype("float32")
    y = rng.normal(size=(len(users), 1)).astype("float32")
    return x, y, users


def _model(mode, clip, noise=0.0, seed=0):
    model = tdk.DPSequential(
        [keras.Input((4,)), keras.layers.Dense(3, activation="tanh"), keras.layers.Dense(1)],
        l2_norm_clip=clip,
        noise_multiplier=noise,
        clipping_mode=mode,
        seed=seed,
    )
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    return model


def _user_gradient(model, x, y):
    """The gradient of the mean loss of one user's examples, by plain autograd (float64)."""
    weights = [
        torch.tensor(v.numpy(), dtype=torch.float64, requires_grad=True)
        for v in model.trainable_variables
    ]
    k1, b1, k2, b2 = weights
    h = torch.tanh(torch.as_tensor(x, dtype=torch.float64) @ k1 + b1)
    loss = ((h @ k2 + b2 - torch.as_tensor(y, dtype=torch.float64)) ** 2).mean()
    return [g.numpy() for g in torch.autograd.grad(loss, weights)]


@pytest.mark.parametrize("mode", ["fast", "vmap"])
@pytest.mark.parametrize("clip", [0.05, 100.0])
def test_each_user_is_one_clipping_unit_and_its_removal_moves_the_sum_by_at_most_c(mode, clip):
    x, y, users = _data()
    loader = UserDataLoader(x, y, batch_size=12, user_ids=users, max_examples_per_user=4, seed=1)
    model = _model(mode, clip)
    model.build((None, 4))
    batch = loader[0][POISSON_BATCH_KEY]
    m = loader.unit_size
    units = len(batch["mask"]) // m
    engine = model._get_dp_engine()

    def clipped_sum(mask):
        result = engine.clipped_batch(
            batch["x"], batch["y"], batch["sample_weight"] * mask,
            num_units=units, l2_norm_clip=clip, rng_seed=0, unit_mask=mask,
        )  # fmt: skip
        return [t.detach().double().numpy() for t in result.summed]

    full = clipped_sum(batch["mask"])
    # Reference: every sampled user's mean gradient over its own rows, clipped, summed.
    expected = [np.zeros(v.shape) for v in model.trainable_variables]
    present = [u for u in range(units) if batch["mask"][u * m : (u + 1) * m].any()]
    assert len(present) >= 3
    for u in present:
        rows = np.flatnonzero(batch["mask"][u * m : (u + 1) * m]) + u * m
        grads = _user_gradient(model, batch["x"][rows], batch["y"][rows])
        norm = np.sqrt(sum(float((g**2).sum()) for g in grads))
        expected = [e + g * min(1.0, clip / norm) for e, g in zip(expected, grads)]
    for got, want in zip(full, expected):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)
    # Removing one user, whatever its number of examples, moves the sum by <= C.
    for u in present[:3]:
        mask = batch["mask"].copy()
        mask[u * m : (u + 1) * m] = 0
        without = clipped_sum(mask)
        moved = np.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(full, without)))
        assert moved <= clip * (1 + 1e-5)


@pytest.mark.parametrize("choice", ["first", "random"])
def test_users_are_poisson_sampled_and_contribute_at_most_m_examples(choice):
    x, y, users = _data(num_users=200, seed=3)
    loader = UserDataLoader(
        x, y, batch_size=20, user_ids=users, max_examples_per_user=3,
        example_choice=choice, seed=5,
    )  # fmt: skip
    assert loader.sampling_probability == pytest.approx(0.1)
    draws = 400
    counts = np.zeros(loader.num_users)
    chosen_sets = {}
    for key in range(draws):
        drawn = loader._sampler.sample(0, key)
        counts[drawn] += 1
        for user in drawn[:5]:
            rows = loader.user_examples(int(user), key)
            own = loader._user_rows[int(user)]
            assert len(rows) == min(len(own), 3) and len(set(rows)) == len(rows)
            assert set(rows) <= set(own)
            if choice == "first":
                np.testing.assert_array_equal(rows, own[:3])
            elif len(own) > 3:
                chosen_sets.setdefault(int(user), set()).add(tuple(rows))
    expected = draws * 0.1
    # Each user's inclusion count is Binomial(400, 0.1): mean 40, sd 6. The total over
    # 200 users has sd 85; a wrong q (e.g. 0.11) moves it by 800.
    assert abs(counts.sum() - 200 * expected) < 5 * np.sqrt(200 * draws * 0.1 * 0.9)
    assert counts.min() > expected - 6 * 6 and counts.max() < expected + 6 * 6
    if choice == "random":  # a user with more than m examples contributes varying subsets
        assert any(len(subsets) > 1 for subsets in chosen_sets.values())


def test_user_level_fit_accounts_users_and_says_so():
    x, y, users = _data(num_users=100, seed=4)
    loader = UserDataLoader(x, y, batch_size=10, user_ids=users, max_examples_per_user=2, seed=0)
    model = _model("auto", 1.0, noise=1.1)
    history = model.fit(loader, epochs=2, target_delta=1e-4, verbose=0)
    assert model.privacy_unit == "user" and model.dp_steps == 20
    assert "user_epsilon" in history.history and "epsilon" not in history.history
    ledger = model.privacy_ledger
    assert ledger.sampling_probability == pytest.approx(10 / 100)
    assert ledger.train_size == 100  # the users, for the default delta
    reference = PRVAccountant()
    reference.compose(1.1, 0.1, 20)
    assert model.get_epsilon(1e-4) == pytest.approx(reference.get_epsilon(1e-4), rel=1e-9)
    assert history.history["user_epsilon"][-1] == pytest.approx(model.get_epsilon(1e-4))
    example_level = tdk.PrivateDataLoader(x, y, batch_size=10)
    with pytest.raises(DPConfigError, match="user-level privacy"):
        model.fit(example_level, epochs=1, verbose=0)


def test_user_loader_refuses_bad_arguments_by_name():
    x, y, users = _data(num_users=30)
    with pytest.raises(DPConfigError, match="user_ids"):
        UserDataLoader(x, y, batch_size=5, user_ids=users[:-1], max_examples_per_user=2)
    with pytest.raises(DPConfigError, match="max_examples_per_user"):
        UserDataLoader(x, y, batch_size=5, user_ids=users, max_examples_per_user=0)
    with pytest.raises(DPConfigError, match="example_choice"):
        UserDataLoader(x, y, batch_size=5, user_ids=users, max_examples_per_user=2,
                       example_choice="last")  # fmt: skip
    with pytest.raises(DPConfigError, match="number of users"):
        UserDataLoader(x, y, batch_size=31, user_ids=users, max_examples_per_user=2)


def test_lipschitz_models_refuse_user_batches():
    from torchdp_keras.lipschitz import DatasetMetadata, DP_Sequential, DPParameters
    from torchdp_keras.lipschitz import layers as L
    from torchdp_keras.lipschitz.losses import DP_MeanAbsoluteError

    x, y, users = _data(num_users=40)
    loader = UserDataLoader(x, y, batch_size=5, user_ids=users, max_examples_per_user=2)
    metadata = DatasetMetadata(
        input_shape=(4,), nb_classes=1, nb_samples_train=len(x), nb_samples_test=0,
        class_names=["y"], nb_steps_per_epochs=len(x) // 5, batch_size=5, max_norm=1.0,
    )  # fmt: skip
    model = DP_Sequential(
        [keras.Input((4,)), L.DP_BoundedInput(upper_bound=1.0), L.DP_SpectralDense(1)],
        dp_parameters=DPParameters(noisify_strategy="global", noise_multiplier=1.0, delta=1e-3),
        dataset_metadata=metadata,
    )
    model.compile(optimizer="sgd", loss=DP_MeanAbsoluteError())
    with pytest.raises(DPConfigError, match="user"):
        model.fit(loader, epochs=1, verbose=0)
