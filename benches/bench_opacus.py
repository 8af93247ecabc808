"""The tutorial CNN under Opacus (plain torch) against DPSequential (Keras on torch).

Benchmark-only dependency: `pip install opacus` (`.[bench]`). Contenders, all
at batch 250 on the same MNIST batches, interleaved round by round:

* plain Keras (`keras.Sequential`) and `DPSequential` (fast clipping, "auto");
* the same CNN written in plain torch (`torch.nn.Sequential`, same padding,
  same initial weights), without DP;
* Opacus 1.5 on that torch model: per-sample gradients through hooks
  (`GradSampleModule` + `DPOptimizer`), fast gradient clipping and ghost
  clipping (`GradSampleModuleFastGradientClipping` + `double_backward`).

Every DP contender uses l2_norm_clip 1.5 and noise_multiplier 1.3, SGD 0.25.
The report gives median step times and the median per-round ratio to plain
Keras and to Opacus's fastest mode.

    python benches/bench_opacus.py --data ../shared/data/mnist.npz
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _timing import (  # noqa: E402
    add_timing_arguments,
    interleaved,
    print_table,
    reexec_with_tuned_malloc,
    summarize,
    write_summary,
)
from bench_step_time import DEFAULT_DATA, PLAIN, keras_contenders, load_batches  # noqa: E402

L2_NORM_CLIP, NOISE_MULTIPLIER, LEARNING_RATE = 1.5, 1.3, 0.25


def torch_cnn(keras_model) -> torch.nn.Sequential:
    """The tutorial CNN in plain torch (NCHW), with the Keras model's weights."""
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 8, stride=2, padding=3),  # Keras "same" here: 3 and 3
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2, 1),
        torch.nn.Conv2d(16, 32, 4, stride=2),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2, 1),
        torch.nn.Flatten(),
        torch.nn.Linear(32 * 4 * 4, 32),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.5),
        torch.nn.Linear(32, 10),
    )
    k1, b1, k2, b2, k3, b3, k4, b4 = keras_model.get_weights()
    # Keras flattens NHWC, torch NCHW: reorder the first dense layer's rows.
    k3 = k3.reshape(4, 4, 32, 32).transpose(2, 0, 1, 3).reshape(512, 32)
    with torch.no_grad():
        for layer, kernel, bias in [
            (model[0], k1.transpose(3, 2, 0, 1), b1),
            (model[3], k2.transpose(3, 2, 0, 1), b2),
            (model[7], k3.T, b3),
            (model[10], k4.T, b4),
        ]:
            layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel)))
            layer.bias.copy_(torch.from_numpy(bias))
    return model


def torch_steps(keras_model, batch_size):
    """`{name: step(x, y)}` for plain torch and the Opacus modes."""
    from opacus import GradSampleModule
    from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
        GradSampleModuleFastGradientClipping,
    )
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
    from opacus.utils import fast_gradient_clipping_utils

    steps = {}
    model = torch_cnn(keras_model)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    criterion = torch.nn.CrossEntropyLoss()
    per_sample = torch.nn.CrossEntropyLoss(reduction="none")

    def plain(x, y):
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()

    steps["plain torch"] = plain

    hooks_model = GradSampleModule(torch_cnn(keras_model))
    hooks_optimizer = DPOptimizer(
        torch.optim.SGD(hooks_model.parameters(), lr=LEARNING_RATE),
        noise_multiplier=NOISE_MULTIPLIER,
        max_grad_norm=L2_NORM_CLIP,
        expected_batch_size=batch_size,
    )

    def opacus_hooks(x, y):
        hooks_optimizer.zero_grad()
        criterion(hooks_model(x), y).backward()
        hooks_optimizer.step()

    steps["Opacus hooks"] = opacus_hooks

    for name, ghost in (("Opacus fast gradient clipping", False), ("Opacus ghost clipping", True)):
        fgc_model = GradSampleModuleFastGradientClipping(
            torch_cnn(keras_model), max_grad_norm=L2_NORM_CLIP, use_ghost_clipping=ghost
        )
        fgc_optimizer = DPOptimizerFastGradientClipping(
            torch.optim.SGD(fgc_model.parameters(), lr=LEARNING_RATE),
            noise_multiplier=NOISE_MULTIPLIER,
            max_grad_norm=L2_NORM_CLIP,
            expected_batch_size=batch_size,
        )

        if hasattr(fast_gradient_clipping_utils, "DPLossFastGradientClipping"):
            # Newer Opacus (1.6) wraps the loss; 1.5.2 had `double_backward`.
            dp_loss = fast_gradient_clipping_utils.DPLossFastGradientClipping(
                fgc_model, fgc_optimizer, torch.nn.CrossEntropyLoss(), "mean"
            )

            def opacus_fgc(x, y, m=fgc_model, o=fgc_optimizer, loss=dp_loss):
                o.zero_grad()
                loss(m(x), y).backward()
                o.step()
        else:

            def opacus_fgc(x, y, m=fgc_model, o=fgc_optimizer):
                o.zero_grad()
                fast_gradient_clipping_utils.double_backward(m, o, per_sample(m(x), y))
                o.step()

        steps[name] = opacus_fgc
    return steps


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--batch-size", type=int, default=250)
    add_timing_arguments(parser, steps=40, warmup=4, max_ratio=None)
    args = parser.parse_args(argv)
    if args.tuned_malloc and argv is None:
        reexec_with_tuned_malloc()
    models = keras_contenders(args.batch_size, modes=("auto",))
    batches = load_batches(args.data, args.batch_size, args.warmup + args.steps)
    torch_batches = [
        (torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y).long())
        for x, y in batches
    ]
    # The torch CNN is the Keras CNN: same logits from the same weights.
    with torch.no_grad():
        ours = torch_cnn(models[PLAIN]).eval()(torch_batches[0][0]).numpy()
    theirs = keras.ops.convert_to_numpy(models[PLAIN](batches[0][0], training=False))
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
    steps = {
        name: (lambda i, m=model: m.train_on_batch(*batches[i])) for name, model in models.items()
    }
    for name, step in torch_steps(models[PLAIN], args.batch_size).items():
        steps[name] = lambda i, s=step: s(*torch_batches[i])
    times = interleaved(steps, args.steps, args.warmup)
    summary = summarize(times, PLAIN)
    print_table(
        f"Tutorial CNN, batch {args.batch_size}, cpu, {torch.get_num_threads()} threads, "
        f"{args.steps} rounds: Keras and Opacus",
        summary,
        PLAIN,
    )
    opacus = {k: v for k, v in times.items() if k.startswith("Opacus")}
    fastest = min(opacus, key=lambda k: summary[k][0])
    against = summarize({"ours": times["DPSequential (auto)"], fastest: times[fastest]}, fastest)
    print(
        f"DPSequential (auto) / {fastest}: {against['ours'][1]:.2f}x "
        "(median per-round ratio; goal <= 1.0, stretch 0.8)"
    )
    summary["ours / fastest Opacus"] = (fastest, against["ours"][1])
    if args.json:
        write_summary(args.json, summary)
    return summary


if __name__ == "__main__":
    main()
