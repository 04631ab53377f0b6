"""A straightforward test-only TSGB, written the way the authors' code works: module swapping.

Deep-copies the model, turns off in-place flags, and swaps every ``nn.Conv2d`` (after an explicit
``F.pad`` for non-zero padding modes), ``nn.BatchNorm2d``,
``nn.AvgPool2d`` and the named classifier ``nn.Linear`` for a module whose forward calls an
autograd Function written here from TSGB.md. Box sums use ``F.conv2d`` with an all-ones kernel;
their transposes use ``torch.nn.grad.conv2d_input`` (not the library's conv_transpose); the
average-pool transpose is autograd of ``F.avg_pool2d``. Saved outputs are cloned because the
models modify them in place (``out += identity``, ``F.relu(..., inplace=True)``).

A convolution followed by a batch norm inside an ``nn.Sequential`` (torchvision's
``Conv2dNormActivation``) is swapped as one rule, TSGB-Conv with the relevance taken after the
batch norm; elsewhere the ratio rules of batch norm and average pooling divide exactly, as the
authors' code does (``g * y / x``). The two agree wherever the convolution's output is not 0.

Functional calls (``F.conv2d``) are invisible to module swapping; a model that uses them passes
its own reference function (see ``FunctionalNet`` in the parity test).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-10


def _conv_signal(conv: nn.Conv2d, x, relevance, conv_groups: str):
    """Steps 2-4 of TSGB-Conv for the relevance ``c`` per output position (N, G, H_out, W_out)."""
    groups = conv.groups if conv_groups == "layer" else 1
    ones = torch.ones(groups, 1, *conv.kernel_size, dtype=x.dtype)
    s = x.abs().reshape(x.shape[0], groups, -1, *x.shape[2:]).sum(2)
    z = F.conv2d(s, ones, None, conv.stride, conv.padding, conv.dilation, groups)
    r = relevance / (z + EPS)
    spread = torch.nn.grad.conv2d_input(s.shape, ones, r, conv.stride, conv.padding, conv.dilation, groups)
    sign = x.sign().reshape(x.shape[0], groups, -1, *x.shape[2:])
    return (sign * spread[:, :, None]).reshape(x.shape)


def _relevance(g, y, groups: int):
    """Step 1 of TSGB-Conv: ``c = sum over the output channels (of each group) of g * y``."""
    return (g * y).reshape(y.shape[0], groups, -1, *y.shape[2:]).sum(2)


class _Conv(torch.autograd.Function):
    """TSGB-Conv; with ``bn``, a convolution and the batch norm after it as one rule.

    The ratio rule passes the relevance ``g * y`` through unchanged (TSGB.md), so the relevance
    at the convolution's output is ``g * y`` at the batch norm's output, except where the
    convolution's output is exactly 0: there TSGB.md's stabilised division sends ``g * y / eps``
    and TSGB-Conv multiplies it by that 0 (the authors' exact division would give 0/0).
    """

    @staticmethod
    def forward(ctx, x, conv: nn.Conv2d, conv_groups: str, bn: nn.BatchNorm2d | None = None):
        y = conv._conv_forward(x, conv.weight, conv.bias)
        ctx.live = torch.ones_like(y) if bn is None else (y != 0).to(y.dtype)
        if bn is not None:
            y = _batch_norm(y, bn)
        ctx.conv, ctx.conv_groups = conv, conv_groups
        ctx.x, ctx.y = x.detach().clone(), y.detach().clone()
        return y

    @staticmethod
    def backward(ctx, g):
        groups = ctx.conv.groups if ctx.conv_groups == "layer" else 1
        relevance = _relevance(g * ctx.live, ctx.y, groups)
        return _conv_signal(ctx.conv, ctx.x, relevance, ctx.conv_groups), None, None, None


class _FC(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, linear: nn.Linear):
        ctx.x, ctx.weight = x.detach().clone(), linear.weight.detach()
        return F.linear(x, linear.weight, linear.bias)

    @staticmethod
    def backward(ctx, g):
        x, W = ctx.x, ctx.weight
        w_pos, w_neg = W.clamp(min=0), W.clamp(max=0)
        beta = (x @ w_pos.T) / ((x @ w_neg.T).abs() + EPS)
        return g @ w_pos + (g * beta) @ w_neg, None


def _batch_norm(x, bn: nn.BatchNorm2d):
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


class _BatchNorm(torch.autograd.Function):
    """The ratio rule as the authors wrote it, ``g * y / x``, exact; where ``x == 0`` (a depthwise
    convolution over dead units) it sends 0, where TSGB.md's stabilised division sends
    ``g * y / eps``, which the rules upstream only ever multiply by that 0."""

    @staticmethod
    def forward(ctx, x, bn: nn.BatchNorm2d):
        y = _batch_norm(x, bn)
        ctx.x, ctx.y = x.detach().clone(), y.detach().clone()
        return y

    @staticmethod
    def backward(ctx, g):
        return torch.where(ctx.x == 0, 0.0, g * ctx.y / ctx.x), None


class _AvgPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pool: nn.AvgPool2d):
        y = pool(x)
        ctx.pool, ctx.x, ctx.y = pool, x.detach().clone(), y.detach().clone()
        return y

    @staticmethod
    def backward(ctx, g):
        with torch.enable_grad():
            x = ctx.x.clone().requires_grad_(True)
            (spread,) = torch.autograd.grad(ctx.pool(x), x, g * ctx.y)
        return torch.where(ctx.x == 0, 0.0, spread / ctx.x), None  # 0/0 only under a ReLU'd zero


class _Swapped(nn.Module):
    def __init__(self, function, module, *options):
        super().__init__()
        self.function, self.module, self.options = function, module, options

    def forward(self, x):
        return self.function.apply(x, self.module, *self.options)


class _Pad(nn.Module):
    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.amounts, self.mode = conv._reversed_padding_repeated_twice, conv.padding_mode

    def forward(self, x):
        return F.pad(x, self.amounts, mode=self.mode)


def reference_conv2d(conv_groups="reference"):
    """A drop-in for F.conv2d with the TSGB-Conv backward (for functional models)."""

    def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        conv = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], weight.shape[2:], stride, padding, dilation, groups, bias is not None)
        conv.weight, conv.bias = nn.Parameter(weight.detach()), None if bias is None else nn.Parameter(bias.detach())
        return _Conv.apply(x, conv, conv_groups)

    return conv2d


def swap_in_reference_rules(model: nn.Module, classifier: str, conv_groups: str = "reference") -> nn.Module:
    """A copy of ``model`` (eval, no in-place ops) whose rule modules run the reference Functions."""
    reference = copy.deepcopy(model).eval()
    for module in reference.modules():
        if isinstance(getattr(module, "inplace", None), bool):
            module.inplace = False
    modules = list(reference.named_modules())  # before any swap: the swapped-in wrappers are not listed
    paired = _pair_convs_with_batch_norms(reference, conv_groups)
    for name, module in modules:
        if name in paired:
            continue
        if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
            # pad with the layer's mode (plain gradient), then TSGB-Conv over the padded input
            unpadded = copy.copy(module)
            unpadded.padding, unpadded.padding_mode = (0, 0), "zeros"
            swapped = nn.Sequential(_Pad(module), _Swapped(_Conv, unpadded, conv_groups))
        elif isinstance(module, nn.Conv2d):
            swapped = _Swapped(_Conv, module, conv_groups)
        elif isinstance(module, nn.BatchNorm2d):
            swapped = _Swapped(_BatchNorm, module)
        elif isinstance(module, nn.AvgPool2d):
            swapped = _Swapped(_AvgPool, module)
        elif isinstance(module, nn.Linear) and name == classifier:
            swapped = _Swapped(_FC, module)
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(reference.get_submodule(parent_name) if parent_name else reference, child, swapped)
    return reference


def _pair_convs_with_batch_norms(reference: nn.Module, conv_groups: str) -> set[str]:
    """Swap each zero-padded Conv2d followed by a BatchNorm2d in an nn.Sequential for one rule.

    Returns the names of the modules swapped (the BN becomes an Identity).
    """
    paired = set()
    for name, module in list(reference.named_modules()):
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and conv.padding_mode == "zeros" and isinstance(bn, nn.BatchNorm2d):
                setattr(module, conv_name, _Swapped(_Conv, conv, conv_groups, bn))
                setattr(module, bn_name, nn.Identity())
                prefix = f"{name}." if name else ""
                paired |= {prefix + conv_name, prefix + bn_name}
    return paired


def reference_saliency(reference_model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Saliency (N, 1, H, W) = sum_C(signal at the input * input) for one target per image."""
    x = x.clone().requires_grad_(True)
    logits = reference_model(x)
    one_hot = F.one_hot(target, logits.shape[1]).to(logits.dtype)
    (signal,) = torch.autograd.grad(logits, x, one_hot)
    return (signal * x).sum(1, keepdim=True).detach()
