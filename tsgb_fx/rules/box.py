"""All-ones box sums over a convolution's windows, and their transposes.

TSGB-Conv needs two linear maps that share a convolution's geometry (kernel size, stride,
padding, dilation) but not its learned weights:

* ``box(s)``: for every output position, the sum of ``s`` over its receptive field, i.e. a
  convolution of ``s`` with an all-ones kernel;
* ``box_transpose(r)``: the adjoint, which spreads every output value back over its receptive
  field, i.e. the transposed convolution with the same all-ones kernel. ``output_padding``
  restores the rows and columns the forward dropped when ``(size + 2 * padding - span)`` was not
  a multiple of the stride, so the result has exactly the input's spatial size.

Both work on ``channels`` independent maps at once (a grouped convolution with one all-ones
filter per map), which serves the per-group variant of TSGB-Conv.

In eager mode, 2-d windows without dilation whose padding is at most half the kernel (the common
case) use sum pooling instead: ``avg_pool`` with ``divisor_override=1`` is ``box`` exactly, and
its own backward is ``box_transpose``, sized by the input. On CPU a convolution of a batch of
one-channel maps costs about 150 us however small the maps (8 x 7 x 7: 146 us as a convolution,
10 us pooled; a stride-2 transpose of 8 x 56 x 56: 488 us against 125 us). A traced graph (the
explicit graph, ONNX) keeps the convolutions, which every runtime has.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from .tracing import is_traced

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
# 2-d only: CPU avg_pool3d refuses an input smaller than the kernel even where padding covers it
_SUM_POOL = {2: F.avg_pool2d}  # with divisor_override=1
_SUM_POOL_TRANSPOSE = {2: torch.ops.aten.avg_pool2d_backward}


@dataclass(frozen=True)
class WindowGeometry:
    """Kernel size, stride, zero padding and dilation of an N-d convolution, one int per axis."""

    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.kernel_size)

    @cached_property  # read on every backward call: computed once per layer
    def is_pointwise(self) -> bool:
        """A 1x1 kernel without padding: every output position sees exactly one input position."""
        return all(k == 1 for k in self.kernel_size) and not any(self.padding)

    @cached_property
    def is_poolable(self) -> bool:
        """Sum pooling computes this box: 2-d, no dilation, padding at most half the kernel."""
        return (
            self.ndim in _SUM_POOL
            and all(d == 1 for d in self.dilation)
            and all(2 * p <= k for k, p in zip(self.kernel_size, self.padding))
        )

    @cached_property
    def transpose_padding(self) -> tuple[int, ...]:
        """``d * (k - 1) - p``: the padding under which a stride-1 box is its own transpose."""
        return tuple(d * (k - 1) - p for k, p, d in zip(self.kernel_size, self.padding, self.dilation))

    def strided(self) -> tuple[slice, ...]:
        """Index of the input positions a pointwise convolution reads."""
        return (Ellipsis, *(slice(None, None, s) for s in self.stride))

    def output_size(self, input_size) -> tuple[int, ...]:
        """Spatial size of the convolution's output for an input of spatial size ``input_size``."""
        return tuple(
            (size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, k, s, p, d in zip(input_size, self.kernel_size, self.stride, self.padding, self.dilation)
        )

    def output_padding(self, input_size, output_size) -> tuple[int, ...]:
        """Rows/columns the forward dropped: what the transpose must add back to reach ``input_size``."""
        return tuple(
            size - ((out - 1) * s - 2 * p + d * (k - 1) + 1)
            for size, out, k, s, p, d in zip(
                input_size, output_size, self.kernel_size, self.stride, self.padding, self.dilation
            )
        )


def per_axis(value, ndim: int) -> tuple[int, ...]:
    """An int or a per-axis sequence (as PyTorch accepts both) as a tuple of ``ndim`` ints."""
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    return tuple(int(v) for v in (values * ndim if len(values) == 1 else values))


def _ones_kernel(geometry: WindowGeometry, channels: int, like: torch.Tensor) -> torch.Tensor:
    return torch.ones((channels, 1, *geometry.kernel_size), dtype=like.dtype, device=like.device)


def box(s: torch.Tensor, geometry: WindowGeometry) -> torch.Tensor:
    """Sum of ``s`` (N, G, *spatial) over every window: ``conv(s, ones)`` per channel.

    A pointwise window is the position itself: a strided view, no convolution.
    """
    if geometry.is_pointwise:
        return s[geometry.strided()]
    if geometry.is_poolable and not is_traced(s):
        return _SUM_POOL[geometry.ndim](s, geometry.kernel_size, geometry.stride, geometry.padding,
                                        divisor_override=1)
    channels = s.shape[1]
    return _CONV[geometry.ndim](
        s,
        _ones_kernel(geometry, channels, s),
        None,
        geometry.stride,
        geometry.padding,
        geometry.dilation,
        channels,
    )


def box_transpose(r: torch.Tensor, geometry: WindowGeometry, input_size) -> torch.Tensor:
    """Adjoint of :func:`box`: spread ``r`` (N, G, *out) over each window, sized to ``input_size``."""
    if geometry.is_pointwise:
        if all(s == 1 for s in geometry.stride):
            return r
        spread = r.new_zeros((*r.shape[:2], *input_size))
        spread[geometry.strided()] = r
        return spread
    if geometry.is_poolable and not is_traced(r):
        sized_like = r.new_empty(()).expand(*r.shape[:2], *input_size)  # only its shape is read
        return _SUM_POOL_TRANSPOSE[geometry.ndim](
            r, sized_like, geometry.kernel_size, geometry.stride, geometry.padding, False, True, 1
        )
    channels = r.shape[1]
    complement = geometry.transpose_padding
    if all(s == 1 for s in geometry.stride) and min(complement) >= 0:
        # stride 1: the transpose is the correlation with the flipped kernel (all ones: the same
        # kernel) and the complementary padding; CPU conv_transpose is up to 15x slower here
        return _CONV[geometry.ndim](r, _ones_kernel(geometry, channels, r), None, 1, complement, geometry.dilation, channels)
    return _CONV_TRANSPOSE[geometry.ndim](
        r,
        _ones_kernel(geometry, channels, r),
        None,
        geometry.stride,
        geometry.padding,
        geometry.output_padding(tuple(input_size), tuple(r.shape[2:])),
        channels,
        geometry.dilation,
    )
