"""TSGB-FC: make the signal target-selective at the classifier.

For the linear layer that produces the logits, ``y = x W^T + b``, with ``W+ = max(W, 0)`` and
``W- = min(W, 0)`` (TSGB.md, "TSGB-FC")::

    z+   = x W+^T,   z- = x W-^T                 (bias left out)
    beta = z+ / (|z-| + eps)                     per sample and output unit
    g_x  = g W+ + (g * beta) W-

For a one-hot ``g`` at class ``j``: ``sum_i x_i g_x,i = z+_j - beta_j |z-_j| = 0`` (up to eps):
evidence for and against the target balance, and the signal keeps which features speak for the
target and which against it. The reference has no eps in ``beta``; it is added so that a class
whose negative evidence ``z-`` is exactly 0 still gives a finite map, and it is far below
``|z-|`` for any ordinary input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .tracing import is_traced

EPS = 1e-10


def tsgb_linear_backward(x: torch.Tensor, weight: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The signal TSGB-FC sends to ``x`` (..., in) for ``g`` (..., out).

    ``g_x`` is a sum over the output units ``j`` with ``g_j != 0`` only: with a one-hot ``g``
    (one target per image) that is a handful of rows of ``W``, not all ``out`` of them (2048 x
    1000 on ResNet-50, where the full form cost more than the layer's forward). In eager mode
    only those rows are read; traced (symbolic batch, where the rows are data), the full form.
    """
    if not is_traced(g):
        rows = g.reshape(-1, g.shape[-1]).any(0).nonzero().squeeze(1)
        if len(rows) < g.shape[-1]:
            weight, g = weight.index_select(0, rows), g.index_select(-1, rows)
    positive = weight.clamp(min=0)
    negative = weight - positive
    beta = F.linear(x, positive) / (F.linear(x, negative).abs() + EPS)
    return g @ positive + (g * beta) @ negative


class TSGBLinearFunction(torch.autograd.Function):
    """Ordinary linear forward; TSGB-FC backward to the input, nothing to the weights."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        g_x = tsgb_linear_backward(x, weight.detach(), g) if ctx.needs_input_grad[0] else None
        return g_x, None, None


def tsgb_linear(x, weight, bias=None):
    """``F.linear(x, weight, bias)`` with the TSGB-FC backward."""
    return TSGBLinearFunction.apply(x, weight, bias)
