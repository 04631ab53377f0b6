"""Property-based tests over randomly generated small CNNs and convolution geometries (hypothesis).

Random CNNs stack convolutions (random groups, stride, dilation, padding, padding mode), batch
norms, ReLU/ReLU6/SiLU, max and average pooling, residual additions and concatenations, and end
in a linear head. For each: the explainer builds, every map is finite, and the map equals the
module-swapping reference TSGB (tests/reference_tsgb.py), an independent implementation.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import tsgb_fx
from tsgb_fx.rules import tsgb_conv

from .helpers import randomise_batch_norm
from .reference_tsgb import reference_saliency, swap_in_reference_rules

PROPERTY_SETTINGS = settings(
    max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU}


class ConvBlock(nn.Sequential):
    """conv, batch norm (or Identity), activation: a Sequential, as torchvision's Conv2dNormActivation."""

    def __init__(self, conv: nn.Conv2d, batch_norm: bool, activation: str):
        bn = nn.BatchNorm2d(conv.out_channels) if batch_norm else nn.Identity()
        act = ACTIVATIONS[activation](inplace=True) if activation != "silu" else nn.SiLU()
        super().__init__(conv, bn, act)


class Residual(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return self.body(x) + x  # (`+=` here would break the eager reference's ReLU backward)


class Concat(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return torch.cat([x, self.body(x)], dim=1)


class RandomCNN(nn.Module):
    def __init__(self, blocks: list[nn.Module], channels: int, classes: int):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(channels, classes)

    def forward(self, x):
        return self.head(F.adaptive_avg_pool2d(self.blocks(x), 1).flatten(1))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def conv_layers(draw, in_channels: int, keep_shape: bool = False):
    groups = draw(st.sampled_from(_divisors(in_channels)))
    out_channels = in_channels if keep_shape else groups * draw(st.integers(1, 3))
    kernel = draw(st.sampled_from([1, 2, 3]))
    dilation = 1 if kernel == 1 else draw(st.integers(1, 2))
    if keep_shape:  # residual: same spatial size, odd kernel, 'same' padding
        kernel = draw(st.sampled_from([1, 3]))
        stride, padding = 1, dilation * (kernel // 2)
    else:
        stride = draw(st.integers(1, 2))
        padding = draw(st.integers(0, dilation * (kernel // 2)))
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"])) if padding else "zeros"
    return nn.Conv2d(in_channels, out_channels, kernel, stride, padding, dilation, groups, draw(st.booleans()), mode)


@st.composite
def random_cnns(draw):
    channels = input_channels = draw(st.sampled_from([1, 3]))
    size = input_size = draw(st.integers(10, 16))
    blocks: list[nn.Module] = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["conv", "conv", "maxpool", "avgpool", "residual", "concat"]))
        if kind in ("maxpool", "avgpool"):
            if size < 4:
                continue
            pool = nn.MaxPool2d(2) if kind == "maxpool" else nn.AvgPool2d(draw(st.sampled_from([2, 3])), stride=2, padding=draw(st.integers(0, 1)))
            blocks.append(pool)
            size = (size + 2 * getattr(pool, "padding", 0) - pool.kernel_size) // 2 + 1
            continue
        conv = draw(conv_layers(channels, keep_shape=kind == "residual"))
        block = ConvBlock(conv, draw(st.booleans()), draw(st.sampled_from(list(ACTIVATIONS))))
        span = conv.dilation[0] * (conv.kernel_size[0] - 1) + 1
        out_size = (size + 2 * conv.padding[0] - span) // conv.stride[0] + 1
        if kind == "concat" and out_size != size:
            kind = "conv"
        if out_size < 1:
            continue
        blocks.append(Residual(block) if kind == "residual" else Concat(block) if kind == "concat" else block)
        channels = channels + conv.out_channels if kind == "concat" else conv.out_channels
        size = out_size
    assume(blocks)
    model = RandomCNN(blocks, channels, classes=5)
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.bias is not None:
            nn.init.normal_(module.bias, std=0.1)
    randomise_batch_norm(model, seed)
    return model.double().eval(), input_channels, input_size


@PROPERTY_SETTINGS
@given(data=st.data())
def test_random_cnn_explainer_matches_reference(data):
    """Builds, is finite, keeps the forward, and equals the independent reference map."""
    model, channels, size = data.draw(random_cnns())
    x = torch.randn(2, channels, size, size, dtype=torch.float64)
    logits = model(x)
    explainer = tsgb_fx.explainer(model)
    result = explainer(x)
    torch.testing.assert_close(result.logits, logits.detach(), rtol=1e-12, atol=1e-12)  # BN folded: rounding
    assert torch.isfinite(result.saliency).all()
    expected = reference_saliency(swap_in_reference_rules(model, "head"), x, result.target)
    torch.testing.assert_close(result.saliency, expected, rtol=1e-6, atol=1e-9 * (expected.abs().max().item() + 1e-30))


@PROPERTY_SETTINGS
@given(conv=st.integers(1, 6).flatmap(lambda c: conv_layers(c)), size=st.integers(5, 11), seed=st.integers(0, 2**16))
def test_tsgb_conv_conserves_relevance(conv, size, seed):
    """sum(g_x * x) over the input == sum(g * y) over the output when every window holds mass."""
    assume(conv.padding_mode == "zeros" and conv.padding[0] == 0)  # padded windows hold no mass
    span = conv.dilation[0] * (conv.kernel_size[0] - 1) + 1
    assume(size >= span)
    torch.manual_seed(seed)
    conv = conv.double()
    x = (torch.rand(2, conv.in_channels, size, size, dtype=torch.float64) + 0.1).requires_grad_(True)
    y = tsgb_conv(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    g = torch.randn_like(y)
    (g_x,) = torch.autograd.grad(y, x, g)
    # input positions no window reads (dropped rows/columns) get no relevance and do not count
    torch.testing.assert_close((g_x * x).sum(), (g * y).sum().detach(), rtol=1e-9, atol=1e-9)


@PROPERTY_SETTINGS
@given(data=st.data())
def test_random_cnn_gradient_method_is_plain_autograd(data):
    model, channels, size = data.draw(random_cnns())
    x = torch.randn(2, channels, size, size, dtype=torch.float64)
    result = tsgb_fx.explainer(model, method="gradient")(x)
    leaf = x.clone().requires_grad_(True)
    logits = model(leaf)
    (expected,) = torch.autograd.grad(logits, leaf, F.one_hot(logits.argmax(1), logits.shape[1]).double())
    torch.testing.assert_close(result.attribution, expected)


@pytest.mark.slow
@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_cnn_onnx_export_matches_torch(data, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from tsgb_export import to_onnx
    from tsgb_export.runtime import OnnxExplainer

    model, channels, size = data.draw(random_cnns())
    model = model.float()
    x = torch.randn(3, channels, size, size)
    explainer = tsgb_fx.explainer(model)
    expected = explainer(x)
    path = to_onnx(explainer, tmp_path_factory.mktemp("onnx") / "model.onnx", x)
    got = OnnxExplainer(path, providers=["CPUExecutionProvider"])(x.numpy())
    assert (got.target == expected.target.numpy()).all()
    saliency = torch.from_numpy(got.saliency)
    assert (saliency - expected.saliency).norm() <= 1e-4 * expected.saliency.norm() + 1e-12
