"""Trace a user's model once into an fx graph that the rewrite can work on.

Two tracers, as in the design:

* ``"fx"``: :func:`torch.fx` symbolic tracing. Module-level graph: module names are kept and
  standard layers stay ``call_module`` nodes. Fails on Python control flow over tensor shapes.
* ``"export"``: :func:`torch.export.export`, an ATen-level graph that handles shape arithmetic
  (timm's ``tf_efficientnet_lite0`` computes its 'same' padding from the input size). Needs an
  example input; the batch size stays dynamic, the spatial size is the example's.
* ``"auto"``: ``"fx"`` first, ``"export"`` when that fails.

The model itself is never traced or touched. :func:`eval_view` makes a shadow of its module
tree: new module objects with their own ``training`` flag (False) and in-place flags (False), but
the very same parameter and buffer tensors. Tracing the shadow gives eval semantics without
changing the user's model, and shares the weights without copying them.

:func:`functionalize_inplace` then rewrites in-place ops (``relu_``, ``add_``, ``F.relu(...,
inplace=True)``, ATen ``*_`` overloads) into their out-of-place forms and points every later use
of the mutated tensor at the new result, so the rule Functions' saved tensors are never
overwritten.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn

from .errors import TraceError
from .ops import LAYER_FORWARDS

TRACERS = ("auto", "fx", "export")


def eval_view(model: nn.Module) -> nn.Module:
    """A shadow of ``model``: own module objects in eval mode, shared parameters and buffers.

    Every module is shallow-copied with its own ``_modules``, ``_parameters``, ``_buffers`` and
    hook dictionaries (snapshots, so hooks present now keep working, such as weight-norm
    pre-hooks), ``training = False`` and ``inplace = False`` where the module has that flag. A
    module that appears twice in the tree appears twice in the shadow as one object.
    """
    memo: dict[int, nn.Module] = {}

    def shadow(module: nn.Module) -> nn.Module:
        if id(module) in memo:
            return memo[id(module)]
        clone = copy.copy(module)
        memo[id(module)] = clone
        state = clone.__dict__
        for key, value in module.__dict__.items():
            if key.startswith("_") and type(value) in (dict, set, type(module._modules)):
                state[key] = copy.copy(value)
        state["_modules"] = {
            name: None if child is None else shadow(child) for name, child in module._modules.items()
        }
        state["training"] = False
        if isinstance(state.get("inplace"), bool):
            state["inplace"] = False
        return clone

    return shadow(model)


class _Tracer(fx.Tracer):
    """``symbolic_trace`` with configurable leaf modules, remembering where tracing failed."""

    def __init__(self, leaf_modules: Sequence, autowrap_functions: Sequence):
        super().__init__(autowrap_functions=tuple(autowrap_functions))
        self._leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self._leaf_names = frozenset(m for m in leaf_modules if isinstance(m, str))
        self.current_module = ""

    def is_leaf_module(self, module: nn.Module, qualname: str) -> bool:
        if qualname in self._leaf_names or isinstance(module, self._leaf_types):
            return True
        # a subclass of a standard layer that keeps its forward is that layer: keep it whole
        # (tracing into it fails on checks such as BatchNorm's input.dim())
        if type(module).forward in LAYER_FORWARDS:
            return True
        return super().is_leaf_module(module, qualname)

    def call_module(self, module, forward, args, kwargs):
        outer, self.current_module = self.current_module, self.path_of_module(module)
        result = super().call_module(module, forward, args, kwargs)
        self.current_module = outer
        return result


def _trace_fx(shadow: nn.Module, leaf_modules, autowrap_functions) -> fx.GraphModule:
    tracer = _Tracer(leaf_modules, autowrap_functions)
    try:
        graph = tracer.trace(shadow)
    except Exception as error:  # fx raises many kinds; each is reported with its place
        where = f"module '{tracer.current_module}'" if tracer.current_module else "the top-level forward"
        raise TraceError(
            f"torch.fx could not trace {where} of {type(shadow).__name__}: "
            f"{type(error).__name__}: {error}. Try leaf_modules=[...] naming that module (or its "
            f"class) to keep it opaque, autowrap_functions=[...] for a function that does shape "
            f"arithmetic, or tracer='export'."
        ) from error
    return fx.GraphModule(shadow, graph, class_name=type(shadow).__name__)


def _example_input(shadow: nn.Module) -> torch.Tensor:
    """A (2, C, 224, ...) example from the first convolution's input channels."""
    for module in shadow.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            weight = module.weight
            spatial = (224,) * (weight.dim() - 2)
            return torch.randn(2, module.in_channels, *spatial, dtype=weight.dtype, device=weight.device)
    raise TraceError(
        "tracer='export' needs an example input and the model has no convolution to guess one "
        "from: pass example_input=torch.randn(N, C, H, W)."
    )


