"""Fixed-window average pooling: the ratio rule ``g_x = AvgPoolT(g * y) / x``.

``AvgPoolT`` is the ordinary backward of the pooling (TSGB.md, "Average pooling"): the
relevance ``g * y`` of every output is spread over its window with the pooling's own weights,
then divided by the input, stabilised as in :mod:`.ratio`. Adaptive pooling is not this rule;
it keeps the plain gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .box import per_axis
from .ratio import divide_by_input

aten = torch.ops.aten


def _avg_pool(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    if x.dim() == 3:  # 1-d pooling is 2-d pooling over a height of 1
        return _avg_pool(
            x.unsqueeze(-2), (1, *kernel_size), (1, *stride), (0, *padding),
            ceil_mode, count_include_pad, divisor_override,
        ).squeeze(-2)
    pool = F.avg_pool2d if x.dim() == 4 else F.avg_pool3d
    return pool(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)


def avg_pool_transpose(u, x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    """The ordinary backward of :func:`_avg_pool`: spread ``u`` over each window with its weights."""
    if x.dim() == 3:
        return avg_pool_transpose(
            u.unsqueeze(-2), x.unsqueeze(-2), (1, *kernel_size), (1, *stride), (0, *padding),
            ceil_mode, count_include_pad, divisor_override,
        ).squeeze(-2)
    backward = aten.avg_pool2d_backward if x.dim() == 4 else aten.avg_pool3d_backward
    return backward(u, x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)


class RatioAvgPoolFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pooling, output_relevance, sends_relevance):
        # pooling: kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override
        y = _avg_pool(x, *pooling)
        ctx.save_for_backward(x, None if output_relevance else y)
        ctx.pooling = pooling
        ctx.sends_relevance = sends_relevance
        return y

    @staticmethod
    def backward(ctx, g):
        x, y = ctx.saved_tensors
        g_x = None
        if ctx.needs_input_grad[0]:
            relevance = g if y is None else g * y  # with output_relevance, g arrives as g * y
            spread = avg_pool_transpose(relevance, x, *ctx.pooling)
            g_x = spread if ctx.sends_relevance else divide_by_input(x, spread)
        return g_x, None, None, None


def ratio_avg_pool(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                   divisor_override=None, output_relevance=False, sends_relevance=False):
    """``F.avg_poolNd`` with the ratio-rule backward; ints or per-axis sequences, as PyTorch takes them.

    ``output_relevance`` and ``sends_relevance``: the op's readers send it the relevance ``g * y``
    rather than the signal, and the writer of ``x`` takes the relevance ``AvgPoolT(g * y)``, which is
    then sent without the division (:mod:`tsgb_fx.rules.relevance`).
    """
    ndim = x.dim() - 2
    kernel_size = per_axis(kernel_size, ndim)
    stride = kernel_size if stride is None or stride == [] or stride == () else per_axis(stride, ndim)
    pooling = (kernel_size, stride, per_axis(padding, ndim), ceil_mode, count_include_pad, divisor_override)
    return RatioAvgPoolFunction.apply(x, pooling, output_relevance, sends_relevance)
