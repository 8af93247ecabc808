"""The PrivateKerasModel workflow on pandas DataFrames (the op_tensorflow guide, ported).

A model is built "locally" and shipped as JSON plus weights, rebuilt with
`keras.models.model_from_json` and `set_weights`, wrapped in
`PrivateKerasModel`, trained on a Poisson-sampling `PrivateDataLoader` built
from DataFrames, with epsilon in the History; predictions come back as a
DataFrame with named columns. The data is scikit-learn's breast-cancer table
(569 rows, 30 features; ships with scikit-learn).

    python examples/private_dataframe.py
    python examples/private_dataframe.py --smoke      # a few steps, for the tests
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
from _common import EpsilonPlot  # noqa: E402
from keras import layers  # noqa: E402

from torchdp_keras import PrivateDataLoader, PrivateKerasModel, get_privacy_budget  # noqa: E402


def load_frames(seed: int = 0):
    """(train_features, train_labels, test_features, test_labels), standardised on train."""
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).frame
    frame = frame.sample(frac=1.0, random_state=seed)
    features, target = frame.drop(columns="target"), frame["target"].astype("float32")
    split = int(0.8 * len(frame))
    train, test = features.iloc[:split], features.iloc[split:]
    mean, std = train.mean(), train.std()
    # Standardising with the training set's statistics is itself a use of the
    # private data; a real deployment would use public or DP statistics.
    train, test = (train - mean) / std, (test - mean) / std
    return train.astype("float32"), target.iloc[:split], test.astype("float32"), target.iloc[split:]


def local_model(num_features: int) -> keras.Sequential:
    """The guide's Sequential model, built where the data is not."""
    return keras.Sequential(
        [
            keras.Input((num_features,)),
            layers.Dense(16, activation="relu"),
            layers.Dense(8, activation="relu"),
            layers.Dense(1, activation="sigmoid"),
        ]
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--l2-norm-clip", type=float, default=1.0)
    parser.add_argument("--noise-multiplier", type=float, default=1.2)
    parser.add_argument("--learning-rate", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=None, help="None: OS entropy")
    parser.add_argument("--plot", default=None, help="write accuracy and epsilon per epoch (PNG)")
    parser.add_argument("--smoke", action="store_true", help="2 epochs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs = 2

    x_train, y_train, x_test, y_test = load_frames()
    n = len(x_train)
    # Before training: what would this plan spend? (prints it, as op_tensorflow does)
    planned = get_privacy_budget(
        sample_size=n,
        batch_size=args.batch_size,
        num_epochs=args.epochs,
        noise_multiplier=args.noise_multiplier,
        target_delta=1e-5,
    )

    # "Importing locally trained models": JSON + weights, rebuilt here.
    local = local_model(x_train.shape[1])
    model_info, weights = local.to_json(), local.get_weights()
    model = keras.models.model_from_json(model_info)
    model.set_weights(weights)

    dp_model = PrivateKerasModel(
        model=model,
        l2_norm_clip=args.l2_norm_clip,
        noise_multiplier=args.noise_multiplier,
        seed=args.seed,
    )
    dp_model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=args.learning_rate, momentum=0.9),
        loss=keras.losses.BinaryCrossentropy(),
        metrics=["accuracy"],
    )
    data_loader = PrivateDataLoader(
        feature_df=x_train, label_df=y_train, batch_size=args.batch_size, seed=args.seed
    )
    callbacks = [EpsilonPlot(args.plot, "breast cancer, PrivateKerasModel")] if args.plot else []
    start = time.perf_counter()
    history = dp_model.fit(
        x=data_loader,
        epochs=args.epochs,
        target_delta=1e-5,
        callbacks=callbacks,
        verbose=1 if not args.smoke else 2,
    )
    result_pdf = dp_model.predict(x=x_test, label_columns=["result"], verbose=0)
    accuracy = float(((result_pdf["result"] > 0.5) == (y_test > 0.5)).mean())
    print(result_pdf.head())
    epsilon = history.history["epsilon"][-1]
    print(
        f"private_dataframe: test accuracy {accuracy:.4f} | epsilon={epsilon:.3f} at "
        f"delta=1e-05 (PRV, Poisson sampling; planned {planned:.3f}) | "
        f"l2_norm_clip={args.l2_norm_clip} noise_multiplier={args.noise_multiplier} "
        f"batch_size={args.batch_size} epochs={args.epochs} steps={dp_model.dp_steps} | "
        f"{time.perf_counter() - start:.1f}s"
    )
    return {
        "accuracy": accuracy,
        "epsilon": epsilon,
        "planned": planned,
        "predictions": result_pdf,
        "index_ok": bool(np.all(result_pdf.index == x_test.index)),
    }


if __name__ == "__main__":
    main()
