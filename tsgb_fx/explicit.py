"""The explicit graph: forward plus rule backward written out as one graph of plain tensor ops.

An :class:`~tsgb_fx.explainer.Explainer` computes a map with autograd: a forward through the
rewritten graph, then ``torch.autograd.grad`` from the one-hot target, with the rule Functions'
``backward`` doing the TSGB steps. Inference servers (ONNX Runtime, ``torch.export`` programs,
``torch.inference_mode``) run no autograd. :func:`explicit_module` therefore *traces* that call
once with :func:`torch.fx.experimental.proxy_tensor.make_fx`: autograd runs during tracing, and
every op it executes, forward and backward alike, is recorded as an ordinary ATen node::

    image (N, C, *S), target (N,)                       N symbolic, C and S fixed
      logits   = graph_module(image)                      the rewritten forward
      chosen   = where(target < 0, argmax(logits), target)
      one_hot  = (arange(K) == chosen[:, None])           no scatter: plain comparisons
      signal   = d(logits . one_hot) / d(image)           traced: rule backwards become ops
      saliency = sum_C(signal * image)                    (N, 1, *S); sum_C(signal) for methods
    -> (logits, saliency)                                 whose attribution is the signal itself

The saliency is the explainer's, whatever the method: ``signal * image`` where
``explainer.times_input`` (tsgb, grad_x_input), the signal alone where not (gradient,
guided_backprop, deconvnet). The choice is fixed when tracing, so the graph holds no branch.

Nothing is written per model: the graph is whatever the rules and autograd compute. Backward
kernels that other runtimes lack (``avg_pool2d_backward``, ``max_pool2d_with_indices_backward``,
``convolution_backward``, ``_adaptive_avg_pool2d_backward``, ...) are decomposed while tracing
into matmuls, scatters and convolutions (:data:`DECOMPOSITIONS`), so the graph exports to ONNX
with standard operators only.

The batch is symbolic (one trace serves every N); channels and spatial size are the example's,
and the graph checks them on every call. The graph is traced for the explainer's device and
dtype (the constants it creates, such as the all-ones box kernels, live there): move the
explainer first, then call ``explicit()``. Parameters and buffers are held as buffers that alias
the model's tensors (``detach()``: same storage, ``requires_grad=False``): later in-place weight
updates are seen, nothing requires grad, the user's model and its parameters are untouched.
"""

from __future__ import annotations

import math
import operator
from functools import partial

import torch
from torch import fx, nn

from .errors import TSGBError
from .rules.box import per_axis

aten = torch.ops.aten

DEFAULT_SPATIAL = 224


# ---------------------------------------------------------------------------------------------
# Decompositions of backward kernels into ops that ONNX (and every runtime) has


def _window_matrix(starts: torch.Tensor, ends: torch.Tensor, size: int, weights: torch.Tensor) -> torch.Tensor:
    """(O, size) matrix: row o is ``weights[o]`` on ``starts[o] <= i < ends[o]``, 0 elsewhere."""
    positions = torch.arange(size, device=starts.device)
    inside = (positions >= starts.unsqueeze(1)) & (positions < ends.unsqueeze(1))
    return inside.to(weights.dtype) * weights.unsqueeze(1)


def _apply_per_axis(grad: torch.Tensor, matrices: list[torch.Tensor]) -> torch.Tensor:
    """``grad`` (N, C, *O) -> (N, C, *S): contract each spatial axis d with its (O_d, S_d) matrix."""
    out = grad
    spatial = len(matrices)
    for axis, matrix in enumerate(matrices):
        dim = out.dim() - spatial + axis
        out = torch.matmul(out.movedim(dim, -1), matrix).movedim(-1, dim)
    return out


