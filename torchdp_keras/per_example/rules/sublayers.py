"""`SublayerRule`: clip a composite layer through the layers it calls.

`MultiHeadAttention` owns no weights itself: its query, key, value and
output projections are `EinsumDense` sublayers, each called once per call.
Registering a layer class with `SublayerRule` tells the fast engine to run
the layer's own `call` unchanged and tap each weighted sublayer with that
sublayer's rule (through a torch forward hook that exists only for the
duration of the call, and is removed afterwards, also on error). The engine
checks, at build time, that the sublayers own every trainable weight of the
layer and, at every call, that each of them ran exactly once; otherwise the
layer is refused, never undercounted.

Register your own composite layers with it only if their `call` uses each
weighted sublayer through its `__call__`, once, and reads no sublayer weight
directly.
"""

from __future__ import annotations

import keras

from torchdp_keras.per_example.rules.base import LayerRule, handles


@handles(keras.layers.MultiHeadAttention)
class SublayerRule(LayerRule):
    """Marks a layer whose weights are clipped through its sublayers' rules."""

    def forward(self, layer, args, kwargs):
        raise TypeError("SublayerRule layers are run by the fast engine, not by the rule.")

    def squared_norms(self, layer, args, kwargs, grad, cache):
        raise TypeError("SublayerRule layers are clipped through their sublayers.")

    def clipped_sums(self, layer, args, kwargs, grad, factors, cache):
        raise TypeError("SublayerRule layers are clipped through their sublayers.")
