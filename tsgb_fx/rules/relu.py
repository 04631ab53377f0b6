"""Rectifiers (ReLU, ReLU6, Hardtanh): the guided-backprop and deconvnet rules.

A rectifier of this family is ``y = clamp(x, min_val, max_val)``: ReLU is ``(0, None)``,
ReLU6 ``(0, 6)``, Hardtanh ``(min_val, max_val)`` (default ``(-1, 1)``). Its ordinary gradient
passes ``g`` where the forward passes ``x``, i.e. where ``min_val < x < max_val``. The rules
(``g`` the signal at ``y``, ``g_x`` the signal sent to ``x``)::

    guided backprop (Springenberg et al. 2015)   g_x = 1[min_val < x < max_val] * max(g, 0)
    deconvnet       (Zeiler & Fergus 2014)       g_x = max(g, 0)

Guided backprop is the ordinary gradient with negative signals dropped; deconvnet ignores the
forward entirely and rectifies the signal. For ReLU both are exactly what Captum's
``GuidedBackprop`` and ``Deconvolution`` do for ``nn.ReLU`` modules (a backward hook that
returns ``relu(grad_input)`` or ``relu(grad_output)``). For ReLU6 and Hardtanh, which Captum
leaves untouched, the same two formulas are used: guided backprop gates with the layer's own
pass-through window (so a saturated ReLU6 unit, ``x >= 6``, passes nothing, as its gradient
does), and deconvnet passes ``max(g, 0)`` whatever the clamp bounds, as it does for ReLU.
"""

from __future__ import annotations

import torch


def _clamp(x: torch.Tensor, min_val: float, max_val: float | None) -> torch.Tensor:
    if max_val is None:
        return torch.relu(x) if min_val == 0 else x.clamp(min=min_val)
    return x.clamp(min_val, max_val)


def passes(x: torch.Tensor, min_val: float, max_val: float | None) -> torch.Tensor:
    """Where the forward passes ``x`` through (its ordinary gradient is 1): ``min_val < x < max_val``."""
    inside = x > min_val
    return inside if max_val is None else inside & (x < max_val)


def guided_backprop_backward(x: torch.Tensor, g: torch.Tensor, min_val: float, max_val: float | None) -> torch.Tensor:
    """``1[min_val < x < max_val] * max(g, 0)``."""
    return torch.where(passes(x, min_val, max_val), g.clamp(min=0), torch.zeros_like(g))


def deconvnet_backward(g: torch.Tensor) -> torch.Tensor:
    """``max(g, 0)``."""
    return g.clamp(min=0)


class GuidedReLUFunction(torch.autograd.Function):
    """Ordinary clamp forward; guided-backprop backward."""

    @staticmethod
    def forward(ctx, x, min_val, max_val):
        ctx.save_for_backward(x)
        ctx.bounds = (min_val, max_val)
        return _clamp(x, min_val, max_val)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        g_x = guided_backprop_backward(x, g, *ctx.bounds) if ctx.needs_input_grad[0] else None
        return g_x, None, None


class DeconvnetReLUFunction(torch.autograd.Function):
    """Ordinary clamp forward; deconvnet backward (the forward's input is not needed)."""

    @staticmethod
    def forward(ctx, x, min_val, max_val):
        return _clamp(x, min_val, max_val)

    @staticmethod
    def backward(ctx, g):
        return (deconvnet_backward(g) if ctx.needs_input_grad[0] else None), None, None


def guided_relu(x, min_val: float = 0.0, max_val: float | None = None):
    """``clamp(x, min_val, max_val)`` (ReLU by default) with the guided-backprop backward."""
    return GuidedReLUFunction.apply(x, float(min_val), None if max_val is None else float(max_val))


def deconvnet_relu(x, min_val: float = 0.0, max_val: float | None = None):
    """``clamp(x, min_val, max_val)`` (ReLU by default) with the deconvnet backward."""
    return DeconvnetReLUFunction.apply(x, float(min_val), None if max_val is None else float(max_val))
