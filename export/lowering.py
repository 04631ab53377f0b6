"""Rewrite the explicit graph into ops that onnxruntime runs fast, before it is exported.

The explicit graph (:mod:`tsgb_fx.explicit`) is written for torch, where some ops are free or
cheap that ONNX runtimes execute literally or slowly. Five spellings have replacements that
change no number (the third only the order of its additions): the first two cost an ONNX
explainer of ResNet-50 about a fifth of its time in onnxruntime on a CPU, the third about a
tenth at batch 1, the fourth DenseNet-121 and the fifth EfficientNet-B0 a few percent.

* **Materialised broadcasts.** ``expand`` is a view in torch and an ``Expand`` node in ONNX that
  writes the full tensor. The rules send one map broadcast over the channels (TSGB-Conv's
  ``BoxT(r)``), which the graph then slices back to one channel (``g.narrow(1, 0, 1)``) or adds
  to another signal. ``slice(expand(t), dim, 0, 1)`` is ``t`` itself when ``t`` has size 1 on
  ``dim``, and a broadcasting elementwise op (add, sub, mul, div, where, a product or quotient by
  a scalar) gives the same result from the unexpanded input whenever its output shape does not
  change; where it would change, the op runs on the narrow inputs and the expand moves after it.
* **Masking by ``where``.** Every rectifier's backward is ``where(y <= 0, 0, g)``, and the rules
  mask with ``where(mask, 0, v)``. onnxruntime's ``Where`` takes about ten times as long as a
  ``Mul`` over the same tensor (39 ms against 3.6 ms for 8x256x56x56 floats on this machine's
  CPU), so ``where(mask, 0, v)`` becomes ``v * float(not mask)`` and ``where(y <= 0, 0, g)``
  becomes ``g * float(y > 0)``: the same numbers wherever ``v`` is finite, which every signal of
  the rules is (their divisions are stabilised).
* **Channel sums as a product with ones.** TSGB-Conv sums over channels (``c`` and ``z``),
  which torchlib writes as ``ReduceSum`` over axis 1. onnxruntime runs that reduction slowly for
  a batch of one: 0.45-0.55 ms for 1x256x56x56 floats on this machine's CPU, about as long as
  for a batch of eight, where a ``MatMul`` of a row of ones with the (1, 256, 3136) view takes
  0.12 ms (from batch 2 on the two take the same time). ``x.sum(d, keepdim)`` over one inner
  axis becomes ``ones(1, D) @ x.reshape(-1, D, L)``, reshaped back. Measured side by side on
  the exported explainers at batch 1: 8% faster for ResNet-50, 7% VGG16, 12% DenseNet-121, 15%
  EfficientNet-B0, 24% MobileNetV2; at batch 8 within the noise (-4% to +3%).
* **Tiled spreads as a transposed convolution.** The backward of an average pool whose windows
  tile its input copies each output's signal over its tile: ``view`` to ``(N, C, o_1, 1, ...)``,
  ``expand`` to ``(N, C, o_1, k_1, ...)``, ``reshape`` to ``(N, C, o_1 k_1, ...)``
  (:func:`tsgb_fx.explicit._spread_over_tiles`, which torch.compile fuses). onnxruntime's
  ``Expand`` over such small inner axes is slow: 13.2 ms for 8x128x28x28 to 56x56 on this
  machine's CPU, where a depthwise ``ConvTranspose`` with a kernel of ones and stride k writes
  the same numbers (each a product with 1) in 3.1 ms.
* **Signs as a clamped product.** TSGB-Conv multiplies its spread signal by ``sign(x)`` where
  ``x`` is not rectified (the image, SiLU outputs read twice, batch-norm outputs). onnxruntime's
  ``Sign`` kernel is scalar: 6.0 ms for 8x32x112x112 floats on this machine's CPU, where ``Abs``
  of three times as many takes 1.0 ms. ``sign(x)`` becomes ``clamp(x * 2^e * 2^e, -1, 1)`` with
  ``2^e`` the dtype's largest power of two (``2^127`` for float32): two products push every
  nonzero ``x``, the smallest subnormal included, to at least 1 in magnitude (or to infinity),
  and the clamp returns exactly -1, 0 or 1; 3.3 ms for the same tensor.

Shapes are read from the nodes' ``meta["val"]`` (make_fx records them, symbolic batch
included); a rewrite whose shapes cannot be proven equal without a new guard is skipped.
"""

