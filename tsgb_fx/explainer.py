"""The explainer: trace once, rewrite once, explain many batches.

``explainer(model)`` returns an :class:`Explainer`, an ``nn.Module`` holding the rewritten graph.
A call runs one forward and one ``torch.autograd.grad`` from the one-hot target at the logits to
the image; autograd is untouched everywhere except at the rule nodes, whose backward is the
method's rule (TSGB.md). The map is ``attribution = signal_at_input * input`` (or the signal
itself for methods whose attribution is a gradient: ``gradient``, ``guided_backprop``,
``deconvnet``) and ``saliency = attribution.sum(channels)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import fx, nn

from .compiled import CompiledGraphs
from .methods import Method, Rule, resolve_method
from .outputs import OutputSelector, select_output
from .ops import OpSite, find_op_sites
from .pooling import route_max_pools
from .rewrite import RuleSite, rewrite
from .trace import trace


@dataclass(frozen=True)
class Explanation:
    """The result of one explainer call; every tensor is detached.

    ``saliency``: (N, 1, *S), or (N, T, *S) for (N, T) targets; the channel sum of ``attribution``.
    ``attribution``: (N, C, *S), or (N, T, C, *S); the method's attribution: the signal at the
    input times the input (``tsgb``, ``grad_x_input``) or the signal itself (``gradient``,
    ``guided_backprop``, ``deconvnet``); see ``Explainer.times_input``.
    ``logits``: (N, K), the model's output for the batch (up to rounding: eagerly, some batch norms
    run folded into the convolution before them, :mod:`tsgb_fx.rules.conv_bn`).
    ``target``: (N,) or (N, T), the explained classes (long).
    """

    saliency: torch.Tensor
    attribution: torch.Tensor
    logits: torch.Tensor
    target: torch.Tensor


class Explainer(nn.Module):
    """A model rewritten once for a saliency method; call it on image batches.

    ``e(x)`` explains each image's top-1 class; ``e(x, target=k)`` one class for all images;
    ``e(x, target=t)`` with ``t`` of length N one class per image; ``e(x, target=tt)`` with ``tt``
    of shape (N, T) (a tensor or N lists of T ints) T classes per image in one batched pass (the
    batch is repeated T times).

    Eval-mode semantics, whatever mode the model is in: batch norm uses its running statistics and
    dropout is off. The model is never modified: the explainer holds a shadow of its module tree
    that shares the parameter and buffer tensors (not copies), so later weight updates are seen,
    and ``e.to(device)`` moves those shared tensors as it would for any wrapper module. Only the
    input receives a backward signal; no weight gradient is computed and nothing writes ``.grad``.

    Memory format: a batch is explained in the layout it comes in. A ``torch.channels_last`` batch
    runs oneDNN's NHWC convolutions on a CPU, and the rules keep that layout; at batch 8 that made
    explanations 5-26% quicker here in two runs (README, Speed), for the same maps up to float rounding.

    Thread safety: a call keeps its state in local variables and autograd contexts only (the
    rule Functions store nothing on modules or globals), so one explainer may serve several
    threads at once and gives the same maps as sequential calls. Changing the model's weights
    while calls run is, as for the model itself, the caller's business.

    ``e.rules`` maps each recognised node to its :class:`~tsgb_fx.rewrite.RuleSite` (kind, rule,
    module); ``e.graph_module`` is the rewritten ``torch.fx.GraphModule``. Built with
    ``compile=True``, calls run the compiled explicit graph instead (``e.compiled_graphs``, one
    per input size, dtype and device; :mod:`tsgb_fx.compiled`) with the same results.
    """

    def __init__(
        self,
        graph_module: fx.GraphModule,
        rules: dict[str, RuleSite],
        *,
        method: str,
        options: Mapping[str, object],
        tracer: str,
        input_channels: int | None,
        input_ndim: int | None,
        spatial_size: tuple[int, ...] | None = None,
        times_input: bool = True,
        compiled: bool = False,
    ):
        super().__init__()
        self.graph_module = graph_module
        self.rules = rules
        self.method = method
        self.options = dict(options)
        self.tracer = tracer
        self.input_channels = input_channels
        self.input_ndim = input_ndim
        self.spatial_size = spatial_size
        self.times_input = times_input  # attribution = signal * input, else the signal itself
        self.compiled_graphs = CompiledGraphs() if compiled else None  # see tsgb_fx.compiled

    def __repr__(self) -> str:  # the graph module's children would fill a screen
        return f"Explainer({self.extra_repr()})"

    def extra_repr(self) -> str:
        counts: dict[str, int] = {}
        for site in self.rules.values():
            counts[site.rule] = counts.get(site.rule, 0) + 1
        summary = ", ".join(f"{rule}: {count}" for rule, count in counts.items())
        compiled = ", compile=True" if self.compiled_graphs is not None else ""
        return f"method={self.method!r}, tracer={self.tracer!r}{compiled}, rules={{{summary}}}"

    def _apply(self, fn, *args, **kwargs):
        """``.to()``, ``.double()``, ...: compiled graphs captured the old tensors, so drop them."""
        if self.compiled_graphs is not None:
            self.compiled_graphs.clear()
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x: torch.Tensor, target=None) -> Explanation:
        self._check_input(x)
        batch = x.shape[0]
        targets = _normalise_target(target, batch, x.device)
        per_image = 1 if targets is None or targets.dim() == 1 else targets.shape[1]
        if self.compiled_graphs is not None:
            logits, attribution, targets = self._explain_compiled(x, targets, per_image)
        else:
            logits, attribution, targets = self._explain_eager(x, targets, per_image)
        if targets.dim() == 2:
            attribution = attribution.unflatten(0, (batch, per_image))
            saliency = attribution.sum(dim=2)
            logits = logits[::per_image]
        else:
            saliency = attribution.sum(dim=1, keepdim=True)
        return Explanation(saliency, attribution, logits, targets)

    def _explain_eager(self, x, targets, per_image):
        """One forward and one ``autograd.grad`` through the rule Functions: (logits, attribution, targets)."""
        with torch.inference_mode(False), torch.enable_grad():
            image = x.detach()
            if image.is_inference():
                image = image.clone()
            if per_image > 1:
                image = image.repeat_interleave(per_image, dim=0)
            image.requires_grad_(True)
            logits = self.graph_module(image)
            self._check_logits(logits, image.shape[0])
            if targets is None:
                targets = logits.detach().argmax(dim=1)
            _check_target_range(targets, logits.shape[1])
            one_hot = torch.zeros_like(logits).scatter_(1, targets.reshape(-1, 1), 1.0)
            (signal,) = torch.autograd.grad(logits, image, grad_outputs=one_hot)
        attribution = (signal * image if self.times_input else signal).detach()
        return logits.detach(), attribution, targets

    def _explain_compiled(self, x, targets, per_image):
        """The compiled explicit graph (:mod:`tsgb_fx.compiled`): (logits, attribution, targets)."""
        image = x.detach().repeat_interleave(per_image, dim=0) if per_image > 1 else x.detach()
        wanted = targets.reshape(-1) if targets is not None else torch.full(
            (image.shape[0],), -1, dtype=torch.long, device=image.device
        )
        logits, attribution = self.compiled_graphs(self, image, wanted)
        self._check_logits(logits, image.shape[0])
        if targets is None:
            targets = logits.argmax(dim=1)
        _check_target_range(targets, logits.shape[1])  # the graph reads < 0 as top-1: refuse it here
        return logits, attribution, targets

    def explicit(self, example_input: torch.Tensor | None = None) -> fx.GraphModule:
        """The whole explanation as one plain graph: ``forward(image, target) -> (logits, saliency)``.

        Forward plus rule backward written out as ordinary tensor ops (no autograd at run time),
        ``target < 0`` meaning each image's top-1 class; see :mod:`tsgb_fx.explicit`. The graph
        is fixed to ``example_input``'s channels and spatial size (default: 224 per axis, or the
        size a torch.export-traced explainer was built for); the batch stays dynamic. The
        saliency is this explainer's for every method: the channel sum of signal x image, or of
        the signal itself where ``times_input`` is False (gradient, guided backprop, deconvnet).
        """
        from .explicit import explicit_module

        return explicit_module(self, example_input)

    # -- checks -----------------------------------------------------------------------------

    def _reference_tensor(self) -> torch.Tensor | None:
        for tensor in self.graph_module.parameters():
            return tensor
        for tensor in self.graph_module.buffers():
            if tensor.is_floating_point():
                return tensor
        return None

    def _check_input(self, x) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor (scaled and normalised image), got dtype {x.dtype}")
        if self.input_ndim is not None and x.dim() != self.input_ndim:
            layout = "N, C" + "".join(f", {axis}" for axis in "DHW"[3 - (self.input_ndim - 2):])
            raise ValueError(
                f"x must be {self.input_ndim}-D ({layout}) for this model, got shape {tuple(x.shape)}"
            )
        if x.dim() < 2 or x.shape[0] == 0:
            raise ValueError(f"x must be a non-empty batch (N, C, ...), got shape {tuple(x.shape)}")
        if self.input_channels is not None and x.shape[1] != self.input_channels:
            raise ValueError(
                f"x has {x.shape[1]} channels but the model's first convolution takes {self.input_channels}"
            )
        if self.spatial_size is not None and tuple(x.shape[2:]) != self.spatial_size:
            raise ValueError(
                f"x has spatial size {tuple(x.shape[2:])} but this explainer was traced by torch.export "
                f"for {self.spatial_size}: build it with example_input of the size you explain"
            )
        reference = self._reference_tensor()
        if reference is not None:
            if x.dtype != reference.dtype:
                raise TypeError(
                    f"x has dtype {x.dtype} but the model's parameters are {reference.dtype}: pass "
                    f"x.to({reference.dtype}) or convert the explainer with e.to({x.dtype})"
                )
            if x.device != reference.device:
                raise ValueError(
                    f"x is on {x.device} but the model's parameters are on {reference.device}: pass "
                    f"x.to('{reference.device}') or move the explainer with e.to('{x.device}')"
                )
        if not _all_finite(x):
            raise ValueError("x contains NaN or infinite values")

    @staticmethod
    def _check_logits(logits, rows: int) -> None:
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != rows:
            what = f"shape {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise TypeError(
                f"the model must return logits of shape (N, K); it returned {what} (for a model with "
                f"several outputs, build the explainer with output=<index, key or callable>)"
            )


def _normalise_target(target, batch: int, device) -> torch.Tensor | None:
    """None, or a long tensor of shape (N,) or (N, T); range is checked once K is known."""
    if target is None:
        return None
    if isinstance(target, bool) or (isinstance(target, torch.Tensor) and target.dtype == torch.bool):
        raise TypeError("target must be an integer class index, got a boolean")
    if isinstance(target, int):
        tensor = torch.full((batch,), target, dtype=torch.long)
    elif isinstance(target, torch.Tensor):
        if target.is_floating_point() or target.is_complex():
            raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}")
        tensor = target.detach().to(torch.long)
        if tensor.dim() == 0:
            tensor = tensor.expand(batch)
    elif isinstance(target, Iterable) and not isinstance(target, (str, bytes)):
        rows = list(target)  # ints (one class per image) or equal-length sequences of ints (N, T)
        nested = bool(rows) and all(isinstance(row, Iterable) and not isinstance(row, (str, bytes)) for row in rows)
        values = [list(row) for row in rows] if nested else rows
        flat = [v for row in values for v in row] if nested else values
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in flat):
            raise TypeError(f"target must hold integer class indices, got {rows!r}")
        if nested and len({len(row) for row in values}) != 1:
            raise ValueError(f"target rows must all have the same number of classes, got {rows!r}")
        tensor = torch.tensor(values, dtype=torch.long)
    else:
        raise TypeError(f"target must be an int, a sequence of ints or an integer tensor, got {type(target).__name__}")
    if tensor.dim() not in (1, 2):
        raise ValueError(f"target must have shape (N,) or (N, T), got {tuple(tensor.shape)}")
    if tensor.shape[0] != batch:
        raise ValueError(f"target has {tensor.shape[0]} rows but x has batch size {batch}")
    if tensor.dim() == 2 and tensor.shape[1] == 0:
        raise ValueError("target of shape (N, T) needs T >= 1")
    return tensor.to(device)


def _check_target_range(targets: torch.Tensor, classes: int) -> None:
    low, high = int(targets.min()), int(targets.max())
    if low < 0 or high >= classes:
        bad = low if low < 0 else high
        raise ValueError(f"target {bad} is out of range: the model has {classes} classes (0..{classes - 1})")


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _reads_the_input(site: OpSite) -> bool:
    """A convolution whose input is the image itself or follows from it along first arguments."""
    if site.kind != "conv":
        return False
    node = site.arguments["x"]
    while isinstance(node, fx.Node) and node.op != "placeholder":
        node = node.all_input_nodes[0] if node.all_input_nodes else None
    return isinstance(node, fx.Node)


def explainer(
    model: nn.Module,
    method: str | Method | Mapping[str, Rule | None] = "tsgb",
    conv_groups: str | None = None,
    classifier: str | None = None,
    tracer: str = "auto",
    leaf_modules: Iterable = (),
    autowrap_functions: Iterable = (),
    example_input: torch.Tensor | None = None,
    output: OutputSelector = None,
    compile: bool = False,
) -> Explainer:
    """Trace ``model`` once and rewrite it into a reusable saliency explainer.

    Args:
        model: any ``nn.Module`` mapping an image batch (N, C, *S) to logits (N, K). It is not
            modified; see :class:`Explainer` for what is shared.
        method: ``"tsgb"`` (Target-Selective Gradient Backprop, TSGB.md), ``"gradient"``,
            ``"grad_x_input"``, ``"guided_backprop"`` or ``"deconvnet"`` (:mod:`tsgb_fx.methods`);
            or your own mix: a map from op kind or module name to a :class:`~tsgb_fx.Rule` (None:
            plain gradient), module names overriding kinds, or a :class:`~tsgb_fx.Method`.
        conv_groups: TSGB only. ``"reference"`` (default) sums TSGB-Conv over all channels as the
            authors' code does; ``"layer"`` keeps each convolution's groups (differs for
            grouped/depthwise convs).
        classifier: TSGB only. ``"last"`` (default) applies TSGB-FC to the linear op that
            produces the logits (found from the graph; none for a model without one, e.g.
            SqueezeNet); ``"all"`` to every linear op.
        tracer: ``"fx"`` (torch.fx symbolic tracing, module names kept), ``"export"``
            (torch.export, for models with shape arithmetic) or ``"auto"`` (fx, then export).
        leaf_modules: module classes or qualified names that fx keeps opaque (plain gradient
            inside), as in torchvision's ``create_feature_extractor``.
        autowrap_functions: functions fx records as single calls instead of tracing into.
        example_input: an input for torch.export; by default a random (2, C, 224, 224) batch
            with C from the first convolution. The batch size stays dynamic; the explainer then
            takes inputs of the example's spatial size only.
        output: for a model that returns more than logits (a tuple, dict or named tuple with
            auxiliary outputs): the index, key or field of the logits, or a callable that takes
            the output and returns them. Applied once to the graph; the rest is dropped.
        compile: explain with ``torch.compile`` of the explicit graph (:mod:`tsgb_fx.compiled`):
            fused kernels, on a CPU with the weights frozen in, on CUDA replayed as one CUDA
            graph; at the price of a one-off compile (about a minute for ResNet-50 on a CPU) on
            the first call for each input size, dtype and device (on a CPU in float32: and batch
            size), and again after the weights change. Same maps as the eager explainer.

    Raises:
        tsgb_fx.TraceError: the model could not be traced; the message names the module or line
            and what to try.

    Example::

        e = tsgb_fx.explainer(torchvision.models.resnet18(weights=...))
        r = e(images)                   # top-1 class of each image
        r = e(images, target=[285, 967])
        r.saliency                      # (N, 1, H, W)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    chosen = resolve_method(method, conv_groups=conv_groups, classifier=classifier)
    if example_input is not None and not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a torch.Tensor, got {type(example_input).__name__}")
    traced = trace(model, tracer, leaf_modules, autowrap_functions, example_input)
    graph_module = traced.graph_module
    select_output(graph_module, output)
    first_conv = next((site for site in find_op_sites(graph_module) if _reads_the_input(site)), None)
    shape = first_conv.weight_shape if first_conv is not None else None
    groups = first_conv.arguments.get("groups") if first_conv is not None else None
    rules = rewrite(graph_module, chosen.rules)
    route_max_pools(graph_module)  # plain-gradient max pools through the faster channels-last kernel
    return Explainer(
        graph_module,
        rules,
        method=chosen.name,
        options=chosen.options,
        tracer=traced.tracer,
        spatial_size=traced.spatial_size,
        input_channels=shape[1] * groups if shape and isinstance(groups, int) else None,
        input_ndim=len(shape) if shape else None,
        times_input=chosen.times_input,
        compiled=_check_flag("compile", compile),
    )


def _all_finite(x: torch.Tensor) -> bool:
    """No NaN or infinity in ``x``, in one reduction for the usual finite input.

    A NaN or an infinity makes the sum NaN or infinite, so a finite sum proves ``x`` finite; only
    a non-finite sum (which finite values can also give, by overflow) needs the elementwise
    check, which makes several full-size temporaries (3.3 ms against 0.15 ms for 8x3x224x224).
    """
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())
