"""A plain-gradient SiLU folded into the TSGB-Conv op before it (EfficientNet's conv, BN, SiLU).

When a TSGB-Conv op's output ``y`` (batch norm folded in or not) feeds only ``a = silu(y)``,
whose gradient stays plain, the SiLU's backward is ``g_y = g_a * silu'(y)``, and TSGB-Conv uses
``g_y`` only through the relevance ``g_y * y``::

    g_y * y = g_a * silu'(y) * y = g_a * silu_backward(y, y)    (silu_backward(t, y) = t * silu'(y))

So the op applies the SiLU itself, keeps ``y``, and forms the relevance straight from ``g_a``:
the SiLU's separate node, its full-size backward tensor and the product are gone.

**The sign, moved upstream.** When ``a`` is read only by another TSGB-Conv, that rule sends
``g_a = sign(a) * BoxT(r)`` (TSGB.md), with ``BoxT(r)`` one map per group. Since
``sign(silu(y)) = sign(y)``::

    g_a * silu'(y) * y = BoxT(r) * silu'(y) * |y| = BoxT(r) * silu_backward(|y|, y)

so the reader may send ``BoxT(r)`` alone, as a broadcast view, and this op uses ``|y|``: the
reader's ``sign`` pass and its product over ``a`` are gone. A pad between the two keeps this
exact: a zero pad's border signal is cropped by the pad's backward, and a reflected, replicated
or circular border value shares the sign of the value it copies, where its signal lands.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .tracing import is_traced


@dataclass(frozen=True)
class SiLUFold:
    """The SiLU after a TSGB-Conv op, folded in (the interface of
    :class:`tsgb_fx.rules.rectify.RectifierFold`). ``unsigned``: its only reader, a TSGB-Conv,
    sends ``BoxT(r)`` without ``sign(a)`` and leaves the sign to this op."""

    unsigned: bool = False
    carries_output = False  # the carrier is silu_backward(y or |y|, y), never y itself

    @staticmethod
    def apply(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the output ``silu(y)``, the kept ``y``, which the carrier reads)."""
        return F.silu(y), y

    def carrier(self, y: torch.Tensor) -> torch.Tensor:
        """What the op multiplies the signal at ``a`` by to get the relevance at ``y``, fresh.

        Eagerly torch's fused ``silu_backward``. A traced graph (the explicit graph, ONNX) would
        spell that as a sigmoid and five more full-size passes; with ``a = silu(y) = y * s``::

            y * silu'(y) = y * s * (1 + y * (1 - s)) = a * (1 + y - a)
            |y| * silu'(y) = |a| * (1 + y - a)                             (s > 0)

        three passes (four unsigned) over ``a``, which is the forward's own SiLU of the same ``y``
        (graph optimisers such as onnxruntime's merge the two).
        """
        if is_traced(y):
            output = F.silu(y)
            return (output.abs() if self.unsigned else output) * (1 + y - output)
        return torch.ops.aten.silu_backward(y.abs() if self.unsigned else y, y)
