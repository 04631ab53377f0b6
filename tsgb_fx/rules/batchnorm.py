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


class RatioBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(x, running_mean, running_var, weight, bias, eps):
        training = running_mean is None or running_var is None
        return F.batch_norm(x, running_mean, running_var, weight, bias, training, 0.0, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], output)

    @staticmethod
    def backward(ctx, g):
        x, y = ctx.saved_tensors
        g_x = divide_by_input(x, y, g) if ctx.needs_input_grad[0] else None
        return g_x, None, None, None, None, None


def ratio_batch_norm(x, running_mean, running_var, weight=None, bias=None, eps=1e-5):
    """Inference batch norm with the ratio-rule backward ``g_x = g * y / x``."""
    return RatioBatchNormFunction.apply(x, running_mean, running_var, weight, bias, eps)
