"""Clipless DP training of Lipschitz networks: deel-lipdp's model API on torch.

With layers whose Lipschitz constants and weight-gradient bounds are known
(`torchdp_keras.lipschitz.layers`), inputs of bounded norm (`DP_BoundedInput`,
first layer) and a loss whose gradient w.r.t. the logits is bounded by `L`
(`torchdp_keras.lipschitz.losses`), every example's gradient w.r.t. layer `l`'s
weights has norm at most `C_l`, computed from the architecture alone
(`compute_gradient_bounds`). A DP step therefore takes the ordinary gradient
of the summed loss (no per-example gradients, no clipping) and adds Gaussian
noise calibrated to these bounds:

- "global": one noise of std `sigma * sqrt(sum_l C_l^2)` on every weight;
- "per-layer": layer `l` gets std `sigma * sqrt(C_l * sum_k C_k)`, the
  allocation that minimises the total noise variance for the same guarantee.

Guarantee: with Poisson sampling at rate `q`, each step is a subsampled
Gaussian mechanism of noise multiplier `sigma` with respect to adding or
removing one example (for "per-layer", dividing block `l` by its std gives
unit noise and sensitivity `sqrt(sum_l C_l^2 / s_l^2) = 1 / sigma`); the
accountant composes them. After each optimizer step the layers restore their
weight constraints (`project()`), which is post-processing.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import secrets
from collections.abc import Sequence

import keras
import numpy as np
import torch
from keras import tree

from torchdp_keras import _keras_compat as keras_compat
from torchdp_keras import _validation
from torchdp_keras.accounting import PRVAccountant
from torchdp_keras.accounting.ledger import PrivacyLedger
from torchdp_keras.callbacks import DPAccountant
from torchdp_keras.errors import DPConfigError, DPError, UnsupportedLayerError
from torchdp_keras.lipschitz.dynamic import AdaptiveLossGradientClipping
from torchdp_keras.lipschitz.layers import DP_BoundedInput, DPLayer
from torchdp_keras.models.keras_hooks import DPKerasHooksMixin
from torchdp_keras.models.privacy_tracking import PRIVACY_STATE_KEY, PrivacyTrackingMixin

logger = logging.getLogger(__name__)

NOISIFY_STRATEGIES = ("global", "per-layer", "optimal-per-layer")

__all__ = [
    "AdaptiveLossGradientClipping",
    "DPParameters",
    "DP_Accountant",
    "DP_Model",
    "DP_Sequential",
    "DatasetMetadata",
    "LayerStack",
    "NoisifyStrategyError",
    "accounting_noise_multiplier",
    "compute_gradient_bounds",
    "get_eps_delta",
    "get_noise_multiplier_coefs",
    "get_optimal_noise_multiplier_coefs",
    "global_noisify",
    "local_noisify",
    "optimal_noisify",
]

# deel-lipdp's callback: the generic one works for these models too.
DP_Accountant = DPAccountant


class NoisifyStrategyError(DPError, TypeError):
    """An unknown `noisify_strategy` (deel-lipdp raises a TypeError)."""


def _check_strategy(strategy) -> None:
    if strategy not in NOISIFY_STRATEGIES:
        raise NoisifyStrategyError(
            f"Expected noisify_strategy in {NOISIFY_STRATEGIES}. Received: "
            f"noisify_strategy={strategy!r}"
        )


@dataclasses.dataclass
class DPParameters:
    """How noise is added (deel-lipdp's `DPParameters`, a plain dataclass).

    The model reads it at every step (as deel-lipdp does): a change made
    between steps applies to the noise and the accounting of later steps.

    Attributes:
        noisify_strategy: "global" (deel-lipdp: one noise scale from the whole
            model's gradient bound), "per-layer" (deel-lipdp: layer l gets
            std `noise_multiplier * nm_coef_l * C_l`, and the accountant
            composes one Gaussian mechanism per layer) or "optimal-per-layer"
            (torchdp_keras: the allocation with the least total noise for the
            guarantee of one Gaussian mechanism of `noise_multiplier`; see
            `get_optimal_noise_multiplier_coefs`).
        noise_multiplier: sigma >= 0: the noise std over the sensitivity.
        delta: The delta of the reported (epsilon, delta) guarantee.
    """

    noisify_strategy: str
    noise_multiplier: float
    delta: float

    def __post_init__(self):
        _validation.check_noise_multiplier(self.noise_multiplier)
        if (
            isinstance(self.delta, bool)
            or not isinstance(self.delta, (int, float))
            or not (0 < self.delta < 1)
        ):
            raise DPConfigError(f"Expected 0 < delta < 1. Received: delta={self.delta!r}")


@dataclasses.dataclass
class DatasetMetadata:
    """What the DP model must know about the training data (deel-lipdp's fields).

    A plain dataclass, as deel-lipdp's. `nb_steps_per_epochs` may be
    fractional (deel-lipdp's pipeline sets `nb_samples_train / batch_size`
    when the number of batches is unknown); the accounting rounds the steps
    of an epoch count up.

    Attributes:
        input_shape: Shape of one example.
        nb_classes: Number of classes.
        nb_samples_train: Number of training examples n.
        nb_samples_test: Number of test examples.
        class_names: Names of the classes.
        nb_steps_per_epochs: Steps per epoch (n // batch_size for Poisson
            sampling at q = batch_size / n).
        batch_size: (Expected) batch size.
        max_norm: Bound on the L2 norm of one input; enforced by the model's
            `DP_BoundedInput` first layer.
    """

    input_shape: tuple
    nb_classes: int
    nb_samples_train: int
    nb_samples_test: int
    class_names: Sequence[str]
    nb_steps_per_epochs: int
    batch_size: int
    max_norm: float

    def __post_init__(self):
        for name in ("nb_samples_train", "batch_size", "nb_classes"):
            _validation.check_int(getattr(self, name), name)
        _validation.check_positive(self.nb_steps_per_epochs, "nb_steps_per_epochs")
        _validation.check_int(self.nb_samples_test, "nb_samples_test", minimum=0)
        _validation.check_positive(self.max_norm, "max_norm")
        if self.batch_size > self.nb_samples_train:
            raise DPConfigError(
                "Expected batch_size <= nb_samples_train. Received: "
                f"batch_size={self.batch_size}, nb_samples_train={self.nb_samples_train}"
            )

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["input_shape"] = list(self.input_shape)
        values["class_names"] = list(self.class_names)
        return values


# -- bounds and noise (functions of deel-lipdp's module) -----------------------------------
def _dp_layers(model) -> list:
    return [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]


def _per_example_bounds(model) -> dict[str, float]:
    """`{variable.path: C_l}`: one example's gradient bound for the *summed* loss.

    As deel-lipdp: the input bound starts unknown (None) and the first layer,
    `DP_BoundedInput`, sets it to its `upper_bound`; it is propagated forward
    through the layers, and the loss's Lipschitz constant `L` backward; each layer with
    weights gets `C_l = layer.backpropagate_params(input_bound, gradient_bound)`
    (every variable of a layer gets the layer's bound, which bounds every
    part). Backward order of the layers.
    """
    loss_bound = model._loss_lipschitz_constant()
    input_bounds: list[float | None] = []
    bound: float | None = None
    layers = _dp_layers(model)
    for layer in layers:
        input_bounds.append(bound)
        bound = layer.propagate_inputs(bound)
    bounds = {}
    gradient = loss_bound
    for layer, x_bound in zip(reversed(layers), reversed(input_bounds)):
        if layer.has_parameters():
            value = float(layer.backpropagate_params(x_bound, gradient))
            for variable in layer.trainable_variables:
                bounds[variable.path] = value
        gradient = layer.backpropagate_inputs(x_bound, gradient)
    return bounds


def compute_gradient_bounds(model) -> dict[str, float]:
    """deel-lipdp's gradient bounds: one example's share of the batch-mean gradient.

    For each trainable variable, the bound `C_l / batch_size` on the norm of
    one example's contribution to the gradient of the loss averaged over a
    batch of `dataset_metadata.batch_size` examples (deel-lipdp starts the
    backward pass at `L / batch_size`, the loss being reduced with
    SUM_OVER_BATCH_SIZE), where `C_l` bounds that example's gradient of its
    own loss.

    Args:
        model: A compiled `DP_Sequential` or `DP_Model`.

    Returns:
        `{variable.path: bound}` in backward order of the layers. Keras 3's
        `variable.name` is the bare name ("kernel"), shared by every layer;
        `variable.path` ("dp_spectral_dense/kernel") is what TensorFlow's
        `variable.name` was in deel-lipdp.
    """
    batch_size = model.dataset_metadata.batch_size
    return {path: c / batch_size for path, c in _per_example_bounds(model).items()}


def _layers_with_weights(model) -> list:
    return [layer for layer in _dp_layers(model) if layer.has_parameters()]


def get_noise_multiplier_coefs(model) -> dict[str, float]:
    """deel-lipdp's per-layer noise multiplier coefficients: `{variable.path: nm_coef}`.

    Each variable gets its layer's `nm_coef` (1 unless the layer was built
    with another), in forward order of the layers. Under the "per-layer"
    strategy, layer `l`'s noise std is `noise_multiplier * nm_coef_l *
    bound_l`.
    """
    return {
        variable.path: float(layer.nm_coef)
        for layer in _layers_with_weights(model)
        for variable in layer.trainable_variables
    }


def get_optimal_noise_multiplier_coefs(model) -> dict[str, float]:
    """The coefficients of the "optimal-per-layer" strategy: `{variable.path: coef}`.

    Layer `l` gets noise std `sigma * coef_l * C_l` with `coef_l =
    sqrt(sum_k C_k / C_l)` (std `sigma * sqrt(C_l * sum_k C_k)`): among
    allocations equivalent to one Gaussian mechanism of noise multiplier
    sigma, the one with the least total noise variance (Lagrange: minimise
    `sum_l s_l^2` subject to `sum_l C_l^2 / s_l^2 = 1 / sigma^2`). This is
    torchdp_keras's own strategy, not deel-lipdp's "per-layer".
    """
    bounds = _layer_bounds(model, _per_example_bounds(model))
    total = sum(bounds.values())
    return {
        variable.path: math.sqrt(total / bounds[layer.name]) if bounds[layer.name] > 0 else 0.0
        for layer in _layers_with_weights(model)
        for variable in layer.trainable_variables
    }


def _layer_bounds(model, gradient_bounds) -> dict[str, float]:
    """One bound per layer with weights (the variables of a layer share it)."""
    return {
        layer.name: gradient_bounds[layer.trainable_variables[0].path]
        for layer in _layers_with_weights(model)
    }


def _noise_stds(model, gradient_bounds, strategy: str) -> dict[str, float]:
    """`{variable.path: noise std}` for bounds `gradient_bounds` (either convention).

    "global": `sigma * sqrt(sum_l C_l^2)` everywhere; "per-layer":
    `sigma * nm_coef_l * C_l`; "optimal-per-layer": `sigma * sqrt(C_l *
    sum_k C_k)`, on layer `l`'s variables.
    """
    sigma = model.noise_multiplier
    per_layer = _layer_bounds(model, gradient_bounds)
    stds = {}
    total = sum(per_layer.values())
    global_std = sigma * math.sqrt(sum(c * c for c in per_layer.values()))
    for layer in _layers_with_weights(model):
        c = per_layer[layer.name]
        if strategy == "global":
            std = global_std
        elif strategy == "per-layer":
            std = sigma * float(layer.nm_coef) * c
        else:
            std = sigma * math.sqrt(c * total)
        for variable in layer.trainable_variables:
            stds[variable.path] = std
    return stds


def accounting_noise_multiplier(model) -> float:
    """The noise multiplier of the one Gaussian mechanism a step of `model` is.

    "global" and "optimal-per-layer": `noise_multiplier`. "per-layer" (deel-
    lipdp): the layers' Gaussian mechanisms of noise multipliers `sigma_l =
    noise_multiplier * nm_coef_l` composed, which is one Gaussian mechanism
    of noise multiplier `(sum_l sigma_l^-2)^(-1/2)` (each block divided by
    its noise std has unit noise and sensitivity `1 / sigma_l`); with L
    layers and `nm_coef` 1, `noise_multiplier / sqrt(L)`.
    """
    sigma = model.noise_multiplier
    if model.dp_parameters.noisify_strategy != "per-layer":
        return sigma
    coefs = [float(layer.nm_coef) for layer in _layers_with_weights(model)]
    if sigma == 0 or not coefs:
        return sigma
    return 1.0 / math.sqrt(sum(1.0 / (sigma * c) ** 2 for c in coefs))


def _noise_like(gradient, std, generator):
    noise = torch.randn(gradient.shape, generator=generator, device=gradient.device)
    return gradient + std * noise.to(gradient.dtype)


def _noisify(model, gradient_bounds, trainable_vars, gradients, strategy):
    stds = _noise_stds(model, gradient_bounds, strategy)
    missing = [v.path for v in trainable_vars if v.path not in stds]
    if missing:
        raise DPConfigError(f"Variables not in gradient_bounds: {', '.join(missing)}")
    generator = model._noise_generator_for(gradients[0].device)
    return [_noise_like(g, stds[v.path], generator) for v, g in zip(trainable_vars, gradients)]


def local_noisify(model, gradient_bounds, trainable_vars, gradients):
    """deel-lipdp's "per-layer" noise: std `sigma * bound_l * nm_coef_l` on layer `l`.

    Args:
        model: The Lipschitz DP model.
        gradient_bounds: `{variable.path: bound}` from `compute_gradient_bounds`
            (batch-mean convention, matching `gradients`).
        trainable_vars: The variables, in the order of `gradients`.
        gradients: Gradients of the batch-mean loss.

    Returns:
        The noisy gradients, in the same order.
    """
    return _noisify(model, gradient_bounds, trainable_vars, gradients, "per-layer")


def global_noisify(model, gradient_bounds, trainable_vars, gradients):
    """deel-lipdp's "global" noise: std `sigma * sqrt(sum_l bound_l^2)` on every gradient.

    Args and returns: as `local_noisify`.
    """
    return _noisify(model, gradient_bounds, trainable_vars, gradients, "global")


def optimal_noisify(model, gradient_bounds, trainable_vars, gradients):
    """The "optimal-per-layer" noise: std `sigma * sqrt(bound_l * sum_k bound_k)`.

    Args and returns: as `local_noisify`.
    """
    return _noisify(model, gradient_bounds, trainable_vars, gradients, "optimal-per-layer")


ACCOUNTANTS = ("rdp", "prv")


def get_eps_delta(model, epochs: float, accountant: str = "rdp") -> tuple[float, float]:
    """deel-lipdp's (epsilon, delta) after `epochs` epochs of the planned training.

    `epochs * nb_steps_per_epochs` steps (rounded up when fractional, which
    can only raise epsilon), each a Gaussian mechanism of noise multiplier
    `accounting_noise_multiplier(model)` on a Poisson sample at rate
    `q = batch_size / nb_samples_train`, with delta from the model's
    `DPParameters`. deel-lipdp reports RDP (autodp, with the improved
    conversion to (epsilon, delta)); `accountant="prv"` gives the tighter
    PRV bound. With a dynamic `DP_ClipGradient`, the `ceil(epochs /
    patience)` releases of its callback (at epochs 0, patience, ...) are
    composed too, as pure epsilon-DP mechanisms, RDP only (deel-lipdp counts
    `epochs // patience`, one too few when it does not divide). What a model
    actually spent is `model.get_epsilon()`.

    Args:
        model: A `DP_Sequential` or `DP_Model`.
        epochs: Epochs elapsed, a number >= 0.
        accountant: "rdp" (deel-lipdp's) or "prv".

    Returns:
        `(epsilon, delta)`.

    Raises:
        DPConfigError: `epochs` < 0 or an unknown `accountant`.
    """
    from torchdp_keras.accounting import RDPAccountant

    if accountant not in ACCOUNTANTS:
        raise DPConfigError(
            f"Expected accountant in {ACCOUNTANTS}. Received: accountant={accountant!r}"
        )
    epochs = _validation.to_float(epochs) if isinstance(epochs, (int, float)) else math.nan
    if not epochs >= 0:
        raise DPConfigError(f"Expected epochs >= 0. Received: epochs={epochs!r}")
    meta = model.dataset_metadata
    steps = math.ceil(epochs * meta.nb_steps_per_epochs - 1e-9)
    delta = model.dp_parameters.delta
    if steps == 0:
        return 0.0, delta
    dynamic = model.dynamic_clipping()
    if dynamic is not None and accountant == "prv":
        raise DPConfigError(
            "Expected accountant='rdp' for a model with a dynamic DP_ClipGradient: its "
            "pure-DP releases are composed by the RDP accountant only. Received: "
            "accountant='prv'"
        )
    rate = meta.batch_size / meta.nb_samples_train
    sigma = accounting_noise_multiplier(model)
    if dynamic is None:
        counter = PRVAccountant() if accountant == "prv" else RDPAccountant()
        counter.compose(sigma, rate, steps)
        return counter.get_epsilon(delta), delta
    rdp = RDPAccountant()  # accountant == "rdp" (refused above otherwise)
    rdp.compose(sigma, rate, steps)
    rdp.compose_pure_dp(dynamic.epsilon, math.ceil(epochs / dynamic.patience - 1e-9))
    return rdp.get_epsilon(delta), delta


# -- the model mixin --------------------------------------------------------------------
class LipschitzDPMixin(DPKerasHooksMixin, PrivacyTrackingMixin):
    """Clipless DP `train_step` for Lipschitz networks (see the module docstring)."""

    def _init_lipschitz(self, dp_parameters, dataset_metadata, debug) -> None:
        if not isinstance(dp_parameters, DPParameters):
            raise DPConfigError(
                "Expected dp_parameters to be a torchdp_keras.lipschitz.DPParameters. "
                f"Received: dp_parameters={dp_parameters!r}"
            )
        _check_strategy(dp_parameters.noisify_strategy)
        if not isinstance(dataset_metadata, DatasetMetadata):
            raise DPConfigError(
                "Expected dataset_metadata to be a torchdp_keras.lipschitz.DatasetMetadata. "
                f"Received: dataset_metadata={dataset_metadata!r}"
            )
        self._init_privacy_tracking(
            PrivacyLedger(
                sampling_probability=dataset_metadata.batch_size
                / dataset_metadata.nb_samples_train,
                train_size=dataset_metadata.nb_samples_train,
                target_delta=dp_parameters.delta,
            )
        )
        self.dp_parameters = dp_parameters
        self.dataset_metadata = dataset_metadata
        self.debug = bool(debug)
        self._noise_generator: torch.Generator | None = None
        self._noise_seed = secrets.randbits(63)  # OS entropy; the global torch RNG is untouched
        self._dp_loss = None

    def _check_dp_layers(self) -> None:
        """Only DP layers; the first one enforces the input bound."""
        layers = _dp_layers(self)
        bad = [f"{self.name}/{layer.name}" for layer in layers if not isinstance(layer, DPLayer)]
        if bad:
            raise UnsupportedLayerError(
                "Lipschitz DP models accept only the layers of torchdp_keras.lipschitz.layers "
                "(their gradient bounds are what the noise is calibrated to; any other layer "
                "could make an example's gradient larger than the bound, with no clipping to "
                "catch it). Not allowed: " + ", ".join(bad),
                layer_paths=bad,
            )
        if not layers:
            return
        self._sync_accountant(layers)
        first = layers[0]
        if not isinstance(first, DP_BoundedInput):
            raise UnsupportedLayerError(
                "Expected the first layer to be DP_BoundedInput(upper_bound=...): the "
                "gradient bounds start from the input bound it guarantees. Received: "
                f"{self.name}/{first.name} ({type(first).__name__})",
                layer_paths=[f"{self.name}/{first.name}"],
            )

    def _sync_accountant(self, layers) -> None:
        """An RDP accountant for a model with dynamic clipping (its pure-DP releases).

        Raises:
            UnsupportedLayerError: a dynamic `DP_ClipGradient` that is not the
                last layer (deel-lipdp's callback requires it last).
        """
        from torchdp_keras.accounting import RDPAccountant
        from torchdp_keras.lipschitz.layers.clipping import DP_ClipGradient

        dynamic = [la for la in layers if isinstance(la, DP_ClipGradient) and la.is_dynamic]
        if not dynamic:
            return
        if dynamic != [layers[-1]]:
            paths = [f"{self.name}/{la.name}" for la in dynamic]
            raise UnsupportedLayerError(
                "Expected DP_ClipGradient(clip_value=None) to be the last layer: its value "
                "is chosen from the loss gradients at the output. Received: " + ", ".join(paths),
                layer_paths=paths,
            )
        if not isinstance(self.accountant, RDPAccountant):
            # Its releases are pure-DP mechanisms, which the RDP accountant composes.
            self.privacy_ledger.use_accountant(RDPAccountant())

    def dynamic_clipping(self):
        """The last layer when it is a dynamic `DP_ClipGradient`, else None."""
        from torchdp_keras.lipschitz.layers.clipping import DP_ClipGradient

        layers = _dp_layers(self)
        last = layers[-1] if layers else None
        return last if isinstance(last, DP_ClipGradient) and last.is_dynamic else None

    @property
    def noise_multiplier(self) -> float:
        """sigma: `dp_parameters.noise_multiplier` (read at every step)."""
        return float(self.dp_parameters.noise_multiplier)

    def _noise_generator_for(self, device) -> torch.Generator:
        generator = self._noise_generator
        if generator is None or generator.device != torch.device(device):
            generator = torch.Generator(device=device)
            generator.manual_seed(self._noise_seed)
            self._noise_generator = generator
        return generator

    def _loss_lipschitz_constant(self) -> float:
        if self._dp_loss is None:
            raise DPConfigError(
                f"Model '{self.name}' is not compiled with a Lipschitz DP loss: compile it "
                "with one of torchdp_keras.lipschitz.losses (e.g. DP_TauCategoricalCrossentropy)."
            )
        return float(self._dp_loss.get_L())

    def compile(self, optimizer="rmsprop", loss=None, *args, **kwargs):
        """As `keras.Model.compile`; the loss must be a Lipschitz DP loss (it has `get_L()`)."""
        if not callable(getattr(loss, "get_L", None)):
            raise DPConfigError(
                "Expected a loss with a known Lipschitz constant, one of "
                "torchdp_keras.lipschitz.losses (DP_TauCategoricalCrossentropy, DP_TauBCE, "
                "DP_MulticlassHKR, DP_MulticlassHinge, DP_MulticlassKR, DP_KCosineSimilarity, "
                "DP_MeanAbsoluteError). "
                f"Received: loss={loss!r}"
            )
        if kwargs.get("jit_compile") is True:
            raise DPConfigError("Expected jit_compile=False or 'auto'. Received: jit_compile=True")
        kwargs["jit_compile"] = False
        super().compile(optimizer, loss, *args, **kwargs)
        self._dp_loss = loss

    def fit(self, x=None, y=None, batch_size=None, epochs=1, *args, **kwargs):
        """As `keras.Model.fit`, with the metadata's batch size by default.

        Pass a `PrivateDataLoader` for the Poisson sampling the epsilon
        assumes; arrays are trained on shuffled batches of fixed size, with a
        warning that the epsilon then assumes Poisson sampling at
        `q = batch_size / n`.
        """
        from torchdp_keras.data import PrivateDataLoader

        if not isinstance(x, PrivateDataLoader) and batch_size is None:
            batch_size = self.dataset_metadata.batch_size
        if isinstance(x, PrivateDataLoader) and x.privacy_unit != "example":
            raise DPConfigError(
                "Expected a loader of examples for a Lipschitz DP model: its noise is "
                "calibrated to one example's gradient bound, and a user's several examples "
                f"would exceed it. Received: a {type(x).__name__} of {x.privacy_unit}s"
            )
        if isinstance(x, PrivateDataLoader) and x.gradient_accumulation_steps != 1:
            raise DPConfigError(
                "Expected PrivateDataLoader(gradient_accumulation_steps=1) for a Lipschitz DP "
                f"model. Received: gradient_accumulation_steps={x.gradient_accumulation_steps}"
            )
        return super().fit(x, y, batch_size, epochs, *args, **kwargs)

    def train_step(self, data):
        x, y, sample_weight, mask = self._unpack(data)
        plan = self.sampling_plan
        expected_batch = None if plan is None else plan.expected_batch_size
        if mask is not None and expected_batch is None:
            raise DPConfigError(
                "Received a PrivateDataLoader batch outside fit(): pass the loader to fit()."
            )
        weights = None
        if sample_weight is not None:
            # Weights in [0, 1] only shrink an example's gradient (an AugmultLoader
            # gives each of an example's m views 1/m: together, one example).
            weights = torch.as_tensor(keras.ops.convert_to_tensor(sample_weight)).reshape(-1)
            if not bool(((weights >= 0) & (weights <= 1)).all()):
                raise DPConfigError(
                    "Expected sample weights in [0, 1]: a larger weight would scale an "
                    "example's gradient beyond the bound the noise is calibrated to. "
                    f"Received: sample weights in [{float(weights.min())}, "
                    f"{float(weights.max())}]"
                )
        keep = None if mask is None else keras.ops.convert_to_tensor(mask) > 0
        strategy = self.dp_parameters.noisify_strategy
        _check_strategy(strategy)
        trainable, grads, y_pred, total, batch = self._summed_loss_gradients(x, y, keep, weights)
        # deel-lipdp's convention: the gradient of the loss summed over the batch
        # and divided by the planned batch size B, whose per-example bounds are
        # compute_gradient_bounds' C_l / B, noised as deel-lipdp noises it; then
        # rescaled to the mean over this batch (or the expected Poisson size).
        planned = self.dataset_metadata.batch_size
        bounds = compute_gradient_bounds(self)
        grads = _noisify(self, bounds, trainable, [g / planned for g in grads], strategy)
        normaliser = expected_batch if mask is not None else batch
        grads = [g * (planned / max(1, normaliser)) for g in grads]
        with torch.no_grad():
            self.optimizer.apply(grads, trainable)
            for layer in _dp_layers(self):
                layer.project()
        self.privacy_ledger.record_update(accounting_noise_multiplier(self))
        if self.debug:
            logger.info(
                "torchdp_keras.lipschitz: step %d, gradient bounds %s", self.dp_steps, bounds
            )
        real = batch if mask is None else int(keep.sum())
        counted = real
        if weights is not None:  # examples, not rows (augmented views weigh 1/m each)
            counted = float(weights.sum() if keep is None else weights[keep.cpu()].sum())
        keras_compat.loss_tracker(self).update_state(
            total.detach() / max(1e-12, counted), sample_weight=counted
        )
        if mask is not None:
            if real == 0:
                return self.get_metrics_result()
            x, y, y_pred = tree.map_structure(lambda t: t[keep], (x, y, y_pred.detach()))
        return self.compute_metrics(x, y, y_pred.detach(), sample_weight=None)

    # -- deel-lipdp's model methods -------------------------------------------------------
    def layers_forward_order(self) -> list:
        """The DP layers in the order the input goes through them."""
        return _dp_layers(self)

    def layers_backward_order(self) -> list:
        """The DP layers in the order the gradient goes through them."""
        return _dp_layers(self)[::-1]

    def condense(self) -> None:
        """Projects every constrained weight onto its set (deel-lip's `condense`).

        The model does this after every step already; call it after setting
        weights by hand.
        """
        for layer in _dp_layers(self):
            layer.project()

    def vanilla_export(self) -> keras.Model:
        """A plain Keras model of copies of the layers, with the current weights.

        The DP layers are ordinary Keras layers: the copy predicts exactly
        as this model does, and trains (if at all) without noise or
        projections, like deel-lip's exported models.
        """
        self.condense()
        copies = [type(layer).from_config(layer.get_config()) for layer in _dp_layers(self)]
        plain = LayerStack(copies, name=f"{self.name}_vanilla")
        shape = self.dataset_metadata.input_shape
        plain(np.zeros((1, *shape), dtype="float32"))
        plain.set_weights(self.get_weights())
        return plain

    # -- diagnostics (deel-lipdp) ------------------------------------------------------
    def _summed_loss_gradients(self, x, y, keep=None, weights=None):
        """Gradients of the summed per-example loss (rows where `keep` is False left out,
        each row's loss times its weight in [0, 1] when `weights` is given).

        Returns:
            `(trainable, grads, y_pred, total, batch)`; a weight the loss does not
            reach gets a zero gradient.
        """
        trainable = list(self.trainable_variables)
        with torch.enable_grad():
            y_pred = self(x, training=True)
            losses = self._dp_loss.call(keras.ops.convert_to_tensor(y, dtype=y_pred.dtype), y_pred)
            losses = losses.reshape(losses.shape[0], -1).sum(1)
            if weights is not None:
                losses = losses * weights.to(device=losses.device, dtype=losses.dtype)
            if keep is not None:
                losses = torch.where(keep, losses, torch.zeros_like(losses))
            total = losses.sum()
            grads = torch.autograd.grad(total, [v.value for v in trainable], allow_unused=True)
        grads = [torch.zeros_like(v.value) if g is None else g for v, g in zip(trainable, grads)]
        return trainable, grads, y_pred, total, int(losses.shape[0])

    def signal_to_noise_elementwise(self, data):
        """deel-lipdp's per-example ratios of gradient norm to gradient bound.

        For every example of `data = (x, y)`, the norm of the gradient of its
        own loss for each variable, and its ratio to the variable's
        per-example bound `C_l` (`compute_gradient_bounds` times the batch
        size). A ratio near 1 means the bound is tight for that example.

        Returns:
            `(ratios, norms, bounds)`: `ratios` and `norms` map each variable
            path to a numpy array with one value per example; `bounds` to `C_l`.
        """
        x, y = data
        size = int(tree.flatten(x)[0].shape[0])
        bounds = _per_example_bounds(self)
        paths = [v.path for v in self.trainable_variables]
        norms = {path: [] for path in paths}
        for i in range(size):
            one = tree.map_structure(lambda t, i=i: t[i : i + 1], (x, y))
            trainable, grads, *_ = self._summed_loss_gradients(*one)
            for v, g in zip(trainable, grads):
                norms[v.path].append(float(torch.linalg.vector_norm(g)))
        norms = {path: np.asarray(values) for path, values in norms.items()}
        ratios = {path: norms[path] / bounds[path] for path in paths}
        return ratios, norms, {path: bounds[path] for path in paths}

    def signal_to_noise_average(self, data):
        """deel-lipdp's ratio of the batch-mean gradient's norm to the per-example bound.

        `data = (x, y)` must hold `dataset_metadata.batch_size` examples.

        Returns:
            `(ratios, norms, bounds)`: dicts keyed by variable path; `norms`
            are those of the gradient of the batch-mean loss, `bounds` the
            per-example bounds `C_l`, `ratios` their quotient.

        Raises:
            DPConfigError: the batch does not have the dataset's batch size.
        """
        x, y = data
        size = int(tree.flatten(x)[0].shape[0])
        if size != self.dataset_metadata.batch_size:
            raise DPConfigError(
                f"Expected a batch of dataset_metadata.batch_size="
                f"{self.dataset_metadata.batch_size} examples. Received: {size}"
            )
        trainable, grads, *_ = self._summed_loss_gradients(x, y)
        bounds = _per_example_bounds(self)
        ratios, norms = {}, {}
        for v, g in zip(trainable, grads):
            norms[v.path] = float(torch.linalg.vector_norm(g)) / size
            ratios[v.path] = norms[v.path] / bounds[v.path] if bounds[v.path] else math.inf
        return ratios, norms, {p: bounds[p] for p in ratios}

    def noise_stds(self) -> dict[str, float]:
        """`{variable.path: std}` of the noise a step adds to the batch-mean gradient."""
        return _noise_stds(self, compute_gradient_bounds(self), self.dp_parameters.noisify_strategy)

    # -- saving ------------------------------------------------------------------------
    def _lipschitz_config(self) -> dict:
        return {
            "dp_parameters": dataclasses.asdict(self.dp_parameters),
            "dataset_metadata": self.dataset_metadata.to_dict(),
            "debug": self.debug,
        }

    @staticmethod
    def _pop_lipschitz_config(config: dict, layers_key: str, custom_objects) -> tuple:
        """(DP keyword arguments, privacy state, deserialised layers) from a config.

        The privacy state is saved with the weights (`save_own_variables`);
        configs written before 0.2 carried it here, and are still read.
        """
        dp = {
            "dp_parameters": DPParameters(**config.pop("dp_parameters")),
            "dataset_metadata": DatasetMetadata(**config.pop("dataset_metadata")),
            "debug": config.pop("debug", False),
        }
        layers = [
            keras_compat.deserialize_keras_object(c, custom_objects=custom_objects)
            for c in config.pop(layers_key)
        ]
        return dp, config.pop(PRIVACY_STATE_KEY, None), layers


@keras.saving.register_keras_serializable(package="torchdp_keras")
class DP_Sequential(LipschitzDPMixin, keras.Sequential):  # noqa: N801 (deel-lipdp's name)
    """A Sequential Lipschitz network trained with clipless DP (deel-lipdp's `DP_Sequential`).

    Args:
        layers: The layers (only `torchdp_keras.lipschitz.layers`; the first
            one `DP_BoundedInput`).
        dp_parameters: `DPParameters`.
        dataset_metadata: `DatasetMetadata`.
        debug: Log the gradient bounds at every step (logging, info level).
        **kwargs: Passed to `keras.Sequential`.

    Raises:
        NoisifyStrategyError: `dp_parameters.noisify_strategy` is not
            "global" or "per-layer" (a `TypeError`, as in deel-lipdp).
        UnsupportedLayerError: a layer outside the Lipschitz DP layers, or no
            `DP_BoundedInput` first; the message names the layers by path.

    Example:
        >>> from torchdp_keras.lipschitz import layers as L
        >>> model = DP_Sequential(
        ...     [keras.Input((4,)), L.DP_BoundedInput(upper_bound=1.0),
        ...      L.DP_SpectralDense(3)],
        ...     dp_parameters=DPParameters("per-layer", 1.0, 1e-5),
        ...     dataset_metadata=DatasetMetadata((4,), 3, 1000, 100, ["a", "b", "c"],
        ...                                      10, 100, 1.0))
    """

    def __init__(self, layers=None, *, dp_parameters, dataset_metadata, debug=False, **kwargs):
        super().__init__(layers=layers, **kwargs)
        self._init_lipschitz(dp_parameters, dataset_metadata, debug)
        self._check_dp_layers()

    def add(self, layer, rebuild=True):
        super().add(layer, rebuild=rebuild)
        if hasattr(self, "dataset_metadata"):
            self._check_dp_layers()

    def get_config(self):
        config = super().get_config()
        config.update(self._lipschitz_config())
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        dp, state, layers = cls._pop_lipschitz_config(config, "layers", custom_objects)
        build_input_shape = config.pop("build_input_shape", None)
        model = cls(layers=layers, name=config.get("name"), **dp)
        if not keras_compat.sequential_graph(model) and build_input_shape:
            model.build(build_input_shape)
        model.privacy_ledger.load_state_dict(state)
        return model


@keras.saving.register_keras_serializable(package="torchdp_keras")
class DP_Model(LipschitzDPMixin, keras.Model):  # noqa: N801 (deel-lipdp's name)
    """A Lipschitz network given as a list of layers, called in order (deel-lipdp's `DP_Model`).

    Args:
        dp_layers: The layers, applied one after the other (the first one
            `DP_BoundedInput`).
        *args: Passed to `keras.Model`.
        dp_parameters: `DPParameters`.
        dataset_metadata: `DatasetMetadata`.
        debug: Log the gradient bounds at every step.
        **kwargs: Passed to `keras.Model`.

    Raises:
        NoisifyStrategyError, UnsupportedLayerError: as `DP_Sequential`.
    """

    def __init__(self, dp_layers, *args, dp_parameters, dataset_metadata, debug=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.dp_layers = list(dp_layers)
        self._init_lipschitz(dp_parameters, dataset_metadata, debug)
        self._check_dp_layers()

    def call(self, inputs, training=None):
        x = inputs
        for layer in self.dp_layers:
            x = layer(x)
        return x

    def build(self, input_shape=None) -> None:
        """Builds every layer by running them once on zeros of `input_shape` (deel-lipdp's call)."""
        if input_shape is not None and not all(layer.built for layer in self.dp_layers):
            x = keras.ops.zeros((1, *tuple(input_shape)[1:]))
            for layer in self.dp_layers:
                x = layer(x)
        self.built = True

    def get_config(self):
        config = {
            "name": self.name,
            "dp_layers": [keras.saving.serialize_keras_object(layer) for layer in self.dp_layers],
        }
        config.update(self._lipschitz_config())
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        dp, state, layers = cls._pop_lipschitz_config(config, "dp_layers", custom_objects)
        model = cls(layers, name=config.get("name"), **dp)
        model.privacy_ledger.load_state_dict(state)
        return model


@keras.saving.register_keras_serializable(package="torchdp_keras")
class LayerStack(keras.Model):
    """A plain Keras model that calls its layers one after the other (`vanilla_export`).

    Unlike `keras.Sequential`, a layer may pass a pair on (residual blocks).
    """

    def __init__(self, stacked_layers, **kwargs):
        super().__init__(**kwargs)
        self.stacked_layers = list(stacked_layers)

    def call(self, inputs):
        x = inputs
        for layer in self.stacked_layers:
            x = layer(x)
        return x

    def get_config(self):
        return {
            "name": self.name,
            "stacked_layers": [
                keras.saving.serialize_keras_object(layer) for layer in self.stacked_layers
            ],
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        stacked = [
            keras_compat.deserialize_keras_object(c, custom_objects=custom_objects)
            for c in config.pop("stacked_layers")
        ]
        return cls(stacked, **config)
