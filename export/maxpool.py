"""``max_pool{2,3}d_with_indices`` for the ONNX exporter, with torch's indices at a fraction of the cost.

torch numbers a max's position within its own (n, c) plane; ONNX ``MaxPool`` numbers it in the
whole flattened tensor, ``index = (n * C + c) * plane + position``. torchlib recovers the plane
offsets with a second ``MaxPool`` (kernel 1, with indices) over the whole input, which in
onnxruntime costs more than the pooling itself: 36 ms against 31 ms for ResNet-50's stem pool at
batch 8 on this machine's CPU. The offsets are ``arange(N * C) * plane``, a tensor of N x C
numbers, so this translation computes them with ``Range`` and subtracts them. The explainer's
forward keeps the pooled values; the backward (TSGB's max-pool rule is the plain gradient)
scatters each output's signal to its index.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from onnxscript import opset18 as op
from onnxscript.function_libs.torch_lib.ops import nn as torchlib_nn

from tsgb_fx.rules.box import per_axis


def _max_pool_with_plane_indices(spatial: int, fallback):
    def translation(self, kernel_size: Sequence[int], stride: Sequence[int] = (), padding: Sequence[int] = (0,),
                    dilation: Sequence[int] = (1,), ceil_mode: bool = False):
        if len(self.shape) != spatial + 2:  # unbatched input: torchlib handles it
            return fallback(self, kernel_size, stride, padding, dilation, ceil_mode)
        kernel = list(per_axis(kernel_size, spatial))
        values, flat_indices = op.MaxPool(
            self,
            kernel_shape=kernel,
            strides=list(per_axis(stride, spatial)) if stride else kernel,
            pads=list(per_axis(padding, spatial)) * 2,
            dilations=list(per_axis(dilation, spatial)),
            ceil_mode=int(bool(ceil_mode)),
        )
        batch_and_channels = op.Shape(self, start=0, end=2)
        plane = op.ReduceProd(op.Shape(self, start=2), keepdims=0)
        planes = op.ReduceProd(batch_and_channels, keepdims=0)
        offsets = op.Mul(op.Range(op.Constant(value_int=0), planes, op.Constant(value_int=1)), plane)
        offsets = op.Reshape(offsets, op.Concat(batch_and_channels, op.Constant(value_ints=[1] * spatial), axis=0))
        return values, op.Sub(flat_indices, offsets)

    return translation


MAX_POOL_TRANSLATIONS = {
    torch.ops.aten.max_pool2d_with_indices.default: _max_pool_with_plane_indices(
        2, torchlib_nn.aten_max_pool2d_with_indices
    ),
    torch.ops.aten.max_pool3d_with_indices.default: _max_pool_with_plane_indices(
        3, torchlib_nn.aten_max_pool3d_with_indices
    ),
}
"""``custom_translation_table`` entries for ``torch.onnx.export``."""
