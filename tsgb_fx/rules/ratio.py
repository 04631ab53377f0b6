"""The ratio rule shared by batch norm and fixed-window average pooling.

Both rules pass the relevance ``g * y`` through unchanged and divide it by the input:
``g_x * x = relevance``. TSGB.md stabilises the division away from zero on the input's own side,
``x + eps * sign(x)``; here the reciprocal is bounded instead, ``1 / x`` clipped to
``[-1/eps, 1/eps]``: a denominator of magnitude ``max(|x|, eps)`` with the sign of ``x``
(``+0`` counts as positive, ``-0`` as negative). Every finite input gives a finite signal, as
with TSGB.md's form; for ``|x| >= eps`` it is the exact ``1 / x`` of the authors' code, and it
differs from TSGB.md's form by at most ``eps / |x|`` relative (1e-7 at ``|x| = 1e-3``).
"""

from __future__ import annotations

import torch

EPS = 1e-10


def divide_by_input(x: torch.Tensor, *factors: torch.Tensor) -> torch.Tensor:
    """``product(factors) / x`` with the reciprocal clipped to ``[-1/eps, 1/eps]``, in one new tensor.

    Four passes over the activation (reciprocal, clip, one product per factor), all but the
    first in place: this rule runs on every batch norm that no convolution feeds (DenseNet's
    norm1 after each concatenation), where the former ``x + eps * sign(x)`` spelling took eight
    (``sign(0) = +1`` needs two signs, and ``torch.where`` is about ten times slower on CPU).
    """
    signal = x.reciprocal().clamp_(min=-1 / EPS, max=1 / EPS)
    for factor in factors:
        signal.mul_(factor)
    return signal
