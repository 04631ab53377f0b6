"""Relevance edges: between two rule ops, send the relevance ``g * x`` instead of the signal ``g``.

The ratio rules (batch norm, fixed-window average pooling; :mod:`.ratio`) end by dividing the
relevance by their input: ``g_x = relevance / x``. When that input ``x`` is the output of another
rule op, that op only ever reads the signal through the relevance ``g_x * x`` (TSGB-Conv's
``c = sum_channels(g * y)``, the ratio rules' ``g * y``), so it multiplies the division away
again. Across such an edge the two ops may instead exchange the relevance ``R = g_x * x`` itself:

* the reader (a ratio rule with ``sends_relevance``) returns ``relevance`` and skips the division;
* the writer (a rule op with ``output_relevance``) takes the ``R`` that arrives at its output for
  ``g * y`` and skips the product.

Autograd only adds and slices what flows back along an edge, and ``R`` is linear in ``g``, so the
edge may pass through a concatenation and fan out to several readers: the slice of a
concatenation's relevance is the relevance of that slice, and the sum of the readers' relevances
is the relevance of the sum of their signals. That is DenseNet, where every layer's batch norm
reads the concatenation of all earlier layers' outputs (:func:`tsgb_fx.rewrite.rewrite` finds
the edges). An input of such a concatenation whose writer cannot take ``R`` (a max pooling, the
image, an op read by anything else too) gets :func:`relevance_to_signal` in between, which
divides once, after autograd has summed the readers' ``R``, where each reader divided before.

Equal to the signal form wherever ``|x| >= eps``: there ``R / x * x = R``. Where ``x == 0``
exactly the signal form passes nothing on, but the relevance a reader sends need not be 0 there (a
batch norm's shift times ``g``, a pooling window's share). So a writer takes ``R`` only where its
own rule drops whatever reaches an output that is exactly 0:

* TSGB-Conv without a folded activation. Outside exact cancellation its output is 0 only over a
  window of zeros, where ``z = 0`` and ``sign(x)`` sends ``r`` to those zeros; a grouped
  convolution whose rule sums all channels needs the batch-norm fold's mask ``live`` for that.
  A folded ReLU is 0 wherever its input is negative, so that writer keeps the signal form.
* Average pooling: its output is 0 over a window of zeros (outside cancellation), and it spreads
  ``R`` over those zeros, which its own writer drops in turn, by either form.
"""

from __future__ import annotations

import torch

from .ratio import divide_by_input


class RelevanceToSignalFunction(torch.autograd.Function):
    """Identity forward; the backward turns the relevance ``R`` that its readers send into the
    signal ``R / x`` (the ratio rules' stabilised division, :func:`.ratio.divide_by_input`)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, relevance):
        (x,) = ctx.saved_tensors
        return divide_by_input(x, relevance)


def relevance_to_signal(x: torch.Tensor) -> torch.Tensor:
    """``x`` unchanged; its readers send back the relevance ``g * x``, its writer gets the signal ``g``."""
    return RelevanceToSignalFunction.apply(x)
