"""Checks that Keras runs (or will run) on the PyTorch backend.

`torchdp_keras` itself imports lazily: the accounting tools need neither
torch nor keras. The check runs twice:

* `check_backend_before_import()` when `torchdp_keras` is imported: it fails
  at once if Keras already runs on another backend, or if `KERAS_BACKEND`
  names another one; it never imports keras itself;
* `check_torch_backend()` before any module that needs keras is imported
  (the model classes, the per-example engine).
"""

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


def check_backend_before_import() -> None:
    """Raises `BackendError` if Keras runs, or is set to run, on another backend.

    Does not import keras.
    """
    keras = sys.modules.get("keras")
    if keras is not None and hasattr(keras, "backend"):
        backend = keras.backend.backend()
        if backend != "torch":
            raise BackendError(
                f"Expected the Keras backend 'torch'. Received: backend={backend!r}. {_HOW_TO_FIX}"
            )
        return
    requested = os.environ.get("KERAS_BACKEND")
    if requested is not None and requested != "torch":
        raise BackendError(
            f"Expected KERAS_BACKEND='torch'. Received: KERAS_BACKEND={requested!r}. {_HOW_TO_FIX}"
        )


def check_torch_backend() -> None:
    """Imports keras and raises `BackendError` unless it runs on torch.

    Raises:
        BackendError: Keras is configured for another backend, or cannot
            start on its default backend.
    """
    check_backend_before_import()
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
