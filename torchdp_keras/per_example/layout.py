"""Layout-preserving forwards of parameter-free layers, for the fast path.

Keras's torch backend pools a channels_last tensor by first copying it into
a contiguous channels-first tensor. On CPU, torch's max pooling of a
contiguous NCHW tensor with a small window is several times slower than the
same pooling of a channels-first *view* of the channels_last tensor (torch's
channels_last memory format), and the copy is wasted work on any device.
Inside the DP step the fast engine therefore runs these layers on the view:
the numbers are exactly those of the Keras layer (max and mean of the same
windows), the Keras layer object is not touched, and layers or settings not
listed here go through their own Keras call.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import torch

_MAX = {
    keras.layers.MaxPooling1D: torch.nn.functional.max_pool1d,
    keras.layers.MaxPooling2D: torch.nn.functional.max_pool2d,
    keras.layers.MaxPooling3D: torch.nn.functional.max_pool3d,
}
_AVERAGE = {
    keras.layers.AveragePooling1D: torch.nn.functional.avg_pool1d,
    keras.layers.AveragePooling2D: torch.nn.functional.avg_pool2d,
    keras.layers.AveragePooling3D: torch.nn.functional.avg_pool3d,
}


def layout_preserving_forward(layer) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A channels_last-preserving forward for `layer`, or None to use its Keras call.

    Covered: `MaxPooling1D/2D/3D` and `AveragePooling1D/2D/3D` with
    `padding="valid"` and `data_format="channels_last"` (exact classes: a
    subclass may change `call`).
    """
    pool = _MAX.get(type(layer)) or _AVERAGE.get(type(layer))
    if (
        pool is None
        or layer.padding != "valid"
        or layer.data_format != "channels_last"
        or getattr(layer, "activity_regularizer", None) is not None
    ):
        return None
    dtype = getattr(torch, layer.compute_dtype)

    def forward(inputs: torch.Tensor) -> torch.Tensor:
        if inputs.dtype != dtype:
            inputs = inputs.to(dtype)
        pooled = pool(
            inputs.movedim(-1, 1), kernel_size=tuple(layer.pool_size), stride=tuple(layer.strides)
        )
        return pooled.movedim(1, -1)

    return forward
