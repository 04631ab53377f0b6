"""tsgb_export.threshold: ``aten.threshold`` exported as onnxruntime runs it fast, with torch's numbers.

``threshold(x, t, 0)`` on float32 with a float32 threshold becomes one ``ThresholdedRelu``; any
other (a threshold float32 rounds, a nonzero value, float64) becomes ``Where(x > t, x, value)``
with constants of ``x``'s type. Each is compared with torch's own ``F.threshold`` through
onnxruntime, on values at, just below and just above the threshold.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tsgb_export.threshold import THRESHOLD_TRANSLATIONS
from tsgb_fx.rules.rectify import largest_below

ort = pytest.importorskip("onnxruntime")

CASES = {
    "relu6 carrier": (torch.float32, largest_below(6.0, torch.float32), 0.0, "ThresholdedRelu"),
    "threshold float32 rounds": (torch.float32, 0.1, 0.0, "Where"),
    "nonzero value": (torch.float32, 1.5, 2.0, "Where"),
    "float64": (torch.float64, largest_below(6.0, torch.float64), 0.0, "Where"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_threshold_exports_with_torchs_numbers(case):
    dtype, threshold, value, expected_op = CASES[case]

    class Threshold(torch.nn.Module):
        def forward(self, x):
            return F.threshold(x, threshold, value)

    torch.manual_seed(0)
    near = torch.tensor([threshold, 0.1, 6.0, 1.5, 0.0, -1.0], dtype=torch.float64).to(dtype)
    steps = torch.nextafter(near, torch.full_like(near, float("inf")))
    x = torch.cat([near, steps, torch.nextafter(near, torch.full_like(near, -float("inf"))),
                   torch.rand(50, dtype=dtype) * 8 - 1])
    program = torch.onnx.export(Threshold().eval(), (x,), dynamo=True, verbose=False, optimize=False,
                                custom_translation_table=THRESHOLD_TRANSLATIONS)
    ops = [node.op_type for node in program.model_proto.graph.node]
    assert expected_op in ops and ("Where" in ops) == (expected_op == "Where"), ops
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    expected = F.threshold(x, threshold, value).numpy()
    assert got.dtype == expected.dtype and np.array_equal(got, expected)