from __future__ import annotations

import math

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

aten = torch.ops.aten

BROADCASTING = (aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.where.self,
                aten.mul.Scalar, aten.div.Scalar, aten.mul_.Tensor)
IN_PLACE = (aten.mul_.Tensor,)  # writes into its first input: that one keeps its shape
NEGATED_COMPARISON = {aten.le.Scalar: aten.gt.Scalar, aten.eq.Scalar: aten.ne.Scalar}
RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def lower_for_onnx(module: fx.GraphModule) -> fx.GraphModule:
    """Apply the rewrites above to ``module`` in place; returns it, recompiled."""
    graph = module.graph
    sums, rows_of_ones = {}, {}  # shared by the channel-sum rewrites of this graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten.slice.Tensor:
            _slice_of_broadcast(node)
        elif node.target in BROADCASTING:
            _broadcast_inputs(graph, node)
        if node.target is aten.where.self:
            _where_as_product(graph, node)
        elif node.target is aten.sum.dim_IntList:
            _inner_sum_as_matmul(graph, node, sums, rows_of_ones)
        elif node.target is aten.sign.default:
            _sign_as_clamped_product(graph, node)
        elif node.target in RESHAPES:
            _tiled_spread_as_transposed_conv(graph, node)
    graph.eliminate_dead_code()
    graph.lint()
    module.recompile()
    return module


NARROWED = "tsgb_lowered_shape"  # meta key: the shape of an op that now runs before its broadcast


def _shape(node) -> tuple | None:
    if not isinstance(node, fx.Node):
        return None
    if NARROWED in node.meta:
        return node.meta[NARROWED]
    value = node.meta.get("val")
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _same(a, b) -> bool:
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def _is_one(size) -> bool:
    return isinstance(size, int) and size == 1


def _broadcast(shapes: list[tuple]) -> tuple | None:
    """torch's broadcast of ``shapes``, or None where sizes are not provably compatible."""
    ndim = max(len(shape) for shape in shapes)
    out = []
    for axis in range(1, ndim + 1):
        sizes = [shape[-axis] for shape in shapes if len(shape) >= axis and not _is_one(shape[-axis])]
        if sizes and not all(statically_known_true(size == sizes[0]) for size in sizes[1:]):
            return None
        out.append(sizes[0] if sizes else 1)
    return tuple(reversed(out))


def _slice_of_broadcast(node: fx.Node) -> None:
    """``slice(expand(t), dim, 0, 1)`` -> ``t`` where that is the same tensor."""
    source, _dim, start, end = (list(node.args) + [None, None, None])[:4]  # equal shapes settle the dim
    if not (isinstance(source, fx.Node) and source.target is aten.expand.default) or start != 0 or end != 1:
        return
    if len(node.args) > 4 and node.args[4] != 1:
        return
    original, wanted = _shape(source.args[0]), _shape(node)
    if original is not None and wanted is not None and _same(original, wanted):
        node.replace_all_uses_with(source.args[0])


def _broadcast_inputs(graph: fx.Graph, node: fx.Node) -> None:
    """Feed a broadcasting op its unexpanded inputs.

    Where the output shape stays the same the expand is simply dropped. Where it would not (every
    input is narrower than the output: two channel-broadcast signals added), the op runs on the
    narrow inputs and the expand moves after it, for the op's own users to absorb in turn.
    """
    output = _shape(node)
    if output is None:
        return
    args = list(node.args)
    expanded = [index for index, arg in enumerate(args) if isinstance(arg, fx.Node) and arg.target is aten.expand.default]
    if node.target in IN_PLACE:
        expanded = [index for index in expanded if index > 0]
    for index in expanded:
        trial = args[:index] + [args[index].args[0]] + args[index + 1:]
        broadcast = _broadcast_of(trial)
        if broadcast is not None and _same(broadcast, output):
            args = trial
    remaining = [args[index] for index in expanded if args[index] is node.args[index]]
    if remaining and node.target not in IN_PLACE:
        narrow = [arg.args[0] if arg in remaining else arg for arg in args]
        to_output = next((arg for arg in remaining if _same(_shape(arg) or (), output)), None)
        narrow_shape = _broadcast_of(narrow)
        if to_output is not None and narrow_shape is not None:
            args = narrow
            with graph.inserting_after(node):
                widened = graph.call_function(aten.expand.default, (node, to_output.args[1]))
            node.replace_all_uses_with(widened, delete_user_cb=lambda user: user is not widened)
            widened.meta = dict(node.meta)
            node.meta[NARROWED] = narrow_shape
    node.args = tuple(args)


