"""Models for the explicit-graph and ONNX tests: a tiny net that reaches every decomposition,
and the torchvision/timm list of issue 3 (random weights, batch-norm statistics measured)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from .helpers import randomise_batch_norm


class TinyNet(nn.Module):
    """Every op kind the explicit graph must write out, in a net that traces in a second.

    Rules: convolution (plain, strided depthwise), batch norm, average pooling with ceil_mode and
    count_include_pad=False, the classifier. Plain gradients: ReLU, max pooling, a transposed
    convolution (convolution_backward), a residual addition, adaptive average pooling to 3 x 3
    (uneven windows), a hidden linear layer.
    """

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
        self.up = nn.ConvTranspose2d(8, 8, 3, stride=2, padding=1)
        self.avg = nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)
        self.head = nn.AdaptiveAvgPool2d(3)
        self.hidden = nn.Linear(8 * 9, 16)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.avg(self.pool(torch.relu(self.bn(self.stem(x)))))
        x = x + self.up(torch.relu(self.depthwise(x)))
        return self.fc(torch.relu(self.hidden(self.head(x).flatten(1))))


def calibrate_batch_norm(model: nn.Module, size: int, seed: int = 0) -> nn.Module:
    """Random affine batch-norm parameters, running statistics measured on random images.

    A randomly initialised net whose running statistics do not match its activations is a poor
    test subject for float32 parity: in mobilenet_v2 the activations shrink to ~1e-4 within a
    few blocks, every batch norm's output is then its constant shift, and the TSGB map is set
    by the signs of rounding noise (torch float32 and float64 maps differ by 2%, so no two
    float32 runtimes can agree to 1e-4). Measured statistics keep every layer's activations at
    the unit scale a trained net has; the weights stay random.
    """
    randomise_batch_norm(model, seed)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.momentum = 1.0  # running statistics := this batch's
    images = torch.randn(16, 3, size, size, generator=torch.Generator().manual_seed(seed + 2))
    model.train()
    with torch.no_grad():
        model(images)
    model.eval()
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    return model


def tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyNet()


def _torchvision(name: str):
    def build(seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return getattr(torchvision.models, name)()

    return build


def _timm(name: str):
    def build(seed: int = 0) -> nn.Module:
        timm = pytest.importorskip("timm")
        torch.manual_seed(seed)
        return timm.create_model(name)

    return build


# name: (factory, spatial size of the test images, explainer keyword arguments)
MODELS = {
    "tiny": (tiny_net, 32, {}),
    "resnet18": (_torchvision("resnet18"), 64, {}),
    "vgg11_bn": (_torchvision("vgg11_bn"), 64, {}),
    "densenet121": (_torchvision("densenet121"), 64, {}),
    "mobilenet_v2": (_torchvision("mobilenet_v2"), 64, {}),
    "efficientnet_b0": (_torchvision("efficientnet_b0"), 64, {}),
    # torch.fx cannot trace its 'same' padding: torch.export at the size it is explained at
    "tf_efficientnet_lite0": (_timm("tf_efficientnet_lite0"), 224, {"tracer": "export"}),
}


def model_params(default: tuple[str, ...]):
    """pytest params over MODELS: those in ``default`` run by default, the rest are slow."""
    return [pytest.param(name, marks=() if name in default else pytest.mark.slow) for name in MODELS]


def build(name: str, batch: int = 3, seed: int = 0):
    """(model, images) for a MODELS entry; the images are a fixed random batch."""
    factory, size, _ = MODELS[name]
    model = calibrate_batch_norm(factory(seed), size, seed)
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    return model, images


def explainer_for(name: str, model: nn.Module, images: torch.Tensor):
    import tsgb_fx

    options = dict(MODELS[name][2])
    if options.get("tracer") == "export":
        options["example_input"] = images[:2]
    return tsgb_fx.explainer(model, **options)
