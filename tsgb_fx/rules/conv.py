"""TSGB-Conv: carry the signal through a convolution without its learned weights.

For a convolution with input ``x`` (N, C_in, *S_in) and output ``y`` (N, C_out, *S_out) that
receives the signal ``g`` at ``y`` (TSGB.md, "TSGB-Conv")::

    c   = sum_{output channels} g * y                       relevance per output position
    z   = Box(sum_{input channels} |x|)                     input mass per receptive field
    r   = c / (z + eps)
    g_x = sign(x) * BoxT(r)                                 broadcast over input channels

``Box`` is a convolution with an all-ones kernel of the layer's size, stride, padding and
dilation; ``BoxT`` its transpose. Hence ``g_x * x = |x| * BoxT(r)``: each output position's
relevance ``c`` is split over its receptive field in proportion to ``|x|`` and, wherever
``z > 0``, conserved. Where ``z == 0`` every ``x`` in the window is 0, so ``sign(x)`` zeroes
whatever ``r`` spreads there: ``eps`` only keeps the division finite and never changes a map
where ``z`` is far above it (ordinary inputs).

``conv_groups="reference"`` sums over all channels whatever the layer's groups, as the
authors' code does. ``conv_groups="layer"`` keeps the layer's connectivity: the four steps run
per group (identical for ``groups == 1``).

Padding modes other than zeros and asymmetric or ``'same'`` padding never reach this rule: the
rewrite turns them into an explicit ``F.pad`` (plain autograd) followed by a convolution with
symmetric zero padding, which is exactly the geometry ``Box`` needs.
"""

from __future__ import annotations

from functools import lru_cache, partial

import torch
import torch.nn.functional as F

from .batchnorm import inference_batch_norm
from .box import WindowGeometry, box, box_transpose, per_axis
from .conv_bn import folded_conv_parameters, worth_folding
from .rectify import NOTHING_FOLDED, RectifierFold
from .silu import SiLUFold
from .tracing import is_traced

EPS = 1e-10
CHUNK_ELEMENTS = 1 << 20  # 4 MB of float32: products larger than this are summed in batch chunks
CONV_GROUPS = ("reference", "layer")

