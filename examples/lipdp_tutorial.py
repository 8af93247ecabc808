"""deel-lipdp's MNIST tutorial notebook (docs/notebooks/train_mnist.ipynb), cell by cell.

Only the imports changed (and `path=`/`seed=` for offline runs). The dynamic
clipping of the last layer (`DP_ClipGradient(epsilon=1, mode="dynamic_svt",
patience=10)` with `AdaptiveLossGradientClipping`) is deel-lipdp's, with its
threshold made private (see `torchdp_keras.lipschitz.dynamic`); each update
is composed by the model's RDP accountant.

Expect a minute or two for the full run (MNIST, batch 2048, 9 epochs within
epsilon 3; 75 s on a 2-core CPU, 87.4% validation accuracy); `--smoke` trains two steps.

    python examples/lipdp_tutorial.py [--data mnist.npz] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
from _common import SHARED_MNIST, add_data_argument  # noqa: E402

# ### Imports (deel.lipdp.* -> torchdp_keras.lipschitz.*)
import torchdp_keras.lipschitz.layers as DP_layers  # noqa: E402, N812
import torchdp_keras.lipschitz.losses as DP_losses  # noqa: E402, N812
from torchdp_keras.lipschitz.model import (  # noqa: E402
    AdaptiveLossGradientClipping,
    DP_Accountant,
    DP_Sequential,
    DPParameters,
)
from torchdp_keras.lipschitz.pipeline import (  # noqa: E402
    bound_clip_value,
    load_and_prepare_data,
)
from torchdp_keras.lipschitz.sensitivity import get_max_epochs  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_argument(parser)
    parser.add_argument("--seed", type=int, default=None, help="sampler seed (None: OS entropy)")
    parser.add_argument("--smoke", action="store_true", help="one epoch on 2048 examples")
    args = parser.parse_args(argv)
    path = args.data
    if path is None and os.path.exists(SHARED_MNIST):
        path = SHARED_MNIST
    start = time.perf_counter()

    # ### Loading the data
    ds_train, ds_test, dataset_metadata = load_and_prepare_data(
        "mnist",
        batch_size=2048,
        drop_remainder=True,  # accounting assumes fixed batch size
        bound_fct=bound_clip_value(10.0),  # clipping preprocessing allows to control input bound
        path=path,
        seed=args.seed,
    )

    # ### Declaring the DP parameters
    dp_parameters = DPParameters(
        noisify_strategy="global",
        noise_multiplier=1.5,
        delta=1e-5,
    )

    # ### Defining the model
    layers = [
        DP_layers.DP_BoundedInput(
            input_shape=dataset_metadata.input_shape,
            upper_bound=dataset_metadata.max_norm,
        ),
        DP_layers.DP_SpectralConv2D(filters=16, kernel_size=5),
        DP_layers.DP_Flatten(),
        DP_layers.DP_SpectralDense(units=10),
        DP_layers.DP_ClipGradient(epsilon=1, mode="dynamic_svt", patience=10),
    ]
    model = DP_Sequential(
        layers=layers, dp_parameters=dp_parameters, dataset_metadata=dataset_metadata
    )
    loss = DP_losses.DP_TauCategoricalCrossentropy(tau=14.0)
    opt = keras.optimizers.SGD(learning_rate=1e-2)  # any non-private optimizer
    model.compile(loss=loss, optimizer=opt, metrics=["accuracy"], run_eagerly=False)

    # ### Define the desired DP guarantees
    num_epochs = get_max_epochs(3.0, model)
    if args.smoke:
        num_epochs = min(num_epochs, 1)
        ds_train.updates_per_epoch = 2

    # ### Train the model
    callbacks = [
        DP_Accountant(log_fn="logging"),
        AdaptiveLossGradientClipping(ds_train=ds_train),  # only with mode="dynamic_svt"
    ]
    hist = model.fit(
        ds_train,
        epochs=num_epochs,
        validation_data=ds_test,
        callbacks=callbacks,
        verbose=2,
    )
    accuracy = hist.history["val_accuracy"][-1]
    epsilon = model.get_epsilon()
    seconds = time.perf_counter() - start
    print(
        f"lipdp_tutorial: {num_epochs} epochs (get_max_epochs(3.0), RDP as deel-lipdp) | "
        f"val accuracy {accuracy:.4f} | epsilon spent {epsilon:.3f} (RDP, Poisson sampling, "
        f"delta 1e-5, with the clipping updates) | clipping value {layers[-1].clip_value:.3f} | "
        f"{seconds:.0f} s"
    )
    return {"epochs": num_epochs, "accuracy": accuracy, "epsilon": epsilon, "seconds": seconds}


if __name__ == "__main__":
    main()
