"""deel-lipdp's MNIST experiment network: a clipless DP step against a plain Keras step.

The network of deel-lipdp's `experiments/MNIST/models_MNIST.py::create_ConvNet`
(two spectral 3x3 convolutions of 16 and 32 filters with biases, GroupSort2,
L2-norm pooling and centring, then `DP_SpectralDense(1024)` on the 1568
flattened features and `DP_SpectralDense(10)`; deel-lipdp's final
`DP_ClipGradient` is not part of this port). The DP model is a
`DP_Sequential` ("per-layer" noise, Adam) whose every step adds the noise
and re-projects every spectral kernel onto the spectral-norm ball (the
1568 x 1024 one is the expensive part); the plain twin is a
`keras.Sequential` of the same layers trained with the same optimizer and
loss, without either. Both are timed interleaved, round by round, on random
MNIST-shaped data.

    python benches/bench_lipdp.py                  # batch 2048 (default)
    python benches/bench_lipdp.py --batch-size 512

Exit status 1 if the DP step is above `--max-ratio` (1.5) times the plain one.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from _timing import (  # noqa: E402
    add_timing_arguments,
    finish,
    interleaved,
    print_table,
    reexec_with_tuned_malloc,
    summarize,
)

from torchdp_keras.lipschitz import DatasetMetadata, DP_Sequential, DPParameters  # noqa: E402
from torchdp_keras.lipschitz import layers as L  # noqa: E402
from torchdp_keras.lipschitz.losses import DP_TauCategoricalCrossentropy  # noqa: E402


def convnet_layers(upper_bound: float = 20.0) -> list:
    """deel-lipdp's MNIST ConvNet (`create_ConvNet`, without DP_ClipGradient)."""
    return [
        L.DP_BoundedInput(input_shape=(28, 28, 1), upper_bound=upper_bound),
        L.DP_SpectralConv2D(
            filters=16, kernel_size=3, kernel_initializer="orthogonal", strides=1, use_bias=False
        ),
        L.DP_AddBias(norm_max=1),
        L.DP_GroupSort(2),
        L.DP_ScaledL2NormPooling2D(pool_size=2, strides=2),
        L.DP_LayerCentering(),
        L.DP_SpectralConv2D(
            filters=32, kernel_size=3, kernel_initializer="orthogonal", strides=1, use_bias=False
        ),
        L.DP_AddBias(norm_max=1),
        L.DP_GroupSort(2),
        L.DP_ScaledL2NormPooling2D(pool_size=2, strides=2),
        L.DP_LayerCentering(),
        L.DP_Flatten(),
        L.DP_SpectralDense(1024, use_bias=False),
        L.DP_AddBias(norm_max=1),
        L.DP_SpectralDense(10, use_bias=False),
        L.DP_AddBias(norm_max=1),
    ]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_timing_arguments(parser, steps=10, warmup=2, max_ratio=1.5)
    parser.add_argument("--batch-size", type=int, default=2048)
    args = parser.parse_args(argv)
    if args.tuned_malloc:
        reexec_with_tuned_malloc()
    n, batch = 60000, args.batch_size
    rng = np.random.default_rng(0)
    x = rng.random((batch, 28, 28, 1), dtype=np.float32)
    y = np.eye(10, dtype=np.float32)[rng.integers(0, 10, batch)]
    keras.utils.set_random_seed(0)
    dp = DP_Sequential(
        convnet_layers(),
        dp_parameters=DPParameters("per-layer", 2.0, 1e-5),
        dataset_metadata=DatasetMetadata(
            input_shape=(28, 28, 1),
            nb_classes=10,
            nb_samples_train=n,
            nb_samples_test=10000,
            class_names=[str(i) for i in range(10)],
            nb_steps_per_epochs=n / batch,
            batch_size=batch,
            max_norm=20.0,
        ),
    )
    loss = DP_TauCategoricalCrossentropy(tau=8.0)
    dp.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
    plain = keras.Sequential([type(layer).from_config(layer.get_config()) for layer in dp.layers])
    plain.build((None, 28, 28, 1))
    plain.set_weights(dp.get_weights())
    plain.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
    steps = {
        "plain Keras": lambda i: plain.train_on_batch(x, y),
        "DP_Sequential (per-layer)": lambda i: dp.train_on_batch(x, y),
    }
    summary = summarize(interleaved(steps, args.steps, args.warmup), "plain Keras")
    print_table(f"deel-lipdp MNIST ConvNet, batch {batch}", summary, "plain Keras")
    return finish(summary, "DP_Sequential (per-layer)", args.max_ratio, "the DP step", args.json)


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
