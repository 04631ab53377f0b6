"""Baseline methods through the rewrite engine, against independent computations.

gradient and grad_x_input against plain autograd; guided_backprop and deconvnet against Captum
(which hooks ``nn.ReLU`` modules) on torchvision models, and against a guided backprop computed
by hand, layer by layer, on a model whose rectifiers are functional, in-place and ReLU6 (which
Captum cannot see). Then user rule maps: kind keys, module-name keys overriding them, errors.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import tsgb_fx
from tsgb_fx.methods import Method, Rule, tsgb
from tsgb_fx.ops import find_op_sites
from tsgb_fx.rules import deconvnet_relu, guided_relu, tsgb_conv
from tsgb_fx.trace import trace

from .helpers import randomise_batch_norm


def _model(factory, seed=0, **kwargs):
    torch.manual_seed(seed)
    return randomise_batch_norm(factory(**kwargs), seed).double().eval()


@pytest.fixture(scope="module")
def resnet():
    return _model(torchvision.models.resnet18, num_classes=10)


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.randn(2, 3, 64, 64, dtype=torch.float64)


def _input_gradient(model, x, target):
    x = x.clone().requires_grad_(True)
    logits = model(x)
    (gradient,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), x)
    return gradient


# --------------------------------------------------------------------------- autograd methods


@pytest.mark.parametrize("method", ["gradient", "grad_x_input"])
def test_gradient_methods_match_autograd(resnet, images, method):
    target = torch.tensor([2, 7])
    result = tsgb_fx.explainer(resnet, method=method)(images, target)
    gradient = _input_gradient(resnet, images, target)
    expected = gradient if method == "gradient" else gradient * images
    torch.testing.assert_close(result.attribution, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(result.saliency, expected.sum(1, keepdim=True), rtol=1e-10, atol=1e-12)


def test_gradient_attribution_with_several_targets_per_image(resnet, images):
    targets = torch.tensor([[1, 4], [9, 9]])
    result = tsgb_fx.explainer(resnet, method="gradient")(images, targets)
    for column in range(2):
        expected = _input_gradient(resnet, images, targets[:, column])
        torch.testing.assert_close(result.attribution[:, column], expected, rtol=1e-10, atol=1e-12)


def test_autograd_methods_replace_nothing(resnet):
    for method in ("gradient", "grad_x_input"):
        e = tsgb_fx.explainer(resnet, method=method)
        assert {site.rule for site in e.rules.values()} == {"gradient"}
        assert e.method == method and e.options == {}


# --------------------------------------------------------------------------- against Captum


def _captum(model, method, x, target):
    from captum.attr import Deconvolution, GuidedBackprop

    attribution = {"guided_backprop": GuidedBackprop, "deconvnet": Deconvolution}[method]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return attribution(model).attribute(x.clone(), target=target)


def _no_inplace(model):
    """A copy whose in-place ReLUs are out-of-place: Captum's full backward hooks refuse in-place outputs."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if hasattr(module, "inplace"):
            module.inplace = False
    return model


@pytest.mark.parametrize("method", ["guided_backprop", "deconvnet"])
def test_rectifier_methods_match_captum_on_resnet18(resnet, images, method):
    target = torch.tensor([3, 8])
    e = tsgb_fx.explainer(resnet, method=method)
    result = e(images, target)
    expected = _captum(_no_inplace(resnet), method, images, target)
    assert sum(site.kind == "relu" for site in e.rules.values()) == 17  # the stem + 2 per block, 8 blocks
    torch.testing.assert_close(result.attribution, expected, rtol=1e-10, atol=1e-12)
    gradient = _input_gradient(resnet, images, target)
    assert (result.attribution - gradient).abs().max() > 1e-3 * gradient.abs().max()  # not the plain gradient


@pytest.mark.slow
@pytest.mark.parametrize("method", ["guided_backprop", "deconvnet"])
def test_rectifier_methods_match_captum_on_vgg11(method):
    model = _model(torchvision.models.vgg11, num_classes=10)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    result = tsgb_fx.explainer(model, method=method)(x, 4)
    torch.testing.assert_close(result.attribution, _captum(_no_inplace(model), method, x, 4), rtol=1e-10, atol=1e-12)


