"""Test set-up: Keras must start on the torch backend, before anything imports it."""

import os

os.environ["KERAS_BACKEND"] = "torch"

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic():
    """Seeds every RNG the tests touch and restores float32 afterwards."""
    keras.utils.set_random_seed(1234)
    yield
    keras.config.set_floatx("float32")
    keras.config.set_dtype_policy("float32")


@pytest.fixture
def float64():
    """Runs a test with Keras floatx float64 (exact per-example comparisons)."""
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")  # the global policy is cached separately
    yield
    keras.config.set_floatx("float32")
    keras.config.set_dtype_policy("float32")


def pytest_report_header(config):
    return f"torch {torch.__version__}, keras {keras.__version__}, numpy {np.__version__}"


@pytest.fixture(scope="session")
def mnist_path(tmp_path_factory):
    """MNIST in keras layout: ../shared/data/mnist.npz, or a synthetic stand-in on a bare clone."""
    from helpers import SHARED_MNIST, write_synthetic_mnist

    if os.path.exists(SHARED_MNIST):
        return os.path.abspath(SHARED_MNIST)
    return write_synthetic_mnist(str(tmp_path_factory.mktemp("data") / "mnist.npz"))
