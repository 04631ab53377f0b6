"""An eval batch norm folded into the weights of the convolution before it, cached per layer.

A batch norm with running statistics after a convolution is an affine map per output channel,
so the pair is one convolution (as inference runtimes do it; onnxruntime does it to the plain
model too)::

    bn(conv(x, w, b)) = (conv(x, w, b) - mean) * s + beta,      s = gamma / sqrt(var + eps)
                      = conv(x, w * s, (b - mean) * s + beta)   (s per output channel)

In eager mode this saves the batch norm's pass over the convolution's output, and the fresh
output tensor it allocates (on a CPU the batch norms were 4% of a ResNet-50 explanation at batch
8 and 9% of a MobileNetV2 one at batch 1; side by side the fold saved 0-4% of the explain time,
about what this machine's noise allows one to see). Equal to the two ops up to rounding: the
folded form rounds ``w * s`` once instead of rounding ``conv * s`` per output.

The fold pays where the batch norm's pass is large next to the copy of the weights it needs:
layers whose output has at least as many positions per channel as one filter has weights
(``prod(S_out) >= C_in / groups * prod(kernel)``, i.e. the copy is no larger than one image's
output). Those are the early, large-activation layers where the pass costs most; the late
layers, with small maps and most of the weights, keep the two ops. ResNet-50 then holds 3.7 MiB of
folded weights instead of 90 (MobileNetV2 1.5, EfficientNet-B0 2.2).

The folded tensors are computed on the first call and kept, keyed weakly by the convolution's
weight, until any of the six source tensors changes: an in-place update bumps its version
counter (``optimizer.step``, ``load_state_dict``, ``mul_``), and ``.data = ...`` or ``.to()``
replaces its storage (a new ``data_ptr``), so the explainer keeps seeing the model's current
weights, as it does without the fold. Calls in several threads may fold the same layer at once;
each stores the same result.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .box import WindowGeometry

_FOLDED = WeakIdKeyDictionary()  # weight -> (key, weight', bias'); by identity, as tensors compare by value


def worth_folding(weight: torch.Tensor, batch_norm, geometry: WindowGeometry, input_size) -> bool:
    """Fold this batch norm: it has running statistics (eval mode is then an affine map; without
    them it normalises with the batch's own statistics), and the output has at least as many
    positions per channel as a filter has weights (the copy is no larger than one image's output)."""
    running_mean, running_var = batch_norm[0], batch_norm[1]
    if running_mean is None or running_var is None:
        return False
    return _output_positions(geometry, input_size) >= weight.shape[1] * math.prod(geometry.kernel_size)


@lru_cache(maxsize=4096)
def _output_positions(geometry: WindowGeometry, input_size) -> int:
    """Positions per channel of the convolution's output; memoised, as every call asks again."""
    return math.prod(geometry.output_size(input_size))


def folded_conv_parameters(weight: torch.Tensor, bias: torch.Tensor | None, batch_norm):
    """``(w * s, (b - mean) * s + beta)`` for the convolution ``weight``, ``bias`` followed by the
    eval batch norm ``batch_norm = (running_mean, running_var, gamma, beta, eps)``; cached."""
    running_mean, running_var, gamma, beta, eps = batch_norm
    key = (_state(weight), _state(bias), _state(running_mean), _state(running_var), _state(gamma), _state(beta), eps)
    entry = _FOLDED.get(weight)
    if entry is not None and entry[0] == key:
        return entry[1], entry[2]
    folded_weight, folded_bias = _fold(weight, bias, *batch_norm)
    _FOLDED[weight] = (key, folded_weight, folded_bias)
    return folded_weight, folded_bias


def _state(t: torch.Tensor | None):
    """What changes when a tensor's values may have: its storage (new on ``.data =`` and ``.to()``,
    different for distinct live tensors) and its version counter (bumped by in-place updates)."""
    return None if t is None else (t.data_ptr(), t._version)


def cached_bytes() -> int:
    """Memory the cache holds: the folded weights and biases of every live model's layers."""
    return sum(t.numel() * t.element_size() for _, weight, bias in list(_FOLDED.values()) for t in (weight, bias))


def _fold(weight, bias, running_mean, running_var, gamma, beta, eps):
    """The folding arithmetic, in float32 at least (a half-precision model's scales would lose
    digits in a half-precision product), cast back to the convolution's dtype; never recorded by
    autograd (TSGB sends nothing to the weights)."""
    with torch.inference_mode(False), torch.no_grad():
        dtype = torch.promote_types(weight.dtype, torch.float32)
        scale = torch.rsqrt(running_var.to(dtype) + eps)
        if gamma is not None:
            scale = scale * gamma.to(dtype)
        shift = -running_mean.to(dtype) if bias is None else bias.to(dtype) - running_mean.to(dtype)
        shift = shift * scale
        if beta is not None:
            shift = shift + beta.to(dtype)
        folded_weight = weight.to(dtype) * scale.reshape(-1, *(1,) * (weight.dim() - 1))
        return folded_weight.to(weight.dtype), shift.to(weight.dtype)
