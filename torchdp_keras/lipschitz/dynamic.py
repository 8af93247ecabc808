"""deel-lipdp's dynamic loss-gradient clipping: `AdaptiveLossGradientClipping`.

A `DP_ClipGradient(clip_value=None, epsilon=..., patience=...)` last layer
starts at the loss's Lipschitz constant `L`; every `patience` epochs this
callback looks at the per-example norms of the loss gradient on one batch and
picks a smaller clipping value with the sparse vector technique (SVT). Each
release is `epsilon`-DP and the model's (RDP) accountant composes it.

The queries are deel-lipdp's: on a grid `p_0 = 0 < ... < p_999 = L` of step
`a`, `q_k = sum_i min(n_i, p_k) - min(n_i, p_k + a)`, each in `[-a n, 0]`
and changed by at most `a` when one example is added or removed. The value
released is the first `p_k` whose `q_k` rises above a threshold. deel-lipdp
sets the threshold to `0.1 q_0`, read from the data without noise, which
voids the SVT guarantee; here `q_0` is released first with Laplace noise
(half the epsilon), then AboveThreshold runs with the other half
(Dwork and Roth, Algorithm 1: threshold noise `Lap(2a / e)`, query noise
`Lap(4a / e)`, `e = epsilon / 2`). The whole update is epsilon-DP.
"""

from __future__ import annotations

import secrets

import keras
import numpy as np
import torch

from torchdp_keras.data.loader import unpack_poisson_batch
from torchdp_keras.errors import DPConfigError, UnsupportedLayerError
from torchdp_keras.lipschitz.layers.clipping import DP_ClipGradient

__all__ = ["AdaptiveLossGradientClipping", "private_clip_value"]

GRID_POINTS = 1000


def private_clip_value(norms, upper: float, epsilon: float, rng: np.random.Generator) -> float:
    """An epsilon-DP choice of a clipping value in `[0, upper]` from per-example norms.

    Args:
        norms: The per-example loss-gradient norms of one batch.
        upper: The largest value (the loss's Lipschitz constant).
        epsilon: The pure-DP budget of this release, > 0.
        rng: The source of the Laplace noise.

    Returns:
        The value (see the module docstring for the mechanism).
    """
    norms = np.asarray(norms, dtype=np.float64)
    points = np.linspace(0.0, upper, GRID_POINTS)
    step = upper / (GRID_POINTS - 1)
    clipped = np.minimum(norms[None, :], points[:, None]).sum(axis=1)
    clipped_next = np.minimum(norms[None, :], points[:, None] + step).sum(axis=1)
    queries = clipped - clipped_next  # sensitivity `step` each
    half = epsilon / 2.0
    threshold = 0.1 * (queries[0] + rng.laplace(scale=step / half))
    noisy_threshold = threshold + rng.laplace(scale=2 * step / half)
    noise = rng.laplace(scale=4 * step / half, size=len(queries))
    above = np.flatnonzero(queries + noise >= noisy_threshold)
    index = int(above[0]) if above.size else int(rng.integers(0, len(queries)))
    return float(points[index])


class AdaptiveLossGradientClipping(keras.callbacks.Callback):
    """Sets and updates the last layer's clipping value during training (deel-lipdp's callback).

    Args:
        ds_train: The training data: a `PrivateDataLoader` (one of its
            Poisson batches is used) or an `(x, y)` pair of arrays (a Poisson
            sample at the dataset's rate is drawn).

    Raises:
        UnsupportedLayerError: (at the start of training) the model's last layer
            is not a `DP_ClipGradient(clip_value=None)`.
    """

    def __init__(self, ds_train=None):
        super().__init__()
        self.ds_train = ds_train
        self._rng = np.random.default_rng(secrets.randbits(128))

    def _layer(self) -> DP_ClipGradient:
        layers = self.model.layers_backward_order()
        if not layers or not isinstance(layers[0], DP_ClipGradient) or not layers[0].is_dynamic:
            raise UnsupportedLayerError(
                "AdaptiveLossGradientClipping needs the model's last layer to be "
                "DP_ClipGradient(clip_value=None, epsilon=...) (mode 'dynamic_svt').",
                layer_paths=[f"{self.model.name}/{layers[0].name}"] if layers else [],
            )
        return layers[0]

    def on_train_begin(self, logs=None):
        self._layer().clip_value = float(self.model._loss_lipschitz_constant())

    def _batch(self):
        data = self.ds_train
        if (
            hasattr(data, "__getitem__")
            and hasattr(data, "__len__")
            and not isinstance(data, (tuple, list))
        ):
            batch = data[0]
            poisson = unpack_poisson_batch(batch)
            if poisson is not None:  # a PrivateDataLoader batch: its real rows only
                x, y, _, mask = poisson
                keep = np.asarray(mask) > 0
                return np.asarray(x)[keep], np.asarray(y)[keep]
            return np.asarray(batch[0]), np.asarray(batch[1])
        if isinstance(data, (tuple, list)) and len(data) == 2:
            x, y = (np.asarray(a) for a in data)
            meta = self.model.dataset_metadata
            chosen = self._rng.random(len(x)) < meta.batch_size / meta.nb_samples_train
            return x[chosen], y[chosen]
        raise DPConfigError(
            "Expected ds_train to be a PrivateDataLoader or an (x, y) pair. Received: "
            f"ds_train={type(data).__name__}"
        )

    def _loss_gradient_norms(self) -> np.ndarray:
        x, y = self._batch()
        if len(x) == 0:
            return np.zeros(0)
        with torch.enable_grad():
            predictions = keras.ops.convert_to_tensor(self.model(x, training=False))
            predictions = predictions.detach().requires_grad_(True)
            targets = keras.ops.convert_to_tensor(y, dtype=predictions.dtype)
            losses = self.model._dp_loss.call(targets, predictions)
            (grad,) = torch.autograd.grad(losses.sum(), predictions)
        rows = grad.reshape(grad.shape[0], -1).double()
        return torch.linalg.vector_norm(rows, dim=1).cpu().numpy()

    def on_epoch_end(self, epoch, logs=None):
        layer = self._layer()
        if epoch % layer.patience != 0:
            return
        upper = float(self.model._loss_lipschitz_constant())
        value = private_clip_value(self._loss_gradient_norms(), upper, layer.epsilon, self._rng)
        # A clipping value of 0 would stop training; the grid's first point is 0.
        layer.clip_value = max(value, upper / (GRID_POINTS - 1))
        self.model.accountant.compose_pure_dp(layer.epsilon)
        if logs is not None:
            logs["clipping_value"] = layer.clip_value
            if "epsilon" in logs:  # logged by a DPAccountant that ran before this release
                logs["epsilon"] = self.model.get_epsilon()
