"""TF Privacy's `privacy.fast_gradient_clipping.layer_registry`.

The registry holds torchdp_keras's own rules (`LayerRule`, `SublayerRule`),
keyed by Keras layer class like TF Privacy's; pass it as
`DPSequential(..., layer_registry=...)`.
"""

from torchdp_keras.per_example import LayerRegistry, make_default_layer_registry

__all__ = ["LayerRegistry", "make_default_layer_registry"]