def _broadcast_of(args: list) -> tuple | None:
    shapes = [_shape(arg) if isinstance(arg, fx.Node) else () for arg in args]
    return None if any(shape is None for shape in shapes) else _broadcast(shapes)


def _zero_scalar(arg) -> bool:
    if isinstance(arg, (int, float)):
        return arg == 0
    return (isinstance(arg, fx.Node) and arg.target is aten.scalar_tensor.default and arg.args[0] == 0
            and _shape(arg) == ())


def _where_as_product(graph: fx.Graph, node: fx.Node) -> None:
    """``where(mask, 0, v)`` -> ``v * float(not mask)``; ``where(mask, v, 0)`` -> ``v * float(mask)``."""
    mask, when_true, when_false = node.args
    if _zero_scalar(when_true):
        value, keep_where_mask = when_false, False
    elif _zero_scalar(when_false):
        value, keep_where_mask = when_true, True
    else:
        return
    output, value_shape = _shape(node), _shape(value)
    dtype = node.meta["val"].dtype if "val" in node.meta else None
    if output is None or value_shape is None or dtype is None or not dtype.is_floating_point:
        return
    broadcast = _broadcast([_shape(mask) or (), value_shape])
    if broadcast is None or not _same(broadcast, output):
        return
    with graph.inserting_before(node):
        if keep_where_mask:
            keep = mask
        elif mask.target in NEGATED_COMPARISON and len(mask.users) == 1:
            keep = graph.call_function(NEGATED_COMPARISON[mask.target], mask.args)  # y <= 0 -> y > 0
        else:
            keep = graph.call_function(aten.logical_not.default, (mask,))
        factor = graph.call_function(aten._to_copy.default, (keep,), {"dtype": dtype})
        product = graph.call_function(aten.mul.Tensor, (value, factor))
    product.meta = dict(node.meta)
    node.replace_all_uses_with(product)


def _inner_sum_as_matmul(graph: fx.Graph, node: fx.Node, sums: dict, rows_of_ones: dict) -> None:
    """``x.sum(d, keepdim)`` over one inner axis ``d`` -> ``ones(1, D) @ x.reshape(-1, D, L)``.

    ``L`` is the product of the sizes after ``d``; the leading ``-1`` takes the batch and the
    axes before ``d``, so only those after the batch need to be known. Skipped for a dtype
    argument, several axes, the batch or last axis, and integer tensors.

    ``sums`` and ``rows_of_ones`` keep what this graph's rewrites already wrote: the graph sums
    some tensors twice (a rectified output is one layer's ``y`` and the next one's ``x``), which
    onnxruntime merges as ``ReduceSum`` nodes but not as products with distinct constants, so a
    repeated sum reuses the first product, and one row of ones serves each size.
    """
    source, dims = node.args[0], node.args[1] if len(node.args) > 1 else None
    keepdim = bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
    value = source.meta.get("val") if isinstance(source, fx.Node) else None
    if node.kwargs.get("dtype") is not None or not isinstance(value, torch.Tensor) or not dims or len(dims) != 1:
        return
    shape, dim = tuple(value.shape), dims[0] % value.dim()
    if not value.dtype.is_floating_point or not 1 <= dim < len(shape) - 1:
        return
    if not all(isinstance(size, int) for size in shape[1:]):
        return
    key = (source, dim, keepdim)
    if key not in sums:
        size, rest = shape[dim], math.prod(shape[dim + 1:])
        summed = [-1, *shape[1:dim], *((1,) if keepdim else ()), *shape[dim + 1:]]
        with graph.inserting_before(node):
            row = (size, value.dtype, value.device)
            if row not in rows_of_ones:  # written before the first sum, so it precedes every later one
                rows_of_ones[row] = graph.call_function(aten.new_ones.default, (source, [1, size]))
            flat = graph.call_function(aten.reshape.default, (source, [-1, size, rest]))
            product = graph.call_function(aten.matmul.default, (rows_of_ones[row], flat))
            sums[key] = graph.call_function(aten.reshape.default, (product, summed))
        sums[key].meta = dict(node.meta)
    node.replace_all_uses_with(sums[key])


