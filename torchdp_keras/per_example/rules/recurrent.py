"""Fast clipping rules for `SimpleRNN`, `GRU`, `LSTM` and `Bidirectional`.

A recurrent cell's weights enter every time step through two products: the
step's input `x_t` times the kernel `W`, and the previous state `h_{t-1}`
times the recurrent kernel `U`. With `g_t` the gradient of the loss sum at
step t's gate pre-activations (everything the later steps pass back through
the state included), example i's gradients are

    dW = sum_t x_it^T g_it,   dU = sum_t h_i,t-1^T g_it,   db = sum_t g_it,

sequence products of T rows, for which the Dense rule's choice between the
ghost norm and explicit per-example products applies (`matmul_squared_norms`).

The rule runs the cell loop itself, step for step the arithmetic of Keras's
cells. The input projections `x W + b` of all steps are computed at once and
are the tapped tensor `z`, so the engine's one backward pass gives `g_t` at
every step; the loop keeps what multiplied the recurrent kernel at each step.
GRU: with `reset_after=True` the candidate's recurrent product is gated after
the multiplication (`r * (h U_h + b_rh)`), so its gradient is `r_t * g_t`;
with `reset_after=False` the candidate's recurrent kernel multiplies
`r_t * h_{t-1}`, which the loop keeps instead of `h_{t-1}`.

Masks (`mask_zero=True` embeddings), `go_backwards`, `return_sequences`,
`return_state`, `initial_state`, input and recurrent dropout (one mask per
sequence, shared by the gates, as Keras's default `implementation=2`) are
followed exactly; a masked step carries the state over and passes no gradient
to its pre-activations. Stateful layers, `StackedRNNCells` and custom cells
are declined with the reason in the log (the per-layer fallback then clips
them).
"""

from __future__ import annotations

import keras
import torch
from keras import tree

from torchdp_keras import _keras_compat as keras_compat
from torchdp_keras.per_example.rules.base import (
    SAVED_KEY,
    Forward,
    LayerRule,
    fold_rows,
    handles,
    sq_norm_rows,
    sub_cache,
)
from torchdp_keras.per_example.rules.dense import clipped_product_sum, matmul_squared_norms

_CELLS = ("SimpleRNNCell", "GRUCell", "LSTMCell")


def _cell_kind(cell) -> str | None:
    """The built-in cell whose arithmetic `cell` computes, or None.

    A subclass that does not define `call` itself computes as its base.
    """
    for cls in type(cell).__mro__:
        if cls.__module__.startswith("keras.") and cls.__name__ in _CELLS:
            return cls.__name__
        if "call" in vars(cls):
            return None
    return None


def _value(variable, dtype):
    return variable.value.to(dtype)


def _layer_mask(args, kwargs):
    mask = kwargs.get("mask")
    if mask is None and isinstance(args[0], torch.Tensor):
        mask = keras_compat.get_keras_mask(args[0])
    if isinstance(mask, (list, tuple)):
        mask = mask[0]
    return None if mask is None else torch.as_tensor(mask).to(torch.bool)


def _initial_state(args, kwargs):
    state = kwargs.get("initial_state")
    if state is None and len(args) > 1:
        state = args[1]
    if state is None:
        return None
    return list(state) if isinstance(state, (list, tuple)) else [state]


def _mask_list(mask, dtype) -> list | None:
    """A cell's dropout mask(s) as a list: one shared by the gates, or one per gate."""
    if mask is None:
        return None
    masks = list(mask) if isinstance(mask, (list, tuple)) else [mask]
    return [torch.as_tensor(m).to(dtype) for m in masks]


def _project(operands, columns, recurrent, width):
    """The recurrent projection: one product, or one per block of U's columns."""
    if len(operands) == 1:
        kernel = recurrent if width is None else recurrent[:, :width]
        return torch.matmul(operands[0], kernel)
    return torch.cat([torch.matmul(a, w) for a, w in zip(operands, columns)], dim=-1)


def _blocks(operands, grad) -> list:
    """`[(a, g)]` pairs: one operand for all of `grad`'s columns, or one per block."""
    if len(operands) == 1:
        return [(operands[0], grad)]
    return list(zip(operands, torch.chunk(grad, len(operands), dim=-1)))


