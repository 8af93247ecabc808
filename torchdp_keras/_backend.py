"""Checks, before anything else is imported, that Keras runs on PyTorch."""

from __future__ import annotations

import os
import sys

from torchdp_keras.errors import BackendError

_HOW_TO_FIX = (
    "torchdp_keras trains Keras 3 models on the PyTorch backend. Set the "
    "environment variable KERAS_BACKEND=torch before keras is imported "
    "(for example `export KERAS_BACKEND=torch`, or "
    "`os.environ['KERAS_BACKEND'] = 'torch'` at the very top of your script), "
    "then import torchdp_keras."
)


def check_torch_backend() -> None:
    """Raises `BackendError` unless Keras is (or will be) on the torch backend.

    If keras has not been imported yet and `KERAS_BACKEND` names another
    backend, the error is raised before keras is imported, so the user sees
    this message instead of an import failure of a backend they never meant
    to use.

    Raises:
        BackendError: Keras is configured for another backend.
    """
    if "keras" not in sys.modules:
        requested = os.environ.get("KERAS_BACKEND")
        if requested is not None and requested != "torch":
            raise BackendError(
                f"Expected KERAS_BACKEND='torch'. Received: "
                f"KERAS_BACKEND={requested!r}. {_HOW_TO_FIX}"
            )
    try:
        import keras
    except ImportError as error:  # e.g. the default backend's package is missing
        raise BackendError(
            f"keras could not be imported ({error}). This usually means that "
            f"Keras tried to start on its default backend. {_HOW_TO_FIX}"
        ) from error
    backend = keras.backend.backend()
    if backend != "torch":
        raise BackendError(
            f"Expected the Keras backend 'torch'. Received: backend={backend!r}. {_HOW_TO_FIX}"
        )
