"""Checks that Keras runs (or will run) on the PyTorch backend.

`torchdp_keras` itself imports lazily: the accounting tools need neither
torch nor keras. The check runs twice:

* `check_backend_before_import()` when `torchdp_keras` is imported: it fails
  at once if Keras already runs on another backend, or if `KERAS_BACKEND`
  names another one, and sets `KERAS_BACKEND=torch` when keras is not
  imported yet and the variable is unset; it never imports keras itself;
* `check_torch_backend()` before any module that needs keras is imported
  (the model classes, the per-example engine).
"""

from __future__ import annotations

import json
import logging
import os
import sys

from torchdp_keras.errors import BackendError

logger = logging.getLogger("torchdp_keras")

_HOW_TO_FIX = (
    "torchdp_keras trains Keras 3 models on the PyTorch backend. Set the "
    "environment variable KERAS_BACKEND=torch before keras is imported "
    "(for example `export KERAS_BACKEND=torch`, or "
    "`os.environ['KERAS_BACKEND'] = 'torch'` at the very top of your script), "
    "then import torchdp_keras."
)


def _keras_config_backend() -> str | None:
    """The backend named in Keras's config file (`$KERAS_HOME/keras.json`), if any."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        with open(os.path.join(home, "keras.json"), encoding="utf-8") as file:
            backend = json.load(file).get("backend")
    except (OSError, ValueError, AttributeError):
        return None
    return backend if isinstance(backend, str) else None


def check_backend_before_import() -> None:
    """Raises `BackendError` if Keras runs, or is set to run, on another backend.

    When keras has not been imported yet and `KERAS_BACKEND` is unset, sets
    `KERAS_BACKEND=torch` for this process (and logs it), so that
    `import torchdp_keras` followed by `import keras` starts Keras on torch
    whatever its default or its `keras.json` says. Does not import keras.
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
    if requested is None:
        os.environ["KERAS_BACKEND"] = "torch"
        # Info, not a warning: Keras writes backend "tensorflow" into a new
        # keras.json by itself, so that file rarely says what the user chose.
        logger.info(
            "torchdp_keras: set KERAS_BACKEND=torch for this process (keras was not imported "
            "yet and KERAS_BACKEND was unset; keras.json's backend %r is not used).",
            _keras_config_backend(),
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
