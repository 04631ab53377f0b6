"""The exported graph keeps every stabiliser: finite maps for all-zero images and dead windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tsgb_fx

pytest.importorskip("onnxruntime")


class DeadWindows(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(2)
        self.pool = nn.AvgPool2d(2)
        self.head = nn.Linear(2, 3)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn(self.conv(x))))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_onnx_maps_stay_finite_where_the_rules_divide_by_zero(tmp_path):
    from tsgb_export import to_onnx
    from tsgb_export.runtime import OnnxExplainer

    torch.manual_seed(0)
    model = DeadWindows().eval()
    x = torch.randn(3, 1, 8, 8)
    x[0] = 0  # an all-zero image
    explainer = tsgb_fx.explainer(model)
    onnx = OnnxExplainer(to_onnx(explainer, tmp_path / "m.onnx", x), providers=["CPUExecutionProvider"])
    got, expected = onnx(x.numpy()), explainer(x)
    assert np.isfinite(got.saliency).all()
    np.testing.assert_allclose(got.saliency, expected.saliency.numpy(), rtol=1e-4, atol=1e-6)
