"""The exceptions raised by torchdp_keras.

Every error the package raises on purpose derives from `DPError`, so callers can
catch the whole family at once. The subclasses also derive from the built-in
exception that describes the mistake (`ValueError` for a bad argument,
`ImportError` for a wrong Keras backend), so code written against plain Keras
keeps working.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "DPConfigError",
    "DPError",
    "PrivacyBudgetExceededError",
    "PrivacyStateError",
    "UnsupportedLayerError",
]


class DPError(Exception):
    """Base class of every error raised on purpose by torchdp_keras."""


class DPConfigError(DPError, ValueError):
    """An argument or a configuration cannot give the requested guarantee.

    Raised for out-of-range DP settings (`l2_norm_clip`, `noise_multiplier`,
    `num_microbatches`, `seed`), a batch that does not split into
    `num_microbatches` groups, a model compiled without a loss, or a model with
    nothing to train.
    """


class UnsupportedLayerError(DPError, ValueError):
    """Some layers of the model cannot be trained with per-example privacy.

    The message lists every offending layer by its path inside the model,
    the privacy reason, and the fix.

    Attributes:
        layer_paths: The paths of the offending layers, in model order.
    """

    def __init__(self, message: str, layer_paths: list[str] | tuple[str, ...] = ()):
        super().__init__(message)
        self.layer_paths = tuple(layer_paths)


class BackendError(DPError, ImportError):
    """Keras runs on a backend other than PyTorch."""


class PrivacyBudgetExceededError(DPError, RuntimeError):
    """Training would take more DP steps than the privacy budget allows.

    Raised before the step that would overspend (for example past
    `DPKerasConfig.train_steps`), counted across several `fit` calls.
    """


class PrivacyStateError(DPError, ValueError):
    """A saved privacy state does not belong to the model it is loaded into.

    Raised by `load_model`/`load_weights` (and `keras.callbacks.BackupAndRestore`)
    when the state was written by a model with other weights, another
    accountant, another sampling probability, or is malformed. Accepting it
    would report an epsilon for a history this model did not have.
    """
