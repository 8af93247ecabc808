"""Per-example (per-unit) clipped gradient sums with `torch.func`.

A *clipping unit* is what DP-SGD clips: one example, or one microbatch of
`m` contiguous examples when `num_microbatches` is set. The engine evaluates
the user's model and loss on each unit alone (a Keras batch of `m`), with
`torch.func.vmap` over `torch.func.grad` of a stateless Keras call, and
returns

    sum_i min(1, C / ||g_i||) g_i

without ever holding more than one chunk of per-unit gradients in memory.

What belongs to a unit's loss: the compiled loss of that unit (honouring its
`sample_weight`) plus the losses its forward pass adds with `add_loss`
(activity regularizers). Weight regularizers do not depend on the data and
are not part of it: the DP model adds their gradient after noising.
"""

from __future__ import annotations

import warnings

import keras
import torch
from keras import tree

from torchdp_keras import _keras_compat as keras_compat
from torchdp_keras.errors import DPConfigError
from torchdp_keras.model_walk import data_updated_state_error, seed_state_ids
from torchdp_keras.ops import clipped_sum_and_norms
from torchdp_keras.per_example.engine import ClippedBatch
from torchdp_keras.per_example.keras_patches import per_example_call_context
from torchdp_keras.per_example.loss_weights import (
    broadcast_example_weights,
    masked_example_weights,
)

# Per-unit gradients held at once, in elements (256 MiB of float32).
DEFAULT_MAX_CHUNK_ELEMENTS = 1 << 26


