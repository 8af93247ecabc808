"""TF Privacy's MNIST tutorial notebook, ported line by line to Keras 3 on torch.

The notebook (../shared/reference/tf_privacy_mnist_notebook.txt) subclasses
`tf.keras.Model`, compiles it with `DPGradientDescentGaussianOptimizer` and an
unreduced loss, fits 15 epochs and reports epsilon with
`compute_dp_sgd_privacy`. The port replaces the `tensorflow_privacy` package
prefix by `torchdp_keras` in the imports, `tf.keras.Model` by
`torchdp_keras.Model`, and nothing else of substance:

- `call(self, x, is_training=False)` becomes `call(self, x, training=False)`:
  Keras passes `training`, so with the notebook's name dropout never ran and
  the softmax was applied before a `from_logits=True` loss during training.
  With `training` the notebook's intent holds: logits (and dropout) in
  training, softmax probabilities otherwise.
- `Conv2D(..., input_shape=...)` loses `input_shape` (Keras 3 builds
  subclassed models from the first batch).

Like the notebook, `fit` draws shuffled batches of fixed size; the epsilon it
reports assumes Poisson sampling (torchdp_keras warns about this). The last
lines print the notebook's statement (RDP 0.94 at order 17, 1.18 with the
classic conversion the notebook's TF Privacy used) and the tighter PRV bound.

    python examples/tf_privacy_mnist_tutorial.py --data ../shared/data/mnist.npz
    python examples/tf_privacy_mnist_tutorial.py --smoke      # a few steps, for the tests
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from _common import EpsilonPlot, add_data_argument, load_mnist  # noqa: E402
from keras import layers, ops  # noqa: E402

from torchdp_keras import Model  # noqa: E402  (was: from tensorflow.keras import Model)
from torchdp_keras.accounting import get_privacy_budget  # noqa: E402
from torchdp_keras.privacy.analysis import compute_dp_sgd_privacy  # noqa: E402
from torchdp_keras.privacy.optimizers.dp_optimizer import (  # noqa: E402
    DPGradientDescentGaussianOptimizer,
)

# In [18]
epochs = 15
batch_size = 250

l2_norm_clip = 1.5  # gradient clip
noise_multiplier = 1.3  # random noise added
num_microbatches = 250
learning_rate = 0.25

assert batch_size % num_microbatches == 0.0


# In [21]
class Classifier(Model):
    # Set layers.
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv1 = layers.Conv2D(16, 8, strides=2, padding="same", activation="relu")
        self.maxpool1 = layers.MaxPool2D(2, 1)
        self.conv2 = layers.Conv2D(32, 4, strides=2, padding="valid", activation="relu")
        self.maxpool2 = layers.MaxPool2D(2, 1)
        self.flatten = layers.Flatten()

        # Fully connected layer.
        self.fc1 = layers.Dense(32, activation="relu")
        self.dropout = layers.Dropout(rate=0.5)
        self.out = layers.Dense(10)

    # Set forward pass.
    def call(self, x, training=False):
        x = ops.reshape(x, [-1, 28, 28, 1])
        x = self.conv1(x)
        x = self.maxpool1(x)
        x = self.conv2(x)
        x = self.maxpool2(x)
        x = self.flatten(x)
        x = self.fc1(x)
        x = self.dropout(x, training=training)
        x = self.out(x)
        if not training:
            # the cross entropy expects logits, so softmax is applied only
            # outside training (as in the notebook).
            x = ops.softmax(x)
        return x


def load_dataset(path):
    # In [6]
    train_data, train_labels, test_data, test_labels = load_mnist(path)

    train_data = np.array(train_data, dtype=np.float32) / 255
    test_data = np.array(test_data, dtype=np.float32) / 255

    train_data = train_data.reshape(train_data.shape[0], 28, 28, 1)
    test_data = test_data.reshape(test_data.shape[0], 28, 28, 1)

    train_labels = np.array(train_labels, dtype=np.int32)
    test_labels = np.array(test_labels, dtype=np.int32)

    train_labels = keras.utils.to_categorical(train_labels, num_classes=10)
    test_labels = keras.utils.to_categorical(test_labels, num_classes=10)
    return train_data, train_labels, test_data, test_labels


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_argument(parser)
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--seed", type=int, default=None, help="None: OS entropy")
    parser.add_argument("--plot", default=None, help="write accuracy and epsilon per epoch (PNG)")
    parser.add_argument("--smoke", action="store_true", help="2 epochs on 1000 examples")
    args = parser.parse_args(argv)

    train_data, train_labels, test_data, test_labels = load_dataset(args.data)
    if args.smoke:
        args.epochs = 2
        train_data, train_labels = train_data[:1000], train_labels[:1000]
        test_data, test_labels = test_data[:500], test_labels[:500]
    if args.seed is not None:
        keras.utils.set_random_seed(args.seed)

    # In [22]
    optimizer = DPGradientDescentGaussianOptimizer(
        l2_norm_clip=l2_norm_clip,
        noise_multiplier=noise_multiplier,
        num_microbatches=num_microbatches,
        learning_rate=learning_rate,
    )

    loss = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)

    # In [23]
    model = Classifier(seed=args.seed)
    model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])

    start = time.perf_counter()
    callbacks = [EpsilonPlot(args.plot, "TF Privacy MNIST tutorial")] if args.plot else []
    model.fit(
        train_data,
        train_labels,
        epochs=args.epochs,
        validation_data=(test_data, test_labels),
        batch_size=batch_size,
        callbacks=callbacks,
        verbose=1 if not args.smoke else 2,
    )
    seconds = time.perf_counter() - start
    _, accuracy = model.evaluate(test_data, test_labels, batch_size=1000, verbose=0)

    # In [24]
    n = len(train_data)
    rdp_epsilon, order = compute_dp_sgd_privacy.compute_dp_sgd_privacy(
        n=n,
        batch_size=batch_size,
        noise_multiplier=noise_multiplier,
        epochs=args.epochs,
        delta=1e-5,
    )
    classic, _ = compute_dp_sgd_privacy.compute_dp_sgd_privacy(
        n=n,
        batch_size=batch_size,
        noise_multiplier=noise_multiplier,
        epochs=args.epochs,
        delta=1e-5,
        conversion="classic",
        verbose=False,
    )
    prv_epsilon = get_privacy_budget(
        sample_size=n,
        batch_size=batch_size,
        num_epochs=args.epochs,
        noise_multiplier=noise_multiplier,
        target_delta=1e-5,
        verbose=False,
    )
    print(
        f"epsilon at delta=1e-05: {rdp_epsilon:.2f} (RDP, improved conversion, order "
        f"{order:g}), {classic:.2f} (RDP, classic conversion: the notebook's number), "
        f"{prv_epsilon:.2f} (PRV, tightest)"
    )
    print(
        f"tf_privacy_mnist_tutorial: test accuracy {accuracy:.4f} | epsilon={rdp_epsilon:.2f} "
        f"(RDP) / {prv_epsilon:.2f} (PRV) at delta=1e-05 | steps={model.dp_steps} "
        f"epochs={args.epochs} | {seconds:.0f}s"
    )
    return {"accuracy": accuracy, "epsilon_rdp": rdp_epsilon, "epsilon_prv": prv_epsilon}


if __name__ == "__main__":
    main()
