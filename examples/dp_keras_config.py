"""JAX Privacy's Keras API, ported: budget first with DPKerasConfig, then make_private.

`DPKerasConfig(epsilon, delta, clipping_norm, batch_size,
gradient_accumulation_steps, train_steps, train_size, ...)` states the
guarantee and the plan; the noise multiplier is calibrated (PRV) so that
`train_steps` updates spend at most `epsilon`. `make_private(model, config)`
returns the DP model; `fit` on arrays draws Poisson batches
(`poisson_sampling_in_fit=True`), accumulates `gradient_accumulation_steps`
physical batches per noised update, and refuses to go past `train_steps`
(`PrivacyBudgetExceededError`), which the end of this example shows.

    python examples/dp_keras_config.py --data ../shared/data/mnist.npz
    python examples/dp_keras_config.py --smoke      # a few steps, for the tests
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
from _common import EpsilonPlot, add_data_argument, images, load_mnist, tanh_cnn  # noqa: E402

import torchdp_keras as tdk  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_argument(parser)
    parser.add_argument("--epsilon", type=float, default=2.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=256, help="physical batch")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=2)
    parser.add_argument("--seed", type=int, default=None, help="None: OS entropy")
    parser.add_argument("--plot", default=None, help="write accuracy and epsilon per epoch (PNG)")
    parser.add_argument("--smoke", action="store_true", help="2 short epochs on 2048 examples")
    args = parser.parse_args(argv)

    x_train, y_train, x_test, y_test = load_mnist(args.data)
    x_train, x_test = images(x_train), images(x_test)
    if args.smoke:
        x_train, y_train = x_train[:2048], y_train[:2048]
        x_test, y_test = x_test[:500], y_test[:500]
        args.epochs, args.batch_size = 2, 128
    n = len(x_train)
    effective = args.batch_size * args.gradient_accumulation_steps
    config = tdk.DPKerasConfig(
        epsilon=args.epsilon,
        delta=args.delta,
        clipping_norm=1.0,
        batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        train_steps=args.epochs * (n // effective),
        train_size=n,
        poisson_sampling_in_fit=True,
        seed=args.seed,
    )
    config = config.update_with_calibrated_noise_multiplier()
    print(
        f"DPKerasConfig: noise_multiplier={config.noise_multiplier:.4f} calibrated for "
        f"epsilon={config.epsilon} at delta={config.delta}, {config.train_steps} updates of "
        f"{config.effective_batch_size} examples (q={config.sampling_probability:.4g})"
    )
    model = tanh_cnn()
    dp_model = tdk.make_private(model, config)
    dp_model.compile(
        # rescale_to_unit_norm (the config's default) makes the update scale
        # independent of clipping_norm.
        optimizer=keras.optimizers.SGD(0.5, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    callbacks = [EpsilonPlot(args.plot, "MNIST, DPKerasConfig")] if args.plot else []
    start = time.perf_counter()
    dp_model.fit(
        x_train,
        y_train,
        epochs=args.epochs,
        validation_data=(x_test, y_test),
        callbacks=callbacks,
        verbose=1 if not args.smoke else 2,
    )
    seconds = time.perf_counter() - start
    _, accuracy = dp_model.evaluate(x_test, y_test, batch_size=1000, verbose=0)
    epsilon = dp_model.get_epsilon()
    try:  # the budget covers config.train_steps updates, and no more
        dp_model.fit(x_train, y_train, epochs=1, verbose=0)
        refused = False
    except tdk.PrivacyBudgetExceededError as error:
        refused = True
        print(f"one more epoch is refused: {error}")
    print(
        f"dp_keras_config: test accuracy {accuracy:.4f} | epsilon={epsilon:.3f} (budget "
        f"{config.epsilon}) at delta={config.delta} (PRV, Poisson sampling) | "
        f"noise_multiplier={config.noise_multiplier:.4f} updates={dp_model.dp_steps}/"
        f"{config.train_steps} batch={config.batch_size}x{config.gradient_accumulation_steps} "
        f"| {seconds:.0f}s"
    )
    return {
        "accuracy": accuracy,
        "epsilon": epsilon,
        "budget": config.epsilon,
        "refused_past_budget": refused,
    }


if __name__ == "__main__":
    main()
