"""deel-lipdp's `pipeline` module for numpy arrays and Keras datasets (no tf.data).

deel-lipdp prepares `tf.data` pipelines; here the training set becomes a
`PrivateDataLoader` (Poisson sampling at `q = batch_size / n`, the sampling
the accountant assumes), the test set a Keras `PyDataset` of fixed batches,
and `DatasetMetadata` describes them as deel-lipdp's does. A bound function
(`bound_clip_value`, `bound_normalize`) is applied to every example first,
so that `max_norm` is a true bound of the inputs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import keras
import numpy as np

from torchdp_keras._validation import check_int, check_positive
from torchdp_keras.errors import DPConfigError
from torchdp_keras.lipschitz.model import DatasetMetadata

logger = logging.getLogger(__name__)

__all__ = [
    "DatasetMetadata",
    "bound_clip_value",
    "bound_normalize",
    "default_delta_value",
    "get_colorspace_function",
    "load_adbench_data",
    "load_and_prepare_data",
    "load_and_prepare_images_data",
    "prepare_tabular_data",
]

BoundFunction = tuple[Callable, float]


def _example_norms(x: np.ndarray) -> np.ndarray:
    return np.linalg.norm(x.reshape(len(x), -1).astype(np.float64), axis=1)


def bound_clip_value(value: float) -> BoundFunction:
    """deel-lipdp's clipping bound: each example scaled to L2 norm `<= value`.

    Returns:
        `(bound, value)`: `bound(x, y)` returns `(x clipped, y)` for a batch
        of examples (the first axis).

    Raises:
        DPConfigError: `value` is not a finite number `> 0`.
    """
    value = check_positive(value, "value")

    def bound(x, y):
        x = np.asarray(x)
        norms = _example_norms(x)
        scale = np.minimum(1.0, value / np.maximum(norms, 1e-30))
        return (x * scale.reshape(-1, *[1] * (x.ndim - 1))).astype(x.dtype), y

    return bound, value


def bound_normalize() -> BoundFunction:
    """deel-lipdp's normalising bound: each example scaled to L2 norm 1 (0 stays 0).

    Returns:
        `(bound, 1.0)`.
    """

    def bound(x, y):
        x = np.asarray(x)
        norms = _example_norms(x)
        scale = np.where(norms > 0, 1.0 / np.maximum(norms, 1e-30), 0.0)
        return (x * scale.reshape(-1, *[1] * (x.ndim - 1))).astype(x.dtype), y

    return bound, 1.0


def default_delta_value(dataset_metadata: DatasetMetadata) -> float:
    """deel-lipdp's default delta: `1 / 10^ceil(log10 n)`, below `1 / n`."""
    n = dataset_metadata.nb_samples_train
    delta = float(1.0 / 10 ** math.ceil(math.log10(n)))
    logger.info("Default delta value: %g", delta)
    return delta


class _Batches(keras.utils.PyDataset):
    """Fixed batches of `(x, y)` in order (the test set)."""

    def __init__(self, x, y, batch_size: int):
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    def __getitem__(self, index):
        window = slice(index * self.batch_size, (index + 1) * self.batch_size)
        return self.x[window], self.y[window]


def _prepare(
    x_train,
    y_train,
    x_test,
    y_test,
    batch_size,
    bound_fct,
    drop_remainder,
    classes,
    class_names,
    seed,
    multiplicity=0,
):
    from torchdp_keras.data import PrivateDataLoader

    batch_size = check_int(batch_size, "batch_size")
    bound, max_norm = bound_fct
    x_test, y_test = bound(x_test, y_test)
    n = len(x_train)
    steps = n // batch_size if drop_remainder else math.ceil(n / batch_size)
    if multiplicity:
        from torchdp_keras.lipschitz.augmult import AugmultLoader, default_augmult_config

        # The views are bounded, after augmentation (deel-lipdp's order).
        loader = AugmultLoader(
            x_train, y_train, batch_size, default_augmult_config(multiplicity), bound, seed=seed
        )
    else:
        x_train, y_train = bound(x_train, y_train)
        loader = PrivateDataLoader(x_train, y_train, batch_size=batch_size, seed=seed)
    metadata = DatasetMetadata(
        input_shape=tuple(x_train.shape[1:]),
        nb_classes=classes,
        nb_samples_train=n,
        nb_samples_test=len(x_test),
        class_names=list(class_names),
        nb_steps_per_epochs=max(1, steps),
        batch_size=batch_size,
        max_norm=float(max_norm),
    )
    return loader, _Batches(x_test, y_test, batch_size), metadata


