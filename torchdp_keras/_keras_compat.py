"""Every private Keras API torchdp_keras relies on, in one place.

Keras 3 keeps much of what a DP trainer needs (the functional graph, the
compiled loss, the torch backend's ops, stateless calls) under `keras.src`
or behind underscore names, which Keras may change in any minor release.
Every such touch point is named here, with the Keras internal it relies on
and the Keras versions whose sources were read to check it exists with the
same meaning ("checked X-Y": every release read from X to Y, inclusive; the
releases read are 3.5.0 to 3.15.1, one per minor version). The rest of the
package imports these names instead of reaching into Keras itself.

`CHECKED_KERAS_RANGE` is the range over which *all* of them hold (minimum
inclusive, maximum exclusive). Importing this module warns (it does not
refuse) when the installed Keras is outside it: a Keras that pip accepts for
the declared dependency may well work, and refusing would break it for
nothing; the warning names the risk, and `check_keras_version()` raises for
callers (and the test suite) that want it strict.

This module imports only the standard library, keras, torch and
`torchdp_keras.errors`, so every other module can import it without cycles.
"""

from __future__ import annotations

import re
import warnings

import keras
from keras.src import backend as _keras_backend

# keras's torch backend modules, patched in place (attributes swapped and restored).
from keras.src.backend.torch import nn as keras_torch_nn  # checked 3.5-3.15.1
from keras.src.backend.torch import random as keras_torch_random  # checked 3.5-3.15.1
from keras.src.backend.torch.core import to_torch_dtype  # keras dtype -> torch; checked 3.5-3.15.1
from keras.src.models.functional import Functional  # the graph model class; checked 3.5-3.15.1
from keras.src.models.model import functional_init_arguments  # checked 3.5-3.15.1 (same body)
from keras.src.random.seed_generator import draw_seed  # advances a SeedGenerator; 3.5-3.15.1
from keras.src.saving.serialization_lib import deserialize_keras_object  # checked 3.5-3.15.1
from keras.src.trainers.data_adapters.data_adapter_utils import (  # checked 3.5-3.15.1
    unpack_x_y_sample_weight,
)
from keras.src.trainers.trainer import Trainer  # Trainer.__init__ for Functional twins; 3.5-3.15.1

from torchdp_keras.errors import DPError

__all__ = [
    "CHECKED_KERAS_RANGE",
    "AutocastScope",
    "Functional",
    "KerasVersionWarning",
    "StatelessScope",
    "Trainer",
    "UnsupportedKerasVersionError",
    "aggregate_additional_loss",
    "build_shapes_dict",
    "call_has_training_arg",
    "channels_last_conversion_target",
    "check_keras_version",
    "compile_loss",
    "compile_metrics",
    "compiled_losses",
    "convert_input_args",
    "deserialize_keras_object",
    "draw_seed",
    "embeddings_variable",
    "first_data_batch",
    "flatten_layers",
    "functional_init_arguments",
    "get_keras_mask",
    "graph_nodes_by_depth",
    "installed_keras_version",
    "kernel_variable",
    "keras_torch_nn",
    "keras_torch_random",
    "loss_tracker",
    "needs_symbolic_build",
    "regularization_losses",
    "run_through_graph",
    "seed_generators",
    "sequential_graph",
    "set_keras_mask",
    "standardize_data_format",
    "standardize_graph_inputs",
    "to_torch_dtype",
    "unpack_x_y_sample_weight",
]

# Every touch point below holds for these Keras versions (min inclusive, max
# exclusive). The floor is 3.11.0 because models/keras_hooks.py unpacks the
# (step, index, batch) triples Keras's epoch iterator yields since 3.11
# (pairs before); with `first_data_batch` there, every remaining touch point
# holds from 3.8.0 (`_aggregate_additional_loss` is new in 3.8, `_flat_losses`
# in 3.7, `get_keras_mask` in 3.6). The ceiling is the newest release read.
CHECKED_KERAS_RANGE: tuple[str, str] = ("3.11.0", "3.16")

# -- keras.src.backend names (none of them under keras.backend's public API) ------------
StatelessScope = _keras_backend.StatelessScope  # state_mapping=, collect_losses=; 3.5-3.15.1
AutocastScope = _keras_backend.AutocastScope  # Layer.__call__'s autocast scope; 3.5-3.15.1
get_keras_mask = _keras_backend.get_keras_mask  # a tensor's Keras mask; checked 3.6-3.15.1
set_keras_mask = _keras_backend.set_keras_mask  # checked 3.6-3.15.1
standardize_data_format = _keras_backend.standardize_data_format  # checked 3.5-3.15.1


# -- the torch backend's channels_last conversion ------------------------------------------
def channels_last_conversion_target() -> tuple[object, str] | None:
    """(module, name) of keras's torch conv memory-format conversion, or None.

    `keras.src.backend.torch.nn._maybe_convert_to_channels_last` exists since
    3.14 (checked 3.14-3.15.1); older releases never convert, so there is
    nothing to patch.
    """
    name = "_maybe_convert_to_channels_last"
    return (keras_torch_nn, name) if hasattr(keras_torch_nn, name) else None


# -- layers ----------------------------------------------------------------------------------
def flatten_layers(layer, include_self=True, recursive=True):
    """`Layer._flatten_layers`: the layer's sublayers (checked 3.5-3.15.1, same signature)."""
    return layer._flatten_layers(include_self=include_self, recursive=recursive)


def call_has_training_arg(operation) -> bool:
    """`Layer._call_has_training_arg` (False for plain Operations); checked 3.5-3.15.1."""
    return getattr(operation, "_call_has_training_arg", False)


def convert_input_args(layer) -> bool:
    """`Layer._convert_input_args`: whether `__call__` casts inputs; checked 3.5-3.15.1."""
    return layer._convert_input_args