def _avg_pool_backward(spatial, grad, x, kernel_size, stride, padding, ceil_mode, count_include_pad,
                       divisor_override):
    """``avg_poolNd_backward`` as one matmul per spatial axis with a static window matrix, or, for
    windows that tile the input, as a broadcast (:func:`_spread_over_tiles`).

    PyTorch's divisor factorises over axes: with ``start = o*s - p``, ``end = min(start + k,
    size + p)``, the window is clipped to ``[max(start, 0), min(end, size))`` and divided by
    ``prod(end - start)`` (count_include_pad) or by the product of the clipped lengths.
    """
    kernel = per_axis(kernel_size, spatial)
    strides = per_axis(stride, spatial) if stride else kernel
    pads = per_axis(padding, spatial)
    outputs = tuple(grad.shape[-spatial:])
    if strides == kernel and not any(pads) and all(
        o * k == size for o, k, size in zip(outputs, kernel, x.shape[-spatial:])
    ):
        return _spread_over_tiles(grad, kernel, divisor_override or math.prod(kernel))
    matrices = []
    for axis in range(spatial):
        size, outputs = x.shape[axis - spatial], grad.shape[axis - spatial]
        start = torch.arange(outputs, device=grad.device) * strides[axis] - pads[axis]
        end = torch.clamp(start + kernel[axis], max=size + pads[axis])
        low, high = torch.clamp(start, min=0), torch.clamp(end, max=size)
        if divisor_override:
            length = torch.ones_like(start)
        else:
            length = end - start if count_include_pad else high - low
        matrices.append(_window_matrix(low, high, size, 1.0 / length.to(grad.dtype)))
    out = _apply_per_axis(grad, matrices)
    return out / divisor_override if divisor_override else out


def _spread_over_tiles(grad: torch.Tensor, kernel: tuple[int, ...], divisor: int) -> torch.Tensor:
    """Windows that tile the input (stride = kernel, no padding, nothing dropped): every input
    position lies in exactly one window, so the backward copies each output's ``grad / divisor``
    over its ``k_1 x ... x k_d`` tile: a broadcast and a reshape, where the window matrices take a
    matmul and two transposes per axis. compile=True fuses the broadcast into its readers:
    DenseNet-121 (three 2x2 transition pools) explained a batch of 8 in 435-442 ms instead of
    491-511 ms on this machine's CPU; onnxruntime runs either spelling in the same time (its
    Expand costs what the Transposes did).
    """
    lead, outputs = grad.shape[: grad.dim() - len(kernel)], grad.shape[grad.dim() - len(kernel):]
    tiles = grad.reshape(*lead, *(size for o in outputs for size in (o, 1)))
    spread = tiles.expand(*lead, *(size for o, k in zip(outputs, kernel) for size in (o, k)))
    return spread.reshape(*lead, *(o * k for o, k in zip(outputs, kernel))) / divisor


def _adaptive_avg_pool_backward(spatial, grad, x):
    """``_adaptive_avg_poolNd_backward``: windows ``[floor(o*S/O), ceil((o+1)*S/O))``, mean weights."""
    matrices = []
    for axis in range(spatial):
        size, outputs = x.shape[axis - spatial], grad.shape[axis - spatial]
        index = torch.arange(outputs, device=grad.device)
        start = torch.div(index * size, outputs, rounding_mode="floor")
        end = torch.div((index + 1) * size + outputs - 1, outputs, rounding_mode="floor")
        matrices.append(_window_matrix(start, end, size, 1.0 / (end - start).to(grad.dtype)))
    return _apply_per_axis(grad, matrices)


def _max_pool_backward(spatial, grad, x, kernel_size, stride, padding, dilation, ceil_mode, indices):
    """``max_poolNd_with_indices_backward``: scatter-add each output's signal to its argmax."""
    flat_grad, flat_indices = grad.flatten(-spatial), indices.flatten(-spatial)
    zeros = torch.zeros(*x.shape[:-spatial], x.shape[-spatial:].numel(), dtype=grad.dtype, device=grad.device)
    return zeros.scatter_add(-1, flat_indices, flat_grad).view(x.shape)


