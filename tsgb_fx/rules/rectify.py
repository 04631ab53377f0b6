"""A plain-gradient rectifier folded into the rule op before it (ReLU, ReLU6 after a conv or BN).

When a rule op's output ``y`` feeds only a rectifier ``out = clamp(y, 0, max)`` that keeps its
plain gradient, the rectifier's backward is ``g_y = g_out * 1[0 < y < max]``, and the rules of
TSGB.md only ever use ``g_y`` through the relevance ``g_y * y``:

    g_y * y = g_out * carrier(out),   carrier(out) = out * 1[out < max]   (= out for ReLU)

since ``y * 1[0 < y < max]`` equals ``out`` where ``y < max`` and 0 elsewhere. So the rule op can
apply the rectifier itself, in place on its fresh output, and keep ``out`` instead of ``y``: the
same signal reaches the op's input, the rectifier's separate output tensor and its backward pass
are gone, and ``out`` is the tensor the next op saves anyway (nothing extra stays in memory).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .tracing import is_traced

Clamp = tuple  # (min_val, max_val): (0.0, None) for ReLU, (0.0, 6.0) for ReLU6


def rectify_(y: torch.Tensor, clamp: Clamp | None) -> torch.Tensor:
    """``clamp(y, *clamp)`` in place on the op's own fresh output; ``y`` when ``clamp`` is None."""
    if clamp is None:
        return y
    low, high = clamp
    return y.clamp_(min=low, max=high)


def relevance_carrier(out: torch.Tensor, clamp: Clamp | None) -> torch.Tensor:
    """What the rule multiplies ``g_out`` by where it used ``y``: ``out * 1[out < max]``.

    ``out`` is the rectified output ``clamp(y, min, max)``. For ReLU (no upper bound) the carrier
    is ``out`` itself. With an upper bound, the saturated units pass no gradient in the
    rectifier's backward, so they carry no relevance. Eagerly that is the rectifier's own
    backward applied to ``out`` (``out`` where ``min < out < max``, else 0): one fused pass, half
    the time of arithmetic on the sign. In a traced graph (the explicit graph, ONNX) that
    backward decomposes into two comparisons, an or, a not, a cast and a product. For ``min ==
    0`` (ReLU6), where ``out == 0`` adds nothing to a product, it is
    ``out - threshold(out, below(max), 0)``: ``threshold`` keeps the values above the largest
    number below ``max`` in ``out``'s dtype, which, as ``out <= max``, are the saturated units
    (``out == max``), so the difference is ``out`` with those set to 0, exactly (a ``max`` the
    dtype does not hold keeps one comparison, ``out * (out < max)``). onnxruntime runs
    that as ``ThresholdedRelu`` and ``Sub`` (:mod:`tsgb_export.threshold`), where a comparison, a
    cast of its booleans and a product took 7% more of MobileNetV2's whole explainer.
    """
    if carries_output(clamp):
        return out
    low, high = clamp
    if is_traced(out):
        below = largest_below(high, out.dtype) if low == 0 else None
        if below is not None:
            return out - F.threshold(out, below, 0.0)
        inside = out < high if low == 0 else (out > low) & (out < high)
        return out * inside.to(out.dtype)
    return torch.ops.aten.hardtanh_backward(out, out, low, high)


def largest_below(bound: float, dtype: torch.dtype) -> float | None:
    """The largest number of ``dtype`` below ``bound`` (``5.9999995`` for 6 in float32), or None
    unless ``dtype`` holds ``bound`` exactly as a normal number above its smallest one.

    Plain arithmetic on ``torch.finfo`` rather than ``torch.nextafter``: tensors made while the
    graph is traced would be recorded in it. With ``bound = m * 2^e`` (``0.5 <= m < 1``), the
    numbers of ``dtype`` in ``[2^(e-1), 2^e)`` are ``2^(e-1) * eps`` apart, and half that below
    a power of two (``m == 0.5``).
    """
    info = torch.finfo(dtype)
    mantissa, exponent = math.frexp(bound)
    if not info.tiny < bound <= info.max or not (2 * mantissa / info.eps).is_integer():
        return None
    step = 2.0 ** (exponent - 1) * info.eps
    return bound - (step / 2 if mantissa == 0.5 else step)


def carries_output(clamp: Clamp | None) -> bool:
    """The carrier is ``out`` itself: no rectifier folded in, or one without an upper bound (ReLU)."""
    return clamp is None or clamp[1] is None


@dataclass(frozen=True)
class RectifierFold:
    """A plain rectifier folded into a TSGB-Conv op, in the interface of every output fold.

    ``apply(y)`` gives the op's output and the tensor it keeps for the backward (here both the
    rectified output, clamped in place); ``carrier(kept)`` what the signal at the output is
    multiplied by for the relevance; ``carries_output``: the carrier is the kept tensor itself.
    ``clamp=None`` folds nothing (:data:`NOTHING_FOLDED`): output, kept tensor and carrier are ``y``.
    """

    clamp: Clamp | None

    def apply(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = rectify_(y, self.clamp)
        return out, out

    def carrier(self, out: torch.Tensor) -> torch.Tensor:
        return relevance_carrier(out, self.clamp)

    @property
    def carries_output(self) -> bool:
        return carries_output(self.clamp)


NOTHING_FOLDED = RectifierFold(None)
"""The fold of an op with no activation folded in: ``apply`` and ``carrier`` give ``y`` itself."""
