"""`PrivateDataLoader`: Poisson-sampled, padded batches for DP models.

A `keras.utils.PyDataset` that draws every model update's batch by Poisson
sampling (each example independently with probability
q = batch_size * gradient_accumulation_steps / n), splits it into
`gradient_accumulation_steps` physical batches, and pads each to a bucket
size with a padding mask. DP models read q, the expected batch size and the
accumulation from the loader, so the accountant composes exactly what the
sampler did.

Batches are yielded as ``{POISSON_BATCH_KEY: {"x", "y", "sample_weight",
"mask"}}``; only torchdp_keras's DP models understand them. Padded rows repeat
the dataset's first example (valid inputs for any model) and are removed
exactly: they contribute zero to gradients, loss and metrics.
"""

from __future__ import annotations

import math

import keras
import numpy as np

from torchdp_keras import distributed
from torchdp_keras._validation import check_int
from torchdp_keras.data.sampling import PoissonSampler, padded_size
from torchdp_keras.errors import DPConfigError

POISSON_BATCH_KEY = "__torchdp_keras_poisson_batch__"


def is_pandas(value) -> bool:
    """True for pandas DataFrames and Series (without importing pandas)."""
    return type(value).__module__.split(".")[0] == "pandas" and hasattr(value, "to_numpy")


def _to_numpy(value, name: str) -> np.ndarray:
    if is_pandas(value):
        array = value.to_numpy()
        if array.dtype == object:
            try:
                array = array.astype("float32")
            except (TypeError, ValueError) as error:
                raise DPConfigError(
                    f"Expected numeric columns in {name}. Received columns of dtype object."
                ) from error
        return array
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch tensor
        return value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.ndim == 0:
        raise DPConfigError(f"Expected {name} to have a batch axis. Received: a scalar")
    return array