def _convolution_backward(grad, x, weight, bias_sizes, stride, padding, dilation, transposed,
                          output_padding, groups, output_mask):
    """The input part of ``convolution_backward`` (a plain-gradient conv) as one convolution.

    Only the signal to the input is needed: parameters never require grad while tracing.
    """
    if output_mask[1] or output_mask[2]:
        return NotImplemented
    if transposed:
        grad_x = aten.convolution(grad, weight, None, stride, padding, dilation, False, [0] * len(stride), groups)
    else:
        extra = [
            size - ((out - 1) * s - 2 * p + d * (k - 1) + 1)
            for size, out, k, s, p, d in zip(
                x.shape[2:], grad.shape[2:], weight.shape[2:], stride, padding, dilation
            )
        ]
        grad_x = aten.convolution(grad, weight, None, stride, padding, dilation, True, extra, groups)
    return grad_x, None, None


def _backward_decompositions() -> dict:
    from torch._decomp import decomposition_table

    table = {op: fn for op, fn in decomposition_table.items() if "backward" in op.name()}
    for spatial in (2, 3):
        table[getattr(aten, f"avg_pool{spatial}d_backward").default] = partial(_avg_pool_backward, spatial)
        table[getattr(aten, f"_adaptive_avg_pool{spatial}d_backward").default] = partial(
            _adaptive_avg_pool_backward, spatial
        )
        table[getattr(aten, f"max_pool{spatial}d_with_indices_backward").default] = partial(
            _max_pool_backward, spatial
        )
    table[aten.convolution_backward.default] = _convolution_backward
    return table


DECOMPOSITIONS = _backward_decompositions()
"""Decomposition table for :func:`make_fx`: every backward kernel torch can decompose, plus ours
for average, adaptive average and max pooling and the input gradient of a plain convolution."""


# ---------------------------------------------------------------------------------------------
# Tracing


def _example_shape(explainer, example_input) -> tuple[int, ...]:
    if example_input is not None:
        if not isinstance(example_input, torch.Tensor):
            raise TypeError(f"example_input must be a torch.Tensor, got {type(example_input).__name__}")
        if explainer.spatial_size is not None and tuple(example_input.shape[2:]) != tuple(explainer.spatial_size):
            raise ValueError(
                f"example_input has spatial size {tuple(example_input.shape[2:])} but the explainer was "
                f"traced by torch.export for {tuple(explainer.spatial_size)}"
            )
        return tuple(example_input.shape)
    channels, ndim = explainer.input_channels, explainer.input_ndim
    if channels is None or ndim is None:
        raise TSGBError(
            "explicit() cannot tell this model's input shape (no convolution reads the image): "
            "pass example_input=torch.randn(N, C, H, W)"
        )
    spatial = explainer.spatial_size or (DEFAULT_SPATIAL,) * (ndim - 2)
    return (2, channels, *spatial)


