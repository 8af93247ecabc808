"""Property-based tests of `PoissonSampler` and `PrivateDataLoader`: invalid arguments are
refused by name; draws are unique, in range and reproducible; batches are what they say.
"""

from __future__ import annotations

import numpy as np
from hypothesis import event, given
from hypothesis import strategies as st
from properties import (  # noqa: F401
    HUGE_INT,
    _assert_clean_error,
    _call,
    _int_at_least,
    _is_bool,
    _settings,
    anything,
    maybe,
)

from torchdp_keras.data import PoissonSampler, PrivateDataLoader, padded_size
from torchdp_keras.data.loader import POISSON_BATCH_KEY


# -- PoissonSampler and PrivateDataLoader ------------------------------------------------------
def _sampler_errors(n, expected, seed, secure_mode) -> set[str]:
    bad = set()
    if not _int_at_least(n, 1):
        bad.add("num_examples")
    if not _int_at_least(expected, 1):
        bad.add("expected_batch_size")
    if not bad and expected > n:
        bad.update({"expected_batch_size", "num_examples"})
    if seed is not None and not _int_at_least(seed, 0):
        bad.add("seed")
    if not _is_bool(secure_mode):
        bad.add("secure_mode")
    elif secure_mode and seed is not None:
        bad.update({"secure_mode", "seed"})
    return bad


@_settings(max_examples=150)
@given(
    n=maybe(st.integers(64, 2**70) | st.integers(1, 64), weight=5),
    expected=maybe(st.integers(1, 64), weight=5),
    seed=maybe(st.none() | st.integers(0, HUGE_INT), weight=5),
    secure_mode=maybe(st.just(False), junk=anything | st.just(True), weight=5),
)
def test_poisson_sampler_refuses_invalid_arguments(n, expected, seed, secure_mode):
    bad = _sampler_errors(n, expected, seed, secure_mode)
    event("invalid" if bad else "valid")
    sampler, error = _call(PoissonSampler, n, expected, seed=seed, secure_mode=secure_mode)
    if bad:
        assert error is not None, f"accepted invalid {sorted(bad)}"
        _assert_clean_error(error, bad)
    else:
        assert error is None, error
        assert sampler.num_examples == n and sampler.expected_batch_size == expected
        assert sampler.sampling_probability == expected / n
        assert 0 < sampler.sampling_probability <= 1


def _check_draw(indices, n):
    assert indices.ndim == 1 and np.issubdtype(indices.dtype, np.integer)
    assert len(np.unique(indices)) == len(indices), "repeated indices"
    assert np.all(np.diff(indices) > 0), "not sorted"
    assert len(indices) == 0 or (indices[0] >= 0 and indices[-1] < n), "out of range"


@_settings(max_examples=40)
@given(
    n=st.integers(1, 3000),
    data=st.data(),
    seed=st.integers(0, 2**64) | st.just(HUGE_INT),
    epoch=st.integers(0, 5),
    step=st.integers(0, 10**6),
)
def test_poisson_draws_are_unique_in_range_and_reproducible(n, data, seed, epoch, step):
    expected = data.draw(st.integers(1, n), label="expected")
    sampler = PoissonSampler(n, expected, seed=seed)
    draw = sampler.sample(epoch, step)
    _check_draw(draw, n)
    again = PoissonSampler(n, expected, seed=seed).sample(epoch, step)
    np.testing.assert_array_equal(draw, again)
    if expected == n:
        np.testing.assert_array_equal(draw, np.arange(n))  # q == 1 takes everything
    secure = PoissonSampler(n, expected, secure_mode=True).sample(epoch, step)
    _check_draw(secure, n)


def _loader_errors(rows, label_rows, batch_size, accumulation, steps, seed, secure_mode):
    bad = set()
    if label_rows is not None and label_rows != rows:
        bad.add("label_df")
    if not _int_at_least(batch_size, 1):
        bad.add("batch_size")
    if not _int_at_least(accumulation, 1):
        bad.add("gradient_accumulation_steps")
    if rows == 0 and "label_df" not in bad:
        bad.update({"num_examples", "feature_df"})
    if not bad and batch_size * accumulation > rows:
        bad.add("batch_size")  # "expected_batch_size <= num_examples"
    if steps is not None and not _int_at_least(steps, 1):
        bad.add("steps_per_epoch")
    bad |= _sampler_errors(max(rows, 1), 1, seed, secure_mode) - {"num_examples"}
    return bad


@_settings(max_examples=80)
@given(
    rows=st.integers(36, 120) | st.integers(0, 35),
    label_rows=st.sampled_from([None, None, "same", "other"]),
    batch_size=maybe(st.integers(1, 12), weight=6),
    accumulation=maybe(st.integers(1, 3), weight=6),
    steps=maybe(st.none() | st.integers(1, 4), weight=6),
    seed=maybe(st.none() | st.integers(0, 2**64), weight=6),
    secure_mode=maybe(st.just(False), weight=6),
)
def test_private_data_loader_batches(
    rows, label_rows, batch_size, accumulation, steps, seed, secure_mode
):
    label_rows = {"same": rows, "other": rows + 1}.get(label_rows)
    x = np.arange(rows, dtype="float32").reshape(rows, 1)
    y = None if label_rows is None else np.arange(label_rows)
    bad = _loader_errors(rows, label_rows, batch_size, accumulation, steps, seed, secure_mode)
    event("invalid" if bad else "valid")

    def make():
        return PrivateDataLoader(
            x, y, batch_size, seed=seed, gradient_accumulation_steps=accumulation,
            steps_per_epoch=steps, secure_mode=secure_mode,
        )  # fmt: skip

    loader, error = _call(make)
    if bad:
        assert error is not None, f"accepted invalid {sorted(bad)}"
        _assert_clean_error(error, bad)
        return
    assert error is None, error
    assert loader.sampling_probability == batch_size * accumulation / rows
    assert len(loader) == loader.updates_per_epoch * accumulation
    twin = make() if seed is not None else None
    for update in range(min(loader.updates_per_epoch, 3)):
        seen = []
        for part in range(accumulation):
            batch = loader[update * accumulation + part][POISSON_BATCH_KEY]
            mask = batch["mask"]
            real = mask == 1
            assert set(np.unique(mask)) <= {0.0, 1.0}
            assert np.all(real[: real.sum()]), "padding is not at the end"
            assert len(mask) == padded_size(int(real.sum()), batch_size, rows)
            indices = batch["x"][real, 0].astype(int)
            seen.append(indices)
            np.testing.assert_array_equal(batch["x"][~real, 0], 0.0)  # padding repeats row 0
            if y is not None:
                np.testing.assert_array_equal(batch["y"][real], indices)
            if twin is not None:
                other = twin[update * accumulation + part][POISSON_BATCH_KEY]
                for key in batch:
                    np.testing.assert_array_equal(batch[key], other[key])
        _check_draw(np.concatenate(seen), rows)  # the update's draw, split in order
