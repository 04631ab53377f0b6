"""Recognise what a graph node does, whatever its spelling.

A convolution can reach the graph as an ``nn.Conv2d`` module call, ``F.conv2d``, ``torch.conv2d``
or an ATen ``conv2d``/``convolution`` overload; a batch norm as a module, ``F.batch_norm``
(timm's ``BatchNormAct2d`` traces to it) or ``aten.batch_norm``; a ReLU as ``nn.ReLU``,
``F.relu``, ``torch.relu``, ``x.relu()`` or ``aten.relu`` (in-place spellings such as ``relu_``
and ``inplace=True`` are made out-of-place by :mod:`tsgb_fx.trace` before this runs). :func:`find_op_sites` maps each
such node to an :class:`OpSite`: its kind and its arguments in the keyword form the rule
functions take, so that rules match what an op does, not how it is written.

Kinds and the rule-function keywords they are normalised to:

========== =====================================================================================
conv       x, weight, bias, stride, padding, dilation, groups, padding_mode
linear     x, weight, bias
batchnorm  x, running_mean, running_var, weight, bias, eps
avgpool    x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override
relu       x, min_val, max_val: the rectifier ``clamp(x, min_val, max_val)``; ReLU is (0.0, None),
           ReLU6 (0.0, 6.0), Hardtanh its bounds (floats; ``max_val=None`` means unbounded)
silu       x: ``x * sigmoid(x)`` (no method gives it a rule; the rewrite folds it into TSGB-Conv)
========== =====================================================================================

The rule functions of :mod:`tsgb_fx.rules` take exactly these keywords (plus their options).

Module subclasses count when they keep the base class's ``forward``; a subclass with its own
forward is traced through (the default) and its functional calls are found instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

KINDS = ("conv", "linear", "batchnorm", "avgpool", "relu", "silu")
aten = torch.ops.aten


@dataclass(frozen=True)
class Attr:
    """A parameter or buffer of the graph module, by its dotted path (becomes a get_attr node)."""

    path: str


@dataclass
class OpSite:
    """One node of a known kind, with its arguments normalised to the rule keywords."""

    kind: str
    node: fx.Node
    arguments: dict[str, Any]
    module: str = ""
    weight_shape: tuple[int, ...] | None = field(default=None)


_CONV_NAMES = ("x", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
_AVGPOOL_NAMES = ("x", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
_AVGPOOL_DEFAULTS = {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True, "divisor_override": None}

# Python-level functions: (kind, positional names, defaults)
_FUNCTIONS = {
    F.conv1d: ("conv", _CONV_NAMES, _CONV_DEFAULTS),
    F.conv2d: ("conv", _CONV_NAMES, _CONV_DEFAULTS),
    F.conv3d: ("conv", _CONV_NAMES, _CONV_DEFAULTS),
    F.linear: ("linear", ("x", "weight", "bias"), {"bias": None}),
    F.batch_norm: (
        "batchnorm",
        ("x", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
        {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5},
    ),
    torch.batch_norm: (
        "batchnorm",
        ("x", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps", "cudnn_enabled"),
        {},
    ),
    F.avg_pool1d: ("avgpool", _AVGPOOL_NAMES[:-1], _AVGPOOL_DEFAULTS),
    F.avg_pool2d: ("avgpool", _AVGPOOL_NAMES, _AVGPOOL_DEFAULTS),
    F.avg_pool3d: ("avgpool", _AVGPOOL_NAMES, _AVGPOOL_DEFAULTS),
    F.relu: ("relu", ("x", "inplace"), {"min_val": 0.0, "max_val": None}),
    torch.relu: ("relu", ("x",), {"min_val": 0.0, "max_val": None}),
    F.relu6: ("relu", ("x", "inplace"), {"min_val": 0.0, "max_val": 6.0}),
    F.hardtanh: ("relu", ("x", "min_val", "max_val", "inplace"), {"min_val": -1.0, "max_val": 1.0}),
    F.silu: ("silu", ("x", "inplace"), {}),
}

# Tensor methods (call_method nodes): (kind, positional names after self, defaults)
_METHODS = {
    "relu": ("relu", (), {"min_val": 0.0, "max_val": None}),
}

# Bounds of the ATen rectifiers whose schema does not carry them
_ATEN_RELU_BOUNDS = {"relu": (0.0, None), "relu6": (0.0, 6.0)}

# ATen overload packets: kind. Argument names come from the schema ("self"/"input" -> "x").
_ATEN = {
    aten.conv1d: "conv",
    aten.conv2d: "conv",
    aten.conv3d: "conv",
    aten.convolution: "conv",
    aten.linear: "linear",
    aten.batch_norm: "batchnorm",
    aten.avg_pool1d: "avgpool",
    aten.avg_pool2d: "avgpool",
    aten.avg_pool3d: "avgpool",
    aten.relu: "relu",
    aten.relu6: "relu",
    aten.hardtanh: "relu",
    aten.silu: "silu",
}

# A standard layer's forward -> its kind; also tells the tracer which modules to keep whole.
LAYER_FORWARDS = {
    nn.Conv1d.forward: "conv",
    nn.Conv2d.forward: "conv",
    nn.Conv3d.forward: "conv",
    nn.Linear.forward: "linear",
    nn.modules.batchnorm._BatchNorm.forward: "batchnorm",
    nn.SyncBatchNorm.forward: "batchnorm",
    nn.AvgPool1d.forward: "avgpool",
    nn.AvgPool2d.forward: "avgpool",
    nn.AvgPool3d.forward: "avgpool",
    nn.ReLU.forward: "relu",
    nn.Hardtanh.forward: "relu",  # nn.ReLU6 is a Hardtanh(0, 6)
    nn.SiLU.forward: "silu",
}


def bind_arguments(names, defaults, args, kwargs) -> dict[str, Any]:
    """A call's arguments by name: ``defaults``, then ``args`` in the order of ``names``, then
    ``kwargs``, with torch's ``input``/``self`` called ``x``."""
    bound = dict(defaults)
    bound.update(zip(names, args))
    bound.update({("x" if key in ("input", "self") else key): value for key, value in kwargs.items()})
    return bound