def seed_generators(layer):
    """`Layer._seed_generators` (empty if absent); checked 3.5-3.15.1."""
    return getattr(layer, "_seed_generators", ())


def build_shapes_dict(layer):
    """`Layer._build_shapes_dict` (None if absent); checked 3.5-3.15.1."""
    return getattr(layer, "_build_shapes_dict", None)


def kernel_variable(layer):
    """`Dense._kernel` / `EinsumDense._kernel` (None if absent); checked 3.5-3.15.1."""
    return getattr(layer, "_kernel", None)


def embeddings_variable(layer):
    """`Embedding._embeddings` (also ReversibleEmbedding's, 3.13+); checked 3.5-3.15.1."""
    return getattr(layer, "_embeddings", None)


# -- functional graphs -----------------------------------------------------------------------
def sequential_graph(model):
    """`Sequential._functional`: its Functional once built, else None; checked 3.5-3.15.1."""
    return model._functional


def graph_nodes_by_depth(graph) -> dict:
    """`Function._nodes_by_depth`: {depth: [Node]}; checked 3.5-3.15.1."""
    return graph._nodes_by_depth


def standardize_graph_inputs(graph, inputs):
    """`Functional._standardize_inputs`; checked 3.5-3.15.1."""
    return graph._standardize_inputs(inputs)


def run_through_graph(graph, inputs, operation_fn):
    """`Function._run_through_graph(inputs, operation_fn=)`; checked 3.5-3.15.1."""
    return graph._run_through_graph(inputs, operation_fn=operation_fn)


# -- trainer state ---------------------------------------------------------------------------
def compile_loss(model):
    """`Trainer._compile_loss` (a CompileLoss, or None); checked 3.5-3.15.1."""
    return model._compile_loss


def compile_metrics(model):
    """`Trainer._compile_metrics` (a CompileMetrics, or None); checked 3.5-3.15.1."""
    return model._compile_metrics


def compiled_losses(loss) -> list:
    """`CompileLoss._flat_losses`: (name, fn, weight, ...) per loss; checked 3.7-3.15.1."""
    return loss._flat_losses


def loss_tracker(model):
    """`Trainer._loss_tracker`: the Mean metric behind `loss`; checked 3.5-3.15.1."""
    return model._loss_tracker


def regularization_losses(model) -> list:
    """`Layer._get_regularization_losses()`: weight penalties; checked 3.5-3.15.1."""
    return model._get_regularization_losses()


def aggregate_additional_loss(model, loss):
    """`Trainer._aggregate_additional_loss`: an add_loss term as fit adds it; checked 3.8-3.15.1."""
    return model._aggregate_additional_loss(loss)


def needs_symbolic_build(model) -> bool:
    """Keras's condition in `Trainer._symbolic_build` for building from a batch.

    Copied from the start of `Trainer._symbolic_build` (checked 3.8-3.15.1,
    unchanged): an unbuilt layer, or unbuilt compiled metrics or loss.
    """
    compiled_metrics = compile_metrics(model)
    loss = compile_loss(model)
    return (
        not all(layer.built for layer in flatten_layers(model))
        or (compiled_metrics is not None and not compiled_metrics.built)
        or (loss is not None and not loss.built)
    )


def first_data_batch(iterator):
    """The first batch of Keras's epoch iterator, as `Trainer._symbolic_build` peeks it.

    The iterator yields (step, batch-or-iterator) pairs up to 3.10 and
    (step, index, batch-or-iterator) triples since 3.11 (checked 3.8-3.15.1);
    the last element is taken either way. None if the iterator is empty.
    """
    for item in iterator:
        data_or_iterator = item[-1]
        if isinstance(data_or_iterator, (list, tuple)):
            return data_or_iterator[0]
        return next(data_or_iterator)
    return None


# -- version check ---------------------------------------------------------------------------
class UnsupportedKerasVersionError(DPError, ImportError):
    """The installed Keras is outside the versions torchdp_keras was checked against."""


class KerasVersionWarning(UserWarning):
    """Warned at import when the installed Keras is outside `CHECKED_KERAS_RANGE`."""


def _version_tuple(version: str) -> tuple[int, ...]:
    """(major, minor, patch) of a version string; pre-release suffixes are ignored."""
    parts = []
    for piece in str(version).split(".")[:3]:
        match = re.match(r"\d+", piece)
        if match is None:
            break
        parts.append(int(match.group()))
    if not parts:
        raise ValueError(f"Not a version number: {version!r}")
    return tuple(parts + [0] * (3 - len(parts)))


def installed_keras_version() -> str:
    """`keras.__version__` of the Keras this process imported."""
    return keras.__version__


def _out_of_range_message(version: str) -> str | None:
    low, high = CHECKED_KERAS_RANGE
    if _version_tuple(low) <= _version_tuple(version) < _version_tuple(high):
        return None
    return (
        f"torchdp_keras relies on private Keras APIs checked against Keras >={low},<{high}; "
        f"the installed Keras is {version}. Install a checked version "
        f'(pip install "keras>={low},<{high}"), or, to try this one, re-check the touch points '
        "in torchdp_keras/_keras_compat.py against its sources and run tests/test_keras_compat.py."
    )


def check_keras_version(version: str | None = None) -> None:
    """Raises unless `version` (default: the installed Keras) is in `CHECKED_KERAS_RANGE`.

    Raises:
        UnsupportedKerasVersionError: With the version, the checked range and
            what to do.
    """
    message = _out_of_range_message(installed_keras_version() if version is None else version)
    if message is not None:
        raise UnsupportedKerasVersionError(message)


_message = _out_of_range_message(installed_keras_version())
if _message is not None:
    warnings.warn(_message, KerasVersionWarning, stacklevel=2)
del _message
