"""`LayerRegistry`: which layers the fast clipping path handles, and how.

TF Privacy's `layer_registry` for Keras 3 on torch: a map from layer
classes to `LayerRule`s. A layer's rule is that of its class or, when its
class does not define `call` itself, that of the nearest base class (a
subclass that only renames or configures, like keras_hub's
`ReversibleEmbedding`); a subclass that changes `call` needs its own.
Classes of optional packages are registered by their import path
("keras_hub.src...PositionEmbedding"), so that the package is never
imported for it.
"""

from __future__ import annotations

import keras

from torchdp_keras.errors import DPConfigError
from torchdp_keras.per_example.rules.base import LayerRule
from torchdp_keras.per_example.rules.conv import (
    ConvRule,
    ConvTransposeRule,
    DepthwiseConvRule,
    SeparableConvRule,
)
from torchdp_keras.per_example.rules.dense import DenseRule
from torchdp_keras.per_example.rules.einsum_dense import EinsumDenseRule
from torchdp_keras.per_example.rules.embedding import EmbeddingRule
from torchdp_keras.per_example.rules.normalization import NormalizationRule
from torchdp_keras.per_example.rules.position_embedding import PositionEmbeddingRule
from torchdp_keras.per_example.rules.recurrent import BidirectionalRule, RecurrentRule
from torchdp_keras.per_example.rules.reversible_embedding import ReversibleEmbeddingRule
from torchdp_keras.per_example.rules.sublayers import SublayerRule


class LayerRegistry:
    """Maps layer classes to the rules that clip them without per-model vmap.

    Example:
        >>> registry = make_default_layer_registry()
        >>> registry.insert(MyLayer, MyLayerRule())  # doctest: +SKIP
        >>> registry.is_elem(keras.layers.Dense(3))
        True
    """

    def __init__(self) -> None:
        self._rules: dict[type | str, LayerRule] = {}

    def insert(self, layer_class: type | str, rule: LayerRule) -> None:
        """Registers `rule` for `layer_class` (and its subclasses that keep its `call`).

        Args:
            layer_class: A `keras.layers.Layer` subclass, or the import path
                of one ("package.module.ClassName") in a package that need
                not be installed.
            rule: The `LayerRule`.
        """
        valid_class = isinstance(layer_class, type) and issubclass(layer_class, keras.layers.Layer)
        if not valid_class and not (isinstance(layer_class, str) and "." in layer_class):
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
            if rule is not None and overriding is None:
                reason = rule.unsupported_reason(layer)
                if reason is None and not rule.supports(layer):
                    reason = "declined by the rule's supports()"
                if reason is None:
                    return rule, None
                return None, f"{type(rule).__name__} declines it: {reason}"
            if rule is not None:
                return None, (
                    f"{overriding.__name__} overrides the call of {cls.__name__}, whose "
                    f"{type(rule).__name__} cannot vouch for it (register a rule for "
                    f"{overriding.__name__})"
                )
            if "call" in vars(cls) and overriding is None:
                overriding = cls  # computes differently from its bases
        return None, "no rule in the registry"

    def is_elem(self, layer: keras.layers.Layer) -> bool:
        """Whether `lookup(layer)` finds a rule."""
        return self.lookup(layer) is not None

    def __len__(self) -> int:
        return len(self._rules)


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
    """
    registry = LayerRegistry()
    recurrent = RecurrentRule()
    # One rule instance per family, shared by the family's classes.
    families = [
        (DenseRule(), ("Dense",)),
        (EmbeddingRule(), ("Embedding",)),
        (ConvRule(), ("Conv1D", "Conv2D", "Conv3D")),
        (DepthwiseConvRule(), ("DepthwiseConv1D", "DepthwiseConv2D")),
        (ConvTransposeRule(), ("Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose")),
        (SeparableConvRule(), ("SeparableConv1D", "SeparableConv2D")),
        (recurrent, ("RNN", "SimpleRNN", "GRU", "LSTM")),
        (BidirectionalRule(recurrent), ("Bidirectional",)),
        (EinsumDenseRule(), ("EinsumDense",)),
        (NormalizationRule(), ("LayerNormalization", "GroupNormalization", "RMSNormalization")),
    ]
    for rule, names in families:
        for name in names:
            registry.insert(getattr(keras.layers, name), rule)
    registry.insert(keras.layers.MultiHeadAttention, SublayerRule())
    reversible = getattr(keras.layers, "ReversibleEmbedding", None)  # Keras >= 3.12
    if reversible is not None:
        registry.insert(reversible, ReversibleEmbeddingRule())
    registry.insert(
        "keras_hub.src.layers.modeling.position_embedding.PositionEmbedding",
        PositionEmbeddingRule(),
    )
    return registry
