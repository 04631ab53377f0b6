"""2-d max pooling through torch's channels-last CPU kernel, same numbers, a fraction of the time.

torch's CPU ``max_pool2d`` on a contiguous (NCHW) tensor is several times slower than on a
channels-last one, whose kernel is vectorised over the channels (pytorch/pytorch#51393): on this
machine's 2-core CPU, 28.5 ms for ResNet-50's stem pool at batch 8 (8x64x112x112), against 3.2 ms
channels-last, 3.6 ms to convert the input and 0.8 ms to convert the pooled output back. Max
pooling keeps its plain gradient in every method, so :func:`route_max_pools` only swaps each 2-d
max pool of the explainer's graph for :func:`max_pool2d`, which takes that detour on a CPU and
hands back a contiguous output: the values and the argmax indices are the same (the backward
routes each output's signal to the same input), and the backward is torch's own, given the
indices in the contiguous layout it runs fastest on. Elsewhere (CUDA, inputs already channels-last,
3-d, the traced explicit graph) it is ``F.max_pool2d`` as written.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from .ops import bind_arguments
from .rules.box import per_axis
from .rules.tracing import is_traced

aten = torch.ops.aten


class _ChannelsLastMaxPool(torch.autograd.Function):
    """``max_pool2d`` of a contiguous CPU batch, pooled channels-last; plain gradient."""

    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, dilation, ceil_mode):
        pooled, indices = aten.max_pool2d_with_indices(
            x.contiguous(memory_format=torch.channels_last), kernel_size, stride, padding, dilation, ceil_mode
        )
        ctx.save_for_backward(x, indices.contiguous())
        ctx.window = (kernel_size, stride, padding, dilation, ceil_mode)
        return pooled.contiguous()

    @staticmethod
    def backward(ctx, g):
        x, indices = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        g_x = aten.max_pool2d_with_indices_backward(g.contiguous(), x, *ctx.window, indices)
        return g_x, None, None, None, None, None


def max_pool2d(x: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False) -> torch.Tensor:
    """``F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)``, through the
    channels-last kernel for a contiguous 4-d CPU batch (see the module docstring)."""
    if (is_traced(x) or x.device.type != "cpu" or x.dim() != 4 or not x.is_contiguous()
            or x.is_contiguous(memory_format=torch.channels_last)):  # one channel or 1x1: both layouts
        return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)
    kernel = list(per_axis(kernel_size, 2))
    strides = list(per_axis(stride, 2)) if stride else kernel  # None or [] (ATen's default): the kernel
    return _ChannelsLastMaxPool.apply(x, kernel, strides, list(per_axis(padding, 2)), list(per_axis(dilation, 2)),
                                      bool(ceil_mode))


_MAX_POOL_ARGUMENTS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")


def _max_pool_arguments(node: fx.Node, modules: dict[str, nn.Module]):
    """``(x, arguments)`` of a 2-d max pool that returns no indices, or None."""
    if node.op == "call_module":
        module = modules.get(str(node.target))
        if type(module) is not nn.MaxPool2d or module.return_indices or len(node.args) != 1 or node.kwargs:
            return None
        return node.args[0], {name: getattr(module, name) for name in _MAX_POOL_ARGUMENTS}
    if node.op != "call_function" or node.target not in (F.max_pool2d, torch.max_pool2d, aten.max_pool2d.default):
        return None
    names = ("x", *_MAX_POOL_ARGUMENTS, "return_indices")
    bound = bind_arguments(names, {}, node.args, node.kwargs)
    if bound.pop("return_indices", False) or "x" not in bound or not set(bound) <= set(names):
        return None
    return bound.pop("x"), bound


def route_max_pools(graph_module: fx.GraphModule) -> int:
    """Swap every 2-d max pool without indices (``nn.MaxPool2d``, ``F.max_pool2d``,
    ``torch.max_pool2d``, ``aten.max_pool2d``) for :func:`max_pool2d`; returns how many."""
    modules = dict(graph_module.named_modules())
    routed = 0
    for node in list(graph_module.graph.nodes):
        found = _max_pool_arguments(node, modules)
        if found is None:
            continue
        x, arguments = found
        with graph_module.graph.inserting_before(node):
            pooled = graph_module.graph.call_function(max_pool2d, (x,), arguments)
        pooled.meta = dict(node.meta)
        node.replace_all_uses_with(pooled)
        graph_module.graph.erase_node(node)
        if node.op == "call_module" and not any(
            other.op == "call_module" and other.target == node.target for other in graph_module.graph.nodes
        ):
            graph_module.delete_submodule(str(node.target))
        routed += 1
    if routed:
        graph_module.graph.lint()
        graph_module.recompile()
    return routed
