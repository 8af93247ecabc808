"""deel-lipdp's augmentation multiplicity ("augmult"): several augmented views per example.

Each example drawn into a batch appears as `augmult` augmented views (random
crops of the mirror-padded image, flips, colour jitter). The privacy unit is
still the example: `AugmultLoader` gives each view the weight `1 / augmult`,
so an example's gradient is the mean of its views' gradients, within the
same bound `C_l` as one view's, and the Poisson sampling (of examples) is
the one the accountant composes.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Sequence

import numpy as np

from torchdp_keras._validation import check_int
from torchdp_keras.data import PrivateDataLoader
from torchdp_keras.data.loader import POISSON_BATCH_KEY
from torchdp_keras.errors import DPConfigError

__all__ = [
    "AugmultConfig",
    "AugmultLoader",
    "apply_augmult",
    "default_augmult_config",
    "padding_input",
]


def padding_input(x: np.ndarray, pad: int) -> np.ndarray:
    """An image `(H, W, C)` padded by `pad` pixels on each edge, mirroring its border."""
    x = np.concatenate([x[:pad][::-1], x, x[-pad:][::-1]], axis=0)
    return np.concatenate([x[:, :pad][:, ::-1], x, x[:, -pad:][:, ::-1]], axis=1)


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    h, s, v = hsv[..., 0] * 6.0, hsv[..., 1], hsv[..., 2]
    i = np.floor(h).astype(int) % 6
    f = h - np.floor(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = np.zeros(hsv.shape, dtype=hsv.dtype)
    for k, (r, g, b) in enumerate(choices):
        sel = i == k
        out[..., 0][sel], out[..., 1][sel], out[..., 2][sel] = r[sel], g[sel], b[sel]
    return out


def _jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """deel-lipdp's colour jitter: hue +-0.1, saturation x[0.6, 1.6], brightness +-0.15,
    contrast x[0.7, 1.3] (RGB images in [0, 1])."""
    from torchdp_keras.lipschitz.pipeline import _rgb_to_hsv

    hsv = _rgb_to_hsv(np.clip(image, 0, 1))
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-0.1, 0.1)) % 1.0
    hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.6, 1.6), 0, 1)
    image = _hsv_to_rgb(hsv) + rng.uniform(-0.15, 0.15)
    mean = image.mean(axis=(0, 1), keepdims=True)
    return ((image - mean) * rng.uniform(0.7, 1.3) + mean).astype(np.float32)


def apply_augmult(
    image: np.ndarray,
    label,
    *,
    augmult: int,
    random_flip: bool,
    random_crop: bool,
    random_color: bool,
    crop_size: Sequence[int],
    pad: int | None,
    rng: np.random.Generator | None = None,
):
    """`augmult` augmented views of one image, and its label repeated (deel-lipdp's function).

    Args:
        image: One image `(H, W, C)`.
        label: Its label.
        augmult: Views, an integer >= 0 (0: the image itself, one view).
        random_flip: Random horizontal flips.
        random_crop: Random crops of size `crop_size` of the image mirror-padded
            by `pad`.
        random_color: Colour jitter (3-channel images in [0, 1]).
        crop_size: `(H, W, C)` of the crops.
        pad: Mirror padding before cropping (None: none).
        rng: The random generator (default: seeded from the OS).

    Returns:
        `(images, labels)`: `(augmult, H, W, C)` and the label stacked `augmult` times.
    """
    if not isinstance(augmult, int) or augmult < 0:
        raise DPConfigError(f"Expected augmult >= 0. Received: augmult={augmult!r}")
    rng = rng or np.random.default_rng(secrets.randbits(128))
    image = np.asarray(image)
    if augmult == 0:
        return image[None], np.asarray(label)[None]
    views = []
    height, width = int(crop_size[0]), int(crop_size[1])
    for _ in range(augmult):
        view = image
        if random_crop:
            padded = padding_input(view, pad) if pad else view
            top = int(rng.integers(0, padded.shape[0] - height + 1))
            left = int(rng.integers(0, padded.shape[1] - width + 1))
            view = padded[top : top + height, left : left + width]
        if random_flip and rng.random() < 0.5:
            view = view[:, ::-1]
        if random_color:
            view = _jitter(view, rng)
        views.append(np.ascontiguousarray(view))
    return np.stack(views), np.stack([np.asarray(label)] * augmult)


@dataclasses.dataclass
class AugmultConfig:
    """Preprocessing options for images at training time (deel-lipdp's dataclass).

    Attributes:
        augmult: Views per example (0: no augmentation).
        random_crop: Random crops of the mirror-padded image.
        random_flip: Random horizontal flips.
        random_color: Colour jitter.
        pad: Padding before cropping.
    """

    augmult: int
    random_crop: bool
    random_flip: bool
    random_color: bool
    pad: int | None = 4

    def apply(self, image, label, *, crop_size, rng=None):
        """`apply_augmult` with these options."""
        return apply_augmult(
            image,
            label,
            augmult=self.augmult,
            random_flip=self.random_flip,
            random_crop=self.random_crop,
            random_color=self.random_color,
            pad=self.pad,
            crop_size=crop_size,
            rng=rng,
        )


def default_augmult_config(multiplicity: int) -> AugmultConfig:
    """deel-lipdp's default: crops and flips, no colour jitter."""
    return AugmultConfig(
        augmult=multiplicity, random_flip=True, random_crop=True, random_color=False
    )


class AugmultLoader(PrivateDataLoader):
    """A `PrivateDataLoader` whose batches hold `augmult` views of each drawn example.

    Every view has the sample weight `1 / augmult` (a padding row 0), so that
    an example's views together weigh one example: its gradient is the mean
    of its views' gradients. The bound function runs on every view.

    Args:
        x, y: The examples (images `(n, H, W, C)`) and one-hot labels.
        batch_size: The expected number of examples per batch.
        config: The `AugmultConfig` (augmult >= 1).
        bound: The bound function `(x, y) -> (x, y)` applied to the views.
        seed: Seed of the sampler and of the augmentations (None: OS entropy).
    """

    def __init__(self, x, y, batch_size: int, config: AugmultConfig, bound, *, seed=None):
        super().__init__(x, y, batch_size=batch_size, seed=seed)
        self.augmult = check_int(config.augmult, "augmult")
        self.config = config
        self._bound = bound
        self._rng = np.random.default_rng(secrets.randbits(128) if seed is None else seed + 1)

    def __getitem__(self, index: int):
        batch = super().__getitem__(index)[POISSON_BATCH_KEY]
        x, y, mask = batch["x"], batch["y"], batch["mask"]
        views, labels = zip(
            *[
                self.config.apply(image, label, crop_size=x.shape[1:], rng=self._rng)
                for image, label in zip(x, y)
            ]
        )
        x_views, y_views = self._bound(np.concatenate(views), np.concatenate(labels))
        weights = np.repeat(mask, self.augmult) / self.augmult
        return {
            POISSON_BATCH_KEY: {
                "x": x_views.astype(np.float32),
                "y": y_views,
                "mask": np.repeat(mask, self.augmult),
                "sample_weight": weights.astype(np.float32),
            }
        }
