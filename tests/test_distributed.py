"""Data-parallel DP training with torch.distributed: two gloo processes on loopback.

Each scenario runs tests/distributed_worker.py on two ranks and compares what
they wrote with a single-process reference computed here from the same
builders: with sigma = 0 one update equals the single-process update on the
union of the shards; with sigma > 0 the update's noise std is sigma * C /
B_global (not sqrt(2) times that); the ranks stay bit-identical; every
Poisson-sampled example goes to exactly one rank; epsilon is the
single-process epsilon; a rank that dies mid-step fails the job.
"""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch.distributed

from torchdp_keras.data import PoissonSampler

sys.path.insert(0, os.path.dirname(__file__))
import distributed_worker as worker  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)
WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(scenario, tmp_path, timeout=240):
    env = dict(
        os.environ,
        KERAS_BACKEND="torch",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        WORLD_SIZE="2",
        OMP_NUM_THREADS="1",
    )
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, scenario, str(tmp_path)],
            env=dict(env, RANK=str(rank)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            proc.kill()
    return [proc.returncode for proc in procs], outputs


@pytest.fixture(scope="module")
def main_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    codes, outputs = _launch("main", out)
    assert codes == [0, 0], "\n".join(o[-3000:] for o in outputs)
    return [dict(np.load(out / f"rank{r}.npz")) for r in range(2)]


@pytest.mark.parametrize("mode", ["auto", "vmap"])
def test_one_step_without_noise_equals_the_single_process_step(main_run, mode):
    x, y = worker.data()
    reference = worker.mlp(seed=0, l2_norm_clip=1.0, noise_multiplier=0.0, clipping_mode=mode)
    reference.train_on_batch(x[:40], y[:40])
    expected = worker.weights(reference)
    for rank in range(2):
        np.testing.assert_allclose(main_run[rank][f"one_step_{mode}"], expected, atol=1e-6)
    np.testing.assert_array_equal(main_run[0][f"one_step_{mode}"], main_run[1][f"one_step_{mode}"])


def test_noise_is_added_once_per_global_update(main_run):
    update = main_run[0]["noise_update"]
    np.testing.assert_array_equal(update, main_run[1]["noise_update"])
    expected = 1.3 * 1.5 / 50  # B_global = 2 ranks x 25 examples
    ratio = update.std() / expected
    # 10,100 values: relative standard error 0.7%; sqrt(2) (noise on both
    # ranks) or 1/2 (normalised by the local batch) would be far outside.
    assert abs(ratio - 1) < 0.05


@pytest.mark.parametrize("name", ["poisson", "poisson_accum"])
def test_poisson_samples_are_sharded_and_accounted_globally(main_run, name):
    accumulation = 2 if name == "poisson_accum" else 1
    x, y = worker.data()
    sampler = PoissonSampler(worker.N, 20 * accumulation, seed=5)
    steps = int(main_run[0][f"{name}_steps"])
    updates_per_epoch = worker.N // (20 * accumulation)
    assert steps == 2 * updates_per_epoch and int(main_run[1][f"{name}_steps"]) == steps
    batches = [
        [main_run[r][f"{name}_batch{i}"] for i in range(steps * accumulation)] for r in range(2)
    ]
    for update in range(steps):
        parts = slice(update * accumulation, (update + 1) * accumulation)
        mine = [np.concatenate(batches[r][parts]) for r in range(2)]
        assert not set(mine[0]) & set(mine[1])  # each sampled example on one rank only
        np.testing.assert_array_equal(np.sort(np.concatenate(mine)), sampler.sample(0, update))
    # Same epsilon and metrics on both ranks, and the single-process epsilon.
    for key in ("epsilon", "loss", "accuracy", "weights"):
        np.testing.assert_array_equal(main_run[0][f"{name}_{key}"], main_run[1][f"{name}_{key}"])
    mode = "vmap" if accumulation > 1 else "auto"
    reference = worker.mlp(seed=0, l2_norm_clip=1.0, noise_multiplier=0.0, clipping_mode=mode)
    import torchdp_keras as tdk

    loader = tdk.PrivateDataLoader(
        x, y, batch_size=20, seed=5, gradient_accumulation_steps=accumulation
    )
    history = reference.fit(loader, epochs=2, verbose=0)
    assert float(main_run[0][f"{name}_epsilon"]) == pytest.approx(
        reference.get_epsilon(1e-5), rel=1e-12
    )
    # sigma = 0: the two-rank run is the single-process run on the same samples.
    np.testing.assert_allclose(main_run[0][f"{name}_weights"], worker.weights(reference), atol=1e-5)
    np.testing.assert_allclose(main_run[0][f"{name}_loss"], history.history["loss"], rtol=1e-5)


def test_noisy_training_keeps_the_ranks_identical(main_run):
    np.testing.assert_array_equal(main_run[0]["noisy_weights"], main_run[1]["noisy_weights"])


def test_a_rank_dying_mid_step_fails_the_job(tmp_path):
    codes, outputs = _launch("failing", tmp_path, timeout=120)
    assert codes[1] == 3
    assert codes[0] != 0, outputs[0][-2000:]
    assert not (tmp_path / "rank0.npz").exists()