def _leading_dims(tree_):
    """vmap `in_dims` for a pytree: 0 for every tensor, None elsewhere."""
    return torch.utils._pytree.tree_map(lambda t: 0 if isinstance(t, torch.Tensor) else None, tree_)


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A `(k,)` mask shaped to broadcast over the rows of a `(k, ...)` tensor."""
    return mask.view(-1, *[1] * (like.ndim - 1))


def _to_units(value, num_units):
    if value is None:
        return None
    return value.reshape(num_units, value.shape[0] // num_units, *value.shape[1:])


def _from_units(value):
    return value.reshape(value.shape[0] * value.shape[1], *value.shape[2:])


class VmapEngine:
    """Clipped per-unit gradient sums of a Keras model, through `torch.func`.

    The engine is bound to the model's current variable lists; build a new one
    when they change (a layer added, a weight frozen).

    Args:
        model: A built Keras model on the torch backend, compiled with a loss.
        max_chunk_elements: Upper bound on `units_per_chunk * num_parameters`,
            the memory of the per-unit gradients held at once.
        units_per_chunk: Fixed number of units per chunk (JAX Privacy's
            `microbatch_size`); overrides the memory bound when given.
        compile: Wrap the per-unit gradient function in `torch.compile`; if
            that fails, warn once and run eagerly.
        compile_source: The user's argument that asked for compilation, named
            in that warning (`use_xla=True`, TF Privacy's name, or Keras's
            `jit_compile=True`).

    Example:
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> model.compile(loss="mse")
        >>> engine = VmapEngine(model)
        >>> x, y = np.ones((4, 3), "float32"), np.zeros((4, 2), "float32")
        >>> out = engine.clipped_batch(x, y, None, num_units=len(x),
        ...                            l2_norm_clip=1.0, rng_seed=0)
        >>> [tuple(s.shape) for s in out.summed], tuple(out.unit_norms.shape)
        ([(3, 2), (2,)], (4,))
    """

    def __init__(
        self,
        model: keras.Model,
        *,
        max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
        units_per_chunk: int | None = None,
        compile: bool = False,
        compile_source: str = "jit_compile=True",
    ):
        self._model = model
        self._trainable = list(model.trainable_variables)
        self._non_trainable = list(model.non_trainable_variables)
        seed_states = seed_state_ids(model)
        self._is_seed_state = [id(v) in seed_states for v in self._non_trainable]
        self._num_params = sum(int(v.value.numel()) for v in self._trainable)
        self._max_chunk_elements = int(max_chunk_elements)
        self._fixed_units_per_chunk = units_per_chunk
        self._data_updated_variables: list[str] = []
        grad_fn = torch.func.grad(self._unit_loss, argnums=0, has_aux=True)
        self._eager_fn = grad_fn
        self._compiled_fn = None
        self._compile = compile
        self._compile_source = compile_source
        self._compile_failed = False

    @property
    def variable_key(self) -> tuple[int, ...]:
        """Identity of the variable lists this engine was built for."""
        return tuple(id(v) for v in self._trainable + self._non_trainable)

    def units_per_chunk(self, num_units: int) -> int:
        """How many units the engine differentiates at once (memory bound)."""
        if self._fixed_units_per_chunk is not None:
            return max(1, min(num_units, self._fixed_units_per_chunk))
        per_unit = max(1, self._num_params)
        return max(1, min(num_units, self._max_chunk_elements // per_unit))

    # -- the function differentiated for one unit ---------------------------
    def _unit_loss(self, trainable_values, non_trainable_values, x, y, sample_weight, loss_scale):
        model = self._model
        mapping = list(zip(self._trainable, trainable_values)) + list(
            zip(self._non_trainable, non_trainable_values)
        )
        with keras_compat.StatelessScope(state_mapping=mapping, collect_losses=True) as scope:
            initial = [scope.get_current_value(v) for v in self._non_trainable]
            if keras_compat.call_has_training_arg(model):
                y_pred = model(x, training=True)
            else:
                y_pred = model(x)
            terms = []
            if keras_compat.compile_loss(model) is not None:
                compiled = keras_compat.compile_loss(model)(
                    y, y_pred, broadcast_example_weights(sample_weight, y_pred)
                )
                if compiled is not None:
                    terms.append(compiled)
            for extra in scope.losses:
                terms.append(keras_compat.aggregate_additional_loss(model, extra))
            final = [scope.get_current_value(v) for v in self._non_trainable]
        if not terms:
            raise DPConfigError(
                f"Model '{model.name}' produced no loss to clip: compile it with "
                "a loss, e.g. model.compile(optimizer=..., loss=...)."
            )
        loss = terms[0]
        for term in terms[1:]:
            loss = loss + term
        if loss.ndim > 0:
            loss = loss.mean()
        new_seed_states = []
        for var, before, after, is_seed in zip(
            self._non_trainable, initial, final, self._is_seed_state
        ):
            if is_seed:
                new_seed_states.append(after)
            elif after is not before and var.path not in self._data_updated_variables:
                self._data_updated_variables.append(var.path)
        y_pred = tree.map_structure(
            lambda t: t.detach() if isinstance(t, torch.Tensor) else t, y_pred
        )
        return loss * loss_scale, (loss.detach(), y_pred, new_seed_states)

    def _vmapped(self, fn, x, y, sample_weight):
        data_dims = tuple(_leading_dims(part) for part in (x, y, sample_weight))
        in_dims = (None, None, *data_dims, None)
        return torch.func.vmap(fn, in_dims=in_dims, randomness="different")

    def _run_chunk(self, trainable_values, non_trainable_values, x, y, sw, loss_scale):
        args = (trainable_values, non_trainable_values, x, y, sw, loss_scale)
        if self._compile and not self._compile_failed:
            if self._compiled_fn is None:
                self._compiled_fn = torch.compile(self._vmapped(self._eager_fn, x, y, sw))
            try:
                return self._compiled_fn(*args)
            except Exception as error:  # noqa: BLE001 - any compiler failure
                self._compile_failed = True
                warnings.warn(
                    f"torchdp_keras: {self._compile_source} asked for torch.compile, which "
                    f"could not compile the DP step ({type(error).__name__}: {error}); "
                    "running it eagerly "
                    "instead. The result is the same, only slower.",
                    stacklevel=4,
                )
        return self._vmapped(self._eager_fn, x, y, sw)(*args)

    def _iter_chunks(self, x, y, sample_weight, num_units, rng_seed, loss_scale, unit_mask=None):
        """Yields `(grads, unit_losses, y_pred)` per chunk of units.

        Gradients are unscaled (divided by `loss_scale`). Units whose
        `unit_mask` is 0 (padding) get exactly zero gradients and losses, even
        if their loss is not finite. The seed generators of random layers are
        advanced once the last chunk has been produced.
        """
        to_tensor = keras.ops.convert_to_tensor
        if unit_mask is not None:
            unit_mask = to_tensor(unit_mask) > 0
            rows = int(tree.flatten(x)[0].shape[0])
            if unit_mask.shape[0] == rows and rows != num_units:
                # A mask of the rows, with units of several rows (a user's
                # examples): padding rows weigh 0, a unit with no row is out.
                sample_weight = masked_example_weights(sample_weight, unit_mask)
                unit_mask = unit_mask.view(num_units, -1).any(dim=1)
        x, y, sample_weight = tree.map_structure(
            lambda t: None if t is None else _to_units(to_tensor(t), num_units),
            (x, y, sample_weight),
        )
        trainable_values = [v.value.detach() for v in self._trainable]
        non_trainable_values = [v.value.detach() for v in self._non_trainable]
        device = trainable_values[0].device
        chunk = self.units_per_chunk(num_units)
        with torch.no_grad(), per_example_call_context(device, rng_seed):
            for start in range(0, num_units, chunk):
                window = slice(start, start + chunk)
                x_c, y_c, sw_c = tree.map_structure(
                    lambda t, w=window: None if t is None else t[w], (x, y, sample_weight)
                )
                grads, (unit_losses, y_pred, seed_states) = self._run_chunk(
                    trainable_values, non_trainable_values, x_c, y_c, sw_c, loss_scale
                )
                self._raise_if_data_updated_state()
                if loss_scale != 1.0:
                    grads = [g / loss_scale for g in grads]
                if unit_mask is not None:
                    keep = unit_mask[window]
                    grads = [torch.where(_rows(keep, g), g, torch.zeros_like(g)) for g in grads]
                    unit_losses = torch.where(keep, unit_losses, torch.zeros_like(unit_losses))
                seed_iter = iter(seed_states)
                non_trainable_values = [
                    next(seed_iter)[0] if is_seed else value
                    for value, is_seed in zip(non_trainable_values, self._is_seed_state)
                ]
                yield grads, unit_losses, y_pred
        for var, value, is_seed in zip(
            self._non_trainable, non_trainable_values, self._is_seed_state
        ):
            if is_seed:
                var.assign(value)

    def per_unit_gradients(
        self, x, y, sample_weight, *, num_units: int, rng_seed: int = 0
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Unclipped per-unit gradients, one tensor `(num_units, *shape)` per weight.

        This materialises all of them at once; DP training never does (see
        `clipped_batch`). Returns `(gradients, unit_losses)`.
        """
        grads, losses = [], []
        for chunk_grads, unit_losses, _ in self._iter_chunks(
            x, y, sample_weight, num_units, rng_seed, 1.0
        ):
            grads.append(chunk_grads)
            losses.append(unit_losses)
        return [torch.cat(parts) for parts in zip(*grads)], torch.cat(losses)

    def clipped_batch(
        self,
        x,
        y,
        sample_weight,
        *,
        num_units: int,
        l2_norm_clip: float,
        rng_seed: int,
        loss_scale: float = 1.0,
        unit_mask=None,
    ) -> ClippedBatch:
        """`ClippingEngine.clipped_batch` (see its arguments), one chunk of units at a time.

        Each unit's gradient is taken with `torch.func.grad` of the model's
        stateless call on that unit alone, vmapped over the units of a chunk.
        """
        summed = None
        num_nonfinite = 0
        losses, norms, predictions = [], [], []
        for grads, unit_losses, y_pred in self._iter_chunks(
            x, y, sample_weight, num_units, rng_seed, loss_scale, unit_mask
        ):
            # One fused pass (csrc/ kernel when built): norms, factors, sums.
            part, sq_norms = clipped_sum_and_norms(grads, l2_norm_clip)
            bad = ~(torch.isfinite(sq_norms) & torch.isfinite(unit_losses))
            if bool(bad.any()):
                # A non-finite unit would turn the whole sum into NaN (0 * inf
                # is NaN): its gradient is replaced by zeros and the sum is
                # taken again. It then contributes nothing, within any bound.
                grads = [torch.where(_rows(bad, g), torch.zeros_like(g), g) for g in grads]
                unit_losses = torch.where(bad, torch.zeros_like(unit_losses), unit_losses)
                part, _ = clipped_sum_and_norms(grads, l2_norm_clip)
                num_nonfinite += int(bad.sum())
            summed = part if summed is None else [a.add_(b) for a, b in zip(summed, part)]
            losses.append(unit_losses)
            norms.append(torch.sqrt(sq_norms))
            predictions.append(y_pred)
        y_pred = tree.map_structure(
            lambda *parts: _from_units(torch.cat(parts, dim=0)), *predictions
        )
        unit_losses = torch.cat(losses)
        if summed is None:  # not reachable: a batch has at least one chunk
            summed = [torch.zeros_like(v.value) for v in self._trainable]
        return ClippedBatch(
            summed=summed,
            unit_losses=unit_losses,
            unit_norms=torch.cat(norms),
            y_pred=y_pred,
            loss_sum=unit_losses.sum(),
            num_nonfinite=num_nonfinite,
        )

    def _raise_if_data_updated_state(self):
        if self._data_updated_variables:
            raise data_updated_state_error(list(self._data_updated_variables))
