"""What the examples share: MNIST loading, the progress/summary plumbing and the PNG plot.

Not part of the library: the examples import it as a sibling module.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402

# Where the project's own data lies in this repository's layout (../shared beside it).
SHARED_MNIST = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "mnist.npz"
)


def add_data_argument(parser) -> None:
    """`--data PATH`: an MNIST .npz in keras layout (x_train, y_train, x_test, y_test)."""
    parser.add_argument(
        "--data",
        default=None,
        help="MNIST .npz in keras layout; default: keras.datasets.mnist (downloads "
        f"once), else {os.path.normpath(SHARED_MNIST)} if it exists",
    )


def load_mnist(path: str | None = None):
    """Returns (x_train, y_train, x_test, y_test) as uint8 images and integer labels.

    From `path` when given; otherwise from `keras.datasets.mnist` (its cache in
    ~/.keras/datasets, or a download), and, when that is unreachable, from
    this repository's ../shared/data/mnist.npz.
    """
    if path is not None:
        if not os.path.exists(path):
            raise SystemExit(f"--data: no such file: {path}")
        return _load_npz(path)
    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
        return x_train, y_train, x_test, y_test
    except Exception as error:  # no network, no cache
        if os.path.exists(SHARED_MNIST):
            return _load_npz(SHARED_MNIST)
        raise SystemExit(
            f"keras.datasets.mnist could not be loaded ({error}); pass --data PATH to an "
            "MNIST .npz in keras layout (x_train, y_train, x_test, y_test)."
        ) from error


def _load_npz(path: str):
    with np.load(path) as data:
        missing = {"x_train", "y_train", "x_test", "y_test"} - set(data.files)
        if missing:
            raise SystemExit(f"--data {path}: missing arrays {sorted(missing)} (keras layout)")
        return data["x_train"], data["y_train"], data["x_test"], data["y_test"]


def tanh_cnn(name: str = "tanh_cnn") -> keras.Sequential:
    """Tramer & Boneh's end-to-end MNIST CNN: the TF Privacy tutorial's, tanh, no dropout."""
    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            layers.Conv2D(16, 8, strides=2, padding="same", activation="tanh"),
            layers.MaxPool2D(2, 1),
            layers.Conv2D(32, 4, strides=2, padding="valid", activation="tanh"),
            layers.MaxPool2D(2, 1),
            layers.Flatten(),
            layers.Dense(32, activation="tanh"),
            layers.Dense(10),
        ],
        name=name,
    )


def images(x: np.ndarray) -> np.ndarray:
    """uint8 (n, 28, 28) -> float32 (n, 28, 28, 1) in [0, 1]."""
    return (x.astype("float32") / 255.0).reshape(len(x), 28, 28, 1)


class EpsilonPlot(keras.callbacks.Callback):
    """Collects accuracy and epsilon per epoch and writes them as a PNG at the end of fit.

    Needs matplotlib (the `examples` extra); without it the callback says so
    when fit ends and writes nothing.
    """

    def __init__(self, path: str, title: str):
        super().__init__()
        self.path, self.title = path, title
        self.rows: list[dict] = []

    def on_epoch_end(self, epoch, logs=None):
        self.rows.append({"epoch": epoch + 1, **(logs or {})})

    def on_train_end(self, logs=None):
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print(f"--plot {self.path}: matplotlib is not installed (pip install matplotlib)")
            return
        epochs = [r["epoch"] for r in self.rows]
        fig, left = plt.subplots(figsize=(6, 4))
        for key, style in (("accuracy", "-"), ("val_accuracy", "--")):
            if any(key in r for r in self.rows):
                left.plot(epochs, [r.get(key, np.nan) for r in self.rows], style, label=key)
        left.set_xlabel("epoch")
        left.set_ylabel("accuracy")
        right = left.twinx()
        right.plot(epochs, [r.get("epsilon", np.nan) for r in self.rows], "r:", label="epsilon")
        right.set_ylabel("epsilon", color="r")
        left.legend(loc="lower right")
        left.set_title(self.title)
        fig.tight_layout()
        fig.savefig(self.path, dpi=100)
        plt.close(fig)
        print(f"wrote {self.path}")
