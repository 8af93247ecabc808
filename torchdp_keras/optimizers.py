"""DP optimizers in TF Privacy's style: the DP settings travel with the optimizer.

TF Privacy's tutorial writes::

    optimizer = DPGradientDescentGaussianOptimizer(
        l2_norm_clip=1.5, noise_multiplier=1.3, num_microbatches=250, learning_rate=0.25)
    loss = CategoricalCrossentropy(from_logits=True, reduction=NONE)
    model.compile(optimizer=optimizer, loss=loss)

Here the same lines work on a `torchdp_keras.Model` (the drop-in base class
for subclassed models) and on every DP model class. The optimizer itself does
not see per-example gradients: it carries the settings, and the model's DP
`train_step` reads them at `compile` time, clips every example (or
microbatch), adds the noise once per update and hands the result to the
optimizer. That is why a DP optimizer refuses to step inside a plain
`keras.Model`, whose `train_step` would give it the unclipped, un-noised
batch gradient: the error names the one-line change.

Differences from TF Privacy, both deliberate:

- `gradient_accumulation_steps=k`: the clipped sums of `k` consecutive batches
  are added, noise is drawn once and the optimizer steps once (JAX Privacy's
  semantics); the accountant composes one event per update with sampling
  probability `k * batch_size / n`. A plain Keras optimizer given its own
  `gradient_accumulation_steps=k` (JAX Privacy's way of asking for
  accumulation) gets the same semantics: the DP model accumulates, noises
  once, and the optimizer applies the update once; a Keras `k` that
  disagrees with the DP one is refused.
- The loss may be reduced or unreduced (`reduction=None`); a unit's loss is
  the mean over its examples either way, as in TF Privacy.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any

import keras

from torchdp_keras import _validation
from torchdp_keras.errors import DPConfigError

__all__ = [
    "DPAdagradGaussianOptimizer",
    "DPAdamGaussianOptimizer",
    "DPGradientDescentGaussianOptimizer",
    "DPKerasAdagradOptimizer",
    "DPKerasAdamOptimizer",
    "DPKerasSGDOptimizer",
    "DPOptimizerMixin",
    "VectorizedDPKerasAdagradOptimizer",
    "VectorizedDPKerasAdamOptimizer",
    "VectorizedDPKerasSGDOptimizer",
    "VectorizedDPAdagrad",
    "VectorizedDPAdam",
    "VectorizedDPSGD",
    "find_dp_optimizer",
    "keras_gradient_accumulation_steps",
    "make_keras_optimizer_class",
]

# Set while a DP train_step applies its privatised gradients: the only
# context in which a DP optimizer may update weights.
_PRIVATE_APPLY = contextvars.ContextVar("torchdp_keras_private_apply", default=False)


@contextlib.contextmanager
def private_apply():
    """Marks gradients handed to the optimizer as clipped and noised (DP train_step only)."""
    token = _PRIVATE_APPLY.set(True)
    try:
        yield
    finally:
        _PRIVATE_APPLY.reset(token)


class DPOptimizerMixin:
    """The DP settings of a DP optimizer class made by `make_keras_optimizer_class`."""

    _dp_settings: dict[str, Any]  # set by the class's __init__ (_check_dp_settings)

    @staticmethod
    def _check_dp_settings(
        l2_norm_clip, noise_multiplier, num_microbatches, gradient_accumulation_steps
    ) -> dict:
        return {
            "l2_norm_clip": _validation.check_l2_norm_clip(l2_norm_clip),
            "noise_multiplier": _validation.check_noise_multiplier(noise_multiplier),
            "num_microbatches": _validation.check_optional_positive_int(
                num_microbatches, "num_microbatches"
            ),
            "gradient_accumulation_steps": _validation.check_int(
                gradient_accumulation_steps, "gradient_accumulation_steps"
            ),
        }

    @property
    def l2_norm_clip(self) -> float:
        """The clipping norm C of every example's (or microbatch's) gradient."""
        return self._dp_settings["l2_norm_clip"]

    @property
    def noise_multiplier(self) -> float:
        """sigma: the noise on the clipped sum has std sigma * C."""
        return self._dp_settings["noise_multiplier"]

    @property
    def num_microbatches(self) -> int | None:
        """None (clip every example) or the number of groups a batch is split into."""
        return self._dp_settings["num_microbatches"]

    @property
    def dp_gradient_accumulation_steps(self) -> int:
        """Batches whose clipped sums make one noised update.

        (Keras's own `gradient_accumulation_steps` attribute stays None: it
        would average already-noised gradients.)
        """
        return self._dp_settings["gradient_accumulation_steps"]

    @property
    def dp_settings(self) -> dict:
        """The four DP settings as a dict (a copy)."""
        return dict(self._dp_settings)

    def _refuse_plain_training(self, what: str) -> None:
        raise DPConfigError(
            f"{type(self).__name__} {what}: it was compiled into a model whose "
            "train_step is not private (a plain keras.Model), which would hand it the "
            "unclipped, un-noised batch gradient. Derive the model from "
            "torchdp_keras.Model instead of keras.Model (e.g. `class "
            "Classifier(torchdp_keras.Model)`), or wrap it: torchdp_keras.make_private("
            "model, l2_norm_clip=..., noise_multiplier=...). No weight was updated."
        )

    def build(self, variables):
        # Keras builds the optimizer before the first step; a DP model has
        # claimed it at compile time (`_claim_for_dp_model`), a plain one has not.
        if not getattr(self, "_dp_claimed", False):
            self._refuse_plain_training("is being built for training outside a DP model")
        return super().build(variables)

    def _claim_for_dp_model(self) -> None:
        """Called by a DP model's compile: this optimizer will get private gradients."""
        self._dp_claimed = True

    def apply(self, grads, trainable_variables=None):
        if not _PRIVATE_APPLY.get():
            self._refuse_plain_training("received gradients that were not clipped or noised")
        return super().apply(grads, trainable_variables)

    def get_config(self):
        config = super().get_config()
        config.pop("gradient_accumulation_steps", None)  # Keras's own: always None here
        config.update(self._dp_settings)
        return config


