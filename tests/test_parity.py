"""End-to-end parity: the graph-rewriting explainer against the module-swapping reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import tsgb_fx

from .explicit_models import calibrate_batch_norm
from .helpers import relative_error
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
    """Random weights; batch-norm statistics measured (see calibrate_batch_norm: with random
    statistics, random-init mobilenet_v2, googlenet and efficientnet_b0 give the same logits to
    1e-10 for any image, and their maps are rounding noise that no two implementations share)."""
    torch.manual_seed(seed)
    model = factory()
    calibrate_batch_norm(model, size=64, seed=seed)
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


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "mobilenet_v2",
                                  pytest.param("efficientnet_b0", marks=pytest.mark.slow)])
def test_channels_last_batches_match_reference(name):
    """A channels_last batch keeps that layout through every rule (the relevance edges of DenseNet,
    the depthwise live masks of MobileNetV2, EfficientNet's SiLU folds): the map is still the
    reference's, which does not depend on layout."""
    factory, classifier = MODELS[name]
    model = _prepared(factory)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    _check_parity(model, classifier, x)


@pytest.mark.parametrize("name", ["mobilenet_v2", pytest.param("efficientnet_b0", marks=pytest.mark.slow)])
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


class ReusedConvNet(nn.Module):
    """One convolution module called twice (shared weights) and a functional average pooling."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.shared = nn.Conv2d(6, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.shared(x))
        x = F.relu(self.bn(self.shared(x)))
        x = F.avg_pool2d(x, 2)
        return self.fc(x.mean((2, 3)))


def test_reused_module_gets_one_rule_per_call():
    model = _prepared(ReusedConvNet)
    explainer = tsgb_fx.explainer(model)
    modules = [site.module for site in explainer.rules.values() if site.kind == "conv"]
    assert modules.count("shared") == 2
    assert any(site.rule == "ratio_avgpool" for site in explainer.rules.values())
    # module swapping cannot see F.avg_pool2d: the reference runs the same model with a pooling module
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    result = explainer(x)
    reference = swap_in_reference_rules(_FunctionalPoolAsModule(model), "inner.fc")
    expected = reference_saliency(reference, x, result.target)
    assert relative_error(result.saliency, expected) < 1e-6


class _FunctionalPoolAsModule(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.pool = inner, nn.AvgPool2d(2)

    def forward(self, x):
        m = self.inner
        x = F.relu(m.stem(x))
        x = F.relu(m.shared(x))
        x = F.relu(m.bn(m.shared(x)))
        return m.fc(self.pool(x).mean((2, 3)))


def test_export_tracer_matches_reference():
    """The ATen-level graph (aten.conv2d, aten.batch_norm, in-place relu_/add_) gives the same map."""
    model = _prepared(torchvision.models.resnet18)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    explainer = tsgb_fx.explainer(model, tracer="export", example_input=x)
    assert explainer.tracer == "export"
    result = explainer(x)
    expected = reference_saliency(swap_in_reference_rules(model, "fc"), x, result.target)
    assert relative_error(result.saliency, expected) < 1e-6


def _rectified_flags(explainer):
    """input_rectified of each TSGB-Conv node, in graph order."""
    nodes = explainer.graph_module.graph.nodes
    return [node.kwargs["input_rectified"] for node in nodes if "input_rectified" in node.kwargs]


def test_rectified_input_shortcut_only_after_plain_rectifiers():
    """TSGB-Conv skips sign(x) only where a plain-gradient ReLU's backward zeroes x == 0 anyway."""
    model = torchvision.models.resnet18().eval()
    plain = _rectified_flags(tsgb_fx.explainer(model))
    # the stem reads the image and layer1.0.conv1 the max pool; all 18 others (downsample too) a ReLU
    assert plain == [False, False] + [True] * 18
    mixed = {**tsgb_fx.methods.tsgb().rules, "relu": tsgb_fx.methods.deconvnet().rules["relu"]}
    assert not any(_rectified_flags(tsgb_fx.explainer(model, method=mixed)))


def _call_targets(explainer):
    return [node.target for node in explainer.graph_module.graph.nodes if node.op == "call_function"]


def test_batch_norms_fold_into_the_convolution_they_follow():
    """Every resnet18 BN follows a conv that feeds only it: all 20 fold, the record keeps them."""
    model = torchvision.models.resnet18().eval()
    explainer = tsgb_fx.explainer(model)
    folded = [node.kwargs.get("batch_norm") for node in explainer.graph_module.graph.nodes
              if node.target is tsgb_fx.rules.tsgb_conv]
    assert len(folded) == 20 and all(statistics is not None for statistics in folded)
    assert tsgb_fx.rules.ratio_batch_norm not in _call_targets(explainer)
    assert sum(site.rule == "ratio_batchnorm" for site in explainer.rules.values()) == 20
    # a BN with another rule (here the plain gradient) stays a separate op
    plain_bn = {**tsgb_fx.methods.tsgb().rules, "bn1": None}
    kept = tsgb_fx.explainer(model, method=plain_bn)
    convs = [node for node in kept.graph_module.graph.nodes if node.target is tsgb_fx.rules.tsgb_conv]
    assert [node.kwargs.get("batch_norm") is not None for node in convs] == [False] + [True] * 19
    assert "bn1" in {str(node.target) for node in kept.graph_module.graph.nodes if node.op == "call_module"}


def test_silus_fold_and_tsgb_readers_leave_the_sign_to_them():
    """efficientnet_b0's 49 SiLUs each follow a batch norm that follows a conv: all fold into
    it. The 32 read only by a convolution (expansion -> depthwise, squeeze-excitation fc1 -> fc2,
    stem -> first depthwise) hand the sign upstream; those read by the squeeze-excitation's
    product or the pooling keep it. The maps stay the reference's (test_torchvision_model_matches_reference
    and the property tests compare folded SiLU nets with the independent reference)."""
    explainer = tsgb_fx.explainer(torchvision.models.efficientnet_b0().eval())
    convs = [node for node in explainer.graph_module.graph.nodes if node.target is tsgb_fx.rules.tsgb_conv]
    folded = [node for node in convs if node.kwargs.get("output_activation") == "silu"]
    unsigned = [node for node in folded if node.kwargs["activation_unsigned"]]
    assert len(folded) == 49 and len(unsigned) == 32
    readers = [node for node in convs if node.kwargs.get("input_sign_upstream")]
    assert {node.kwargs["x"] for node in readers} == set(unsigned)
    assert all(len(node.users) == 1 for node in unsigned)
    assert sum(site.kind == "silu" and site.rule == "gradient" for site in explainer.rules.values()) == 49
