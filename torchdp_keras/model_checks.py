"""Structural checks of a Keras model before it is trained with DP-SGD.

DP-SGD bounds the influence of one example by clipping that example's
gradient. A layer that mixes examples within a batch (BatchNormalization in
training mode normalises each example with statistics of the whole batch)
makes every example's output, and therefore its gradient, depend on the other
examples: the clipped gradient no longer bounds one example's influence, and
the moving statistics it updates are released without noise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from torchdp_keras import _keras_compat as keras_compat
from torchdp_keras._backend import check_torch_backend

check_torch_backend()

import keras  # noqa: E402

from torchdp_keras.errors import DPConfigError, UnsupportedLayerError  # noqa: E402


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
        if _mixes_examples(layer)
    ]


def _mixes_examples(layer) -> bool:
    return isinstance(layer, keras.layers.BatchNormalization) and layer.trainable


@dataclasses.dataclass(frozen=True)
class ModelProblem:
    """One reason why a model cannot be trained privately as it is.

    Attributes:
        path: The layer's path in the model ("model/block/layer").
        layer: The layer's class name.
        reason: What breaks, and why it breaks the privacy guarantee.
        fix: How to change the model (or the clipping mode).
    """

    path: str
    layer: str
    reason: str
    fix: str

    def __str__(self) -> str:
        return f"{self.path} ({self.layer}): {self.reason} Fix: {self.fix}"


_BATCH_NORM_REASON = (
    "normalises each example with the mean and variance of the whole batch, so one "
    "example's gradient depends on the others and clipping it no longer bounds that "
    "example's influence; its moving statistics are also updated from the data without "
    "noise."
)
_BATCH_NORM_FIX = (
    "replace it with keras.layers.GroupNormalization or keras.layers.LayerNormalization "
    "(which normalise each example on its own; torchdp_keras.fix(model) does it), or "
    "freeze it with `layer.trainable = False` to use fixed statistics."
)
_STATEFUL_REASON = (
    "is stateful: its state carries over from one batch to the next, so the output on "
    "an example depends on the examples of earlier batches, whose influence is then "
    "neither clipped nor accounted, and the state itself is computed from the data "
    "without noise."
)
_STATEFUL_FIX = "build it with stateful=False (the state then restarts with every sequence)."


def find_problems(
    model: keras.layers.Layer,
    *,
    clipping_mode: str = "auto",
    layer_registry=None,
    prefix: str | None = None,
    include_root: bool = False,
) -> list[ModelProblem]:
    """Every reason why `model` cannot be trained with DP-SGD as it is, in model order.

    Checked: layers that mix the examples of a batch (BatchNormalization in
    training mode), stateful recurrent layers, and, for
    `clipping_mode="fast"`, layers the fast clipping path cannot handle
    (no rule in `layer_registry`, weights shared by several calls or layers).
    In "auto" mode such layers are not problems: the model trains with
    per-example gradients instead. The fast path is only checked on built
    Sequential and functional models (others are checked at the first step).

    Args:
        model: A Keras model or layer.
        clipping_mode: "auto", "fast" or "vmap".
        layer_registry: The fast path's rules (default: the built-in registry).
        prefix: Path of `model` (default: its name).
        include_root: Check `model` itself too, not only what it contains.
    """
    problems = []
    for path, layer in iter_layers(model, prefix=prefix, include_root=include_root):
        kind = type(layer).__name__
        if _mixes_examples(layer):
            problems.append(ModelProblem(path, kind, _BATCH_NORM_REASON, _BATCH_NORM_FIX))
        if isinstance(layer, keras.layers.RNN) and getattr(layer, "stateful", False):
            problems.append(ModelProblem(path, kind, _STATEFUL_REASON, _STATEFUL_FIX))
    if clipping_mode == "fast" and isinstance(model, keras.Model) and model.built:
        problems.extend(_fast_path_problems(model, layer_registry))
    return problems


def _fast_path_problems(model: keras.Model, layer_registry) -> list[ModelProblem]:
    from torchdp_keras.per_example import FastEngine, make_default_layer_registry
    from torchdp_keras.per_example.fast_engine import FastPathUnsupported

    registry = layer_registry if layer_registry is not None else make_default_layer_registry()
    try:
        FastEngine(model, registry, fallback=None)
    except FastPathUnsupported as error:
        fix = (
            "use clipping_mode='auto' (per-example gradients for the layers the fast "
            "path cannot take) or 'vmap', or register a LayerRule for the layer."
        )
        found = dict(iter_layers(model))
        order = {path: i for i, path in enumerate(found)}
        problems = []
        for path, detail in sorted(
            error.problems or [(model.name, str(error))],
            key=lambda problem: order.get(problem[0], -1),
        ):
            kind = type(found.get(path, model)).__name__
            detail = detail.removeprefix(f"{kind}: ")
            problems.append(
                ModelProblem(
                    path,
                    kind,
                    f"{detail} (the fast clipping path computes each example's gradient "
                    "norm layer by layer and must see every weight once per example).",
                    fix,
                )
            )
        return problems
    return []


def problems_error(problems: list[ModelProblem]) -> UnsupportedLayerError:
    """One error that lists every problem by path, with the reason and the fix."""
    listed = "\n".join(f"  - {problem}" for problem in problems)
    return UnsupportedLayerError(
        "This model cannot be trained with per-example privacy as it is:\n" + listed,
        layer_paths=list(dict.fromkeys(problem.path for problem in problems)),
    )


def check_per_example_privacy(
    model: keras.layers.Layer,
    *,
    prefix: str | None = None,
    include_root: bool = False,
    clipping_mode: str = "auto",
    layer_registry=None,
) -> None:
    """Raises `UnsupportedLayerError` listing every problem `find_problems` finds.

    Raises:
        UnsupportedLayerError: the message lists all problems by layer path,
            with the privacy reason and the fix.
    """
    problems = find_problems(
        model,
        clipping_mode=clipping_mode,
        layer_registry=layer_registry,
        prefix=prefix,
        include_root=include_root,
    )
    if problems:
        raise problems_error(problems)


def validate(
    model: keras.layers.Layer,
    *,
    clipping_mode: str | None = None,
    layer_registry=None,
    strict: bool = True,
) -> list[ModelProblem]:
    """Checks that `model` can be trained with DP-SGD; collects every problem at once.

    DP models run the same check when they are built and before their first
    step; call it yourself to see every problem of a model before wrapping it.

    Args:
        model: A Keras model (plain or DP).
        clipping_mode: "auto", "fast" or "vmap"; default: the DP model's own
            mode, or "auto" for a plain model.
        layer_registry: The fast path's rules (default: the DP model's, or the
            built-in registry).
        strict: Raise if there is any problem (default); False: return them.

    Returns:
        The problems found (empty when the model is fine).

    Raises:
        UnsupportedLayerError: `strict` and some layer cannot be trained
            privately; the message lists every one by path, with the reason
            and the fix, and `error.layer_paths` holds the paths.

    Example:
        >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4),
        ...                           keras.layers.BatchNormalization()])
        >>> [p.layer for p in validate(model, strict=False)]
        ['BatchNormalization']
    """
    if not isinstance(model, keras.layers.Layer):
        raise DPConfigError(
            f"Expected model to be a keras.Model. Received: model={type(model).__name__}"
        )
    if clipping_mode is None:
        clipping_mode = getattr(model, "clipping_mode", "auto")
    if clipping_mode not in ("auto", "fast", "vmap"):
        raise DPConfigError(
            "Expected clipping_mode in ('auto', 'fast', 'vmap'). "
            f"Received: clipping_mode={clipping_mode!r}"
        )
    if layer_registry is None:
        layer_registry = getattr(model, "layer_registry", None)
    problems = find_problems(model, clipping_mode=clipping_mode, layer_registry=layer_registry)
    if strict and problems:
        raise problems_error(problems)
    return problems


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
