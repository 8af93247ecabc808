"""`LayerRegistry`: which layers the fast clipping path handles, and how.

TF Privacy's `layer_registry` for Keras 3 on torch: a map from layer
classes to `LayerRule`s. A layer's rule is that of its class or, when its
class does not define `call` itself, that of the nearest base class (a
subclass that only renames or configures, like keras_hub's
`ReversibleEmbedding`); a subclass that changes `call` needs its own.
Classes of optional packages are registered by their import path
("keras_hub.src...PositionEmbedding"), so that the package is never
imported for it.

The built-in rules declare their layer classes next to their code
(`@handles` in `rules.base`); `make_default_layer_registry` builds a fresh
registry from the rule classes of `rules.RULES` every time it is called.
There is no global registry: add your own rules to the registry you pass to
the model, with `insert`.

Example:
    >>> import keras
    >>> registry = make_default_layer_registry()
    >>> keras.layers.Dense in registry
    True
    >>> conv = keras.layers.Conv2D(4, 3)
    >>> conv.build((None, 8, 8, 2))
    >>> type(registry.lookup(conv)).__name__
    'ConvRule'
"""

from __future__ import annotations

from collections.abc import Iterator

import keras

from torchdp_keras.errors import DPConfigError
from torchdp_keras.per_example.rules import RULES
from torchdp_keras.per_example.rules.base import (
    LayerKey,
    LayerRule,
    check_layer_key,
    handled_layers,
)


class LayerRegistry:
    """Maps layer classes to the rules that clip them without per-model vmap.

    Example:
        >>> from torchdp_keras.per_example import SublayerRule
        >>> class Block(keras.layers.Layer):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.inner = keras.layers.Dense(3)
        ...
        ...     def call(self, x):
        ...         return self.inner(x)
        >>> registry = make_default_layer_registry()
        >>> registry.is_elem(keras.layers.Dense(3)), registry.is_elem(Block())
        (True, False)
        >>> registry.insert(Block, SublayerRule())
        >>> registry.is_elem(Block())
        True
    """

    def __init__(self) -> None:
        self._rules: dict[LayerKey, LayerRule] = {}

    def insert(self, layer_class: LayerKey, rule: LayerRule) -> None:
        """Registers `rule` for `layer_class` (and its subclasses that keep its `call`).

        Args:
            layer_class: A `keras.layers.Layer` subclass, or the import path
                of one ("package.module.ClassName") in a package that need
                not be installed.
            rule: The `LayerRule`.
        """
        if not check_layer_key(layer_class):
            raise DPConfigError(
                f"Expected layer_class to be a keras.layers.Layer subclass or its import "
                f"path. Received: layer_class={layer_class!r}"
            )
        if not isinstance(rule, LayerRule):
            raise DPConfigError(
                f"Expected rule to be a torchdp_keras LayerRule. Received: rule={rule!r}"
            )
        self._rules[layer_class] = rule

    def _registered(self, cls) -> LayerRule | None:
        return self._rules.get(cls) or self._rules.get(f"{cls.__module__}.{cls.__qualname__}")

    def lookup(self, layer: keras.layers.Layer) -> LayerRule | None:
        """The rule for this layer, or None if its class is not registered or
        the rule cannot handle this instance (e.g. a grouped convolution)."""
        return self.explain(layer)[0]

    def explain(self, layer: keras.layers.Layer) -> tuple[LayerRule | None, str | None]:
        """`(rule, None)`, or `(None, why no rule handles this layer)`.

        The reason names the option or limit the rule declines, or the
        subclass whose own `call` the registered base's rule cannot vouch for.
        """
        overriding = None
        for cls in type(layer).__mro__:
            rule = self._registered(cls)
            if rule is None:
                if "call" in vars(cls) and overriding is None:
                    overriding = cls  # computes differently from its bases
                continue
            if overriding is None:
                reason = rule.unsupported_reason(layer)
                if reason is None and not rule.supports(layer):
                    reason = "declined by the rule's supports()"
                if reason is None:
                    return rule, None
                return None, f"{type(rule).__name__} declines it: {reason}"
            return None, (
                f"{overriding.__name__} overrides the call of {cls.__name__}, whose "
                f"{type(rule).__name__} cannot vouch for it (register a rule for "
                f"{overriding.__name__})"
            )
        return None, "no rule in the registry"

    def is_elem(self, layer: keras.layers.Layer) -> bool:
        """Whether `lookup(layer)` finds a rule."""
        return self.lookup(layer) is not None

    def __len__(self) -> int:
        return len(self._rules)

    def __iter__(self) -> Iterator[LayerKey]:
        """The registered layer classes and import paths, in insertion order."""
        return iter(tuple(self._rules))

    def __contains__(self, layer_class: object) -> bool:
        """Whether this exact class (or import path) is registered."""
        return layer_class in self._rules

    def rule_for(self, layer_class: LayerKey) -> LayerRule:
        """The rule registered for exactly `layer_class` (KeyError if none)."""
        return self._rules[layer_class]


def make_default_layer_registry() -> LayerRegistry:
    """A registry with the built-in rules.

    Ghost norms or explicit per-example products, whichever is cheaper, and
    book-keeping: Dense, EinsumDense, Embedding (sparse), Conv1D, Conv2D,
    Conv3D (through patches), DepthwiseConv1D, DepthwiseConv2D, SeparableConv1D,
    SeparableConv2D (depthwise then pointwise), Conv1DTranspose, Conv2DTranspose,
    Conv3DTranspose (patches of the output gradient), SimpleRNN, GRU, LSTM and
    `RNN` over their cells, and Bidirectional around them (the cell loop run by
    the rule, input and recurrent kernels as sequence products).
    Closed-form per-example gradients (as small as the weights):
    LayerNormalization, GroupNormalization, RMSNormalization. MultiHeadAttention through its
    EinsumDense projections (`SublayerRule`). ReversibleEmbedding (tied input and
    output embedding, both uses) and keras_hub's PositionEmbedding. A rule that cannot handle an
    instance (grouped or channels_first convolutions, LoRA, quantized
    layers) leaves it to the per-layer per-example fallback of
    clipping_mode="auto", which logs it.

    The registry is new at every call: one instance of each rule class of
    `rules.RULES`, inserted for each layer class it declares with `@handles`.

    Returns:
        A `LayerRegistry` that the caller owns (changing it changes no other).

    Raises:
        DPConfigError: two rule classes declare the same layer class.
    """
    registry = LayerRegistry()
    claimed: dict[LayerKey, str] = {}
    for rule_class in RULES:
        rule = rule_class()  # one instance per rule, shared by the classes it declares
        for layer_class in handled_layers(rule_class):
            if layer_class in claimed:
                raise DPConfigError(
                    f"{rule_class.__name__} and {claimed[layer_class]} both declare "
                    f"@handles({layer_class!r})"
                )
            claimed[layer_class] = rule_class.__name__
            registry.insert(layer_class, rule)
    return registry
