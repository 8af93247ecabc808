"""DP LoRA fine-tuning of a keras_hub causal language model (GPT-2 architecture).

By default, offline: a small GPT-2 built from a config (random weights), a
byte-level tokenizer, and text that ships with an installed package (the
docstrings of `keras.layers`). `backbone.enable_lora(rank)` freezes the
model and trains the LoRA factors of the attention's query and value
projections; `torchdp_keras.make_private` clips every example's gradient of
those factors on the fast path (no per-example gradients of the model) and
adds noise; a `PrivateDataLoader` draws Poisson-sampled batches, so the
epsilon in the progress bar is the guarantee as stated. The last line gives
the next-token loss on held-out text before and after, and epsilon.

With `--preset NAME` (e.g. `gpt2_base_en`; needs the preset downloaded or
downloadable), the pretrained model and its tokenizer are used instead.

    pip install ".[hub]"
    python examples/keras_hub_lora.py
    python examples/keras_hub_lora.py --smoke      # a few steps, for the tests
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import torchdp_keras as tdk  # noqa: E402


def shipped_text() -> str:
    """The docstrings of `keras.layers`: text every Keras install has, no download."""
    docs = [inspect.getdoc(getattr(keras.layers, name)) for name in sorted(dir(keras.layers))]
    return "\n\n".join(doc for doc in docs if doc)


def sequences(ids: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping windows of `length + 1` tokens: inputs and next-token targets."""
    count = (len(ids) - 1) // length
    windows = ids[: count * length + 1]
    x = np.stack([windows[i * length : (i + 1) * length] for i in range(count)])
    y = np.stack([windows[i * length + 1 : (i + 1) * length + 1] for i in range(count)])
    return x.astype("int32"), y.astype("int32")


def build(args):
    import keras_hub

    if args.preset:
        model = keras_hub.models.CausalLM.from_preset(args.preset, preprocessor=None)
        tokenizer = keras_hub.tokenizers.Tokenizer.from_preset(args.preset)
        encode = lambda text: np.asarray(tokenizer(text))  # noqa: E731
    else:
        keras.utils.set_random_seed(args.seed if args.seed is not None else 0)
        backbone = keras_hub.models.GPT2Backbone(
            vocabulary_size=256,
            num_layers=2,
            num_heads=2,
            hidden_dim=64,
            intermediate_dim=128,
            max_sequence_length=args.sequence_length,
        )
        model = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
        encode = lambda text: np.frombuffer(text.encode("utf-8"), dtype=np.uint8)  # noqa: E731
    model.backbone.enable_lora(args.rank)
    return model, encode


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None, help="a keras_hub preset (downloads)")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--sequence-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--l2-norm-clip", type=float, default=1.0)
    parser.add_argument("--noise-multiplier", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None, help="None: OS entropy")
    parser.add_argument("--smoke", action="store_true", help="1 epoch on 128 sequences")
    args = parser.parse_args(argv)

    model, encode = build(args)
    x, y = sequences(encode(shipped_text()), args.sequence_length)
    split = int(0.9 * len(x))
    (x_train, y_train), (x_test, y_test) = (x[:split], y[:split]), (x[split:], y[split:])
    if args.smoke:
        args.epochs = 1
        x_train, y_train = x_train[:128], y_train[:128]
        x_test, y_test = x_test[:32], y_test[:32]
    print(
        f"keras_hub_lora: {len(x_train)} sequences of {args.sequence_length} tokens, "
        f"{args.epochs} epoch(s); expect {'seconds' if args.smoke else 'about a minute'} "
        "on a 2-core CPU",
        flush=True,
    )

    def inputs(tokens):
        return {"token_ids": tokens, "padding_mask": np.ones_like(tokens)}

    dp_model = tdk.make_private(
        model,
        l2_norm_clip=args.l2_norm_clip,
        noise_multiplier=args.noise_multiplier,
        seed=args.seed,
    )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    dp_model.compile(optimizer=keras.optimizers.Adam(args.learning_rate), loss=loss)
    before = dp_model.evaluate(inputs(x_test), y_test, verbose=0)
    loader = tdk.PrivateDataLoader(
        inputs(x_train), y_train, batch_size=args.batch_size, seed=args.seed
    )
    start = time.perf_counter()
    dp_model.fit(loader, epochs=args.epochs, verbose=1 if not args.smoke else 2)
    after = dp_model.evaluate(inputs(x_test), y_test, verbose=0)
    plan = dp_model.clipping_plan()
    epsilon = dp_model.get_epsilon()
    trained = sum(int(np.prod(w.shape)) for w in dp_model.trainable_weights)
    print(
        f"keras_hub_lora: held-out loss {before:.3f} -> {after:.3f} | epsilon={epsilon:.2f} at "
        f"delta={dp_model.privacy_delta:.2g} (PRV) | LoRA rank {args.rank}, {trained} trained "
        f"weights | engine {plan.engine}, {len(plan.slow_layers)} slow layers | "
        f"{time.perf_counter() - start:.0f}s"
    )
    return {
        "before": before,
        "after": after,
        "epsilon": epsilon,
        "engine": plan.engine,
        "slow_layers": plan.slow_layers,
    }


if __name__ == "__main__":
    main()
