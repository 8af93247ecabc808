"""The interface of a fast-clipping rule, and helpers shared by the rules.

A rule knows one Keras layer type well enough to compute, from the layer's
input `a` and the gradient `g` of the per-example loss sum at the layer's
output (pre-activation where the layer has a fused activation), for every
example `i`:

* the squared norm of example i's gradient for the layer's trainable weights
  (summed over them), without materialising per-example gradients when a
  cheaper formula exists ("ghost norms");
* given per-example clip factors `c_i`, the clipped sums
  `sum_i c_i * grad_i(W)` for each weight, formed directly from `a` and `g`
  ("book-keeping"), with no second backward pass.

Each rule class says which layer classes its default instance handles with
`@handles(...)`, next to the class: `make_default_layer_registry` reads those
declarations from the rule classes listed in `rules.RULES`. A declaration is
an immutable tuple on the rule class; it registers nothing anywhere by itself.

Example:
    >>> import keras
    >>> from torchdp_keras.per_example.rules.dense import DenseRule
    >>> handled_layers(DenseRule) == (keras.layers.Dense,)
    True
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, NamedTuple

import keras
import torch

from torchdp_keras.ops.clip_noise import squared_row_norms
from torchdp_keras.per_example.memory import BUDGET_KEY

Finish = Callable[[torch.Tensor], torch.Tensor]


class Forward(NamedTuple):
    """What `LayerRule.forward` returns.

    Attributes:
        z: The tapped tensor (pre-activation output): the engine takes the
            gradient of the loss with respect to it.
        finish: The rest of the layer: its output is `finish(z)`.
        saved: Anything the forward computed that the norms need (e.g. a
            normalised input), handed to `squared_norms` and `clipped_sums`
            as `cache["saved"]`; None when nothing is.
    """

    z: torch.Tensor
    finish: Finish
    saved: Any = None


def _relu_derivative(y):
    return (y > 0).to(y.dtype)


def _tanh_derivative(y):
    return 1 - y * y


def _sigmoid_derivative(y):
    return y * (1 - y)


def _elu_derivative(y):
    return torch.where(y > 0, torch.ones_like(y), y + 1)


def _softplus_derivative(y):
    return -torch.expm1(-y)


_OUTPUT_DERIVATIVES = {
    keras.activations.relu: _relu_derivative,
    keras.activations.tanh: _tanh_derivative,
    keras.activations.sigmoid: _sigmoid_derivative,
    keras.activations.elu: _elu_derivative,
    keras.activations.softplus: _softplus_derivative,
}


def output_derivative(activation) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """`f'(z)` written as a function of `y = f(z)`, for activations where it is one.

    Autograd's own backward of these activations reads the output the same
    way (tanh, sigmoid) or an equivalent sign (relu: z > 0 iff y > 0), so the
    pre-activation gradient `dL/dy * f'(z)` formed from it is the one autograd
    would give. None for other activations (gelu, silu, ...).
    """
    return _OUTPUT_DERIVATIVES.get(activation)


def as_forward(rule, result) -> Forward:
    """`rule.forward`'s result as a `Forward`.

    A plain `(z, finish)` or `(z, finish, saved)` tuple (user rules written
    before `Forward`) is read the same way; anything else is a clear error.
    """
    if isinstance(result, Forward):
        return result
    if isinstance(result, tuple) and len(result) in (2, 3) and callable(result[1]):
        return Forward(*result)
    raise TypeError(
        f"Expected {type(rule).__name__}.forward to return a Forward(z, finish, saved=None). "
        f"Received: {type(result).__name__}"
        + (f" of length {len(result)}" if isinstance(result, tuple) else "")
    )


class LayerRule(abc.ABC):
    """Fast per-example clipping for one layer type.

    Subclass it and register an instance with `LayerRegistry.insert` to make
    a custom layer eligible for the fast path. The built-in rules declare
    their layer classes with `@handles` and are listed in `rules.RULES`. `args` and `kwargs` are the
    arguments of the layer's call in the model (the first positional
    argument is the layer's input), with the batch on axis 0. `cache` is a
    dict private to one call of the layer in one step, which a rule can use to
    share work between `squared_norms` and `clipped_sums`.
    """

    activation_after_tap: bool = False
    """True when the rule's `finish` is the layer's `activation` and nothing else.

    A layer tapped from its finished output (a layer called inside a walked
    block or a subclassed model) then needs no second forward when its
    activation's derivative is a function of its output (relu, tanh,
    sigmoid, elu, softplus): the engine taps the output and multiplies its
    gradient by `output_derivative(activation)(output)`.
    """

    def supports(self, layer) -> bool:
        """Whether this rule can handle this particular layer instance."""
        return self.unsupported_reason(layer) is None

    def unsupported_reason(self, layer) -> str | None:
        """Why this rule declines this layer instance (the option or limit), or None.

        The log of `clipping_mode="auto"` names it for a layer left to the
        per-layer fallback. Override this rather than `supports`.
        """
        return None

    @abc.abstractmethod
    def forward(self, layer, args: tuple, kwargs: dict) -> Forward:
        """Computes the layer's pre-activation output `z` and the rest of the layer.

        Returns:
            A `Forward(z, finish, saved=None)`: the layer's output is
            `finish(z)`; the engine takes the gradient of the loss with
            respect to `z`; `saved` reaches the norms as `cache["saved"]`.
        """

    def tap_output(self, layer, output: torch.Tensor) -> torch.Tensor | None:
        """`z` read off the layer's own output, or None when it cannot be.

        Used when the layer is called by another layer (a sublayer of a layer
        registered with `SublayerRule`): the engine then sees the finished
        output. Return it when it *is* the tapped tensor (no activation
        after it); the default, None, makes the engine recompute the layer
        through `forward`.
        """
        return None

    recomputes_in_hooks: bool = False
    """True when a tapped layer's own output is never usable (`tap_output` is
    always None and the activation does not follow the tap): the rule's
    `forward` recomputes it. Inside a subclassed model or a walked block the
    layer's own forward then runs without autograd (its output is replaced).
    """

    supports_shared_uses: bool = False
    """True when the rule clips a layer called several times per forward pass.

    Example i's gradient of a shared weight is the sum over the uses, so its
    norm has cross terms between uses. A rule that supports it implements
    `merge_uses` (the uses seen as one call, e.g. Dense's sequences
    concatenated) or overrides `use_squared_norms` and `use_clipped_sums`.
    """

    def merge_uses(self, layer, uses: list) -> tuple | None:
        """`(args, kwargs, grad)` of one call equivalent to all `uses`, or None."""
        return None

    def use_squared_norms(self, layer, uses: list, cache: dict) -> torch.Tensor:
        """Per-unit squared norms over all the calls `uses` ([(args, kwargs, grad)])."""
        args, kwargs, grad = uses[0] if len(uses) == 1 else self._merged(layer, uses, cache)
        return self.squared_norms(layer, args, kwargs, grad, cache)

    def use_clipped_sums(self, layer, uses: list, factors, cache: dict) -> list[torch.Tensor]:
        """Clipped sums over all the calls `uses` ([(args, kwargs, grad)])."""
        args, kwargs, grad = uses[0] if len(uses) == 1 else self._merged(layer, uses, cache)
        return self.clipped_sums(layer, args, kwargs, grad, factors, cache)

    def _merged(self, layer, uses, cache):
        if "merged_uses" not in cache:
            merged = self.merge_uses(layer, uses)
            if merged is None:
                raise TypeError(f"{type(self).__name__} cannot clip a layer used several times.")
            cache["merged_uses"] = merged
        return cache["merged_uses"]

    def fold_units(self, layer, args: tuple, kwargs: dict, grad: torch.Tensor, units: int):
        """`(args, kwargs, grad)` seen as `units` groups of consecutive examples, or None.

        For `num_microbatches`: a unit's gradient is the sum of its examples'
        gradients. A rule that can see a group as one example with a longer
        sequence (Dense: (B, T, d) -> (units, B/units * T, d)) returns that
        view, and its `squared_norms` and `clipped_sums` then give the
        groups' norms and sums unchanged. None (the default): the rule cannot,
        and the model takes the per-example engine for such batches.
        """
        return None

    def fold_saved(self, layer, saved, units: int):
        """What `forward` saved, seen as `units` groups (see `fold_units`).

        Rules whose norms read saved per-example tensors fold them as they
        fold the gradient; the default returns `saved` unchanged.
        """
        return saved

    @abc.abstractmethod
    def squared_norms(
        self, layer, args: tuple, kwargs: dict, grad: torch.Tensor, cache: dict
    ) -> torch.Tensor:
        """Per-example squared gradient norms over `layer.trainable_weights`, (B,) float64."""

    @abc.abstractmethod
    def clipped_sums(
        self,
        layer,
        args: tuple,
        kwargs: dict,
        grad: torch.Tensor,
        factors: torch.Tensor,
        cache: dict,
    ) -> list[torch.Tensor]:
        """`sum_i factors[i] * grad_i(w)` for each `w` in `layer.trainable_weights`."""


LayerKey = type | str
"""A layer class, or the import path of one ("package.module.ClassName")."""

_HANDLES = "_handled_layers"


def check_layer_key(layer_class) -> bool:
    """Whether `layer_class` is a `keras.layers.Layer` subclass or a dotted import path."""
    if isinstance(layer_class, type):
        return issubclass(layer_class, keras.layers.Layer)
    return isinstance(layer_class, str) and "." in layer_class


def handles(*layer_classes: LayerKey | None) -> Callable[[type], type]:
    """Class decorator: the layer classes a rule's default instance handles.

    Put it on the rule class, next to its code. It records the classes on the
    rule class as an immutable tuple (read with `handled_layers`) and
    registers nothing: `make_default_layer_registry` builds a fresh registry
    from the declarations of the rule classes in `rules.RULES`. A class of an
    optional package is named by its import path ("keras_hub.src...Layer"),
    so that the package is never imported for it; a `None` (a class missing
    from this Keras version, from `getattr(keras.layers, name, None)`) is
    left out. A subclass of a declared rule declares nothing unless it is
    decorated itself.

    Args:
        *layer_classes: `keras.layers.Layer` subclasses or their import paths.

    Returns:
        The decorator, which returns the rule class unchanged but for the
        declaration.

    Example:
        >>> import keras
        >>> @handles(keras.layers.Dense, "my_package.layers.MyDense")
        ... class MyDenseRule(LayerRule):
        ...     pass
        >>> handled_layers(MyDenseRule) == (keras.layers.Dense, "my_package.layers.MyDense")
        True
    """
    keys = tuple(key for key in layer_classes if key is not None)
    for key in keys:
        if not check_layer_key(key):
            raise TypeError(
                f"Expected keras.layers.Layer subclasses or their import paths. Received: {key!r}"
            )
    if len(set(keys)) != len(keys):
        raise TypeError(f"A layer class is named twice: {keys!r}")

    def declare(rule_class: type) -> type:
        if not (isinstance(rule_class, type) and issubclass(rule_class, LayerRule)):
            raise TypeError(f"@handles decorates LayerRule subclasses. Received: {rule_class!r}")
        if _HANDLES in vars(rule_class):
            raise TypeError(f"{rule_class.__name__} already declares its layers")
        setattr(rule_class, _HANDLES, keys)
        return rule_class

    return declare


def handled_layers(rule_class: type) -> tuple[LayerKey, ...]:
    """The layer classes `rule_class` itself declares with `@handles` (its bases' not included)."""
    return vars(rule_class).get(_HANDLES, ())


WORKSPACE_KEY = "workspace"
SAVED_KEY = "saved"


def sub_cache(cache: dict, name: str) -> dict:
    """A cache of its own for one part of a layer (one of several products).

    It shares the layer's step budget for explicit products, and has its
    own workspace inside the layer's, so that the parts' scratch tensors
    and `per_example` products never overwrite each other.
    """
    sub = cache.get(name)
    if sub is None:
        sub = {key: cache[key] for key in (BUDGET_KEY,) if key in cache}
        workspace = cache.get(WORKSPACE_KEY)
        if workspace is not None:
            sub[WORKSPACE_KEY] = workspace.setdefault(name, {})
        cache[name] = sub
    return sub


def scratch(cache: dict, name: str, shape, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor for an intermediate result, reused across steps.

    The fast engine gives every layer a workspace that outlives the step
    (`cache[WORKSPACE_KEY]`); a rule that asks for the same `name` with the
    same shape and dtype gets the same memory back next step. Large
    per-example intermediates then stay resident instead of being freshly
    allocated (and, on CPU, page-faulted in) every step. Write every element
    before reading (`out=` of a product, or `zero_()` first), and never return
    a scratch tensor from `clipped_sums`: the next step overwrites it.
    Without a workspace in `cache` this is a plain `torch.empty`.
    """
    shape = tuple(shape)
    workspace = cache.get(WORKSPACE_KEY)
    if workspace is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    tensor = workspace.get(name)
    if (
        tensor is None
        or tuple(tensor.shape) != shape
        or tensor.dtype != like.dtype
        or tensor.device != like.device
    ):
        tensor = torch.empty(shape, dtype=like.dtype, device=like.device)
        workspace[name] = tensor
    return tensor


def weights_reason(layer, expected) -> str | None:
    """Why `layer.trainable_weights` is not `expected` (in order), or None.

    `expected` maps the names a rule knows to the variables (None: absent).
    """
    known = {name: w for name, w in expected.items() if w is not None}
    if [id(w) for w in layer.trainable_weights] == [id(w) for w in known.values()]:
        return None
    return (
        "trainable weights other than "
        + ", ".join(known)
        + " (in that order): "
        + ", ".join(w.path for w in layer.trainable_weights)
    )


def option_reason(layer, *, paddings=None, channels_last: bool = False) -> str | None:
    """The first option of `layer` that rules built on Keras's own arithmetic decline."""
    mode = getattr(layer, "quantization_mode", None)
    if mode is not None:
        return f"quantization_mode={mode!r}"
    if channels_last and getattr(layer, "data_format", "channels_last") != "channels_last":
        return f"data_format={layer.data_format!r} (channels_last only)"
    if paddings is not None and layer.padding not in paddings:
        return f"padding={layer.padding!r} (supported: {', '.join(paddings)})"
    return None


def identity(t):
    return t


def is_linear(activation) -> bool:
    """Whether a Keras activation leaves its input unchanged."""
    return activation is None or activation is identity or activation is keras.activations.linear


def reduce_to_shape(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Per-example gradient of a parameter of `shape` broadcast against `t` (B, ...).

    Sums each example's slice of `t` over the axes the parameter was
    broadcast along (numpy rules: trailing alignment), giving (B, *shape).
    """
    lead = t.ndim - 1 - len(shape)
    if lead:
        t = t.sum(dim=tuple(range(1, 1 + lead)))
    axes = tuple(1 + i for i, n in enumerate(shape) if n == 1 and t.shape[1 + i] != 1)
    if axes:
        t = t.sum(dim=axes, keepdim=True)
    return t.reshape(t.shape[0], *shape)


def as_sequence(t: torch.Tensor) -> torch.Tensor:
    """Reshapes `(B, ..., F)` into `(B, T, F)` (T = 1 for 2-D inputs)."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


def fold_rows(t: torch.Tensor, units: int, keep_last: int = 1) -> torch.Tensor:
    """(B, ..., *last) -> (units, B/units * ..., *last): groups of rows as one longer row.

    `keep_last` trailing axes are kept as they are (features); everything
    between the batch axis and them is merged with the group.
    """
    tail = tuple(t.shape[t.ndim - keep_last :]) if keep_last else ()
    return t.reshape(units, -1, *tail)


def sq_norm_rows(t: torch.Tensor) -> torch.Tensor:
    """Per-row squared L2 norms of a `(B, ...)` tensor, in float64."""
    return squared_row_norms(t)


def weighted(t: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """`t` with row i scaled by `factors[i]`."""
    return t * factors.to(t.dtype).view(-1, *[1] * (t.ndim - 1))
