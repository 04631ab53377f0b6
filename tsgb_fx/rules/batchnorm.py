"""Batch norm (eval mode): the ratio rule ``g_x = g * y / x``.

The relevance ``g * y`` at the output passes to the input unchanged (TSGB.md, "BatchNorm").
The forward is always the inference form with running statistics; a layer without running
statistics (``track_running_stats=False``) normalises with the batch's own statistics, as it
does in PyTorch's eval mode too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ratio import divide_by_input
from .rectify import rectify_, relevance_carrier


def inference_batch_norm(x, running_mean, running_var, weight, bias, eps):
    """Batch norm as in eval mode: running statistics, or the batch's own where there are none."""
    training = running_mean is None or running_var is None
    return F.batch_norm(x, running_mean, running_var, weight, bias, training, 0.0, eps)


class RatioBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, eps, output_clamp, sends_relevance):
        out = rectify_(inference_batch_norm(x, running_mean, running_var, weight, bias, eps), output_clamp)
        ctx.save_for_backward(None if sends_relevance else x, out)
        ctx.output_clamp = output_clamp
        ctx.sends_relevance = sends_relevance
        return out

    @staticmethod
    def backward(ctx, g):
        x, y = ctx.saved_tensors
        g_x = None
        if ctx.needs_input_grad[0]:
            carrier = relevance_carrier(y, ctx.output_clamp)
            if ctx.sends_relevance:
                g_x = carrier.mul_(g) if carrier is not y else g * y
            else:
                g_x = divide_by_input(x, carrier, g)
        return g_x, None, None, None, None, None, None, None


def ratio_batch_norm(x, running_mean, running_var, weight=None, bias=None, eps=1e-5, output_clamp=None,
                     sends_relevance=False):
    """Inference batch norm with the ratio-rule backward ``g_x = g * y / x``.

    ``output_clamp``: the rewrite folded the plain ReLU/ReLU6 that follows into this op
    (:mod:`tsgb_fx.rules.rectify`). ``sends_relevance``: the writer of ``x`` takes the relevance
    ``g * y`` itself (:mod:`tsgb_fx.rules.relevance`), which is then sent without the division.
    """
    return RatioBatchNormFunction.apply(
        x, running_mean, running_var, weight, bias, eps, output_clamp, sends_relevance
    )