def _model_tensors(graph_module: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Every parameter, buffer and tensor constant the graph reads, by dotted path."""
    tensors = dict(graph_module.named_parameters())
    tensors.update(graph_module.named_buffers())
    for node in graph_module.graph.nodes:
        if node.op == "get_attr" and node.target not in tensors:
            value = _get_attr(graph_module, str(node.target))
            if isinstance(value, torch.Tensor):
                tensors[str(node.target)] = value
    return tensors


def _get_attr(module: nn.Module, path: str):
    value = module
    for part in path.split("."):
        value = getattr(value, part)
    return value


def _explanation(graph_module: fx.GraphModule, names: list[str], times_input: bool, with_attribution: bool):
    """The function make_fx traces: (tensors, image, target) -> (logits, saliency[, attribution]).

    ``times_input`` is the explainer's: the attribution is ``signal * image`` or the signal
    itself, exactly as :meth:`tsgb_fx.Explainer.forward` forms it, so the two maps agree.
    """

    def explain(state, image, target):
        with torch.enable_grad():
            image = image.detach().requires_grad_(True)
            logits = torch.func.functional_call(graph_module, dict(zip(names, state)), (image,))
            chosen = torch.where(target < 0, logits.detach().argmax(dim=1), target)
            classes = torch.arange(logits.shape[1], device=logits.device)
            one_hot = (classes == chosen.unsqueeze(1)).to(logits.dtype)
            (signal,) = torch.autograd.grad(logits, image, grad_outputs=one_hot)
        attribution = signal * image if times_input else signal
        saliency = attribution.sum(dim=1, keepdim=True)
        if with_attribution:
            return logits.detach(), saliency.detach(), attribution.detach()
        return logits.detach(), saliency.detach()

    return explain


def _trace(graph_module: fx.GraphModule, tensors: dict[str, torch.Tensor], shape, dtype, device,
           times_input: bool = True, with_attribution: bool = False) -> fx.GraphModule:
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    mode = FakeTensorMode(shape_env=ShapeEnv())
    batch_only = [DimDynamic.DYNAMIC] + [DimDynamic.STATIC] * (len(shape) - 1)
    # The example batch is 2: a batch of 1 would be specialised (size-1 dims broadcast).
    image = mode.from_tensor(
        torch.empty((max(shape[0], 2), *shape[1:]), dtype=dtype, device=device),
        source=ConstantSource("image"),
        symbolic_context=StatelessSymbolicContext(dynamic_sizes=batch_only),
    )
    target = mode.from_tensor(
        torch.zeros(max(shape[0], 2), dtype=torch.long, device=device),
        source=ConstantSource("target"),
        symbolic_context=StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC]),
    )
    state = [mode.from_tensor(tensor.detach(), static_shapes=True) for tensor in tensors.values()]
    explain = _explanation(graph_module, list(tensors), times_input, with_attribution)
    return make_fx(explain, decomposition_table=DECOMPOSITIONS, tracing_mode="symbolic")(state, image, target)


def _finish(traced: fx.GraphModule, tensors: dict[str, torch.Tensor], shape) -> fx.GraphModule:
    """Parameters become buffers of a fresh root; inputs are named; shapes are checked."""
    graph = traced.graph
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    state_nodes, image, target = placeholders[:-2], placeholders[-2], placeholders[-1]
    used = {name for name, _ in traced.named_children()} | set(traced.__dict__)
    for node, (path, tensor) in zip(state_nodes, tensors.items()):
        name = _buffer_name(path, used)
        traced.register_buffer(name, tensor.detach())
        with graph.inserting_before(node):
            attribute = graph.get_attr(name)
        attribute.meta = dict(node.meta)
        node.replace_all_uses_with(attribute)
        graph.erase_node(node)
    graph._codegen = fx.graph.CodeGen()  # plain forward(image, target), not make_fx's pytree wrapper
    output = next(node for node in graph.nodes if node.op == "output")
    output.args = (tuple(output.args[0]),)
    for node, name in ((image, "image"), (target, "target")):
        node.target = name
        node.name = name
    for node in list(graph.nodes):  # nothing requires grad at run time: detach is a no-op
        if node.op == "call_function" and node.target in (aten.detach.default, aten.alias.default):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    _insert_shape_checks(graph, image, target, shape)
    graph.eliminate_dead_code()
    graph.lint()
    module = fx.GraphModule(traced, graph, class_name="ExplicitExplainer")  # copies what get_attr reads
    _check_plain(module)
    return module


def _buffer_name(path: str, used: set[str]) -> str:
    base = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in path) or "tensor"
    if base[0].isdigit():
        base = "_" + base
    name, index = base, 1
    while name in used:
        name, index = f"{base}_{index}", index + 1
    used.add(name)
    return name


def _insert_shape_checks(graph: fx.Graph, image: fx.Node, target: fx.Node, shape) -> None:
    """``_assert_scalar`` nodes: the image's fixed dims and the target's length."""
    anchor = target.next
    expected = f"(N, {', '.join(map(str, shape[1:]))})"
    checks = [(image, axis, size, f"image must have shape {expected}: dim {axis} differs") for axis, size in enumerate(shape) if axis > 0]
    with graph.inserting_before(anchor):
        for node, axis, size, message in checks:
            dim = graph.call_function(aten.sym_size.int, (node, axis))
            ok = graph.call_function(operator.eq, (dim, size))
            graph.call_function(aten._assert_scalar.default, (ok, message))
        batch = graph.call_function(aten.sym_size.int, (image, 0))
        length = graph.call_function(aten.sym_size.int, (target, 0))
        same = graph.call_function(operator.eq, (batch, length))
        graph.call_function(aten._assert_scalar.default, (same, "target must have one entry per image (shape (N,))"))


def _check_plain(module: fx.GraphModule) -> None:
    left = sorted({
        str(node.target)
        for node in module.graph.nodes
        if node.op == "call_function" and "backward" in str(node.target)
    })
    if left:
        raise TSGBError(
            f"the explicit graph still holds backward kernels without a decomposition: {', '.join(left)}. "
            f"Add one to tsgb_fx.explicit.DECOMPOSITIONS."
        )


def explicit_module(explainer, example_input: torch.Tensor | None = None,
                    with_attribution: bool = False) -> fx.GraphModule:
    """Trace ``explainer``'s forward plus rule backward into one plain fx graph.

    Returns an ``fx.GraphModule`` with ``forward(image, target) -> (logits, saliency)``:
    ``image`` (N, C, *S) of the explainer's dtype, ``target`` (N,) int64 with ``target < 0``
    meaning each image's top-1 class; ``logits`` (N, K), ``saliency`` (N, 1, *S), the channel
    sum of the explainer's attribution (signal x image, or the signal for ``gradient``,
    ``guided_backprop``, ``deconvnet``: ``explainer.times_input``). The batch N is
    symbolic; C and S are those of ``example_input`` (only its shape is used), else of the
    explainer's export trace, else C from the first convolution and a 224 spatial size. The graph
    holds ATen ops only (no autograd at run time, so it runs under ``torch.inference_mode()``),
    exports with ``torch.export`` (batch dynamic) and compiles with ``torch.compile``.
    ``with_attribution`` adds a third output, the attribution (N, C, *S) itself (what
    ``compile=True`` explainers return; the exported formats keep the two outputs).

    Example::

        g = tsgb_fx.explainer(model).explicit(example_input=torch.randn(1, 3, 224, 224))
        with torch.inference_mode():
            logits, saliency = g(images, torch.full((len(images),), -1))
    """
    graph_module = explainer.graph_module
    shape = _example_shape(explainer, example_input)
    reference = explainer._reference_tensor()
    dtype = example_input.dtype if example_input is not None else (
        reference.dtype if reference is not None else torch.float32
    )
    device = reference.device if reference is not None else torch.device("cpu")
    tensors = _model_tensors(graph_module)
    with torch.inference_mode(False):
        traced = _trace(graph_module, tensors, shape, dtype, device, explainer.times_input, with_attribution)
    module = _finish(traced, tensors, shape)
    module.meta["tsgb_fx"] = {
        "method": explainer.method,
        "options": dict(explainer.options),
        "times_input": bool(explainer.times_input),
        "input_shape": tuple(int(size) for size in shape[1:]),
        "tracer": explainer.tracer,
    }
    return module


def export_program(module: fx.GraphModule, example_input: torch.Tensor | None = None,
                   dynamic_batch: bool = True) -> torch.export.ExportedProgram:
    """``torch.export`` an explicit module with a dynamic batch; save it with ``torch.export.save``."""
    from torch.export import Dim

    shape = module.meta.get("tsgb_fx", {}).get("input_shape")
    if example_input is None:
        if shape is None:
            raise ValueError("pass example_input=torch.randn(N, C, H, W)")
        buffer = next(iter(module.buffers()), None)
        example_input = torch.randn(
            2, *shape,
            dtype=buffer.dtype if buffer is not None and buffer.is_floating_point() else torch.float32,
            device=buffer.device if buffer is not None else "cpu",
        )
    if dynamic_batch and example_input.shape[0] < 2:  # torch.export specialises a batch of 1
        example_input = example_input.expand(2, *example_input.shape[1:])
    target = torch.full((example_input.shape[0],), -1, dtype=torch.long, device=example_input.device)
    dynamic = None
    if dynamic_batch:
        batch = Dim("batch")
        dynamic = {"image": {0: batch}, "target": {0: batch}}
    with torch.inference_mode(False):
        return torch.export.export(module, (example_input, target), dynamic_shapes=dynamic)
