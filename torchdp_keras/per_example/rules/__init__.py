"""The built-in fast-clipping rules, one module per layer family.

Each rule class declares the layer classes it handles with `@handles(...)`
(`rules.base`), next to its code. `RULES` lists the rule classes whose
declarations make up `make_default_layer_registry()`: one instance of each,
shared by the classes it declares, in this order (no two rules may declare
the same class). A new built-in rule is a class decorated with `@handles`
in its module and an entry here; the fast-clipping tests then require a
test case for each class it declares (`tests/per_example/test_registry_cases.py`).

Example:
    >>> from torchdp_keras.per_example.rules import RULES
    >>> from torchdp_keras.per_example.rules.base import handled_layers
    >>> [layer.__name__ for layer in handled_layers(RULES[0])]
    ['Dense']
"""

from __future__ import annotations

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

RULES: tuple[type, ...] = (
    DenseRule,
    EmbeddingRule,
    ConvRule,
    DepthwiseConvRule,
    ConvTransposeRule,
    SeparableConvRule,
    RecurrentRule,
    BidirectionalRule,
    EinsumDenseRule,
    NormalizationRule,
    SublayerRule,
    ReversibleEmbeddingRule,
    PositionEmbeddingRule,
)
"""The rule classes of the default registry, in registration order."""

__all__ = ["RULES"]