def _aten_names_and_defaults(overload) -> tuple[tuple[str, ...], dict[str, Any]]:
    names, defaults = [], {}
    for argument in overload._schema.arguments:
        name = "x" if argument.name in ("self", "input") else argument.name
        names.append(name)
        if argument.has_default_value():
            defaults[name] = argument.default_value
    return tuple(names), defaults


def _module_site(node: fx.Node, module: nn.Module, kind: str) -> OpSite:
    path = str(node.target)

    def attr(name):
        return Attr(f"{path}.{name}") if getattr(module, name, None) is not None else None

    x = node.args[0] if node.args else node.kwargs.get("input")
    if kind == "conv":
        arguments = dict(
            x=x, weight=attr("weight"), bias=attr("bias"), stride=module.stride,
            padding=module.padding, dilation=module.dilation, groups=module.groups,
            padding_mode=module.padding_mode,
        )
        return OpSite(kind, node, arguments, path, tuple(module.weight.shape))
    if kind == "linear":
        return OpSite(kind, node, dict(x=x, weight=attr("weight"), bias=attr("bias")), path)
    if kind == "batchnorm":
        arguments = dict(
            x=x, running_mean=attr("running_mean"), running_var=attr("running_var"),
            weight=attr("weight"), bias=attr("bias"), eps=module.eps,
        )
        return OpSite(kind, node, arguments, path)
    if kind == "relu":
        bounds = (0.0, None) if isinstance(module, nn.ReLU) else (float(module.min_val), float(module.max_val))
        return OpSite(kind, node, dict(x=x, min_val=bounds[0], max_val=bounds[1]), path)
    if kind == "silu":
        return OpSite(kind, node, dict(x=x), path)
    arguments = dict(
        x=x, kernel_size=module.kernel_size, stride=module.stride, padding=module.padding,
        ceil_mode=module.ceil_mode, count_include_pad=module.count_include_pad,
        divisor_override=getattr(module, "divisor_override", None),
    )
    return OpSite(kind, node, arguments, path)