class SmallVGG(nn.Module):
    """VGG-shaped (conv/ReLU/max pool, then ReLU'd linear layers): vgg11's structure at test size."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(True), nn.Dropout(), nn.Linear(32, 5),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


@pytest.mark.parametrize("method", ["guided_backprop", "deconvnet"])
def test_rectifier_methods_match_captum_on_a_vgg_shaped_net(method):
    model = _model(SmallVGG)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    result = tsgb_fx.explainer(model, method=method)(x)
    torch.testing.assert_close(result.attribution, _captum(_no_inplace(model), method, x, result.target),
                               rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- by hand


class Rectified(nn.Module):
    """Every spelling of a rectifier: F.relu, in-place relu_, x.relu(), ReLU6 module (in-place), F.relu6, F.hardtanh."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 3, 3, 3))
        self.w2 = nn.Parameter(torch.randn(6, 6, 3, 3) * 0.5)
        self.w3 = nn.Parameter(torch.randn(6, 6, 1, 1))
        self.act6 = nn.ReLU6(inplace=True)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        a = F.relu(F.conv2d(x, self.w1, padding=1))       # 8x8
        b = F.conv2d(a, self.w2, stride=2, padding=1)      # 4x4
        b.relu_()
        c = self.act6(F.conv2d(b, self.w3) + 3.0)          # ReLU6 that saturates
        d = F.hardtanh(c - 1.0, -0.5, 4.0)                 # a hardtanh
        e = F.relu6(d * 2.0).relu()
        return self.fc(e.flatten(1))


def _hand_computed(model: Rectified, x, target, rule):
    """The backward written out layer by layer: conv transposes via torch.nn.grad, rectifiers by ``rule``."""
    w1, w2, w3, fc = model.w1, model.w2, model.w3, model.fc.weight
    with torch.no_grad():
        p1 = F.conv2d(x, w1, padding=1); a = p1.relu()
        p2 = F.conv2d(a, w2, stride=2, padding=1); b = p2.relu()
        p3 = F.conv2d(b, w3) + 3.0; c = p3.clamp(0, 6)
        p4 = c - 1.0; d = p4.clamp(-0.5, 4.0)
        p5 = d * 2.0; e5 = p5.clamp(0, 6)
        p6 = e5  # .relu() of a non-negative tensor
        g = torch.zeros(x.shape[0], fc.shape[0], dtype=x.dtype)
        g[torch.arange(x.shape[0]), target] = 1.0
        g = (g @ fc).view_as(p6)
        g = rule(p6, g, 0.0, None)
        g = rule(p5, g, 0.0, 6.0) * 2.0
        g = rule(p4, g, -0.5, 4.0)
        g = rule(p3, g, 0.0, 6.0)
        g = torch.nn.grad.conv2d_input(b.shape, w3, g)
        g = rule(p2, g, 0.0, None)
        g = torch.nn.grad.conv2d_input(a.shape, w2, g, stride=2, padding=1)
        g = rule(p1, g, 0.0, None)
        g = torch.nn.grad.conv2d_input(x.shape, w1, g, padding=1)
    saturated = int((p3 >= 6).sum()), int((p4 >= 4).sum()), int((p4 <= -0.5).sum())
    return g, saturated


def _guided(pre, g, low, high):
    passes = (pre > low) & (pre < high if high is not None else True)
    return torch.where(passes, g.clamp(min=0), torch.zeros_like(g))


def _deconv(pre, g, low, high):
    return g.clamp(min=0)


@pytest.mark.parametrize("tracer", ["fx", "export"])
@pytest.mark.parametrize("method, rule", [("guided_backprop", _guided), ("deconvnet", _deconv)])
def test_functional_inplace_and_relu6_match_hand_computed(method, rule, tracer):
    torch.manual_seed(3)
    model = Rectified().double().eval()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 4])
    e = tsgb_fx.explainer(model, method=method, tracer=tracer, example_input=x)
    result = e(x, target)
    expected, saturated = _hand_computed(model, x, target, rule)
    assert all(count > 0 for count in saturated)  # the upper bounds matter in this case
    assert sum(site.kind == "relu" for site in e.rules.values()) == 6
    torch.testing.assert_close(result.attribution, expected, rtol=1e-10, atol=1e-12)
    assert torch.equal(result.logits, model(x))


def test_captum_misses_functional_rectifiers_and_tsgb_fx_does_not():
    torch.manual_seed(3)
    model = Rectified().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    ours = tsgb_fx.explainer(model, method="guided_backprop")(x, 1).attribution
    expected, _ = _hand_computed(model, x, torch.tensor([1, 1]), _guided)
    captum = _captum(_no_inplace(model), "guided_backprop", x, 1)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    assert (captum - expected).abs().max() > 1e-3 * expected.abs().max()


