"""One rank of the two-process tests in test_distributed.py (gloo on loopback).

Run by the tests as `python tests/distributed_worker.py SCENARIO OUT_DIR` with
RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set; writes its results to
OUT_DIR/rank{RANK}.npz. The scenarios are defined here and their single-process
references in test_distributed.py, from the same builders.
"""

from __future__ import annotations

import datetime
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch.distributed as dist  # noqa: E402
from helpers import zero_gradient_model  # noqa: E402
from keras import layers  # noqa: E402

import torchdp_keras as tdk  # noqa: E402

WIDTH = 100
N = 200


def mlp(seed: int, **dp):
    keras.utils.set_random_seed(seed)
    model = tdk.DPSequential(
        [keras.Input((8,)), layers.Dense(16, activation="tanh"), layers.Dense(3)], **dp
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 8)).astype("float32")
    x[:, 0] = np.arange(N)  # the example's index travels in feature 0
    y = rng.integers(0, 3, size=N)
    return x, y


def weights(model) -> np.ndarray:
    return np.concatenate([w.ravel() for w in model.get_weights()])


class _Record(keras.callbacks.Callback):
    """Records the example indices of every physical batch (feature 0)."""

    def __init__(self, model):
        super().__init__()
        self.indices = []
        step = model.train_step

        def recording(batch):
            from torchdp_keras.data import unpack_poisson_batch

            bx, _, _, mask = unpack_poisson_batch(batch)
            self.indices.append(np.asarray(bx)[np.asarray(mask) > 0, 0].astype(int))
            return step(batch)

        model.train_step = recording


def main_scenario(rank: int, world: int) -> dict:
    out = {}
    x, y = data()
    # A: sigma = 0, one step on this rank's half of 40 examples; rank 1 starts
    # from other weights, which the first step's broadcast must overwrite.
    for mode in ("auto", "vmap"):
        model = mlp(seed=rank, l2_norm_clip=1.0, noise_multiplier=0.0, clipping_mode=mode)
        half = slice(rank * 20, (rank + 1) * 20)
        model.train_on_batch(x[:40][half], y[:40][half])
        out[f"one_step_{mode}"] = weights(model)
    # B: noise of one update with zero gradients: std sigma * C / B_global.
    model = zero_gradient_model(WIDTH, l2_norm_clip=1.5, noise_multiplier=1.3, seed=rank)
    xs = np.random.default_rng(rank).normal(size=(25, WIDTH)).astype("float32")
    before = weights(model)
    model.train_on_batch(xs, np.zeros((25, WIDTH), "float32"))
    out["noise_update"] = before - weights(model)
    # C: Poisson loader over the global dataset, with and without accumulation.
    for name, kwargs, mode in (
        ("poisson", {}, "auto"),
        ("poisson_accum", {"gradient_accumulation_steps": 2}, "vmap"),
    ):
        model = mlp(seed=0, l2_norm_clip=1.0, noise_multiplier=0.0, clipping_mode=mode)
        record = _Record(model)
        loader = tdk.PrivateDataLoader(x, y, batch_size=20, seed=5, **kwargs)
        history = model.fit(loader, epochs=2, verbose=0, callbacks=[record])
        out[f"{name}_weights"] = weights(model)
        out[f"{name}_epsilon"] = np.array(model.get_epsilon(1e-5))
        out[f"{name}_loss"] = np.array(history.history["loss"])
        out[f"{name}_accuracy"] = np.array(history.history["accuracy"])
        out[f"{name}_steps"] = np.array(model.dp_steps)
        for i, indices in enumerate(record.indices):
            out[f"{name}_batch{i}"] = indices
    # D: noise with sigma > 0 over a loader stays identical on the ranks.
    model = mlp(seed=rank, l2_norm_clip=1.0, noise_multiplier=1.0)
    model.fit(tdk.PrivateDataLoader(x, y, batch_size=20), epochs=1, verbose=0)
    out["noisy_weights"] = weights(model)
    return out


def failing_scenario(rank: int, world: int) -> dict:
    x, y = data()

    class Die(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if rank == 1 and batch == 2:
                os._exit(3)  # a crash: no exception handling, no goodbye

    model = mlp(seed=0, l2_norm_clip=1.0, noise_multiplier=1.0)
    model.fit(x, y, batch_size=10, epochs=1, verbose=0, callbacks=[Die()])
    return {"finished": np.array(1)}


def main() -> int:
    scenario, out_dir = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {"main": main_scenario, "failing": failing_scenario}[scenario](rank, world)
    np.savez(os.path.join(out_dir, f"rank{rank}.npz"), **results)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
