"""``threshold(x, t, 0)`` for the ONNX exporter: one ``ThresholdedRelu``.

The explicit graph writes a ReLU6 carrier as ``out - threshold(out, below(6), 0)``
(:func:`tsgb_fx.rules.rectify.relevance_carrier`). torchlib has no translation for
``aten.threshold``, so the exporter would decompose it into a comparison and a ``Where``, which
onnxruntime runs about ten times slower than a product (:mod:`tsgb_export.lowering`). With the
value 0 it is ONNX's ``ThresholdedRelu`` (``x`` where ``x > alpha``, else 0), whose ``alpha``
is a float32 attribute: that is used for float32 tensors and thresholds that float32 holds
exactly; any other threshold becomes ``Where(x > t, x, value)`` with constants of ``x``'s type.
"""

from __future__ import annotations

import numpy as np
import torch
from onnxscript import ir
from onnxscript import opset18 as op


def _threshold(self, threshold: float, value: float):
    if value == 0 and self.dtype == ir.DataType.FLOAT and float(np.float32(threshold)) == threshold:
        return op.ThresholdedRelu(self, alpha=float(threshold))
    numpy_dtype = self.dtype.numpy()
    bound = op.Constant(value=ir.tensor(np.array(threshold, dtype=numpy_dtype)))
    replacement = op.Constant(value=ir.tensor(np.array(value, dtype=numpy_dtype)))
    return op.Where(op.Greater(self, bound), self, replacement)


THRESHOLD_TRANSLATIONS = {torch.ops.aten.threshold.default: _threshold}
"""``custom_translation_table`` entries for ``torch.onnx.export``."""
