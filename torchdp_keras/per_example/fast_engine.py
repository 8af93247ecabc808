"""Fast gradient clipping: one forward, one backward, no per-model vmap.

The engine runs a functional or Sequential model's graph itself; any other
model (subclassed, or a wrapper around one) runs its own `call`. Every
layer with trained weights is called through its `LayerRule` (in a graph)
or tapped through a torch forward hook that exists only during the step (in
a model's or a block's own `call`); the rule exposes the layer's
pre-activation output `z`. One backward pass of the sum of the per-unit
losses gives `dL/dz` for every such layer at once. From each layer's input
and `dL/dz` its rule computes per-unit squared gradient norms (ghost norms
where a formula exists, per-layer per-example gradients otherwise); the
norms are summed over layers, turned into clip factors, and each rule forms
its clipped-sum gradients directly (book-keeping). There is no second
backward pass and no B x P tensor for the model.

Layers without a rule whose sublayers own their weights (and layers
registered with `SublayerRule`, like MultiHeadAttention) are walked: their
sublayers are tapped instead. Parameter-free pooling layers and Keras's
convolution run on channels_last views (`layout.py`). Rules keep large
intermediates in per-layer scratch memory that outlives the step
(`rules.base.scratch`).

Scope (anything else raises `FastPathUnsupported`, and `clipping_mode="auto"`
then uses the per-example engine):
* every layer with trained weights is called once per forward pass, or its
  rule merges its uses (`LayerRule.merge_uses`: Dense, Embedding,
  ReversibleEmbedding): a shared weight's per-example gradient is the sum
  over its uses, never undercounted;
* every use of a weight goes through the call of the layer that owns it
  (checked on the first step against autograd's full gradient);
* one clipping unit per example, or groups of examples (`num_microbatches`)
  when every rule can fold a group into one row (`LayerRule.fold_units`);
* losses that are sums of per-example terms: every compiled loss reduced with
  "sum_over_batch_size" (the Keras default) or "sum", or every one unreduced
  (`reduction=None`, an example's loss being the mean of its row), and no
  `add_loss` terms (activity regularizers) in the forward pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable
from typing import Any, NamedTuple

import keras
import torch
from keras import tree

from torchdp_keras import _keras_compat as keras_compat
from torchdp_keras.errors import UnsupportedLayerError
from torchdp_keras.model_walk import data_updated_state_error, iter_layers, seed_state_ids
from torchdp_keras.ops import clip_factors
from torchdp_keras.per_example.engine import ClippedBatch
from torchdp_keras.per_example.keras_patches import per_example_call_context
from torchdp_keras.per_example.layout import layout_preserving_forward, layout_preserving_ops
from torchdp_keras.per_example.loss_weights import (
    broadcast_example_weights,
    masked_example_weights,
)
from torchdp_keras.per_example.memory import BUDGET_KEY, StepBudget
from torchdp_keras.per_example.registry import LayerRegistry
from torchdp_keras.per_example.rules.base import (
    SAVED_KEY,
    WORKSPACE_KEY,
    LayerRule,
    as_forward,
    output_derivative,
)
from torchdp_keras.per_example.rules.per_example import PerExampleGradientRule
from torchdp_keras.per_example.rules.sublayers import SublayerRule

logger = logging.getLogger(__name__)

_SEPARABLE_REDUCTIONS = {"sum_over_batch_size": True, "sum": False}  # value: scale by B


class Tap(NamedTuple):
    """One call of a ruled layer in the forward pass.

    Attributes:
        layer: The layer called.
        rule: Its `LayerRule`.
        args, kwargs: The call's arguments (inputs in the layer's dtype).
        tensor: The tapped tensor, whose gradient the backward pass gives
            (the pre-activation `z`, or the finished output).
        saved: What the rule's forward kept for its norms, or None.
        derivative: `f'` of the activation to multiply the output's gradient
            by, when the finished output is the tap; else None.
    """

    layer: Any
    rule: LayerRule
    args: tuple
    kwargs: dict
    tensor: torch.Tensor
    saved: Any
    derivative: Callable | None


class UnitTap(NamedTuple):
    """A tap with its output gradient, seen as one row per clipping unit."""

    layer: Any
    rule: LayerRule
    args: tuple
    kwargs: dict
    grad: torch.Tensor
    saved: Any


class FastPathUnsupported(UnsupportedLayerError):
    """The model (or this batch) is outside the fast path's scope.

    Attributes:
        problems: `(layer path, what is wrong)` for each offending layer.
    """

    def __init__(self, message: str, layer_paths=(), problems=()):
        super().__init__(message, layer_paths=layer_paths)
        self.problems = tuple(problems)


def graph_of(model) -> keras_compat.Functional | None:
    """The functional graph that computes `model`'s output, or None."""
    if isinstance(model, keras.Sequential):
        return keras_compat.sequential_graph(model)
    if isinstance(model, keras_compat.Functional):
        return model
    if getattr(model, "_dp_wraps_model", False):  # PrivateKerasModel calls model.model
        return graph_of(model.model)
    return None