# TensorFlow's (tf.image) RGB -> YIQ and RGB -> YUV matrices (columns: Y, I/U, Q/V).
_RGB_TO = {
    "YIQ": np.array(
        [
            [0.299, 0.59590059, 0.2115],
            [0.587, -0.27455667, -0.52273617],
            [0.114, -0.32134392, 0.31119955],
        ]
    ),
    "YUV": np.array(
        [
            [0.299, -0.14714119, 0.61497538],
            [0.587, -0.28886916, -0.51496512],
            [0.114, 0.43601035, -0.10001026],
        ]
    ),
}


def _rgb_to_hsv(x: np.ndarray) -> np.ndarray:
    """tf.image.rgb_to_hsv on `(..., 3)` values in [0, 1]: hue, saturation, value in [0, 1]."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    value = x.max(axis=-1)
    spread = value - x.min(axis=-1)
    saturation = np.where(value > 0, spread / np.where(value > 0, value, 1), 0.0)
    safe = np.where(spread > 0, spread, 1)
    hue = np.where(
        value == r, (g - b) / safe, np.where(value == g, 2 + (b - r) / safe, 4 + (r - g) / safe)
    )
    hue = np.where(spread > 0, (hue / 6.0) % 1.0, 0.0)
    return np.stack([hue, saturation, value], axis=-1).astype(x.dtype)


def _colorspace(x: np.ndarray, space: str) -> np.ndarray:
    if space == "HSV":
        return _rgb_to_hsv(x)
    return (x @ _RGB_TO[space]).astype(x.dtype)


def get_colorspace_function(colorspace: str | None) -> Callable:
    """deel-lipdp's colorspace map `(x, y) -> (x in that colorspace, y)` for RGB in [0, 1].

    Args:
        colorspace: None or "RGB" (unchanged), "HSV", "YIQ", "YUV",
            "RGB_STANDARDIZED" (CIFAR-10's mean and std) or "GRAYSCALE"
            (luma, one channel).

    Raises:
        DPConfigError: another colorspace.
    """
    space = None if colorspace is None else str(colorspace).upper()
    if space in (None, "RGB"):
        return lambda x, y: (x, y)
    if space in ("HSV", "YIQ", "YUV"):
        return lambda x, y: (_colorspace(np.asarray(x), space), y)
    if space == "RGB_STANDARDIZED":
        mean, std = _CIFAR10_MEAN_STD
        return lambda x, y: (((np.asarray(x) - mean) / std).astype(np.asarray(x).dtype), y)
    if space == "GRAYSCALE":
        weights = np.array([0.2989, 0.5870, 0.1140])
        return lambda x, y: ((np.asarray(x) @ weights)[..., None].astype(np.asarray(x).dtype), y)
    raise DPConfigError(
        "Expected colorspace None, 'RGB', 'HSV', 'YIQ', 'YUV', 'RGB_STANDARDIZED' or "
        f"'GRAYSCALE'. Received: colorspace={colorspace!r}"
    )


_IMAGE_DATASETS = {
    "mnist": keras.datasets.mnist,
    "fashion_mnist": keras.datasets.fashion_mnist,
    "cifar10": keras.datasets.cifar10,
}
# deel-lipdp's RGB_STANDARDIZED: CIFAR-10's per-channel mean and standard deviation.
_CIFAR10_MEAN_STD = (np.array([0.4914, 0.4822, 0.4465]), np.array([0.2023, 0.1994, 0.2010]))


def load_and_prepare_images_data(
    dataset_name: str = "mnist",
    batch_size: int = 256,
    colorspace: str | None = "RGB",
    bound_fct: BoundFunction | None = None,
    drop_remainder: bool = True,
    multiplicity: int = 0,
    *,
    path: str | None = None,
    seed: int | None = None,
):
    """deel-lipdp's image pipeline, on numpy arrays.

    Images are scaled to [0, 1], labels one-hot encoded, the bound applied to
    every example. With `bound_fct=None` the bound is the largest possible
    norm of an image in [0, 1], `sqrt(h w c)` (deel-lipdp reports `h w c`,
    also a bound, much looser).

    Args:
        dataset_name: "mnist", "fashion_mnist" or "cifar10" (from
            `keras.datasets`, downloaded once) unless `path` is given.
        batch_size: The expected batch size of the Poisson sampling.
        colorspace: "RGB" (or None: unchanged), "RGB_STANDARDIZED" (CIFAR-10's
            per-channel mean and std), "HSV", "YIQ", "YUV" (TensorFlow's
            conversions, for 3-channel images) or "grayscale" (single-channel
            images only).
        bound_fct: `bound_clip_value(v)`, `bound_normalize()` or None.
        drop_remainder: The steps per epoch: `n // batch_size` (True) or
            rounded up.
        multiplicity: deel-lipdp's augmentation multiplicity: 0 (none) or
            the number of augmented views (mirror-padded random crops and
            flips) of each example in a batch, each weighing `1 / multiplicity`
            (`torchdp_keras.lipschitz.augmult`).
        path: An `.npz` in keras layout (`x_train`, `y_train`, `x_test`,
            `y_test`) to read instead of downloading.
        seed: Seed of the Poisson sampler (None: OS entropy).

    Returns:
        `(ds_train, ds_test, dataset_metadata)`: a `PrivateDataLoader`, a
        Keras `PyDataset` of test batches, and the `DatasetMetadata`.

    Raises:
        DPConfigError: an unknown dataset or colorspace, or augmentation.
    """
    multiplicity = check_int(multiplicity, "multiplicity", minimum=0)
    if path is not None:
        with np.load(path) as data:
            x_train, y_train = data["x_train"], data["y_train"]
            x_test, y_test = data["x_test"], data["y_test"]
    elif dataset_name in _IMAGE_DATASETS:
        (x_train, y_train), (x_test, y_test) = _IMAGE_DATASETS[dataset_name].load_data()
    else:
        raise DPConfigError(
            f"Expected dataset_name in {sorted(_IMAGE_DATASETS)} (or a path). Received: "
            f"dataset_name={dataset_name!r}"
        )
    x_train, x_test = (a.astype("float32") / 255.0 for a in (x_train, x_test))
    if x_train.ndim == 3:
        x_train, x_test = x_train[..., None], x_test[..., None]
    channels = x_train.shape[-1]
    space = None if colorspace is None else str(colorspace).upper()
    if channels == 1 and space == "GRAYSCALE":
        space = None  # already grayscale (deel-lipdp: the only colorspace for such images)
    elif channels != 3 and space not in (None, "RGB"):
        raise DPConfigError(
            "Expected colorspace 'RGB', None or 'grayscale' for single-channel images "
            f"(the others convert RGB). Received: colorspace={colorspace!r} with "
            f"{channels} channel(s)"
        )
    convert = get_colorspace_function(space)
    (x_train, _), (x_test, _) = convert(x_train, None), convert(x_test, None)
    if bound_fct is None:
        if space in ("RGB_STANDARDIZED", "YIQ", "YUV"):
            raise DPConfigError(
                f"Expected a bound_fct with colorspace={colorspace!r}: its values are not "
                "in [0, 1], so no bound follows from the image size."
            )
        identity = (lambda x, y: (x, y), math.sqrt(math.prod(x_train.shape[1:])))
        bound_fct = identity
    y_train, y_test = (np.asarray(a).reshape(-1) for a in (y_train, y_test))
    classes = int(max(y_train.max(), y_test.max())) + 1
    y_train = np.eye(classes, dtype="float32")[y_train]
    y_test = np.eye(classes, dtype="float32")[y_test]
    return _prepare(
        x_train,
        y_train,
        x_test,
        y_test,
        batch_size,
        bound_fct,
        drop_remainder,
        classes,
        [str(i) for i in range(classes)],
        seed,
        multiplicity,
    )


load_and_prepare_data = load_and_prepare_images_data
"""deel-lipdp's earlier name of `load_and_prepare_images_data` (its tutorial uses it)."""


def load_adbench_data(
    dataset_name: str, dataset_dir: str, standardize: bool = True, redownload: bool = False
):
    """deel-lipdp's ADBench loader from a local copy: `(X, y)` of one Classical `.npz`.

    The file is `{dataset_dir}/datasets/Classical/{dataset_name}.npz`.

    Args:
        dataset_name: The file's name without `.npz`.
        dataset_dir: The folder holding `datasets/Classical/`.
        standardize: Subtract the mean and divide by the std of all features
            (deel-lipdp's global standardisation).
        redownload: deel-lipdp downloads the files from GitHub; here only
            False is accepted (nothing is downloaded).

    Raises:
        DPConfigError: `redownload=True`.
    """
    if redownload:
        raise DPConfigError(
            "Expected redownload=False: this package downloads nothing; put ADBench's "
            "Classical/*.npz files under dataset_dir/datasets/Classical/. Received: "
            "redownload=True"
        )
    path = f"{dataset_dir}/datasets/Classical/{dataset_name}.npz"
    with np.load(path, allow_pickle=False) as data:
        x_data, y_data = data["X"], data["y"]
    if standardize:
        x_data = (x_data - x_data.mean()) / x_data.std()
    return x_data, y_data


def prepare_tabular_data(
    x_train: np.ndarray,
    x_test: np.ndarray,
    y_train: np.ndarray,
    y_test: np.ndarray,
    batch_size: int,
    bound_fct: BoundFunction | None = None,
    drop_remainder: bool = True,
    *,
    seed: int | None = None,
):
    """deel-lipdp's tabular pipeline: numpy features and one-hot labels.

    Args:
        x_train, x_test: Features `(n, F)`.
        y_train, y_test: One-hot labels `(n, C)`.
        batch_size: The expected batch size of the Poisson sampling.
        bound_fct: `bound_clip_value(v)` or `bound_normalize()`. Required:
            unlike images, features have no known range (deel-lipdp fails
            on None too).
        drop_remainder: As `load_and_prepare_images_data`.
        seed: Seed of the Poisson sampler.

    Returns:
        `(ds_train, ds_test, dataset_metadata)`.

    Raises:
        DPConfigError: `bound_fct` is None.
    """
    if bound_fct is None:
        raise DPConfigError(
            "Expected bound_fct (bound_clip_value(v) or bound_normalize()): features have "
            "no known range, and the gradient bounds need one. Received: bound_fct=None"
        )
    x_train, x_test = (np.asarray(a, dtype="float32") for a in (x_train, x_test))
    y_train, y_test = (np.asarray(a, dtype="float32") for a in (y_train, y_test))
    classes = int(y_train.shape[-1]) if y_train.ndim > 1 else int(np.unique(y_train).shape[0])
    return _prepare(
        x_train,
        y_train,
        x_test,
        y_test,
        batch_size,
        bound_fct,
        drop_remainder,
        classes,
        [str(i) for i in range(classes)],
        seed,
    )