def to_numpy_tree(value, name: str):
    """Arrays, DataFrames, Series, tensors (or a dict/list/tuple of them) as numpy."""
    if isinstance(value, dict):
        return {k: _to_numpy(v, f"{name}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_numpy(v, f"{name}[{i}]") for i, v in enumerate(value)]
    return _to_numpy(value, name)


def _leaves(tree):
    if isinstance(tree, dict):
        return list(tree.values())
    if isinstance(tree, list):
        return tree
    return [tree]


def _take(tree, indices):
    if isinstance(tree, dict):
        return {k: v[indices] for k, v in tree.items()}
    if isinstance(tree, list):
        return [v[indices] for v in tree]
    return tree[indices]


class PrivateDataLoader(keras.utils.PyDataset):
    """Poisson-sampled batches for DP training (the `op_tensorflow` loader's API).

    Args:
        feature_df: Features: a numpy array, pandas DataFrame, torch tensor,
            or a dict (or list) of them for multi-input models.
        label_df: Labels, in the same forms (or None).
        batch_size: The expected physical batch size b.
        sample_weight: Optional per-example weights.
        seed: Seed of the sampler (int >= 0); None draws OS entropy.
        gradient_accumulation_steps: k; each update's batch is one Poisson
            draw with q = k * b / n, split into k physical batches.
        steps_per_epoch: Updates per epoch; default n // (k * b) (so an epoch
            is n / b physical steps).
        secure_mode: Draw the samples from the OS CSPRNG (no seed allowed);
            required by DP models built with `secure_mode=True`.

    Guarantee: every update's examples are an independent Poisson sample of
    the whole dataset with rate `sampling_probability`, as the DP-SGD
    analysis assumes. Updates are numbered over the model's whole training:
    `fit` starts the loader at the model's `dp_steps`, and update `u` is the
    sampler's draw `(0, u)`. A model restored with its privacy state (e.g. by
    `keras.callbacks.BackupAndRestore`) therefore continues with new draws,
    even with a fixed seed, instead of replaying the samples of the first run.

    Under `torch.distributed` (process group initialised before the loader
    is built; every rank passes the whole dataset), `batch_size` is the
    global expected physical batch: every rank draws the same global sample
    (rank 0's seed or OS entropy; in secure mode rank 0's draw, broadcast)
    and keeps the sampled indices at positions rank, rank + W, ...; each
    sampled example is trained on by exactly one rank, and
    `sampling_probability` is the global q.

    Example:
        >>> x = np.random.default_rng(0).random((640, 4), dtype="float32")
        >>> y = x.sum(axis=1, keepdims=True)
        >>> loader = PrivateDataLoader(feature_df=x, label_df=y, batch_size=64, seed=0)
        >>> loader.sampling_probability, len(loader)
        (0.1, 10)
        >>> dp_model = tdk.DPSequential([keras.Input((4,)), keras.layers.Dense(1)],
        ...                             l2_norm_clip=1.0, noise_multiplier=1.1)
        >>> dp_model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        >>> history = dp_model.fit(loader, epochs=5, target_delta=1e-5, verbose=0)
        >>> dp_model.dp_steps
        50
    """

    def __init__(
        self,
        feature_df,
        label_df=None,
        batch_size: int = 32,
        *,
        sample_weight=None,
        seed: int | None = None,
        gradient_accumulation_steps: int = 1,
        steps_per_epoch: int | None = None,
        secure_mode: bool = False,
    ):
        super().__init__()
        batch_size = check_int(batch_size, "batch_size")
        gradient_accumulation_steps = check_int(
            gradient_accumulation_steps, "gradient_accumulation_steps"
        )
        self.index = feature_df.index if is_pandas(feature_df) else None
        self.features = to_numpy_tree(feature_df, "feature_df")
        self.labels = None if label_df is None else to_numpy_tree(label_df, "label_df")
        self.sample_weight = (
            None if sample_weight is None else to_numpy_tree(sample_weight, "sample_weight")
        )
        sizes = {
            name: len(leaf)
            for name, tree in (
                ("feature_df", self.features),
                ("label_df", self.labels),
                ("sample_weight", self.sample_weight),
            )
            if tree is not None
            for leaf in _leaves(tree)
        }
        if len(set(sizes.values())) != 1:
            raise DPConfigError(f"Expected the same number of rows everywhere. Received: {sizes}")
        self.num_examples = next(iter(sizes.values()))
        self.batch_size = int(batch_size)
        self.gradient_accumulation_steps = int(gradient_accumulation_steps)
        effective = self.batch_size * self.gradient_accumulation_steps
        # Under torch.distributed every rank draws the same global sample
        # (rank 0's seed, or rank 0's secure draws) and keeps its share of it.
        self._rank, self._world = distributed.process_group()
        if self._world > 1 and not secure_mode:
            seed = distributed.shared_entropy(None if seed is None else check_int(seed, "seed", 0))
        self._sampler = PoissonSampler(
            self.num_examples, effective, seed=seed, secure_mode=secure_mode
        )
        if steps_per_epoch is None:
            steps_per_epoch = max(1, self.num_examples // effective)
        self.updates_per_epoch = check_int(steps_per_epoch, "steps_per_epoch")
        self.epoch = 0
        self._first_update = 0
        self._last_draw: tuple[int, np.ndarray] | None = None  # (key, this rank's draw)

    # -- what the accountant needs -----------------------------------------------
    @property
    def privacy_unit(self) -> str:
        """What one clipping unit is, and what the epsilon protects: an example."""
        return "example"

    @property
    def unit_size(self) -> int:
        """Rows per clipping unit in a batch (1: every example is its own unit)."""
        return 1

    @property
    def num_units(self) -> int:
        """The n of q = expected units per update / n: here the number of examples."""
        return self.num_examples

    @property
    def expected_batch_size(self) -> int:
        """Expected examples per model update: batch_size * gradient_accumulation_steps."""
        return self.batch_size * self.gradient_accumulation_steps

    @property
    def sampling_probability(self) -> float:
        """q = expected_batch_size / num_examples."""
        return self._sampler.sampling_probability

    @property
    def secure_mode(self) -> bool:
        """Whether the samples come from the OS CSPRNG."""
        return self._sampler.secure_mode

    def start_at(self, update: int) -> None:
        """Numbers the next epoch's first update `update` (fit calls it with `dp_steps`)."""
        self._first_update = check_int(update, "update", 0)
        self.epoch = 0
        self._last_draw = None

    # -- PyDataset -----------------------------------------------------------------
    def __len__(self) -> int:
        return self.updates_per_epoch * self.gradient_accumulation_steps

    def on_epoch_end(self) -> None:
        self.epoch += 1

    def _draw(self, update: int) -> np.ndarray:
        """This rank's examples of update `update` of the epoch (all of them on one process)."""
        key = self._first_update + self.epoch * self.updates_per_epoch + update
        if self._last_draw is None or self._last_draw[0] != key:
            drawn = self._sampler.sample(0, key)
            if self._world > 1:
                if self.secure_mode:  # rank 0's draw: a CSPRNG cannot be shared by a seed
                    drawn = self._broadcast_draw(drawn)
                drawn = drawn[self._rank :: self._world]
            self._last_draw = (key, drawn)
        return self._last_draw[1]

    def _broadcast_draw(self, drawn: np.ndarray) -> np.ndarray:
        import torch

        included = torch.zeros(self.num_examples, dtype=torch.uint8)
        included[torch.from_numpy(drawn)] = 1
        device = distributed._device()
        included = included.to(device)
        torch.distributed.broadcast(included, src=0)
        return np.flatnonzero(included.cpu().numpy())

    @property
    def physical_batch_size(self) -> int:
        """Expected examples per physical batch on this rank (batch_size / world size)."""
        return math.ceil(self.batch_size / self._world)

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"Expected 0 <= index < {len(self)}. Received: index={index}")
        update, part = divmod(index, self.gradient_accumulation_steps)
        chunk = np.array_split(self._draw(update), self.gradient_accumulation_steps)[part]
        size = padded_size(len(chunk), self.physical_batch_size, self.num_examples)
        rows = np.concatenate([chunk, np.zeros(size - len(chunk), dtype=chunk.dtype)])
        mask = np.zeros(size, dtype="float32")
        mask[: len(chunk)] = 1.0
        batch = {"x": _take(self.features, rows), "mask": mask}
        if self.labels is not None:
            batch["y"] = _take(self.labels, rows)
        if self.sample_weight is not None:
            batch["sample_weight"] = _take(self.sample_weight, rows)
        return {POISSON_BATCH_KEY: batch}


def unpack_poisson_batch(data):
    """`(x, y, sample_weight, mask)` of a loader batch, or None for other data.

    Accepts the batch itself or a Keras `(batch, None, None)` tuple (as
    `train_on_batch` wraps it).
    """
    if isinstance(data, (list, tuple)) and data and all(part is None for part in data[1:]):
        data = data[0]
    if isinstance(data, dict) and POISSON_BATCH_KEY in data:
        batch = data[POISSON_BATCH_KEY]
        return batch["x"], batch.get("y"), batch.get("sample_weight"), batch["mask"]
    return None