@handles(keras.layers.RNN, keras.layers.SimpleRNN, keras.layers.GRU, keras.layers.LSTM)
class RecurrentRule(LayerRule):
    """Kernel, recurrent kernel and bias of `SimpleRNN`, `GRU` and `LSTM`.

    The step pre-activations exist only inside the cell loop, so the rule
    always runs the loop itself (`recomputes_in_hooks`).

    Example:
        >>> from torchdp_keras.per_example import make_default_layer_registry
        >>> registry = make_default_layer_registry()
        >>> lstm = keras.layers.LSTM(8)
        >>> lstm.build((None, 5, 3))
        >>> type(registry.lookup(lstm)).__name__
        'RecurrentRule'
    """

    recomputes_in_hooks = True

    def unsupported_reason(self, layer) -> str | None:
        cell = getattr(layer, "cell", None)
        kind = _cell_kind(cell)
        if cell is None or kind is None:
            return (
                f"cell {type(cell).__name__} is not a SimpleRNNCell, GRUCell or LSTMCell "
                "(StackedRNNCells and custom cells need their own rule)"
            )
        if layer.stateful:
            return "stateful=True: the state carried between batches is data-dependent"
        expected = [cell.kernel, cell.recurrent_kernel]
        if cell.use_bias:
            expected.append(cell.bias)
        if [id(w) for w in layer.trainable_weights] != [id(w) for w in expected]:
            return "trainable weights other than kernel, recurrent_kernel and bias"
        return None

    # -- forward -------------------------------------------------------------------
    def forward(self, layer, args, kwargs):
        cell = layer.cell
        kind = _cell_kind(cell)
        dtype = keras_compat.to_torch_dtype(cell.compute_dtype)
        x = torch.as_tensor(args[0]).to(dtype)
        training = bool(kwargs.get("training", False))
        mask = _layer_mask(args, kwargs)
        states = _initial_state(args, kwargs)
        if states is None:
            states = [x.new_zeros((x.shape[0], size)) for size in tree.flatten(cell.state_size)]
        states = [torch.as_tensor(s).to(dtype) for s in states]
        input_masks = recurrent_masks = None
        if training and (cell.dropout > 0 or cell.recurrent_dropout > 0):
            try:  # the cell's own masks (its seed generator), then cleared as RNN.call does
                input_masks = _mask_list(cell.get_dropout_mask(x[:, 0]), dtype)
                recurrent_masks = _mask_list(cell.get_recurrent_dropout_mask(states[0]), dtype)
            finally:
                cell.reset_dropout_mask()
                cell.reset_recurrent_dropout_mask()
        if layer.go_backwards:
            x = torch.flip(x, dims=[1])
            mask = None if mask is None else torch.flip(mask, dims=[1])
        # One input per block of the kernel's columns: one for all of them, or
        # one per gate when the cell draws a dropout mask per gate.
        inputs = [x] if input_masks is None else [x * m.unsqueeze(1) for m in input_masks]
        kernel = _value(cell.kernel, dtype)
        if len(inputs) == 1:
            z = torch.matmul(inputs[0], kernel)
        else:
            columns = torch.chunk(kernel, len(inputs), dim=1)
            z = torch.cat([torch.matmul(a, w) for a, w in zip(inputs, columns)], dim=-1)
        bias = _value(cell.bias, dtype) if cell.use_bias else None
        input_bias = bias
        if kind == "GRUCell" and cell.reset_after and bias is not None:
            input_bias = bias[0]
        if input_bias is not None:
            z = z + input_bias
        saved: dict = {"inputs": inputs}

        def finish(z):
            return self._loop(layer, kind, z, states, mask, recurrent_masks, bias, saved)

        return Forward(z, finish, saved)

    @staticmethod
    def _loop(layer, kind, z, states, mask, recurrent_masks, bias, saved):
        cell = layer.cell
        units = cell.units
        recurrent = _value(cell.recurrent_kernel, z.dtype)
        blocks = 1 if recurrent_masks is None else len(recurrent_masks)
        columns = torch.chunk(recurrent, blocks, dim=1)
        act = cell.activation
        rec_act = getattr(cell, "recurrent_activation", None)
        gru = kind == "GRUCell"
        recurrent_bias = None
        if gru and cell.reset_after and bias is not None:
            recurrent_bias = bias[1]
        # What multiplied each block of U at each step; GRU's reset gate (or,
        # with reset_after=False, the gated state its candidate block multiplied).
        operands: list[list] = [[] for _ in range(blocks)]
        gates = []
        outputs = []
        output = torch.zeros_like(states[0])
        for t in range(z.shape[1]):
            z_t = z[:, t]
            h = states[0]
            rhs = [h] if recurrent_masks is None else [h * m for m in recurrent_masks]
            for kept, rh in zip(operands, rhs):
                kept.append(rh)
            if gru and not cell.reset_after:
                # The candidate's block is applied to the reset-gated state below.
                inner = _project(rhs[:2] if blocks > 1 else rhs, columns, recurrent, 2 * units)
            else:
                inner = _project(rhs, columns, recurrent, None)
            if kind == "SimpleRNNCell":
                new_h = z_t + inner
                new_h = act(new_h) if act is not None else new_h
                new_states = [new_h]
            elif kind == "LSTMCell":
                s_i, s_f, s_c, s_o = torch.chunk(z_t + inner, 4, dim=1)
                c = rec_act(s_f) * states[1] + rec_act(s_i) * act(s_c)
                new_h = rec_act(s_o) * act(c)
                new_states = [new_h, c]
            else:
                x_z, x_r, x_h = torch.split(z_t, units, dim=1)
                if recurrent_bias is not None:
                    inner = inner + recurrent_bias
                update = rec_act(x_z + inner[:, :units])
                reset = rec_act(x_r + inner[:, units : 2 * units])
                if cell.reset_after:
                    candidate = act(x_h + reset * inner[:, 2 * units :])
                    gates.append(reset)
                else:
                    gated = reset * rhs[-1]
                    candidate = act(x_h + torch.matmul(gated, recurrent[:, 2 * units :]))
                    gates.append(gated)
                new_h = update * h + (1 - update) * candidate
                new_states = [new_h]
            if mask is None:
                output, states = new_h, new_states
            else:
                keep = mask[:, t : t + 1]
                previous = torch.zeros_like(output) if layer.zero_output_for_mask else output
                output = torch.where(keep, new_h, previous)
                states = [torch.where(keep, new, old) for new, old in zip(new_states, states)]
            if layer.return_sequences:
                outputs.append(output)
        saved["recurrent_inputs"] = [torch.stack(kept, dim=1).detach() for kept in operands]
        if gates:
            saved["gates"] = torch.stack(gates, dim=1).detach()
        result = torch.stack(outputs, dim=1) if layer.return_sequences else output
        if layer.return_state:
            return [result, *states]
        return result

    # -- norms and sums ------------------------------------------------------------
    def fold_units(self, layer, args, kwargs, grad, units):
        return args, kwargs, fold_rows(grad, units)

    def fold_saved(self, layer, saved, units):
        return tree.map_structure(lambda t: fold_rows(t, units), saved)

    @staticmethod
    def _products(layer, grad, saved) -> dict:
        """`{weight name: [(a, g), ...]}`: the column blocks of each kernel's gradient."""
        cell = layer.cell
        units = cell.units
        inputs = [a.to(grad.dtype) for a in saved["inputs"]]
        states = [h.to(grad.dtype) for h in saved["recurrent_inputs"]]
        products = {"kernel": _blocks(inputs, grad)}
        if _cell_kind(cell) != "GRUCell":
            products["recurrent_kernel"] = _blocks(states, grad)
            return products
        gates = saved["gates"].to(grad.dtype)
        update_reset, candidate = grad[..., : 2 * units], grad[..., 2 * units :]
        if cell.reset_after:
            # The candidate's recurrent product is gated after the multiplication.
            recurrent_grad = torch.cat([update_reset, candidate * gates], dim=-1)
            products["recurrent_kernel"] = _blocks(states, recurrent_grad)
        else:
            # Its recurrent kernel multiplies the reset-gated state instead.
            first = _blocks(states[:2] if len(states) > 1 else states, update_reset)
            products["recurrent_kernel"] = [*first, (gates, candidate)]
        return products

    @staticmethod
    def _bias_grads(layer, products) -> torch.Tensor:
        """Per-example bias gradients, (B, *bias.shape)."""
        input_grad = torch.cat([g.sum(dim=1) for _, g in products["kernel"]], dim=-1)
        cell = layer.cell
        if _cell_kind(cell) == "GRUCell" and cell.reset_after:
            recurrent = torch.cat([g.sum(dim=1) for _, g in products["recurrent_kernel"]], -1)
            return torch.stack([input_grad, recurrent], 1)
        return input_grad

    def _prepared(self, layer, grad, cache):
        if "products" not in cache:
            cache["products"] = self._products(layer, grad, cache[SAVED_KEY])
        return cache["products"]

    def squared_norms(self, layer, args, kwargs, grad, cache):
        products = self._prepared(layer, grad, cache)
        norms = torch.zeros(grad.shape[0], dtype=torch.float64, device=grad.device)
        for name, blocks in products.items():
            for index, (a, g) in enumerate(blocks):
                norms = norms + matmul_squared_norms(a, g, sub_cache(cache, f"{name}{index}"))
        if layer.cell.use_bias:
            norms = norms + sq_norm_rows(self._bias_grads(layer, products))
        return norms

    def clipped_sums(self, layer, args, kwargs, grad, factors, cache):
        products = self._prepared(layer, grad, cache)
        out = []
        for name, blocks in products.items():
            parts = [
                clipped_product_sum(a, g, factors, sub_cache(cache, f"{name}{index}"))
                for index, (a, g) in enumerate(blocks)
            ]
            out.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
        if layer.cell.use_bias:
            bias = self._bias_grads(layer, products)
            out.append(torch.tensordot(factors.to(bias.dtype), bias, dims=1))
        return out


