"""`fix(model)`: a copy of a Keras model that DP-SGD can train.

BatchNormalization is the usual reason a model cannot be trained privately
(see `torchdp_keras.model_checks`). `fix` rebuilds the model with every
trainable BatchNormalization replaced by a GroupNormalization over the same
axis, which normalises each example on its own: the copy computes per-example
gradients whose clipping bounds each example's influence. Everything else,
weights included, is copied unchanged; the original model is not modified.
"""

from __future__ import annotations

from torchdp_keras import _keras_compat as keras_compat
from torchdp_keras._backend import check_torch_backend

check_torch_backend()

import keras  # noqa: E402

from torchdp_keras.errors import DPConfigError  # noqa: E402
from torchdp_keras.model_checks import example_mixing_layers, iter_layers  # noqa: E402

# GroupNormalization's groups: the largest divisor of the channels up to this
# (Wu and He 2018 found 32 groups a good default) ...
MAX_GROUPS = 32
# ... such that each group normalises at least this many values of an example
# (its channels times the positions). The mean and variance of a group of n
# values are estimates with a relative spread of about sqrt(2/n) (18% at 64):
# at 1x1 or 2x2 positions, 32 groups of 1280 or 96 channels would hold a
# handful of values each, and the per-example gradients through them range
# over orders of magnitude.
MIN_GROUP_VALUES = 64


def num_groups(
    channels: int,
    positions: int | None = None,
    *,
    max_groups: int = MAX_GROUPS,
    min_group_values: int = MIN_GROUP_VALUES,
) -> int:
    """The group count `fix` gives a GroupNormalization over `channels`.

    The largest divisor g of `channels` with g <= `max_groups` and, when the
    number of positions per channel is known (the product of the other
    non-batch axes: 8 * 8 for a (B, 8, 8, C) input), `channels / g *
    positions >= min_group_values`; 1 (one group, like LayerNormalization
    over the channels) when no divisor reaches that many values.

    Example:
        >>> num_groups(64), num_groups(48), num_groups(7)
        (32, 24, 7)
        >>> num_groups(1280, positions=1), num_groups(96, positions=4), num_groups(8, positions=4)
        (20, 6, 1)
    """
    divisors = [g for g in range(1, min(channels, max_groups) + 1) if channels % g == 0]
    if positions is not None:
        divisors = [g for g in divisors if channels // g * positions >= min_group_values] or [1]
    return max(divisors)


def _positions(layer, axis: int) -> int | None:
    """Positions per channel of a built layer's input (None if a size is unknown)."""
    shape: tuple | None
    try:
        shape = tuple(layer.input.shape)
    except (AttributeError, ValueError):
        shapes = keras_compat.build_shapes_dict(layer) or {}
        shape = next(iter(shapes.values()), None)
    if not shape:
        return None
    axis = axis % len(shape)
    sizes = [d for i, d in enumerate(shape) if i not in (0, axis)]
    if any(d is None for d in sizes):
        return None
    positions = 1
    for d in sizes:
        positions *= int(d)
    return positions


def _replacement(layer: keras.layers.BatchNormalization) -> keras.layers.GroupNormalization:
    axis = layer.axis if isinstance(layer.axis, int) else layer.axis[0]
    channels = int(layer.gamma.shape[0] if layer.scale else layer.beta.shape[0])
    return keras.layers.GroupNormalization(
        groups=num_groups(channels, _positions(layer, axis)),
        axis=axis,
        epsilon=max(layer.epsilon, 1e-5),
        center=layer.center,
        scale=layer.scale,
        name=f"{layer.name}_group_norm",
    )


def fix(model: keras.Model) -> keras.Model:
    """Returns a copy of `model` with BatchNormalization replaced by GroupNormalization.

    Each trainable BatchNormalization over C channels becomes a
    GroupNormalization over the same axis with `num_groups(C, positions)`
    groups (the largest divisor of C up to 32 whose groups each hold at least
    `MIN_GROUP_VALUES` = 64 values of an example, counting the positions of
    the layer's input: 1 group when none does) and the same `center`/`scale`; its gamma and
    beta are carried over, its moving statistics dropped (they were computed
    from the data without noise). Frozen BatchNormalization layers
    (`trainable=False`, fixed statistics) are private already and are kept.
    All other layers and weights are copied as they are; nested Sequential
    and functional models are rebuilt too.

    Args:
        model: A built Sequential or functional Keras model.

    Returns:
        A new, uncompiled model with the same inputs and outputs.

    Raises:
        DPConfigError: `model` is not a built Sequential or functional model
            (subclassed models must be changed in their code), or is already
            a DP model (which never holds trainable BatchNormalization: fix the
            Keras model before wrapping it).

    Example:
        >>> model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(16, 3),
        ...                           keras.layers.BatchNormalization()])
        >>> [type(l).__name__ for l in fix(model).layers]
        ['Conv2D', 'GroupNormalization']
    """
    from torchdp_keras.models.dp_trainer import DPTrainerMixin

    if not isinstance(model, keras.Model):
        raise DPConfigError(
            f"Expected model to be a keras.Model. Received: model={type(model).__name__}"
        )
    if isinstance(model, DPTrainerMixin):
        raise DPConfigError(
            f"Expected a plain Keras model; '{model.name}' is already a DP model, which "
            "cannot hold trainable BatchNormalization. Call fix() on the Keras model "
            "before passing it to make_private."
        )
    _check_rebuildable(model)
    return _rebuild(model)


def _rebuild(model: keras.Model) -> keras.Model:
    """The copy of a Sequential or functional model; nested models rebuilt first."""
    copies: list[tuple[keras.layers.Layer, keras.layers.Layer]] = []
    replaced = set()

    def clone(layer):
        if isinstance(layer, keras.Model):
            return _rebuild(layer)  # its weights are copied there
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable:
            new = _replacement(layer)
            replaced.add(id(new))
        else:
            new = layer.__class__.from_config(layer.get_config())
        copies.append((layer, new))
        return new

    def call(layer, *args, **kwargs):
        if id(layer) in replaced:  # BatchNormalization's call takes `mask`, this one not
            kwargs.pop("mask", None)
            kwargs.pop("training", None)
        return layer(*args, **kwargs)

    # Sequential models list their layers instead of calling them: no call_function.
    fixed = keras.models.clone_model(
        model,
        clone_function=clone,
        call_function=None if isinstance(model, keras.Sequential) else call,
    )
    for old, new in copies:
        if id(new) in replaced:
            if old.scale:
                new.gamma.assign(old.gamma)
            if old.center:
                new.beta.assign(old.beta)
        elif old.weights:
            new.set_weights(old.get_weights())
        new.trainable = old.trainable
    return fixed


def _check_rebuildable(model: keras.Model) -> None:
    """Refuses models `clone_model` cannot rebuild layer by layer."""
    if not model.built:
        raise DPConfigError(
            f"Expected a built model: build '{model.name}' (call it on data or give it an "
            "Input) before fix()."
        )
    for path, layer in [(model.name, model), *iter_layers(model)]:
        if isinstance(layer, keras.Model) and not _is_graph(layer):
            mixing = example_mixing_layers(layer, prefix=path)
            if mixing:
                raise DPConfigError(
                    f"fix() rebuilds Sequential and functional models, and '{path}' is a "
                    f"subclassed model ({type(layer).__name__}): replace its "
                    "BatchNormalization layers in its code (with "
                    "keras.layers.GroupNormalization). Received: BatchNormalization at "
                    + ", ".join(mixing)
                )


def _is_graph(model: keras.Model) -> bool:
    return isinstance(model, (keras.Sequential, keras_compat.Functional))
