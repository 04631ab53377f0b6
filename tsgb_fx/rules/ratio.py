"""The ratio rule shared by batch norm and fixed-window average pooling.

Both rules pass the relevance ``g * y`` through unchanged and divide it by the input:
``g_x * x = relevance``. The division is stabilised away from zero on the input's own side,
``x + eps * sign(x)`` with ``sign(0) = +1``, so its magnitude is never below ``eps`` and every
finite input gives a finite signal; for ``|x| >> eps`` it is the formula of TSGB.md.
"""

from __future__ import annotations

import torch

EPS = 1e-10


def divide_by_input(x: torch.Tensor, *factors: torch.Tensor) -> torch.Tensor:
    """``product(factors) / (x + eps * sign(x))`` with ``sign(0) = +1``, in one new tensor.

    ``sign(sign(x) + 1/2)`` is that sign (+1 for x >= 0, -1 below): arithmetic rather than
    ``torch.where(x >= 0, eps, -eps)``, which on CPU runs about ten times slower over a boolean
    mask. Every step after the first works in place on the one buffer, as ``1 / denominator``
    times the factors: a fresh full-size tensor per step cost more than the arithmetic (page
    faults), and this rule runs on every batch-norm input.
    """
    signal = x.sign().add_(0.5).sign_()
    signal.mul_(EPS).add_(x).reciprocal_()
    for factor in factors:
        signal.mul_(factor)
    return signal