_KERAS_RNNS = (keras.layers.SimpleRNN, keras.layers.GRU, keras.layers.LSTM, keras.layers.RNN)


@handles(keras.layers.Bidirectional)
class BidirectionalRule(LayerRule):
    """`Bidirectional` around two layers the `RecurrentRule` covers.

    Both directions run through `RecurrentRule` in one call; their weights are
    disjoint, so example i's squared norm is the sum of the two layers'.
    """

    recomputes_in_hooks = True

    def __init__(self, inner: RecurrentRule | None = None):
        self._inner = inner or RecurrentRule()

    def unsupported_reason(self, layer) -> str | None:
        for direction in (layer.forward_layer, layer.backward_layer):
            if not isinstance(direction, keras.layers.RNN):
                return f"{direction.name} is not a keras.layers.RNN"
            for cls in type(direction).__mro__:
                if cls in _KERAS_RNNS:
                    break
                if "call" in vars(cls):
                    return f"{direction.name}: {cls.__name__} overrides the call of its base"
            reason = self._inner.unsupported_reason(direction)
            if reason is not None:
                return f"{direction.name}: {reason}"
        own = {id(w) for w in layer.trainable_weights}
        directions = (layer.forward_layer, layer.backward_layer)
        inner = [id(w) for d in directions for w in d.trainable_weights]
        if own != set(inner) or len(inner) != len(own):
            return "trainable weights other than its two layers'"
        return None

    def forward(self, layer, args, kwargs):
        sequences = args[0]
        kwargs = dict(kwargs)
        state = _initial_state(args, kwargs)
        kwargs.pop("initial_state", None)
        half = None if state is None else len(state) // 2
        parts = []
        for direction, states in (
            (layer.forward_layer, None if state is None else state[:half]),
            (layer.backward_layer, None if state is None else state[half:]),
        ):
            call_kwargs = dict(kwargs)
            if states is not None:
                call_kwargs["initial_state"] = states
            parts.append(self._inner.forward(direction, (sequences,), call_kwargs))
        sizes = [part[0].shape[-1] for part in parts]
        z = torch.cat([part[0] for part in parts], dim=-1)

        def finish(z):
            forward_z, backward_z = torch.split(z, sizes, dim=-1)
            y = parts[0].finish(forward_z)
            y_rev = parts[1].finish(backward_z)
            return _merge(layer, y, y_rev)

        return Forward(z, finish, (sizes, parts[0].saved, parts[1].saved))

    def fold_units(self, layer, args, kwargs, grad, units):
        return args, kwargs, fold_rows(grad, units)

    def fold_saved(self, layer, saved, units):
        sizes, forward_saved, backward_saved = saved
        return (
            sizes,
            self._inner.fold_saved(layer.forward_layer, forward_saved, units),
            self._inner.fold_saved(layer.backward_layer, backward_saved, units),
        )

    def _directions(self, layer, grad, cache):
        sizes, forward_saved, backward_saved = cache[SAVED_KEY]
        forward_grad, backward_grad = torch.split(grad, sizes, dim=-1)
        out = []
        for name, direction, g, saved in (
            ("forward", layer.forward_layer, forward_grad, forward_saved),
            ("backward", layer.backward_layer, backward_grad, backward_saved),
        ):
            sub = sub_cache(cache, name)
            sub[SAVED_KEY] = saved
            out.append((direction, g, sub))
        return out

    def squared_norms(self, layer, args, kwargs, grad, cache):
        return sum(
            self._inner.squared_norms(direction, (), {}, g, sub)
            for direction, g, sub in self._directions(layer, grad, cache)
        )

    def clipped_sums(self, layer, args, kwargs, grad, factors, cache):
        sums = {}
        for direction, g, sub in self._directions(layer, grad, cache):
            for weight, total in zip(
                direction.trainable_weights,
                self._inner.clipped_sums(direction, (), {}, g, factors, sub),
            ):
                sums[id(weight)] = total
        return [sums[id(w)] for w in layer.trainable_weights]


def _merge(layer, y, y_rev):
    """`Bidirectional.call`'s merge of the two directions' results."""
    states = ()
    if layer.return_state:
        states = tuple(y[1:]) + tuple(y_rev[1:])
        y, y_rev = y[0], y_rev[0]
    if layer.return_sequences:
        y_rev = torch.flip(y_rev, dims=[1])
    mode = layer.merge_mode
    if mode == "concat":
        output = torch.cat([y, y_rev], dim=-1)
    elif mode == "sum":
        output = y + y_rev
    elif mode == "ave":
        output = (y + y_rev) / 2
    elif mode == "mul":
        output = y * y_rev
    else:
        output = (y, y_rev)
    if layer.return_state:
        return (*output, *states) if mode is None else (output, *states)
    return output
