"""Explainer.explicit(example_input) fixes the explicit graph to the size you explain."""

from __future__ import annotations

import torch
from torch import nn

import tsgb_fx


def test_explicit_takes_the_example_size():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5))
    model(torch.randn(1, 3, 40, 48))
    explainer = tsgb_fx.explainer(model.eval())
    x = torch.randn(2, 3, 40, 48)
    graph = explainer.explicit(x)
    with torch.inference_mode():
        logits, saliency = graph(x, torch.tensor([1, -1]))
    expected = explainer(x, target=torch.tensor([1, int(logits[1].argmax())]))
    torch.testing.assert_close(saliency, expected.saliency, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(logits, expected.logits)
