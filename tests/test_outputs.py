"""Models that return logits plus auxiliaries: the output= selector, or a clear refusal at build time."""

from __future__ import annotations

import collections

import pytest
import torch
from torch import nn

import tsgb_fx

Outputs = collections.namedtuple("Outputs", "logits features")


class MultiOutput(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)
        self.aux = nn.Linear(6, 2)

    def forward(self, x):
        features = torch.relu(self.conv(x)).mean((2, 3))
        logits, aux = self.fc(features), self.aux(features)
        if self.kind == "tuple":
            return aux, logits
        if self.kind == "dict":
            return {"aux": aux, "logits": logits}
        return Outputs(logits, features)


def _logits(model, x):
    out = model(x)
    return {"tuple": lambda: out[1], "dict": lambda: out["logits"], "namedtuple": lambda: out.logits}[model.kind]()


SELECTORS = {"tuple": 1, "dict": "logits", "namedtuple": "logits"}


@pytest.mark.parametrize("tracer", ["fx", "export"])
@pytest.mark.parametrize("kind", list(SELECTORS))
def test_selector_picks_the_logits(kind, tracer):
    torch.manual_seed(0)
    model = MultiOutput(kind).eval()
    x = torch.randn(2, 3, 8, 8)
    e = tsgb_fx.explainer(model, tracer=tracer, example_input=x, output=SELECTORS[kind])
    result = e(x)
    torch.testing.assert_close(result.logits, _logits(model, x))
    classifiers = [site.module for site in e.rules.values() if site.kind == "classifier"]
    assert classifiers == ["fc"]  # the auxiliary head is gone, not mistaken for the classifier


def test_callable_selector():
    model = MultiOutput("dict").eval()
    x = torch.randn(1, 3, 8, 8)
    result = tsgb_fx.explainer(model, output=lambda out: out["logits"])(x)
    torch.testing.assert_close(result.logits, model(x)["logits"])


@pytest.mark.parametrize("kind, words", [("tuple", "output=<index>"), ("dict", "['aux', 'logits']"), ("namedtuple", "fields")])
def test_structured_output_without_selector_is_refused_at_build(kind, words):
    with pytest.raises(tsgb_fx.TraceError, match="output") as info:
        tsgb_fx.explainer(MultiOutput(kind))
    assert words in str(info.value)


@pytest.mark.parametrize("selector", [5, "logit", lambda out: 3])
def test_bad_selector_names_the_argument(selector):
    with pytest.raises(ValueError, match="output="):
        tsgb_fx.explainer(MultiOutput("dict" if isinstance(selector, str) else "tuple"), output=selector)