def _trace_export(shadow: nn.Module, example_input: torch.Tensor | None) -> Traced:
    from torch.export import Dim

    example = _example_input(shadow) if example_input is None else example_input.detach()
    if example.shape[0] < 2:  # a batch of 1 would be specialised to 1
        example = example[:1].expand(2, *example.shape[1:]).contiguous()
    # Only the batch is dynamic: symbolic spatial sizes make shape-computed padding (timm's
    # 'same' convolutions) take minutes to export, and a deployment has one input size anyway.
    dynamic = {0: Dim.AUTO}
    try:
        program = torch.export.export(shadow, (example,), dynamic_shapes=(dynamic,))
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise TraceError(
            f"torch.export could not capture {type(shadow).__name__} with an example input of "
            f"shape {tuple(example.shape)}: {type(error).__name__}: {first_line}. If the model "
            f"needs another input size, pass example_input=...; a module with data-dependent "
            f"control flow can be kept opaque with tracer='fx' and leaf_modules=[...]."
        ) from error
    graph_module = program.module()
    image = next(node for node in graph_module.graph.nodes if node.op == "placeholder")
    if isinstance(image.meta.get("val", torch.empty(0)).shape[0], int):
        raise TraceError(
            f"torch.export fixed the batch size of {type(shadow).__name__} to {example.shape[0]}: the "
            f"model's forward depends on it (e.g. reshape(2, -1)); use reshape(x.shape[0], -1) or flatten."
        )
    return Traced(graph_module, "export", tuple(example.shape[2:]))


@dataclass(frozen=True)
class Traced:
    """A traced graph, the tracer that made it and, for torch.export, the spatial size it is fixed to."""

    graph_module: fx.GraphModule
    tracer: str
    spatial_size: tuple[int, ...] | None = None


def trace(
    model: nn.Module,
    tracer: str = "auto",
    leaf_modules: Iterable = (),
    autowrap_functions: Iterable = (),
    example_input: torch.Tensor | None = None,
) -> Traced:
    """Trace an eval-mode shadow of ``model`` with in-place ops made out-of-place."""
    if tracer not in TRACERS:
        raise ValueError(f"tracer must be one of {TRACERS}, got {tracer!r}")
    leaf_modules, autowrap_functions = tuple(leaf_modules), tuple(autowrap_functions)
    for leaf in leaf_modules:
        if not (isinstance(leaf, str) or (isinstance(leaf, type) and issubclass(leaf, nn.Module))):
            raise TypeError(f"leaf_modules takes module names and nn.Module classes, got {leaf!r}")
    shadow = eval_view(model)
    if tracer == "export":
        traced = _trace_export(shadow, example_input)
    else:
        try:
            traced = Traced(_trace_fx(shadow, leaf_modules, autowrap_functions), "fx")
        except TraceError as fx_error:
            if tracer == "fx":
                raise
            try:
                traced = _trace_export(shadow, example_input)
            except TraceError as export_error:
                raise TraceError(f"{fx_error}\nThe fallback failed too: {export_error}") from export_error
    functionalize_inplace(traced.graph_module)
    return traced


# ---------------------------------------------------------------------------------------------
# In-place ops -> out-of-place ops

_INPLACE_OPERATORS = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
}


def _out_of_place(node: fx.Node):
    """The out-of-place target for an in-place node, or None if the node is not in-place."""
    target = node.target
    if node.op == "call_method":
        name = str(target)
        if name.endswith("_") and not name.endswith("__") and name != "requires_grad_":
            if hasattr(torch.Tensor, name[:-1]):
                return name[:-1]
        return None
    if node.op != "call_function":
        return None
    if target in _INPLACE_OPERATORS:
        return _INPLACE_OPERATORS[target]
    if isinstance(target, torch._ops.OpOverload):
        schema = target._schema
        first = schema.arguments[0] if schema.arguments else None
        if first is not None and first.alias_info is not None and first.alias_info.is_write:
            packet = getattr(torch.ops.aten, schema.name.split("::")[-1].rstrip("_"), None)
            overload = target._overloadname
            if packet is not None and overload in packet.overloads():
                return getattr(packet, overload)
        return None
    name = getattr(target, "__name__", "")
    for namespace in (torch, torch.nn.functional):
        if name.endswith("_") and getattr(namespace, name, None) is target:
            return getattr(namespace, name[:-1], None)
    return None


def functionalize_inplace(graph_module: fx.GraphModule) -> None:
    """Replace in-place ops by out-of-place ones; later readers of the mutated tensor read the result."""
    graph = graph_module.graph
    order = {node: index for index, node in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if node.kwargs.get("inplace") is True:
            node.kwargs = {**node.kwargs, "inplace": False}
            mutated = node.args[0] if node.args else node.kwargs.get("input")
        else:
            replacement = _out_of_place(node)
            if replacement is None:
                continue
            node.target = replacement
            mutated = node.args[0]
        if isinstance(mutated, fx.Node):
            for user in list(mutated.users):
                if user is not node and order[user] > order[node]:
                    user.replace_input_with(mutated, node)
    graph.lint()
    graph_module.recompile()
