"""The contract every clipping engine keeps: `ClippingEngine` and `ClippedBatch`.

An engine turns one batch into the sum of its clipping units' clipped
gradients. Two implement it: `FastEngine` (fast clipping: one forward, one
backward, per-layer rules, no per-example gradient materialised) and
`VmapEngine` (per-example gradients of the whole model with `torch.func`).
`make_engine` (see `torchdp_keras.per_example.factory`) chooses between them;
the DP step only ever sees this protocol.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["ClippedBatch", "ClippingEngine"]


@dataclasses.dataclass
class ClippedBatch:
    """What one pass of an engine over a batch returns.

    Attributes:
        summed: Sum over units of the clipped unit gradients, one tensor per
            trainable variable (in `model.trainable_variables` order).
        unit_losses: The loss of every unit, shape `(num_units,)` (None
            where the engine only computes their sum).
        unit_norms: The unclipped gradient norm of every unit.
        y_pred: The model's training-mode predictions for the whole batch.
        loss_sum: The sum of the units' losses (padding excluded).
        num_nonfinite: Units left out because their gradient (or, in the
            per-example engine, their loss) was not finite: NaN or inf from a
            bad example. They contribute exactly zero to `summed`.
    """

    summed: list[torch.Tensor]
    unit_losses: torch.Tensor | None
    unit_norms: torch.Tensor
    y_pred: Any
    loss_sum: torch.Tensor
    num_nonfinite: int = 0


@runtime_checkable
class ClippingEngine(Protocol):
    """What the DP step asks of an engine.

    An engine is bound to the model's variable lists when built
    (`variable_key`: the ids of the trainable then non-trainable variables);
    a model whose lists changed (a layer added, a weight frozen) builds a
    new one.
    """

    @property
    def variable_key(self) -> tuple[int, ...]:
        """The ids of the variables the engine was built for."""
        ...

    def clipped_batch(
        self,
        x: Any,
        y: Any,
        sample_weight: Any,
        *,
        num_units: int,
        l2_norm_clip: float,
        rng_seed: int,
        loss_scale: float = 1.0,
        unit_mask: Any = None,
    ) -> ClippedBatch:
        """Clips every unit's gradient to `l2_norm_clip` and sums them.

        Args:
            x: Inputs of one batch, as Keras hands them to `train_step`; the
                leading axis of every tensor is the batch axis.
            y: Targets of the batch (or None).
            sample_weight: Sample weights of the batch (or None).
            num_units: Number of clipping units; the batch splits into
                `num_units` contiguous groups of equal size.
            l2_norm_clip: The clipping norm `C`.
            rng_seed: Seed of the random layers (dropout) for this batch.
            loss_scale: Mixed-precision loss scale; the gradients are unscaled
                before their norms are taken.
            unit_mask: Optional 0/1 mask of the units `(num_units,)` or of the
                rows `(batch,)`: a unit or row with 0 (padding) contributes
                exactly nothing; a unit of several rows whose rows are all 0
                is left out.

        Returns:
            A `ClippedBatch`. The seed generators of random layers have
            advanced; no other model state has changed.

        Raises:
            UnsupportedLayerError: a layer updates a non-trainable variable
                from the data in its training pass (or, for `FastEngine`,
                `FastPathUnsupported`: the model is outside its scope).
        """
        ...