def test_every_rectifier_spelling_is_recognised_with_its_bounds():
    graph_module = trace(Rectified(), "fx").graph_module
    bounds = [(s.arguments["min_val"], s.arguments["max_val"]) for s in find_op_sites(graph_module) if s.kind == "relu"]
    assert bounds == [(0.0, None), (0.0, None), (0.0, 6.0), (-0.5, 4.0), (0.0, 6.0), (0.0, None)]
    module = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Hardtanh(-2, 3), nn.ReLU6(), nn.ReLU(inplace=True))
    for tracer in ("fx", "export"):
        traced = trace(module, tracer, example_input=torch.randn(2, 3, 4, 4)).graph_module
        sites = [s for s in find_op_sites(traced) if s.kind == "relu"]
        assert [(s.arguments["min_val"], s.arguments["max_val"]) for s in sites] == [(-2.0, 3.0), (0.0, 6.0), (0.0, None)]
        assert [s.module for s in sites] == ["1", "2", "3"]


def test_rectifier_rules_compute_the_ordinary_forward():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 5.0, 6.0, 7.0], dtype=torch.float64)
    for low, high in ((0.0, None), (0.0, 6.0), (-1.0, 1.0)):
        expected = F.relu(x) if high is None else F.hardtanh(x, low, high)
        assert torch.equal(guided_relu(x, low, high), expected)
        assert torch.equal(deconvnet_relu(x, low, high), expected)


# --------------------------------------------------------------------------- user maps


def test_tsgb_as_a_user_map_is_tsgb(resnet, images):
    expected = tsgb_fx.explainer(resnet)(images).saliency
    e = tsgb_fx.explainer(resnet, method=dict(tsgb().rules))
    assert e.method == "custom" and e.times_input
    assert torch.equal(e(images).saliency, expected)


def test_module_name_keys_override_kind_keys(resnet, images):
    rules = {**tsgb().rules, "layer4.1.conv2": None, "layer1.0.relu": Rule("guided", guided_relu)}
    e = tsgb_fx.explainer(resnet, method=rules)
    by_module = {}
    for site in e.rules.values():
        by_module.setdefault(site.module, set()).add(site.rule)
    assert by_module["layer4.1.conv2"] == {"gradient"}
    assert by_module["layer4.1.conv1"] == {"tsgb_conv"}
    assert by_module["layer1.0.relu"] == {"guided"}  # both calls of the reused module
    assert by_module["layer1.1.relu"] == {"gradient"}
    assert sum(site.module == "layer1.0.relu" for site in e.rules.values()) == 2
    assert not torch.equal(e(images).saliency, tsgb_fx.explainer(resnet)(images).saliency)


class PlainReLU(nn.Module):
    """A ReLU that Captum does not hook (not an nn.ReLU)."""

    def forward(self, x):
        return torch.relu(x)


def test_a_name_key_keeps_one_module_plain_as_captum_does_for_a_module_it_cannot_see(resnet, images):
    method = Method("mixed", {"relu": Rule("guided", guided_relu), "layer3.0.relu": None}, times_input=False)
    result = tsgb_fx.explainer(resnet, method=method)(images, 5)
    reference = _no_inplace(resnet)
    reference.layer3[0].relu = PlainReLU()
    torch.testing.assert_close(result.attribution, _captum(reference, "guided_backprop", images, 5),
                               rtol=1e-10, atol=1e-12)


def test_unknown_keys_and_misplaced_rules_are_refused(resnet):
    with pytest.raises(ValueError, match=r"'layer4\.1\.conv3'.*did you mean 'layer4\.1\.conv2'|'layer4\.1\.conv3'.*'layer4\.1\.conv"):
        tsgb_fx.explainer(resnet, method={"layer4.1.conv3": None})
    with pytest.raises(ValueError, match=r"'layer4'.*module that calls the op itself.*'layer4\.0\.conv1'"):
        tsgb_fx.explainer(resnet, method={"layer4": None})
    with pytest.raises(ValueError, match=r"'relus'.*did you mean 'relu'"):
        tsgb_fx.explainer(resnet, method={"relus": None})
    with pytest.raises(ValueError, match=r"rule 'guided' cannot replace node .*conv.*'layer1\.0\.conv1'"):
        tsgb_fx.explainer(resnet, method={"layer1.0.conv1": Rule("guided", guided_relu)})
    with pytest.raises(ValueError, match=r"rule 'tsgb_conv' cannot replace .*relu"):
        tsgb_fx.explainer(resnet, method={"relu": Rule("tsgb_conv", tsgb_conv)})
    with pytest.raises(TypeError, match=r"method\['conv'\] must be a tsgb_fx.Rule"):
        tsgb_fx.explainer(resnet, method={"conv": tsgb_conv})
    with pytest.raises(ValueError, match="conv_groups"):
        tsgb_fx.explainer(resnet, method="gradient", conv_groups="layer")
    with pytest.raises(ValueError, match="classifier"):
        tsgb_fx.explainer(resnet, method={"conv": None}, classifier="all")
    with pytest.raises(TypeError, match="method"):
        tsgb_fx.explainer(resnet, method=3)

