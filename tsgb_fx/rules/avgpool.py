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
    def forward(ctx, x, *pooling):  # kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override
        y = _avg_pool(x, *pooling)
        ctx.save_for_backward(x, y)
        ctx.pooling = pooling
        return y

    @staticmethod
    def backward(ctx, g):
        x, y = ctx.saved_tensors
        g_x = None
        if ctx.needs_input_grad[0]:
            g_x = divide_by_input(x, avg_pool_transpose(g * y, x, *ctx.pooling))
        return (g_x,) + (None,) * 6


def ratio_avg_pool(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                   divisor_override=None):
    """``F.avg_poolNd`` with the ratio-rule backward; ints or per-axis sequences, as PyTorch takes them."""
    ndim = x.dim() - 2
    kernel_size = per_axis(kernel_size, ndim)
    stride = kernel_size if stride is None or stride == [] or stride == () else per_axis(stride, ndim)
    return RatioAvgPoolFunction.apply(
        x, kernel_size, stride, per_axis(padding, ndim), ceil_mode, count_include_pad, divisor_override
    )
