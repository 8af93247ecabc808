"""Clipless DP training of a Lipschitz CNN on MNIST (deel-lipdp's workflow, ported).

Every layer is 1-Lipschitz with a known weight-gradient bound, the input norm
is bounded by `DP_BoundedInput`, and the loss has a known Lipschitz constant:
every example's gradient is bounded by construction, so a DP step is the
ordinary batch gradient plus Gaussian noise calibrated to those bounds (no
per-example gradients, no clipping). The noise multiplier is calibrated for
the target epsilon (PRV, delta 1e-5) over the planned Poisson-sampled steps.

At the end the example times training steps of this DP model against plain
(non-private) Keras training of the same layers and loss, interleaved in one
run, and prints the ratio: close to 1, since there is no per-example work
(the DP step also adds the noise and re-projects the spectral layers).

    python examples/lipschitz_mnist.py --epsilon 8 --data ../shared/data/mnist.npz
    python examples/lipschitz_mnist.py --epsilon 1
    python examples/lipschitz_mnist.py --smoke      # a few steps, for the tests
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
from _common import EpsilonPlot, add_data_argument, images, load_mnist  # noqa: E402

import torchdp_keras as tdk  # noqa: E402
from torchdp_keras.lipschitz import (  # noqa: E402
    DatasetMetadata,
    DP_Sequential,
    DPParameters,
    accounting_noise_multiplier,
    compute_gradient_bounds,
)
from torchdp_keras.lipschitz import layers as L  # noqa: E402
from torchdp_keras.lipschitz.losses import DP_TauCategoricalCrossentropy  # noqa: E402


def lipschitz_layers(max_norm: float) -> list:
    """A small 1-Lipschitz CNN: spectral convolutions, GroupSort, L2-norm pooling."""
    return [
        keras.Input((28, 28, 1)),
        L.DP_BoundedInput(upper_bound=max_norm),
        L.DP_SpectralConv2D(16, 3, padding="same"),
        L.DP_GroupSort(2),
        L.DP_ScaledL2NormPooling2D(2),
        L.DP_SpectralConv2D(32, 3, padding="same"),
        L.DP_GroupSort(2),
        L.DP_ScaledL2NormPooling2D(2),
        L.DP_Flatten(),
        L.DP_SpectralDense(64),
        L.DP_GroupSort(2),
        L.DP_SpectralDense(10),
    ]


def step_time_ratio(model, x, y, rounds: int = 20) -> tuple[float, float]:
    """(DP ms/step, plain ms/step): the same layers trained by plain Keras, interleaved."""
    plain = keras.Sequential(
        [type(layer).from_config(layer.get_config()) for layer in model.layers],
    )
    plain.build((None, 28, 28, 1))
    plain.set_weights(model.get_weights())
    plain.compile(optimizer=keras.optimizers.SGD(0.01), loss=model.loss)
    dp_times, plain_times = [], []
    batch = model.dataset_metadata.batch_size
    for i in range(rounds + 2):
        chunk = slice((i * batch) % (len(x) - batch), (i * batch) % (len(x) - batch) + batch)
        for which, times in ((model, dp_times), (plain, plain_times))[:: 1 if i % 2 else -1]:
            start = time.perf_counter()
            which.train_on_batch(x[chunk], y[chunk])
            if i >= 2:
                times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(dp_times), 1e3 * statistics.median(plain_times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_argument(parser)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=2000, help="expected batch size")
    parser.add_argument("--learning-rate", type=float, default=0.005)
    parser.add_argument("--max-norm", type=float, default=10.0, help="input L2 bound")
    parser.add_argument("--tau", type=float, default=16.0, help="softmax temperature of the loss")
    parser.add_argument(
        "--noisify-strategy",
        default="optimal-per-layer",
        choices=["optimal-per-layer", "per-layer", "global"],
        help="optimal-per-layer: torchdp_keras's allocation; per-layer: deel-lipdp's (one "
        "Gaussian per layer, composed: needs more noise for the same epsilon)",
    )
    parser.add_argument("--seed", type=int, default=None, help="None: OS entropy")
    parser.add_argument("--plot", default=None, help="write accuracy and epsilon per epoch (PNG)")
    parser.add_argument("--smoke", action="store_true", help="2 short epochs on 1000 examples")
    args = parser.parse_args(argv)

    x_train, y_train, x_test, y_test = load_mnist(args.data)
    x_train, x_test = images(x_train), images(x_test)
    if args.smoke:
        x_train, y_train = x_train[:1000], y_train[:1000]
        x_test, y_test = x_test[:500], y_test[:500]
        args.epochs, args.batch_size = 2, 250
    y_train, y_test = (
        keras.utils.to_categorical(v, 10).astype("float32") for v in (y_train, y_test)
    )
    n = len(x_train)
    steps_per_epoch = n // args.batch_size
    sigma = tdk.calibrate_noise_multiplier(
        target_epsilon=args.epsilon,
        target_delta=args.delta,
        sampling_probability=args.batch_size / n,
        steps=args.epochs * steps_per_epoch,
    )
    model = DP_Sequential(
        lipschitz_layers(args.max_norm),
        dp_parameters=DPParameters(args.noisify_strategy, sigma, args.delta),
        dataset_metadata=DatasetMetadata(
            input_shape=(28, 28, 1),
            nb_classes=10,
            nb_samples_train=n,
            nb_samples_test=len(x_test),
            class_names=[str(i) for i in range(10)],
            nb_steps_per_epochs=steps_per_epoch,
            batch_size=args.batch_size,
            max_norm=args.max_norm,
        ),
    )
    model.compile(
        optimizer=keras.optimizers.Adam(args.learning_rate),
        loss=DP_TauCategoricalCrossentropy(tau=args.tau),
        metrics=["accuracy"],
    )
    # The accountant sees one Gaussian mechanism of accounting_noise_multiplier
    # (deel-lipdp's "per-layer" composes the layers': sigma / sqrt(layers));
    # scale sigma so that this one is the calibrated value.
    dp_sigma = sigma * sigma / accounting_noise_multiplier(model)
    model.dp_parameters.noise_multiplier = dp_sigma
    bounds = list(compute_gradient_bounds(model).values())
    print(
        f"noise_multiplier={dp_sigma:.4f}; gradient bounds per layer (backward, batch mean): "
        + ", ".join(f"{b:.3g}" for b in bounds)
    )
    loader = tdk.PrivateDataLoader(x_train, y_train, batch_size=args.batch_size, seed=args.seed)
    callbacks = (
        [EpsilonPlot(args.plot, f"Lipschitz CNN, epsilon {args.epsilon:g}")] if args.plot else []
    )
    start = time.perf_counter()
    model.fit(
        loader,
        epochs=args.epochs,
        validation_data=(x_test, y_test),
        callbacks=callbacks,
        verbose=1 if not args.smoke else 2,
    )
    seconds = time.perf_counter() - start
    _, accuracy = model.evaluate(x_test, y_test, batch_size=1000, verbose=0)
    epsilon = model.get_epsilon()
    dp_ms, plain_ms = step_time_ratio(model, x_train, y_train, rounds=4 if args.smoke else 20)
    print(
        f"lipschitz_mnist: test accuracy {accuracy:.4f} | epsilon={epsilon:.3f} (target "
        f"{args.epsilon:g}) at delta={args.delta:g} (PRV, Poisson sampling) | "
        f"noise_multiplier={dp_sigma:.4f} ({args.noisify_strategy}) batch_size={args.batch_size} "
        f"epochs={args.epochs} steps={model.dp_steps} | step {dp_ms:.1f} ms vs plain Keras "
        f"{plain_ms:.1f} ms ({dp_ms / plain_ms:.2f}x) | {seconds:.0f}s"
    )
    return {"accuracy": accuracy, "epsilon": epsilon, "ratio": dp_ms / plain_ms, "seconds": seconds}


if __name__ == "__main__":
    main()