CONV_BY_NDIM = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def tsgb_conv_backward(
    x: torch.Tensor,
    y: torch.Tensor,
    g: torch.Tensor,
    geometry: WindowGeometry,
    groups: int,
    conv_groups: str,
    input_rectified: bool = False,
    output_fold=NOTHING_FOLDED,
    live: torch.Tensor | None = None,
    input_sign_upstream: bool = False,
    output_relevance: bool = False,
) -> torch.Tensor:
    """The signal TSGB-Conv sends to ``x``, a pure function of (x, y, g) and the geometry.

    ``y`` is the op's saved output (before a folded SiLU). Where the rewrite folded ops into
    this one, the relevance at the output is ``g * carrier(y) * live`` rather than ``g * y``:
    ``carrier`` undoes the activation folded in as ``output_fold`` (a
    :class:`~tsgb_fx.rules.rectify.RectifierFold` or a :class:`~tsgb_fx.rules.silu.SiLUFold`)
    and ``live`` is the batch-norm fold's mask of nonzero convolution outputs (:func:`tsgb_conv`).

    ``input_rectified``: ``x`` is the output of a rectifier (ReLU, ReLU6) that keeps its plain
    gradient. Then ``|x| = x``, and ``sign(x)`` is 1 except where ``x == 0``, exactly where the
    rectifier's own backward zeroes the signal anyway; so ``BoxT(r)`` is sent as a broadcast view,
    saving three passes over ``x`` (``abs``, ``sign``, the product) with the same map.

    ``input_sign_upstream``: ``x`` is a folded SiLU's output read by this op alone, and that op
    multiplies by ``sign(x)`` itself (:mod:`tsgb_fx.rules.silu`); ``BoxT(r)`` is sent unsigned.

    ``output_relevance``: the op's readers send the relevance ``g * y`` itself
    (:mod:`tsgb_fx.rules.relevance`), so ``g`` here already is that product (no activation is
    folded in then).
    """
    rule_groups = groups if conv_groups == "layer" else 1
    if output_relevance:  # c = sum_channels(g * live), g being the relevance R
        relevance = group_sums(g, rule_groups) if live is None else channel_sums(torch.mul, (g, live), rule_groups)
    else:
        relevance = relevance_sums(g, y, output_fold, live, rule_groups)  # c: (N, G, *S_out)
    if input_rectified:  # sum |x|: (N, G, *S_in); vector_norm is ~5x slower than abs then sum
        mass = group_sums(x, rule_groups)
    else:
        mass = channel_sums(torch.abs, (x,), rule_groups)
    ratio = relevance / (box(mass, geometry) + EPS)  # r = c / (z + eps)
    spread = box_transpose(ratio, geometry, x.shape[2:])  # BoxT(r): (N, G, *S_in)
    if input_rectified or input_sign_upstream:  # sign(x) is 1 where it matters, or applied upstream
        if rule_groups == 1:
            return spread.expand_as(x)
        return spread.repeat_interleave(x.shape[1] // rule_groups, dim=1)
    return x.sign().unflatten(1, (rule_groups, -1)).mul_(spread.unsqueeze(2)).flatten(1, 2)


def relevance_sums(g, y, output_fold, live, groups: int) -> torch.Tensor:
    """``c = sum over each group's output channels of g * carrier(y) * live``: (N, groups, *S).

    A ``g`` that is one map broadcast over the channels (stride 0: what a rectified TSGB-Conv
    sends back) gives ``c = g * sum_channels(carrier(y) * live)``: a sum instead of a
    full-size product. The carrier and the mask are formed inside :func:`channel_sums`, so in
    eager mode they never make a full-size temporary either.
    """
    broadcast = g.stride(1) == 0
    if broadcast and live is None and output_fold.carries_output:
        return g.narrow(1, 0, 1) * group_sums(y, groups)  # the carrier is y itself: nothing to form
    tensors = (y, live, None if broadcast else g)
    sums = channel_sums(partial(_unit_relevance, output_fold=output_fold), tensors, groups)
    return g.narrow(1, 0, 1) * sums if broadcast else sums


def _unit_relevance(y, live, g, output_fold):
    """``carrier(y) * live * g`` (each factor only where given), as a fresh tensor."""
    weight = output_fold.carrier(y)
    fresh = weight is not y
    for factor in (live, g):
        if factor is not None:
            weight = weight.mul_(factor) if fresh else weight * factor
            fresh = True
    return weight


def channel_sums(term, tensors: tuple[torch.Tensor, ...], groups: int) -> torch.Tensor:
    """``sum over the channels of each group of term(*tensors)``: (N, C, *S) -> (N, groups, *S).

    ``term`` is elementwise (``torch.abs`` for ``|x|``, :func:`_unit_relevance` for ``g * y``;
    a ``None`` among ``tensors`` is passed on as it is). In eager
    mode on a CPU a term bigger than :data:`CHUNK_ELEMENTS` is formed a few images at a time: the
    full-size temporary only feeds a channel sum, and allocating one of tens of megabytes costs
    several times the arithmetic there (fresh pages on every call); chunks stay in the
    allocator's cache. CUDA's caching allocator reuses blocks anyway, and there each chunk would
    cost kernel launches, which bound an eager explanation on a GPU. Traced (symbolic batch), it
    is the one plain expression.
    """
    if tensors[0].device.type == "cpu" and not is_traced(tensors[0]):
        batch = tensors[0].shape[0]
        per_chunk = max(1, CHUNK_ELEMENTS * batch // max(1, tensors[0].numel()))
        if per_chunk < batch:
            starts = range(0, batch, per_chunk)
            chunks = [term(*(None if t is None else t[start : start + per_chunk] for t in tensors)) for start in starts]
            return torch.cat([group_sums(chunk, groups) for chunk in chunks])
    return group_sums(term(*tensors), groups)


def group_sums(t: torch.Tensor, groups: int) -> torch.Tensor:
    """Sum over the channels of each group: (N, C, *S) -> (N, groups, *S)."""
    return t.sum(1, keepdim=True) if groups == 1 else t.unflatten(1, (groups, -1)).sum(2)


class TSGBConvFunction(torch.autograd.Function):
    """Ordinary convolution forward; TSGB-Conv backward to the input, nothing to the weights.

    ``batch_norm``: the arguments of a ratio-rule batch norm folded in after the convolution
    (see :func:`tsgb_conv`); ``output_fold`` an activation folded in after that: a
    :class:`~tsgb_fx.rules.rectify.RectifierFold` or a :class:`~tsgb_fx.rules.silu.SiLUFold`.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, geometry, groups, conv_groups, input_rectified, batch_norm, output_fold,
                input_sign_upstream, output_relevance):
        y, live = _convolve_and_normalise(x, weight, bias, geometry, groups, batch_norm,
                                          masked=batch_norm is not None and groups > 1 and conv_groups == "reference")
        out, kept = output_fold.apply(y)
        ctx.save_for_backward(x, None if output_relevance else kept, live)
        ctx.output_fold = output_fold
        ctx.output_relevance = output_relevance
        ctx.input_sign_upstream = input_sign_upstream
        ctx.geometry = geometry
        ctx.groups = groups
        ctx.conv_groups = conv_groups
        ctx.input_rectified = input_rectified
        return out

    @staticmethod
    def backward(ctx, g):
        x, y, live = ctx.saved_tensors
        g_x = None
        if ctx.needs_input_grad[0]:
            g_x = tsgb_conv_backward(
                x, y, g, ctx.geometry, ctx.groups, ctx.conv_groups, ctx.input_rectified, ctx.output_fold, live,
                ctx.input_sign_upstream, ctx.output_relevance,
            )
        return g_x, None, None, None, None, None, None, None, None, None, None


def _convolve_and_normalise(x, weight, bias, geometry, groups, batch_norm, masked):
    """The op's forward up to its output fold: ``(bn(conv(x)), live)``, ``live`` the mask of the
    convolution's nonzero outputs where ``masked`` (see :func:`tsgb_conv`), else None.

    Eagerly, a batch norm with running statistics is folded into the convolution's weights where
    that pays (:mod:`tsgb_fx.rules.conv_bn`): one convolution instead of a convolution and a full
    pass. With the mask the folded bias is added after it, as the mask is of the convolution's
    own output; a convolution with a bias of its own then keeps the two ops. Traced graphs keep
    the two ops, which runtimes fold themselves.
    """
    convolve = partial(CONV_BY_NDIM[x.dim() - 2], stride=geometry.stride, padding=geometry.padding,
                       dilation=geometry.dilation, groups=groups)
    if batch_norm is None:
        return convolve(x, weight, bias), None
    if (not is_traced(x) and not (masked and bias is not None)
            and worth_folding(weight, batch_norm, geometry, x.shape[2:])):
        weight, folded_bias = folded_conv_parameters(weight, bias, batch_norm)
        if not masked:
            return convolve(x, weight, folded_bias), None
        y = convolve(x, weight, None)
        live = nonzero_mask(y)
        return y.add_(folded_bias.reshape(-1, *(1,) * (y.dim() - 2))), live
    y = convolve(x, weight, bias)
    live = nonzero_mask(y) if masked else None
    return inference_batch_norm(y, *batch_norm), live


def nonzero_mask(y: torch.Tensor) -> torch.Tensor:
    """1.0 where ``y != 0``, else 0.0, in ``y``'s dtype: a mask that is applied by ``mul_``.

    Eagerly ``sign(y).abs_()``: with the product it takes 0.4 ms where ``eq`` then ``where``
    took 1.7 ms (96x112x112 floats, CPU). Traced, a compare and a cast: onnxruntime's ``Sign``
    kernel is scalar, several times slower than ``Greater`` plus ``Cast``.
    """
    if is_traced(y):
        return (y != 0).to(y.dtype)
    return y.sign().abs_()


@lru_cache(maxsize=1024)
def layer_geometry(kernel_size, stride, padding, dilation, padding_mode):
    """``(window, pad)`` for one layer's arguments: its :class:`WindowGeometry` with symmetric zero
    padding, and the explicit ``F.pad`` arguments ``(amounts, mode)`` it needs first, or None.

    'same'/'valid', asymmetric and non-zero padding become an explicit pad (PyTorch's 'same'
    puts the odd extra row on the right; a non-zero ``padding_mode`` pads with that mode and
    convolves without padding); the pad keeps its plain gradient. A pure function of hashable
    arguments, memoised: every call of a layer asks again, and the window's cached properties
    then carry over from call to call.
    """
    ndim = len(kernel_size)
    stride, dilation = per_axis(stride, ndim), per_axis(dilation, ndim)
    pad = None
    if padding == "valid":
        padding = (0,) * ndim
    elif padding == "same":
        total = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
        padding = tuple(t // 2 for t in total)
        if not all(t % 2 == 0 for t in total) or padding_mode != "zeros":
            pad = [(low, t - low) for low, t in zip(padding, total)]
    else:
        padding = per_axis(padding, ndim)
        if padding_mode != "zeros":
            pad = [(p, p) for p in padding]
    if pad is not None:
        amounts = tuple(amount for pair in reversed(pad) for amount in pair)  # F.pad: last axis first
        pad = (amounts, "constant" if padding_mode == "zeros" else padding_mode)
        padding = (0,) * ndim
    return WindowGeometry(tuple(kernel_size), stride, padding, dilation), pad


@lru_cache(maxsize=None)
def _output_fold(clamp, activation, unsigned):
    """The fold object for the rewrite's plain arguments (:data:`NOTHING_FOLDED` for none);
    memoised, as every call of a layer asks again."""
    if activation == "silu":
        return SiLUFold(bool(unsigned))
    return NOTHING_FOLDED if clamp is None else RectifierFold(clamp)


def _hashable(value):
    return tuple(value) if isinstance(value, list) else value


def tsgb_conv(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros",
              conv_groups="reference", input_rectified=False, batch_norm=None, output_clamp=None,
              output_activation=None, activation_unsigned=False, input_sign_upstream=False, output_relevance=False):
    """``F.convNd(x, weight, bias, stride, padding, dilation, groups)`` with the TSGB-Conv backward.

    Takes every spelling the rewrite meets: ints or per-axis sequences, ``padding='same'`` or
    ``'valid'``, and a module's ``padding_mode``. ``input_rectified`` is set by the rewrite when
    ``x`` comes straight from a plain-gradient rectifier (see :func:`tsgb_conv_backward`); an
    explicit pad in between makes it moot, so it is then dropped.

    ``batch_norm``: ``(running_mean, running_var, weight, bias, eps)`` of the batch norm that is
    this convolution's only user, folded in by the rewrite when that batch norm has the ratio
    rule. The ratio rule passes the relevance through unchanged (``g_x * x = g * y``, TSGB.md),
    and TSGB-Conv reads the signal at its output only through the relevance
    ``c = sum_channels(g * y)``; so the pair's signal to ``x`` is TSGB-Conv's with ``g * y``
    taken at the batch norm's output, and the ratio rule's division is never computed.

    Where the convolution's output is exactly 0 the stabilised division sends ``g * y / eps``,
    which TSGB-Conv multiplies by that 0: the relevance stops. Outside cancellation that means
    an all-zero window, and where the rule sums ``|x|`` over the same channels the convolution
    reads (``groups == 1``, or ``conv_groups="layer"``) its ``z`` is then 0 too and TSGB-Conv
    stops the relevance by itself (``sign(x) = 0`` on that window). A grouped or depthwise
    convolution with ``conv_groups="reference"`` sums other channels into ``z``, so there the
    fold keeps a mask of the nonzero outputs (``live``) and stops them itself. (They are common: a
    depthwise channel over dead ReLU6 units. Unmasked, the batch norm's shift there carried
    relevance into other channels and EfficientNet-Lite0's map of the cat photo grew 3.5-fold.)
    Equal to the two rules one after the other wherever ``|y_conv| >= eps``.

    ``output_clamp``: the rewrite folded the plain ReLU/ReLU6 that follows into this op
    (:mod:`tsgb_fx.rules.rectify`). ``output_activation="silu"``: it folded the plain SiLU that
    follows, and ``activation_unsigned``: that SiLU's only reader is a TSGB-Conv that leaves
    ``sign`` to this op, which it does with ``input_sign_upstream`` (:mod:`tsgb_fx.rules.silu`).

    ``output_relevance``: every reader of the output sends the relevance ``g * y`` rather than the
    signal (:mod:`tsgb_fx.rules.relevance`); the op then reads it as it arrives.
    """
    if output_activation not in (None, "silu"):
        raise ValueError(f"output_activation must be None or 'silu', got {output_activation!r}")
    clamp = None if output_clamp is None else tuple(output_clamp)
    output_fold = _output_fold(clamp, output_activation, activation_unsigned)
    if output_relevance and output_fold is not NOTHING_FOLDED:
        raise ValueError(
            "output_relevance takes no folded activation (a ReLU's zeros would keep relevance that its "
            f"backward drops); got output_clamp={output_clamp!r}, output_activation={output_activation!r}"
        )
    window, pad = layer_geometry(
        tuple(weight.shape[2:]), _hashable(stride), _hashable(padding), _hashable(dilation), padding_mode
    )
    if pad is not None:
        x = F.pad(x, pad[0], mode=pad[1])
    rectified = input_rectified and pad is None
    return TSGBConvFunction.apply(
        x, weight, bias, window, groups, conv_groups, rectified, batch_norm, output_fold, input_sign_upstream,
        output_relevance,
    )
