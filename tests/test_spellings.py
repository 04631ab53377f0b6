"""Rules follow what an op does: subclasses, autowrapped functions, N-d convolutions, classifier choice."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import tsgb_fx


def same_padding(x, kernel: int, stride: int):
    """Shape arithmetic that symbolic tracing cannot follow (math.ceil of a traced size)."""
    size = x.shape[-1]
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return F.pad(x, [total // 2, total - total // 2] * 2)


class SamePadNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(same_padding(x, 3, 2))).mean((2, 3)))


def test_autowrap_functions_make_shape_arithmetic_traceable():
    model = SamePadNet().eval()
    with pytest.raises(tsgb_fx.TraceError):
        tsgb_fx.explainer(model, tracer="fx")
    e = tsgb_fx.explainer(model, tracer="fx", autowrap_functions=[same_padding])
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(e(x).logits, model(x))
    assert [site.rule for site in e.rules.values() if site.kind in ("conv", "classifier")] == ["tsgb_conv", "tsgb_fc"]


class MyConv(nn.Conv2d):
    """A subclass that keeps nn.Conv2d's forward."""


class MyBatchNorm(nn.BatchNorm2d):
    pass


@pytest.mark.parametrize("as_leaf", [False, True])
def test_module_subclasses_get_their_rules(as_leaf):
    model = nn.Sequential(MyConv(3, 4, 3), MyBatchNorm(4), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 3, 8, 8))
    e = tsgb_fx.explainer(model.eval(), leaf_modules=[MyConv, MyBatchNorm] if as_leaf else ())
    rules = sorted(site.rule for site in e.rules.values() if site.rule != "gradient")
    assert rules == ["ratio_avgpool", "ratio_batchnorm", "tsgb_conv", "tsgb_fc"]


@pytest.mark.parametrize("ndim", [1, 3])
def test_nd_convolution_models(ndim):
    conv, bn, pool = {1: (nn.Conv1d, nn.BatchNorm1d, nn.AvgPool1d), 3: (nn.Conv3d, nn.BatchNorm3d, nn.AvgPool3d)}[ndim]
    model = nn.Sequential(
        conv(2, 4, 3, stride=2, padding=1), bn(4), nn.ReLU(inplace=True), pool(2),
        conv(4, 4, 3, groups=2, padding=1), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3),
    )
    spatial = (16,) if ndim == 1 else (8, 8, 8)
    model(torch.randn(1, 2, *spatial))
    e = tsgb_fx.explainer(model.eval())
    x = torch.randn(2, 2, *spatial)
    result = e(x)
    assert result.saliency.shape == (2, 1, *spatial) and torch.isfinite(result.saliency).all()
    assert sum(site.rule == "tsgb_conv" for site in e.rules.values()) == 2
    with pytest.raises(ValueError, match=f"{ndim + 2}-D"):
        e(torch.randn(2, 2, *spatial, 4))


def test_classifier_choice_on_vgg():
    torch.manual_seed(0)
    model = torchvision.models.vgg11(num_classes=10).eval()
    last = tsgb_fx.explainer(model)
    every = tsgb_fx.explainer(model, classifier="all")
    linear = lambda e: [(site.module, site.rule) for site in e.rules.values() if site.kind in ("linear", "classifier")]
    assert linear(last) == [("classifier.0", "gradient"), ("classifier.3", "gradient"), ("classifier.6", "tsgb_fc")]
    assert linear(every) == [("classifier.0", "tsgb_fc"), ("classifier.3", "tsgb_fc"), ("classifier.6", "tsgb_fc")]
    # 96 x 96 leaves 3 x 3 positions at the last convolution: with one position, TSGB-Conv would
    # fix the map's shape and the classifier rule could only scale it
    x = torch.randn(1, 3, 96, 96)
    a, b = last(x, target=1).saliency, every(x, target=1).saliency
    assert (a / a.norm() - b / b.norm()).norm() > 1e-3