@functools.cache
def make_keras_optimizer_class(cls: type) -> type:
    """Returns the DP version of a Keras optimizer class (TF Privacy's function).

    The returned class takes `(l2_norm_clip, noise_multiplier,
    num_microbatches=None, gradient_accumulation_steps=1, *args, **kwargs)`,
    the rest being `cls`'s own arguments (`learning_rate`, ...). Calling
    this twice with the same class returns the same class, so saved models
    load again.

    Args:
        cls: A subclass of `keras.optimizers.Optimizer`.

    Returns:
        A subclass of `cls`, registered for Keras saving as
        `torchdp_keras>DPKeras<Name>Optimizer`.

    Raises:
        DPConfigError: `cls` is not a Keras optimizer class, or is already DP.

    Example:
        >>> DPKerasRMSpropOptimizer = make_keras_optimizer_class(keras.optimizers.RMSprop)
        >>> opt = DPKerasRMSpropOptimizer(l2_norm_clip=1.0, noise_multiplier=1.1,
        ...                               learning_rate=1e-3)
    """
    if not (isinstance(cls, type) and issubclass(cls, keras.optimizers.Optimizer)):
        raise DPConfigError(
            "Expected cls to be a Keras optimizer class (a subclass of "
            f"keras.optimizers.Optimizer). Received: cls={cls!r}"
        )
    if issubclass(cls, DPOptimizerMixin):
        raise DPConfigError(f"Expected a non-DP optimizer class. Received: cls={cls.__name__}")
    if issubclass(cls, keras.optimizers.LossScaleOptimizer):
        raise DPConfigError(
            "Expected a base optimizer class, not LossScaleOptimizer (Keras wraps the DP "
            "optimizer in it by itself under mixed precision). Received: "
            f"cls={cls.__name__}"
        )

    def __init__(
        self,
        l2_norm_clip,
        noise_multiplier,
        num_microbatches=None,
        gradient_accumulation_steps=1,
        *args,
        **kwargs,
    ):
        settings = self._check_dp_settings(
            l2_norm_clip, noise_multiplier, num_microbatches, gradient_accumulation_steps
        )
        cls.__init__(self, *args, **kwargs)
        self._dp_settings = settings

    name = f"DPKeras{cls.__name__}Optimizer"
    dp_cls = type(
        name,
        (DPOptimizerMixin, cls),
        {
            "__init__": __init__,
            "__module__": __name__,
            "__qualname__": name,
            "__doc__": (
                f"`keras.optimizers.{cls.__name__}` for DP training: clip every "
                "example's gradient to `l2_norm_clip`, add Gaussian noise of std "
                "`noise_multiplier * l2_norm_clip` once per update.\n\n"
                "Args:\n"
                "    l2_norm_clip: Clipping norm C > 0.\n"
                "    noise_multiplier: sigma >= 0.\n"
                "    num_microbatches: None (every example is clipped) or the "
                "number of contiguous groups a batch is split into.\n"
                "    gradient_accumulation_steps: Batches per noised update.\n"
                f"    *args, **kwargs: `keras.optimizers.{cls.__name__}`'s arguments.\n"
            ),
        },
    )
    return keras.saving.register_keras_serializable(package="torchdp_keras", name=name)(dp_cls)


