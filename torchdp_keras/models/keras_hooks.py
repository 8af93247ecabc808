"""Keras hooks every DP model (per-example and Lipschitz) overrides the same way.

The train function runs `train_step` eagerly (each DP step compiles only what
it can itself), a loaded model recompiles from its saved compile config, and
`PrivateDataLoader` batches are unwrapped. A loader batch is a dict
`{POISSON_BATCH_KEY: {"x", "y", "sample_weight", "mask"}}`: padded to a fixed
shape, with `mask` 0 on padding rows. Keras's own `test_step` and symbolic
build would take the dict for the model's inputs; these versions unwrap it
and drop the padding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import keras
from keras import tree

from torchdp_keras import _keras_compat as keras_compat
from torchdp_keras.data import unpack_poisson_batch

if TYPE_CHECKING:
    # The mixins are only ever combined with a keras.Model, whose attributes
    # (name, optimizer, weights, ...) they use; the type checker sees them.
    from keras import Model as KerasModelBase
else:
    KerasModelBase = object


class DPKerasHooksMixin(KerasModelBase):
    """`make_train_function`, `compile_from_config`; loader batches in the other hooks."""

    def compile_from_config(self, config):
        # Keras skips compiling a loaded model whose class overrides compile();
        # ours only adds checks, so the saved compile config applies as is.
        config = keras_compat.deserialize_keras_object(config)
        self.compile(**config)
        if hasattr(self, "optimizer") and self.built:
            self.optimizer.build(self.trainable_variables)

    def make_train_function(self, force=False):
        # The DP step compiles only its pure per-example part (see VmapEngine),
        # so Keras must not wrap the whole step in torch.compile.
        if self.train_function is not None and not force:
            return self.train_function
        if self.steps_per_execution > 1:
            raise ValueError(
                "`steps_per_execution` must be 1 with the PyTorch backend. "
                f"Received: steps_per_execution={self.steps_per_execution}"
            )

        def one_step_on_data(data):
            return self.train_step(data[0])

        self.train_function = one_step_on_data
        return self.train_function

    def _unpack(self, data):
        """`(x, y, sample_weight, mask)`; mask is None unless a Poisson batch."""
        poisson = unpack_poisson_batch(data)
        if poisson is not None:
            return poisson
        x, y, sample_weight = keras_compat.unpack_x_y_sample_weight(data)
        return x, y, sample_weight, None

    def test_step(self, data):
        x, y, sample_weight, mask = self._unpack(data)
        if mask is None:
            return super().test_step(data)
        keep = keras.ops.convert_to_tensor(mask) > 0
        if not bool(keep.any()):
            return self.get_metrics_result()
        x, y, sample_weight = tree.map_structure(
            lambda t: None if t is None else t[keep], (x, y, sample_weight)
        )
        return super().test_step((x, y, sample_weight))

    def _symbolic_build(self, iterator=None, data_batch=None):
        # Keras peeks at the first batch to build metrics; a Poisson batch is
        # unwrapped to the (x, y, sample_weight) Keras expects.
        if data_batch is None and iterator is not None and keras_compat.needs_symbolic_build(self):
            data_batch = keras_compat.first_data_batch(iterator)
        if data_batch is None:
            return super()._symbolic_build(iterator=iterator)
        x, y, sample_weight, _ = self._unpack(data_batch)
        parts = [x, y, sample_weight]
        while parts[-1] is None:
            parts.pop()
        return super()._symbolic_build(data_batch=tuple(parts))
