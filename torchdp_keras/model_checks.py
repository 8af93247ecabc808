"""Structural checks of a Keras model before it is trained with DP-SGD.

DP-SGD bounds the influence of one example by clipping that example's
gradient. A layer that mixes examples within a batch (BatchNormalization in
training mode normalises each example with statistics of the whole batch)
makes every example's output, and therefore its gradient, depend on the other
examples: the clipped gradient no longer bounds one example's influence, and
the moving statistics it updates are released without noise.
"""

from __future__ import annotations

from collections.abc import Iterator

from torchdp_keras._backend import check_torch_backend

check_torch_backend()

import keras  # noqa: E402

from torchdp_keras.errors import UnsupportedLayerError  # noqa: E402


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
        for child in layer._flatten_layers(include_self=False, recursive=False):
            if id(child) in seen:
                continue
            seen.add(id(child))
            path = f"{prefix}/{child.name}"
            yield path, child
            yield from walk(child, path)

    yield from walk(model, prefix)


def example_mixing_layers(
    model: keras.layers.Layer, *, prefix: str | None = None, include_root: bool = False
) -> list[str]:
    """Paths of layers that mix examples of a batch in the training pass.

    BatchNormalization (including its synchronized variant) is listed unless
    it is frozen (`trainable=False`), in which case Keras runs it in inference
    mode with fixed statistics and it treats every example on its own.
    """
    return [
        path
        for path, layer in iter_layers(model, prefix=prefix, include_root=include_root)
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
    ]


def check_per_example_privacy(
    model: keras.layers.Layer, *, prefix: str | None = None, include_root: bool = False
) -> None:
    """Raises `UnsupportedLayerError` naming every layer that mixes examples.

    Args:
        model: The Keras model (or layer) to check.
        prefix: Path of `model` in the error message (default: its name).
        include_root: Check `model` itself too, not only what it contains.

    Raises:
        UnsupportedLayerError: at least one layer mixes examples; the message
            lists all of them by path, with the reason and the fix.
    """
    paths = example_mixing_layers(model, prefix=prefix, include_root=include_root)
    if paths:
        listed = "\n".join(f"  - {p} (BatchNormalization)" for p in paths)
        raise UnsupportedLayerError(
            "These layers mix the examples of a batch, which breaks per-example "
            "privacy:\n"
            f"{listed}\n"
            "BatchNormalization normalises each example with the mean and "
            "variance of the whole batch, so one example's gradient depends on "
            "the others and clipping it no longer bounds that example's "
            "influence; its moving statistics are also updated from the data "
            "without noise. Replace it with keras.layers.GroupNormalization or "
            "keras.layers.LayerNormalization (which normalise each example on "
            "its own), or freeze it with `layer.trainable = False` to use fixed "
            "statistics.",
            layer_paths=paths,
        )


def seed_state_ids(model: keras.layers.Layer) -> set[int]:
    """`id`s of the state variables of every SeedGenerator in `model`.

    These non-trainable variables change every step without depending on
    data (random layers draw fresh masks); any other non-trainable variable
    updated in the training pass is state computed from the data.
    """
    ids = set()
    for layer in [model] + [layer for _, layer in iter_layers(model)]:
        for seed_generator in getattr(layer, "_seed_generators", ()):
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
