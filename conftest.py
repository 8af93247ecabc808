"""Repository-wide pytest set-up, for the tests and the doctests of torchdp_keras.

Keras reads KERAS_BACKEND once, on its first import, so it is set here, before
pytest imports any test module or any module of the package for its doctests.
"""

import os

os.environ["KERAS_BACKEND"] = "torch"

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from _pytest.doctest import DoctestItem  # noqa: E402

import torchdp_keras  # noqa: E402

# setup.py is not a module to import (pytest skips it anyway); the examples and benchmarks are
# scripts, run by tests/test_examples.py.
collect_ignore = ["setup.py", "examples", "benches"]


@pytest.fixture(autouse=True)
def _doctest_names(request, doctest_namespace):
    """The names the docstrings' examples use without importing them; seeded RNGs."""
    if not isinstance(request.node, DoctestItem):
        return
    doctest_namespace.update(
        keras=keras,
        np=np,
        torch=torch,
        tdk=torchdp_keras,
        torchdp_keras=torchdp_keras,
    )
    keras.utils.set_random_seed(0)
