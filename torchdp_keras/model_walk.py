"""Walking a Keras model's layers: the helpers both the checks and the engines use.

A leaf module (it imports neither `torchdp_keras.model_checks` nor
`torchdp_keras.per_example`), so that the structural checks can build an
engine and the engines can name layers by path without an import cycle.
"""

from __future__ import annotations

from collections.abc import Iterator

import keras

from torchdp_keras import _keras_compat as keras_compat
from torchdp_keras.errors import UnsupportedLayerError


def iter_layers(
    model: keras.layers.Layer, *, prefix: str | None = None, include_root: bool = False
) -> Iterator[tuple[str, keras.layers.Layer]]:
    """Yields `(path, layer)` for every layer nested in `model`, depth first.

    The path joins layer names with "/" starting from `prefix` (default: the
    model's own name), e.g. ``"classifier/block_1/batch_normalization"``. A
    layer reachable twice (shared weights) is yielded once, at its first path.

    Args:
        model: The root layer.
        prefix: Path of the root; defaults to `model.name`.
        include_root: Also yield `(prefix, model)` first.
    """
    prefix = model.name if prefix is None else prefix
    seen = {id(model)}
    if include_root:
        yield prefix, model

    def walk(layer, prefix):
        for child in keras_compat.flatten_layers(layer, include_self=False, recursive=False):
            if id(child) in seen:
                continue
            seen.add(id(child))
            path = f"{prefix}/{child.name}"
            yield path, child
            yield from walk(child, path)

    yield from walk(model, prefix)


def seed_state_ids(model: keras.layers.Layer) -> set[int]:
    """`id`s of the state variables of every SeedGenerator in `model`.

    These non-trainable variables change every step without depending on
    data (random layers draw fresh masks); any other non-trainable variable
    updated in the training pass is state computed from the data.
    """
    ids = set()
    for layer in [model] + [layer for _, layer in iter_layers(model)]:
        for seed_generator in keras_compat.seed_generators(layer):
            ids.add(id(seed_generator.state))
    return ids


def data_updated_state_error(paths: list[str]) -> UnsupportedLayerError:
    """The error for non-trainable variables updated from the training data."""
    listed = "\n".join(f"  - {p}" for p in paths)
    return UnsupportedLayerError(
        "These non-trainable variables are updated from the training data during the "
        f"forward pass:\n{listed}\n"
        "DP-SGD only privatises the gradient step; state computed directly from the "
        "data (such as moving statistics) would be released without noise. Freeze the "
        "layers that own them (`trainable=False`) or replace them.",
        layer_paths=paths,
    )
