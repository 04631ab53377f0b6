"""Zoo: every torchvision classification CNN and a dozen timm CNNs build an explainer and give
finite, non-constant maps (random init, small inputs). One model per family runs by default; the
rest are marked slow and run by `make test-all`."""

from __future__ import annotations

import pytest
import torch
import torchvision

import tsgb_fx

from .helpers import randomise_batch_norm

NOT_CNN = ("vit_", "swin_", "maxvit_")
TORCHVISION_CNNS = [
    name for name in torchvision.models.list_models(module=torchvision.models) if not name.startswith(NOT_CNN)
]
TORCHVISION_DEFAULT = {
    "alexnet", "convnext_tiny", "efficientnet_v2_s", "inception_v3", "mnasnet0_5", "mobilenet_v3_small",
    "regnet_y_400mf", "resnext50_32x4d", "shufflenet_v2_x0_5", "squeezenet1_1", "vgg11_bn",
}
WITHOUT_LINEAR_CLASSIFIER = {"squeezenet1_0", "squeezenet1_1"}

# tracer: the one "auto" must end up with
TIMM_CNNS = {
    "tf_efficientnet_lite0": "export", "efficientnet_b0": "fx", "mobilenetv3_small_100": "fx",
    "resnet50d": "fx", "regnety_002": "fx", "densenet121": "fx", "convnext_atto": "fx",
    "ghostnet_100": "fx", "mixnet_s": "fx", "rexnet_100": "fx", "cspresnet50": "fx",
    "efficientvit_b0": "export", "repvgg_a0": "fx", "hrnet_w18_small": "fx", "res2net50_14w_8s": "fx",
    "lcnet_050": "fx",
}
TIMM_DEFAULT = {"tf_efficientnet_lite0", "efficientnet_b0", "mobilenetv3_small_100", "regnety_002", "lcnet_050"}


def _marks(name, default):
    return pytest.param(name, marks=() if name in default else pytest.mark.slow)


def _assert_useful_map(explainer, size):
    x = torch.randn(2, 3, size, size)
    result = explainer(x)
    assert result.saliency.shape == (2, 1, size, size)
    assert torch.isfinite(result.saliency).all()
    assert result.saliency.flatten(1).std(1).min() > 0  # non-constant for every image


@pytest.mark.parametrize("name", [_marks(n, TORCHVISION_DEFAULT) for n in TORCHVISION_CNNS])
def test_torchvision_cnn(name):
    torch.manual_seed(0)
    kwargs = {"init_weights": True} if name in ("googlenet", "inception_v3") else {}
    model = randomise_batch_norm(torchvision.models.get_model(name, num_classes=10, **kwargs)).eval()
    explainer = tsgb_fx.explainer(model)
    assert explainer.tracer == "fx"
    classifiers = [site for site in explainer.rules.values() if site.kind == "classifier"]
    assert len(classifiers) == (0 if name in WITHOUT_LINEAR_CLASSIFIER else 1)
    assert all(site.rule == "tsgb_fc" for site in classifiers)
    _assert_useful_map(explainer, 80 if name == "inception_v3" else 64)


@pytest.mark.parametrize("name", [_marks(n, TIMM_DEFAULT) for n in TIMM_CNNS])
def test_timm_cnn(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = randomise_batch_norm(timm.create_model(name, num_classes=10)).eval()
    explainer = tsgb_fx.explainer(model, example_input=torch.randn(2, 3, 96, 96))
    assert explainer.tracer == TIMM_CNNS[name]
    batch_norms = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    ratio_rules = sum(site.rule == "ratio_batchnorm" for site in explainer.rules.values())
    assert ratio_rules >= batch_norms  # timm's BatchNormAct2d traces to F.batch_norm and is still found
    _assert_useful_map(explainer, 96)


def test_fx_refuses_shape_arithmetic_and_names_the_module():
    timm = pytest.importorskip("timm")
    with pytest.raises(tsgb_fx.TraceError, match="conv_stem") as info:
        tsgb_fx.explainer(timm.create_model("tf_efficientnet_lite0"), tracer="fx")
    assert "tracer='export'" in str(info.value)