def keras_gradient_accumulation_steps(optimizer) -> int | None:
    """Keras's own `gradient_accumulation_steps` of `optimizer` (inside a LossScaleOptimizer).

    None when the optimizer does not accumulate. A DP model then accumulates
    the clipped sums itself (one noise draw per update) and hands the
    optimizer each update scaled so that Keras's average over its window
    applies it exactly once (see `DPTrainerMixin.train_step`).
    """
    while isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    steps = getattr(optimizer, "gradient_accumulation_steps", None)
    return int(steps) if steps else None


def find_dp_optimizer(optimizer) -> DPOptimizerMixin | None:
    """The DP optimizer inside `optimizer` (unwrapping LossScaleOptimizer), or None."""
    while isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    return optimizer if isinstance(optimizer, DPOptimizerMixin) else None


def tf_privacy_named_class(base: type, name: str, tf_privacy_module: str) -> type:
    """`base` under another of TF Privacy's names, so that errors and saved files say it.

    TF Privacy has several names for one optimizer (its Keras, vectorized and
    TF1 classes: `DPKerasSGDOptimizer`, `VectorizedDPKerasSGDOptimizer`,
    `DPGradientDescentGaussianOptimizer`). They are one algorithm here; each
    name is a subclass with nothing of its own, so that a message about the
    optimizer names the class the user wrote.
    """
    doc = (
        f"TF Privacy's `{tf_privacy_module}.{name}`: `{base.__name__}` under the name "
        f"TF Privacy users write.\n\n{base.__doc__ or ''}"
    )
    named = type(name, (base,), {"__module__": __name__, "__qualname__": name, "__doc__": doc})
    return keras.saving.register_keras_serializable(package="torchdp_keras", name=name)(named)


DPKerasSGDOptimizer = make_keras_optimizer_class(keras.optimizers.SGD)
DPKerasAdamOptimizer = make_keras_optimizer_class(keras.optimizers.Adam)
DPKerasAdagradOptimizer = make_keras_optimizer_class(keras.optimizers.Adagrad)
# The tutorial's name (TF Privacy's dp_optimizer module, TF1 optimizers): DP SGD.
_TF1 = "privacy.optimizers.dp_optimizer"
DPGradientDescentGaussianOptimizer = tf_privacy_named_class(
    DPKerasSGDOptimizer, "DPGradientDescentGaussianOptimizer", _TF1
)
DPAdamGaussianOptimizer = tf_privacy_named_class(
    DPKerasAdamOptimizer, "DPAdamGaussianOptimizer", _TF1
)
DPAdagradGaussianOptimizer = tf_privacy_named_class(
    DPKerasAdagradOptimizer, "DPAdagradGaussianOptimizer", _TF1
)
# TF Privacy's vectorized Keras optimizers: the same algorithm (every engine
# here is vectorised).
_VECTORIZED = "privacy.optimizers.dp_optimizer_keras_vectorized"
VectorizedDPKerasSGDOptimizer = tf_privacy_named_class(
    DPKerasSGDOptimizer, "VectorizedDPKerasSGDOptimizer", _VECTORIZED
)
VectorizedDPKerasAdamOptimizer = tf_privacy_named_class(
    DPKerasAdamOptimizer, "VectorizedDPKerasAdamOptimizer", _VECTORIZED
)
VectorizedDPKerasAdagradOptimizer = tf_privacy_named_class(
    DPKerasAdagradOptimizer, "VectorizedDPKerasAdagradOptimizer", _VECTORIZED
)
# TF Privacy's vectorized TF1 optimizers.
_VECTORIZED_TF1 = "privacy.optimizers.dp_optimizer_vectorized"
VectorizedDPSGD = tf_privacy_named_class(DPKerasSGDOptimizer, "VectorizedDPSGD", _VECTORIZED_TF1)
VectorizedDPAdam = tf_privacy_named_class(DPKerasAdamOptimizer, "VectorizedDPAdam", _VECTORIZED_TF1)
VectorizedDPAdagrad = tf_privacy_named_class(
    DPKerasAdagradOptimizer, "VectorizedDPAdagrad", _VECTORIZED_TF1
)
