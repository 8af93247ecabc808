"""DP-SGD on MNIST, data-parallel over several processes with torch.distributed.

Launch with torchrun (gloo on CPU; nccl when every process has a GPU):

    torchrun --nproc_per_node=2 examples/distributed_mnist.py --data ../shared/data/mnist.npz
    torchrun --nproc_per_node=2 examples/distributed_mnist.py --smoke   # a few steps

    # two machines, 8 GPUs each (run on both, same --rdzv-endpoint):
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d \\
        --rdzv-endpoint=HOST:29500 examples/distributed_mnist.py --batch-size 4096

Every rank loads the whole training set; `PrivateDataLoader(batch_size=B)`
draws one Poisson sample of it per update (global q = B / n) and each rank
trains on its share (about B / world examples); the clipped sums are
all-reduced and rank 0 adds the noise once. The epsilon and the training
metrics are the same on every rank; rank 0 prints them. Without torchrun
(no process group) the same script trains on one process.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _common import add_data_argument, images, load_mnist, tanh_cnn  # noqa: E402

import torchdp_keras as tdk  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_argument(parser)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=512, help="global expected batch")
    parser.add_argument("--noise-multiplier", type=float, default=1.1)
    parser.add_argument("--l2-norm-clip", type=float, default=1.0)
    parser.add_argument("--learning-rate", type=float, default=0.5)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--smoke", action="store_true", help="a few steps on 4,096 examples")
    args = parser.parse_args(argv)

    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if launched and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        # A rank that dies makes the others fail after at most this long.
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=5))
    rank, world = tdk.distributed.process_group()

    x_train, y_train, x_test, y_test = load_mnist(args.data)
    if args.smoke:
        x_train, y_train = x_train[:4096], y_train[:4096]
        x_test, y_test = x_test[:512], y_test[:512]
        args.epochs, args.batch_size = 1, 256
    x_train, x_test = images(x_train), images(x_test)

    if args.seed is not None:
        keras.utils.set_random_seed(args.seed)
    model = tdk.make_private(
        tanh_cnn(),
        l2_norm_clip=args.l2_norm_clip,
        noise_multiplier=args.noise_multiplier,
        seed=args.seed,
    )
    model.compile(
        optimizer=keras.optimizers.SGD(args.learning_rate, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    loader = tdk.PrivateDataLoader(
        x_train,
        y_train,
        batch_size=args.batch_size,
        seed=None if args.seed is None else args.seed + 1,
    )
    start = time.perf_counter()
    history = model.fit(
        loader, epochs=args.epochs, verbose=2 if rank == 0 else 0, target_delta=args.delta
    )
    seconds = time.perf_counter() - start
    # Every rank holds the same weights: evaluate the test set on rank 0's copy.
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    result = {
        "world_size": world,
        "epsilon": model.get_epsilon(args.delta),
        "test_accuracy": float(accuracy),
        "train_accuracy": float(history.history["accuracy"][-1]),
        "steps": model.dp_steps,
        "seconds": seconds,
    }
    if rank == 0:
        print(
            f"distributed_mnist: {world} process(es), {result['steps']} updates in "
            f"{seconds:.1f} s; test accuracy {accuracy:.4f}; epsilon {result['epsilon']:.3f} "
            f"(delta={args.delta}, q={loader.sampling_probability:.4g}, "
            f"sigma={args.noise_multiplier})"
        )
    if launched:
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
