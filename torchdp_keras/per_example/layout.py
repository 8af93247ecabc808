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

Layers the engine does not call itself (inside a subclassed model or a
walked block) reach the same views through `layout_preserving_ops()`, a
context that swaps Keras's torch `max_pool`, `average_pool` and `conv` for
versions that work on the views when the call is channels_last (pooling
with "valid" padding, convolution with "valid" or "same"), and call Keras's
own otherwise; restored on exit.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator

import keras
import torch

from torchdp_keras import _keras_compat as keras_compat

keras_torch_nn = keras_compat.keras_torch_nn  # keras's torch ops, patched in place below

_MAX_BY_RANK = {
    1: torch.nn.functional.max_pool1d,
    2: torch.nn.functional.max_pool2d,
    3: torch.nn.functional.max_pool3d,
}
_AVERAGE_BY_RANK = {
    1: torch.nn.functional.avg_pool1d,
    2: torch.nn.functional.avg_pool2d,
    3: torch.nn.functional.avg_pool3d,
}
_MAX = dict(
    zip(
        (keras.layers.MaxPooling1D, keras.layers.MaxPooling2D, keras.layers.MaxPooling3D),
        _MAX_BY_RANK.values(),
    )
)
_AVERAGE = dict(
    zip(
        (
            keras.layers.AveragePooling1D,
            keras.layers.AveragePooling2D,
            keras.layers.AveragePooling3D,
        ),
        _AVERAGE_BY_RANK.values(),
    )
)


def _pool_view(pool, inputs: torch.Tensor, size: tuple, strides: tuple) -> torch.Tensor:
    """`pool` of a channels_last tensor through its channels-first view, channels_last out."""
    return pool(inputs.movedim(-1, 1), kernel_size=size, stride=strides).movedim(1, -1)


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
        return _pool_view(pool, inputs, tuple(layer.pool_size), tuple(layer.strides))

    return forward


def _pool_on_view(original, pools):
    def pool(inputs, pool_size, strides=None, padding="valid", data_format=None):
        data_format = keras_compat.standardize_data_format(data_format)
        spatial = getattr(inputs, "ndim", 0) - 2
        if (
            not isinstance(inputs, torch.Tensor)
            or padding != "valid"
            or data_format != "channels_last"
            or spatial not in pools
        ):
            return original(inputs, pool_size, strides, padding, data_format)
        size = (pool_size,) * spatial if isinstance(pool_size, int) else tuple(pool_size)
        if strides is None:
            strides = size
        elif isinstance(strides, int):
            strides = (strides,) * spatial
        return _pool_view(pools[spatial], inputs, size, tuple(strides))

    return pool


def _conv_on_view(original):
    from torchdp_keras.per_example.rules.conv import _CONV_FUNCTIONS, _pad_channels_last

    def conv(inputs, kernel, strides=1, padding="valid", data_format=None, dilation_rate=1):
        data_format = keras_compat.standardize_data_format(data_format)
        spatial = getattr(inputs, "ndim", 0) - 2
        if isinstance(kernel, keras.Variable):  # a layer passes its kernel variable
            kernel = kernel.value
        if (
            not isinstance(inputs, torch.Tensor)
            or not isinstance(kernel, torch.Tensor)
            or padding not in ("valid", "same")
            or data_format != "channels_last"
            or spatial not in _CONV_FUNCTIONS
        ):
            return original(inputs, kernel, strides, padding, data_format, dilation_rate)

        def tuple_of(value):
            return (value,) * spatial if isinstance(value, int) else tuple(value)

        shape = types.SimpleNamespace(
            padding=padding,
            kernel_size=tuple(kernel.shape[:spatial]),
            strides=tuple_of(strides),
            dilation_rate=tuple_of(dilation_rate),
        )
        padded = _pad_channels_last(shape, inputs)
        weight = kernel.permute(spatial + 1, spatial, *range(spatial))
        out = _CONV_FUNCTIONS[spatial](
            padded.movedim(-1, 1),
            weight,
            stride=shape.strides,
            dilation=shape.dilation_rate,
            groups=inputs.shape[-1] // kernel.shape[-2],
        )
        return out.movedim(1, -1)

    return conv


@contextlib.contextmanager
def layout_preserving_ops() -> Iterator[None]:
    """Keras's torch pooling and convolution ops keep channels_last views, inside the context.

    The numbers are those of Keras's ops (max and mean of the same windows,
    the same convolution up to the order of floating-point additions); the
    originals are restored on exit, also on error.
    """
    originals = (keras_torch_nn.max_pool, keras_torch_nn.average_pool, keras_torch_nn.conv)
    keras_torch_nn.conv = _conv_on_view(originals[2])
    keras_torch_nn.max_pool = _pool_on_view(originals[0], _MAX_BY_RANK)
    keras_torch_nn.average_pool = _pool_on_view(originals[1], _AVERAGE_BY_RANK)
    try:
        yield
    finally:
        keras_torch_nn.max_pool, keras_torch_nn.average_pool, keras_torch_nn.conv = originals