def _tiled_spread_as_transposed_conv(graph: fx.Graph, node: fx.Node) -> None:
    """``reshape(expand(view(g, (N, C, o_1, 1, ...)), (N, C, o_1, k_1, ...)), (N, C, o_1 k_1, ...))``
    -> ``conv_transpose(g, ones(C, 1, k_1, ...), stride=k, groups=C)``, for 1 to 3 spatial axes
    with static sizes after the batch (a ``clone`` between the expand and the reshape included)."""
    spread = node.args[0]
    if isinstance(spread, fx.Node) and spread.target is aten.clone.default:
        spread = spread.args[0]
    if not (isinstance(spread, fx.Node) and spread.target is aten.expand.default):
        return
    tiles = spread.args[0]
    if not (isinstance(tiles, fx.Node) and tiles.target in RESHAPES):
        return
    grad = tiles.args[0]
    shapes = [_shape(grad), _shape(tiles), _shape(spread), _shape(node)]
    if any(shape is None for shape in shapes) or not all(isinstance(size, int) for shape in shapes
                                                         for size in shape[1:]):
        return
    grad_shape, tiles_shape, spread_shape, output_shape = shapes
    spatial = len(grad_shape) - 2
    if not 1 <= spatial <= 3 or len(output_shape) != len(grad_shape):
        return
    outputs = grad_shape[2:]
    kernel = spread_shape[3::2]
    if (tuple(tiles_shape[1:]) != (grad_shape[1], *(size for o in outputs for size in (o, 1)))
            or tuple(spread_shape[1:]) != (grad_shape[1], *(size for o, k in zip(outputs, kernel) for size in (o, k)))
            or tuple(output_shape[1:]) != (grad_shape[1], *(o * k for o, k in zip(outputs, kernel)))):
        return
    channels = grad_shape[1]
    with graph.inserting_before(node):
        ones = graph.call_function(aten.new_ones.default, (grad, [channels, 1, *kernel]))
        conv = graph.call_function(aten.convolution.default, (
            grad, ones, None, list(kernel), [0] * spatial, [1] * spatial, True, [0] * spatial, channels))
    conv.meta = dict(node.meta)
    node.replace_all_uses_with(conv)


def _sign_as_clamped_product(graph: fx.Graph, node: fx.Node) -> None:
    """``sign(x)`` -> ``clamp(x * 2^e * 2^e, -1, 1)`` for a floating ``x``, ``2^e`` the dtype's
    largest power of two (``2^127`` for float32, ``2^1023`` for float64).

    The smallest subnormal is ``2^-149`` for float32 (``2^-1074`` for float64), and two factors of
    ``2^e`` lift it to at least 1; larger values overflow to an infinity of their sign, which the
    clamp also takes to -1 or 1; zero stays zero. Two products, as ``2^(2e)`` is not representable.
    """
    (source,) = node.args
    value = source.meta.get("val") if isinstance(source, fx.Node) else None
    if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point:
        return
    factor = 2.0 ** (math.frexp(torch.finfo(value.dtype).max)[1] - 1)
    with graph.inserting_before(node):
        lifted = graph.call_function(aten.mul.Tensor, (source, factor))
        lifted = graph.call_function(aten.mul.Tensor, (lifted, factor))
        clamped = graph.call_function(aten.clamp.default, (lifted, -1.0, 1.0))
    clamped.meta = dict(node.meta)
    node.replace_all_uses_with(clamped)