def _function_site(node: fx.Node, kind: str, bound: dict[str, Any]) -> OpSite | None:
    if kind == "conv":
        if bound.get("transposed"):
            return None  # transposed convolutions keep the plain gradient
        arguments = {name: bound[name] for name in _CONV_NAMES}
    elif kind == "linear":
        arguments = {name: bound.get(name) for name in ("x", "weight", "bias")}
    elif kind == "relu":
        maximum = bound.get("max_val")
        arguments = dict(x=bound["x"], min_val=float(bound["min_val"]), max_val=None if maximum is None else float(maximum))
    elif kind == "silu":
        arguments = dict(x=bound["x"])
    elif kind == "batchnorm":
        arguments = {name: bound.get(name) for name in ("x", "running_mean", "running_var", "weight", "bias")}
        arguments["eps"] = bound["eps"]
        if bound.get("training"):  # normalises with batch statistics: no running statistics used
            arguments.update(running_mean=None, running_var=None)
    else:
        arguments = {name: bound.get(name, _AVGPOOL_DEFAULTS.get(name)) for name in _AVGPOOL_NAMES}
    return OpSite(kind, node, arguments, _module_path(node))


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path if isinstance(path, str) else ""


def match(node: fx.Node, modules: dict[str, nn.Module]) -> OpSite | None:
    """The :class:`OpSite` of ``node`` if it is one of the :data:`KINDS`."""
    if node.op == "call_module":
        module = modules.get(str(node.target))
        kind = LAYER_FORWARDS.get(type(module).forward) if module is not None else None
        return _module_site(node, module, kind) if kind else None
    if node.op == "call_method":
        if node.target not in _METHODS:
            return None
        kind, names, defaults = _METHODS[node.target]
        return _function_site(node, kind, bind_arguments(("x", *names), defaults, node.args, node.kwargs))
    if node.op != "call_function":
        return None
    target = node.target
    if target in _FUNCTIONS:
        kind, names, defaults = _FUNCTIONS[target]
    elif isinstance(target, torch._ops.OpOverload) and target.overloadpacket in _ATEN:
        kind = _ATEN[target.overloadpacket]
        names, defaults = _aten_names_and_defaults(target)
        if kind == "relu" and target.overloadpacket is not aten.hardtanh:
            minimum, maximum = _ATEN_RELU_BOUNDS[target.overloadpacket.__name__]
            defaults = {**defaults, "min_val": minimum, "max_val": maximum}
    else:
        return None
    return _function_site(node, kind, bind_arguments(names, defaults, node.args, node.kwargs))


def find_op_sites(graph_module: fx.GraphModule) -> list[OpSite]:
    """Every node of a known kind (conv, linear, batch norm, average pooling, rectifier, SiLU), in graph order."""
    modules = dict(graph_module.named_modules())
    sites = []
    for node in graph_module.graph.nodes:
        site = match(node, modules)
        if site is not None:
            if site.kind == "conv" and site.weight_shape is None:
                site.weight_shape = _static_shape(graph_module, site.arguments["weight"])
            sites.append(site)
    return sites


def _static_shape(graph_module: fx.GraphModule, value) -> tuple[int, ...] | None:
    """Shape of a weight given as a get_attr node (fx) or a node carrying a fake value (export)."""
    if isinstance(value, fx.Node):
        if value.op == "get_attr":
            try:
                return tuple(graph_module.get_parameter(str(value.target)).shape)
            except AttributeError:
                try:
                    return tuple(graph_module.get_buffer(str(value.target)).shape)
                except AttributeError:
                    return None
        fake = value.meta.get("val")
        if isinstance(fake, torch.Tensor):
            try:
                return tuple(int(size) for size in fake.shape)
            except TypeError:
                return None
    return None