def _graph_layers(graph: keras_compat.Functional):
    """(layer, uses) for every operation of a graph, nested graphs flattened."""
    counts: dict[int, list] = {}
    for depth_nodes in keras_compat.graph_nodes_by_depth(graph).values():
        for node in depth_nodes:
            op = node.operation
            if op is None or node.is_input:
                continue
            inner = graph_of(op) if isinstance(op, keras.Model) else None
            if inner is not None:
                for layer, uses in _graph_layers(inner):
                    entry = counts.setdefault(id(layer), [layer, 0])
                    entry[1] += uses
                continue
            entry = counts.setdefault(id(op), [op, 0])
            entry[1] += 1
    return [(layer, uses) for layer, uses in counts.values()]


def _walkable(layer) -> bool:
    """Whether a rule-less layer may be clipped through its sublayers.

    Recurrent layers call their cell once per time step (its weights are
    shared across steps), so they are left whole to the per-layer fallback.
    """
    return not isinstance(layer, keras.layers.RNN)


class FastEngine:
    """Clipped per-example gradient sums without per-example model gradients.

    Args:
        model: A built DP model whose computation is a functional graph.
        registry: The `LayerRegistry` of rules.
        fallback: In "auto" mode, the rule for weighted layers the registry
            does not cover (explicit per-layer per-example gradients); None
            in "fast" mode, where such layers are an error.

    Raises:
        FastPathUnsupported: the model is outside the fast path's scope; the
            message lists the layers by path.
    """

    def __init__(self, model: keras.Model, registry: LayerRegistry, *, fallback=None):
        self._model = model
        graph = graph_of(model)
        # A functional graph is run layer by layer; any other model (subclassed,
        # or a wrapper around one) runs its own call with every weighted layer
        # tapped through hooks that exist only during the step.
        self._graph = graph
        entries = _graph_layers(graph) if graph is not None else [(model, 1)]
        paths = {id(layer): path for path, layer in iter_layers(model)}
        paths[id(model)] = model.name
        self._rules: dict[int, object] = {}
        self._layout_forwards = {}
        self.slow_layers: list[str] = []
        self.plan: list[tuple[str, str, str]] = []  # (path, layer class, how it is clipped)
        problems = []
        covered: set[int] = set()
        # Composite layer (walked) -> every tapped layer inside it, at any depth.
        self._leaves: dict[int, list] = {}
        self._paths: dict[int, str] = {}
        # Per-layer scratch tensors reused from step to step (see rules.base.scratch).
        self._workspaces: dict[int, dict] = {}
        # The weights the optimizer trains. A layer's own `trainable_weights` can
        # miss some: keras_hub's enable_lora freezes an attention layer whose
        # LoRA-enabled projections still train.
        self._trained_ids = {id(v) for v in model.trainable_variables}
        for layer, uses in entries:
            weights = self._trained(layer)
            if not weights:
                forward = layout_preserving_forward(layer)
                if forward is not None:
                    self._layout_forwards[id(layer)] = forward
                continue
            path = paths.get(id(layer), layer.name)
            if uses > 1 and not self._shareable(layer, registry):
                problems.append((path, f"called {uses} times: shared weights"))
                continue
            self._assign_rule(layer, path, registry, fallback, problems, covered, [])
        missing = [v.path for v in model.trainable_variables if id(v) not in covered]
        if missing and not problems:
            problems.append(
                (model.name, "weights not owned by any layer of the graph: " + ", ".join(missing))
            )
        if problems:
            raise FastPathUnsupported(
                "These layers cannot take the fast clipping path:\n"
                + "\n".join(f"  - {path} ({detail})" for path, detail in problems),
                layer_paths=[path for path, _ in problems],
                problems=problems,
            )
        self._trainable = list(model.trainable_variables)
        self._non_trainable = list(model.non_trainable_variables)
        self._seed_states = seed_state_ids(model)
        # Checked once, on the first step: the clipped sums the taps give (with
        # factors 1) equal autograd's gradient of every weight, so that no use
        # of a weight outside its layer's call is left out.
        self._verified = False

    def _assign_rule(self, layer, path, registry, fallback, problems, covered, leaves) -> None:
        """Finds the rule of `layer`, walking into composite layers.

        A layer is walked (its weighted sublayers tapped instead) when it is
        registered with `SublayerRule`, or has no rule of its own while its
        sublayers own each of its trainable weights exactly once (a subclassed
        model, a block of layers); recurrent layers, which call their cell
        once per time step, are not walked.
        """
        weights = self._trained(layer)
        rule, declined = registry.explain(layer)
        if rule is None or isinstance(rule, SublayerRule):
            children = [
                child
                for child in keras_compat.flatten_layers(layer, include_self=False, recursive=False)
                if self._trained(child)
            ]
            owned = [id(w) for child in children for w in self._trained(child)]
            exact = (
                bool(children)
                and sorted(owned) == sorted(id(w) for w in weights)
                and len(set(owned)) == len(owned)
            )
            if exact and (isinstance(rule, SublayerRule) or _walkable(layer)):
                inner: list = []
                for child in children:
                    self._assign_rule(
                        child, f"{path}/{child.name}", registry, fallback, problems, covered, inner
                    )
                self._leaves[id(layer)] = inner
                self._paths[id(layer)] = path
                leaves.extend(inner)
                return
            if isinstance(rule, SublayerRule):
                problems.append(
                    (
                        path,
                        f"{type(layer).__name__}: registered with SublayerRule, but its "
                        "sublayers do not own each of its trainable weights exactly once",
                    )
                )
                return
        how = type(rule).__name__ if rule is not None else ""
        if rule is None:
            if fallback is None:
                problems.append((path, f"{type(layer).__name__}: {declined}"))
                return
            rule = fallback
            how = f"per-layer per-example gradients ({declined})"
            self.slow_layers.append(f"{path} ({type(layer).__name__}: {declined})")
        if [id(w) for w in weights] != [id(w) for w in layer.trainable_weights]:
            problems.append(
                (path, f"{type(layer).__name__}: trainable=False, but weights of it are trained")
            )
            return
        reused = [w.path for w in weights if id(w) in covered]
        if reused:
            problems.append((path, f"weights used by another layer too: {', '.join(reused)}"))
            return
        self._rules[id(layer)] = rule
        self._paths[id(layer)] = path
        self.plan.append((path, type(layer).__name__, how))
        covered.update(id(w) for w in weights)
        leaves.append(layer)

    @staticmethod
    def _shareable(layer, registry) -> bool:
        """Whether `layer` may be called several times: its rule handles shared uses."""
        rule = registry.lookup(layer)
        return rule is not None and rule.supports_shared_uses

    def _trained(self, layer) -> list:
        """The weights of `layer` (its own and its sublayers') that the optimizer trains."""
        seen: set[int] = set()
        out = []
        for weight in getattr(layer, "weights", ()):
            if id(weight) in self._trained_ids and id(weight) not in seen:
                seen.add(id(weight))
                out.append(weight)
        return out

    @property
    def variable_key(self) -> tuple[int, ...]:
        return tuple(id(v) for v in self._trainable + self._non_trainable)

    # -- forward through the graph -----------------------------------------------
    def _run_graph(self, graph: keras_compat.Functional, inputs, taps: list):
        inputs = keras_compat.standardize_graph_inputs(graph, inputs)

        def operation_fn(op):
            def call(*args, **kwargs):
                if keras_compat.call_has_training_arg(op):
                    kwargs["training"] = True  # as Functional.call propagates it
                inner = graph_of(op) if isinstance(op, keras.Model) else None
                if inner is not None:
                    kwargs.pop("training", None)
                    kwargs.pop("mask", None)
                    return self._run_graph(inner, args[0], taps)
                if id(op) in self._leaves:
                    return self._composite_call(op, args, kwargs, taps)
                rule = self._rules.get(id(op))
                if rule is None:
                    forward = self._layout_forwards.get(id(op))
                    if forward is not None and len(args) == 1 and isinstance(args[0], torch.Tensor):
                        return forward(args[0])
                    return op(*args, **kwargs)
                return self._tapped_call(op, rule, args, kwargs, taps)

            return call

        return keras_compat.run_through_graph(graph, inputs, operation_fn=operation_fn)

    def _composite_call(self, layer, args, kwargs, taps):
        """Runs a walked layer's own call, tapping every weighted layer inside it."""
        calls: dict[int, int] = {}
        running: set[int] = set()
        grad_modes: dict[int, bool] = {}

        def no_grad_before(module, hook_args, hook_kwargs):
            # A layer whose rule recomputes it from its inputs (LayerRule.
            # recomputes_in_hooks): its own forward, whose output is replaced,
            # builds no autograd graph. Restored by `restore_grad`, which runs
            # even when the forward raises.
            if id(module) not in running:
                grad_modes[id(module)] = torch.is_grad_enabled()
                torch.set_grad_enabled(False)

        def restore_grad(module, hook_args, hook_kwargs, output):
            if id(module) in grad_modes:
                torch.set_grad_enabled(grad_modes.pop(id(module)))

        def hook(module, hook_args, hook_kwargs, output):
            if id(module) in running:  # the rule's own forward of this layer
                return None
            calls[id(module)] = calls.get(id(module), 0) + 1
            running.add(id(module))
            try:
                rule = self._rules[id(module)]
                return self._tapped_call(module, rule, hook_args, hook_kwargs, taps, output)
            finally:
                running.discard(id(module))

        leaves = self._leaves[id(layer)]
        handles = []
        try:
            for leaf in leaves:
                if self._rules[id(leaf)].recomputes_in_hooks:
                    handles.append(leaf.register_forward_pre_hook(no_grad_before, with_kwargs=True))
                    handles.append(
                        leaf.register_forward_hook(
                            restore_grad, with_kwargs=True, always_call=True, prepend=True
                        )
                    )
                handles.append(leaf.register_forward_hook(hook, with_kwargs=True))
            out = layer(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
            for module_id in list(grad_modes):  # a forward that failed before its hooks
                torch.set_grad_enabled(grad_modes.pop(module_id))
        path = self._paths[id(layer)]
        wrong = [
            f"{self._paths[id(leaf)]} ran {calls.get(id(leaf), 0)} times"
            for leaf in leaves
            if calls.get(id(leaf), 0) != 1
            and not (calls.get(id(leaf), 0) > 1 and self._rules[id(leaf)].supports_shared_uses)
        ]
        if wrong:
            raise FastPathUnsupported(
                f"Layer {path} ({type(layer).__name__}) is clipped through the layers it "
                "calls, which must each run exactly once per call (a layer called twice "
                "shares its weights between uses): " + ", ".join(wrong),
                layer_paths=[path],
            )
        return out

    @staticmethod
    def _tapped_call(layer, rule, args, kwargs, taps, output=None):
        if getattr(layer, "activity_regularizer", None) is not None:
            raise FastPathUnsupported(
                f"Layer '{layer.name}' has an activity regularizer (an add_loss term).",
                layer_paths=[layer.name],
            )
        z = None if output is None else rule.tap_output(layer, output)
        if z is not None:  # a sublayer whose finished output is the tap
            taps.append(Tap(layer, rule, args, kwargs, z, None, None))
            return None
        derivative = (
            output_derivative(layer.activation)
            if output is not None and rule.activation_after_tap
            else None
        )
        if derivative is not None and isinstance(output, torch.Tensor):
            # The finished output is the tap; its gradient times f'(z), read
            # off the output, is the pre-activation gradient (no second forward).
            taps.append(Tap(layer, rule, args, kwargs, output, None, derivative))
            return None
        first = args[0]
        if isinstance(first, torch.Tensor) and keras_compat.convert_input_args(layer):
            # What Layer.__call__ does first: the input in the layer's dtype.
            converted = layer.dtype_policy.convert_input(first, layer.autocast, layer.input_dtype)
            if converted is not first:
                mask = keras_compat.get_keras_mask(first)
                if mask is not None:
                    keras_compat.set_keras_mask(converted, mask)
                args = (converted, *args[1:])
        autocast = None
        if layer.autocast and layer.compute_dtype != layer.variable_dtype:
            autocast = keras_compat.AutocastScope(layer.compute_dtype)
        with autocast or contextlib.nullcontext():
            forward = as_forward(rule, rule.forward(layer, args, kwargs))
            z, out = forward.z, forward.finish(forward.z)
        if hasattr(layer, "compute_mask") and isinstance(args[0], torch.Tensor):
            mask = keras_compat.get_keras_mask(args[0])
            try:
                out_mask = layer.compute_mask(args[0], mask)
            except (TypeError, ValueError):
                out_mask = None
            # A layer with several outputs (return_state) has one mask (or None) each.
            pairs = (
                zip(out, out_mask)
                if isinstance(out, (list, tuple)) and isinstance(out_mask, (list, tuple))
                else [(out, out_mask)]
            )
            for tensor, tensor_mask in pairs:
                if isinstance(tensor, torch.Tensor) and tensor_mask is not None:
                    keras_compat.set_keras_mask(tensor, tensor_mask)
        taps.append(Tap(layer, rule, args, kwargs, z, forward.saved, None))
        return out

    def _loss_sum(self, y, y_pred, sample_weight, batch_size):
        compile_loss = keras_compat.compile_loss(self._model)
        if compile_loss is None:
            raise FastPathUnsupported("The model has no compiled loss.", layer_paths=[])
        total = compile_loss(y, y_pred, broadcast_example_weights(sample_weight, y_pred))
        reductions = {
            getattr(fn, "reduction", None)
            for _, fn, _, _ in keras_compat.compiled_losses(compile_loss)
        }
        if reductions == {None} and total.ndim >= 1 and total.shape[0] == batch_size:
            # Unreduced (TF Privacy's tutorial): an example's loss is the mean
            # of its row, as the per-example engine takes it.
            return total.reshape(batch_size, -1).mean(1).sum()
        scales = {_SEPARABLE_REDUCTIONS.get(reduction) for reduction in reductions}
        if None in scales or len(scales) != 1:
            raise FastPathUnsupported(
                "The fast path needs losses that sum over examples: every compiled loss "
                "reduced with 'sum_over_batch_size' or 'sum', or every one unreduced "
                "(reduction=None), all the same.",
                layer_paths=[],
            )
        return total * batch_size if scales.pop() else total

    # -- the step ----------------------------------------------------------------
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
        """`ClippingEngine.clipped_batch`, computed by fast clipping."""
        to_tensor = keras.ops.convert_to_tensor
        x, y, sample_weight = tree.map_structure(
            lambda t: None if t is None else to_tensor(t), (x, y, sample_weight)
        )
        batch_size = int(tree.flatten(x)[0].shape[0])
        if num_units < 1 or batch_size % num_units:
            raise FastPathUnsupported(
                f"Expected a batch of a multiple of {num_units} examples (num_microbatches). "
                f"Received: a batch of {batch_size}",
                layer_paths=[],
            )
        group = batch_size // num_units  # examples per clipping unit
        keep = None if unit_mask is None else to_tensor(unit_mask) > 0
        device = self._trainable[0].value.device
        first_pass = None
        for _ in range(2):
            masked = (
                (x, y, sample_weight) if keep is None else _exclude_rows(x, y, sample_weight, keep)
            )
            if keep is not None and not bool(keep.any()) and first_pass is not None:
                # Every example was non-finite: nothing to clip or sum.
                return dataclasses.replace(
                    first_pass,
                    summed=[torch.zeros_like(v.value) for v in self._trainable],
                    unit_norms=torch.zeros_like(first_pass.unit_norms),
                    loss_sum=first_pass.loss_sum.new_zeros(()),
                    num_nonfinite=int(first_pass.num_nonfinite),
                )
            with per_example_call_context(device, rng_seed):
                masked_x, masked_y, masked_weight = masked
                result = self._clipped_batch(
                    masked_x,
                    masked_y,
                    masked_weight,
                    batch_size,
                    num_units,
                    keep,
                    l2_norm_clip,
                    loss_scale,
                )
            bad = ~torch.isfinite(result.unit_norms)
            if not bool(bad.any()):
                if first_pass is None:
                    return result
                # Predictions of the examples as they are, for the metrics.
                return dataclasses.replace(
                    result,
                    y_pred=first_pass.y_pred,
                    num_nonfinite=first_pass.num_nonfinite + result.num_nonfinite,
                )
            if first_pass is not None:
                break
            # A non-finite example (NaN or inf in its gradient) would make every
            # clipped sum NaN through 0 * inf. The batch runs again with it
            # excluded like a padding row (inputs replaced, weight 0, gradient
            # rows zeroed), with the same random-layer seed, so that the other
            # examples are computed exactly as before.
            first_pass = dataclasses.replace(result, num_nonfinite=int(bad.sum()))
            good = (~bad).repeat_interleave(group)  # every example of a bad unit
            keep = good if keep is None else keep & good
        raise RuntimeError(  # not reachable: the excluded rows are copies of finite ones
            "torchdp_keras: the fast clipping path still produced non-finite per-example "
            "norms after excluding the non-finite examples."
        )

    def _clipped_batch(
        self, x, y, sample_weight, batch_size, units, keep, l2_norm_clip, loss_scale
    ):
        taps: list[Tap] = []
        unchecked = 0
        # On the first step the gradient of every trainable weight (every use)
        # is taken too: of its own parameter where that is an autograd leaf,
        # else of a fresh leaf copy the step reads instead.
        leaves = mapping = None
        if not self._verified:
            leaves, mapping = [], []
            for variable in self._trainable:
                value = variable.value
                if not (value.is_leaf and value.requires_grad):
                    value = value.detach().clone().requires_grad_(True)
                    mapping.append((variable, value))
                leaves.append(value)
        with torch.enable_grad():
            with keras_compat.StatelessScope(state_mapping=mapping, collect_losses=True) as scope:
                if self._graph is not None:
                    y_pred = self._run_graph(self._graph, x, taps)
                else:
                    with layout_preserving_ops():
                        y_pred = self._composite_call(self._model, (x,), {"training": True}, taps)
                loss = self._loss_sum(y, y_pred, sample_weight, batch_size)
                if units != batch_size:  # a unit's loss is the mean over its examples
                    loss = loss / (batch_size // units)
            if scope.losses:
                raise FastPathUnsupported(
                    "The forward pass adds losses with add_loss (activity regularizers).",
                    layer_paths=[],
                )
            self._check_state_updates(scope)
            zs = [tap.tensor for tap in taps]
            full = None
            full_scale = loss_scale
            if leaves is not None and loss_scale != 1.0 and zs:
                # The whole gradient (checked once) at a plain Keras step's scale,
                # the mean loss's: the sum of the units' scaled losses would
                # overflow float16 where no unit's gradient does.
                grads = torch.autograd.grad(
                    loss * loss_scale, zs, allow_unused=True, retain_graph=True
                )
                full_scale = loss_scale / batch_size
                full = torch.autograd.grad(loss * full_scale, leaves, allow_unused=True)
            else:
                grads = torch.autograd.grad(
                    loss * loss_scale, zs + (leaves or []), allow_unused=True
                )
                if leaves is not None:
                    grads, full = grads[: len(zs)], grads[len(zs) :]
        with torch.no_grad():
            grads = [torch.zeros_like(z) if g is None else g for g, z in zip(grads, zs)]
            # Mixed precision: the rules see float32 inputs and gradients (a
            # float16 gradient divided by the loss scale would underflow, and
            # norms and clipped sums formed in bfloat16 could exceed C).
            low = {t.dtype for t in grads if t.dtype in _LOW_PRECISION}
            if low:
                taps = [_upcast_tap(tap) for tap in taps]
                grads = [_upcast(g) for g in grads]
            grads = [
                g if tap.derivative is None else g.mul_(tap.derivative(tap.tensor.detach()))
                for g, tap in zip(grads, taps)
            ]
            if loss_scale != 1.0:  # in place: these are large, fresh tensors
                grads = [g.div_(loss_scale) for g in grads]
            if keep is not None:
                grads = [
                    torch.where(keep.view(-1, *[1] * (g.ndim - 1)), g, torch.zeros_like(g))
                    for g in grads
                ]
            # One entry per tapped layer: its uses (a shared layer has several).
            groups: dict[int, list] = {}
            for tap, g in zip(taps, grads):
                groups.setdefault(id(tap.layer), []).append(
                    self._unit_view(tap, g, units, batch_size)
                )
            entries = []
            budget = StepBudget()  # explicit per-example products, over all layers
            for uses in groups.values():
                layer, rule = uses[0].layer, uses[0].rule
                cache = {
                    WORKSPACE_KEY: self._workspaces.setdefault(id(layer), {}),
                    SAVED_KEY: uses[0].saved,
                    BUDGET_KEY: budget,
                }
                entries.append((layer, rule, [(u.args, u.kwargs, u.grad) for u in uses], cache))
            sq_norms = None
            for layer, rule, uses, cache in entries:
                part = rule.use_squared_norms(layer, uses, cache)
                sq_norms = part if sq_norms is None else sq_norms + part
            factors = clip_factors(sq_norms, l2_norm_clip)
            sums: dict[int, torch.Tensor] = {}
            for layer, rule, uses, cache in entries:
                for weight, total in zip(
                    layer.trainable_weights, rule.use_clipped_sums(layer, uses, factors, cache)
                ):
                    sums[id(weight)] = total.to(weight.value.dtype)
            summed = [
                sums[id(v)] if id(v) in sums else torch.zeros_like(v.value) for v in self._trainable
            ]
            if full is not None and bool(torch.isfinite(sq_norms).all()):
                unit_keep = None if keep is None else keep.view(units, -1).any(dim=1)
                if not self._verify(entries, full, full_scale, unit_keep, factors, low):
                    # Overflow (float16 under a loss scale): nothing was checked, so
                    # no unit is used: all are left out as non-finite this step.
                    unchecked = units if unit_keep is None else int(unit_keep.sum())
                    summed = [torch.zeros_like(v.value) for v in self._trainable]
                    sq_norms = torch.zeros_like(sq_norms)
            self._advance_seed_states(scope)
        y_pred = tree.map_structure(
            lambda t: t.detach() if isinstance(t, torch.Tensor) else t, y_pred
        )
        return ClippedBatch(
            summed=summed,
            unit_losses=None,
            unit_norms=torch.sqrt(sq_norms),
            y_pred=y_pred,
            loss_sum=loss.detach() if keep is None or bool(keep.any()) else loss.new_zeros(()),
            num_nonfinite=unchecked,
        )

    def _unit_view(self, tap: Tap, grad, units: int, batch_size: int) -> UnitTap:
        """The tap with its output gradient, with one row per clipping unit."""
        layer, rule, args, kwargs = tap.layer, tap.rule, tap.args, tap.kwargs
        if units == batch_size:
            return UnitTap(layer, rule, args, kwargs, grad, tap.saved)
        view = rule.fold_units(layer, args, kwargs, grad, units)
        if view is None:
            path = self._paths.get(id(layer), layer.name)
            raise FastPathUnsupported(
                f"Layer {path} ({type(layer).__name__}): its rule cannot clip groups of "
                f"examples (num_microbatches={units} with batches of {batch_size}).",
                layer_paths=[path],
            )
        args, kwargs, grad = view
        return UnitTap(layer, rule, args, kwargs, grad, rule.fold_saved(layer, tap.saved, units))

    def _verify(self, entries, full, loss_scale, keep, like, low=()) -> bool:
        """The taps' unclipped sums must be autograd's full gradient of every weight.

        Returns False (checking nothing; the next step checks again) when a full
        gradient is not finite.

        A weight that the model also uses outside the call of the layer that
        owns it (read directly by another layer, tied to another layer's
        output projection) has gradient terms that no tap sees: its
        per-example norms would be undercounted. Such a model is refused (the
        "auto" mode then uses the per-example engine), naming the weights.
        """
        ones = torch.ones_like(like) if keep is None else keep.to(like.dtype)
        # Autograd's gradient of a layer computed in bfloat16 / float16 has
        # that precision's rounding; a weight used elsewhere misses whole terms.
        tolerance = max([1e-3] + [8 * torch.finfo(dtype).eps for dtype in low])
        sums: dict[int, torch.Tensor] = {}
        for layer, rule, uses, cache in entries:
            for weight, total in zip(
                layer.trainable_weights, rule.use_clipped_sums(layer, uses, ones, cache)
            ):
                sums[id(weight)] = total.double()
        pairs = []
        for variable, gradient in zip(self._trainable, full):
            expected = (
                torch.zeros_like(variable.value, dtype=torch.float64)
                if gradient is None
                else gradient.double() / loss_scale
            )
            if not bool(torch.isfinite(expected).all()):
                return False
            pairs.append((variable, sums.get(id(variable), torch.zeros_like(expected)), expected))
        # Relative to the weight's own gradient, and to the whole gradient for
        # weights whose gradient is rounding noise (an attention key bias).
        overall = sum(float(torch.linalg.vector_norm(e)) for _, _, e in pairs)
        wrong = []
        for variable, tapped, expected in pairs:
            error = float(torch.linalg.vector_norm(tapped - expected))
            scale = float(torch.linalg.vector_norm(tapped) + torch.linalg.vector_norm(expected))
            if error > tolerance * (scale + 1e-2 * overall):
                wrong.append(variable.path)
        if wrong:
            raise FastPathUnsupported(
                "These weights are also used outside the call of the layer that owns "
                "them (read directly, or tied to another layer), so their per-example "
                "gradients are not all seen by the fast path: " + ", ".join(wrong),
                layer_paths=wrong,
            )
        self._verified = True
        return True

    def _check_state_updates(self, scope):
        updated = [
            v.path
            for v in self._non_trainable
            if id(v) not in self._seed_states and scope.get_current_value(v) is not None
        ]
        if updated:
            raise data_updated_state_error(updated)

    def _advance_seed_states(self, scope):
        for var in self._non_trainable:
            if id(var) in self._seed_states:
                value = scope.get_current_value(var)
                if value is not None:
                    var.assign(value)


_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _upcast(value):
    """`value` with its bfloat16 / float16 tensors in float32 (the rest as they are)."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in _LOW_PRECISION else value
    if isinstance(value, (list, tuple, dict)):
        return tree.map_structure(_upcast, value)
    return value


def _upcast_tap(tap: Tap) -> Tap:
    """A tap whose inputs, saved tensors and tapped tensor are float32 or better."""
    return tap._replace(
        args=tuple(_upcast(a) for a in tap.args),
        kwargs={k: _upcast(v) for k, v in tap.kwargs.items()},
        tensor=_upcast(tap.tensor),
        saved=_upcast(tap.saved),
    )


def _exclude_rows(x, y, sample_weight, keep: torch.Tensor):
    """Inputs with the rows where `keep` is False neutralised, and weights 0 there.

    Those rows take the first kept row's inputs, so that no value of theirs
    (padding, or a non-finite example) reaches the forward pass; their zero
    weight and masked gradients then remove them exactly.
    """
    real = torch.nonzero(keep).flatten()
    if real.numel():
        x, y = tree.map_structure(
            lambda t: (
                None
                if t is None
                else torch.where(keep.view(-1, *[1] * (t.ndim - 1)), t, t[real[0]])
            ),
            (x, y),
        )
    return x, y, masked_example_weights(sample_weight, keep)


def describe_slow_layers(engine: FastEngine) -> str | None:
    """One log line naming the layers "auto" left on per-layer per-example gradients."""
    if not engine.slow_layers:
        return None
    return (
        "clipping_mode='auto': these layers use explicit per-example gradients of the "
        "layer (memory B x its parameters), no fast-clipping rule covering them: "
        + "; ".join(engine.slow_layers)
        + ". Register a LayerRule (or change the option named) to avoid it."
    )


__all__ = ["FastEngine", "FastPathUnsupported", "PerExampleGradientRule", "graph_of"]
