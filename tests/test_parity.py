"""End-to-end parity: the graph-rewriting explainer against the module-swapping reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import tsgb_fx

from .helpers import randomise_batch_norm, relative_error
from .reference_tsgb import reference_conv2d, reference_saliency, swap_in_reference_rules

MODELS = {  # name: (factory, classifier module)
    "resnet18": (torchvision.models.resnet18, "fc"),
    "vgg11": (torchvision.models.vgg11, "classifier.6"),
    "densenet121": (torchvision.models.densenet121, "classifier"),
    "mobilenet_v2": (torchvision.models.mobilenet_v2, "classifier.1"),
    "googlenet": (lambda: torchvision.models.googlenet(init_weights=True), "fc"),
    "efficientnet_b0": (torchvision.models.efficientnet_b0, "classifier.1"),
}


class FunctionalNet(nn.Module):
    """Functional convolutions, an in-place ``+=``, ``torch.cat`` and one ReLU module used three times."""

    conv2d = staticmethod(F.conv2d)  # the reference swaps in its own

    def __init__(self):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3), nn.Parameter(torch.randn(8) * 0.1)
        self.w2 = nn.Parameter(torch.randn(8, 8, 3, 3) * 0.2)
        self.w3 = nn.Parameter(torch.randn(16, 16, 1, 1) * 0.3)
        self.act = nn.ReLU()
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        h = self.act(self.conv2d(x, self.w1, self.b1, padding=1))
        y = self.conv2d(h, self.w2, None, 1, 1)
        y += h
        y = F.relu(y)
        z = torch.cat([y, h], dim=1)
        z = self.act(self.bn(self.conv2d(z, self.w3, stride=2)))
        return self.fc(self.act(F.adaptive_avg_pool2d(z, 1).flatten(1)))


def _prepared(factory, seed=0):
    torch.manual_seed(seed)
    model = factory()
    randomise_batch_norm(model, seed)
    return model.double().eval()


def _check_parity(model, classifier, x, conv_groups="reference", reference=None):
    explainer = tsgb_fx.explainer(model, conv_groups=conv_groups)
    result = explainer(x)
    reference = reference or swap_in_reference_rules(model, classifier, conv_groups)
    expected = reference_saliency(reference, x, result.target)
    assert torch.equal(result.target, model(x).argmax(1))
    assert relative_error(result.saliency, expected) < 1e-6
    assert result.saliency.abs().sum() > 0


@pytest.mark.parametrize("name", list(MODELS))
def test_torchvision_model_matches_reference(name):
    factory, classifier = MODELS[name]
    model = _prepared(factory)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    _check_parity(model, classifier, x)


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_b0"])
def test_layer_groups_match_reference_on_depthwise_models(name):
    factory, classifier = MODELS[name]
    model = _prepared(factory, seed=1)
    _check_parity(model, classifier, torch.randn(1, 3, 64, 64, dtype=torch.float64), conv_groups="layer")


def test_functional_model_matches_reference():
    model = _prepared(FunctionalNet)
    reference = swap_in_reference_rules(model, "fc")
    reference.conv2d = reference_conv2d()
    explainer = tsgb_fx.explainer(model)
    conv_rules = [site for site in explainer.rules.values() if site.kind == "conv"]
    assert len(conv_rules) == 3 and all(site.rule == "tsgb_conv" for site in conv_rules)
    _check_parity(model, "fc", torch.randn(3, 3, 16, 16, dtype=torch.float64), reference=reference)
