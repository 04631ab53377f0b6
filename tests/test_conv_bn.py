"""Batch norm folded into the convolution's weights (eager): the two ops' output, never stale.

Checked against torch's own convolution followed by its own eval batch norm, and the maps of
a model whose folded tensors were changed after the first call against the independent
module-swapping reference built from the changed model.
"""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from torch import nn

import tsgb_fx
from tsgb_fx.rules import conv_bn
from tsgb_fx.rules.conv_bn import folded_conv_parameters

from .helpers import randomise_batch_norm
from .reference_tsgb import reference_saliency, swap_in_reference_rules

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BATCH_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("conv_bias", [False, True])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("groups", [1, 2])
def test_folded_parameters_give_the_convolution_then_the_batch_norm(ndim, conv_bias, affine, groups):
    torch.manual_seed(ndim + 2 * conv_bias + 4 * affine)
    conv = CONV[ndim](4, 6, 3, padding=1, stride=2, groups=groups, bias=conv_bias).double()
    batch_norm = randomise_batch_norm(BATCH_NORM[ndim](6, affine=affine).double()).eval()
    x = torch.randn(2, 4, *(7,) * ndim, dtype=torch.float64)
    expected = batch_norm(conv(x))
    arguments = (batch_norm.running_mean, batch_norm.running_var, batch_norm.weight, batch_norm.bias, batch_norm.eps)
    weight, bias = folded_conv_parameters(conv.weight, conv.bias, arguments)
    actual = conv._conv_forward(x, weight, bias)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    assert not weight.requires_grad and not bias.requires_grad


class ConvBatchNormNet(nn.Module):
    """On a 9x9 input: a plain conv + BN with a conv bias (folded), a depthwise one (folded,
    masked), a depthwise conv with a bias of its own before its BN (masked: the two ops are kept)
    and a late conv whose 5x5 output has fewer positions than a filter has weights (72: kept)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.depthwise = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.biased = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU())
        self.late = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.pool(self.late(self.biased(self.depthwise(self.stem(x))))).flatten(1))

    def folded_bytes(self):
        """What the fold should keep: the stem's and the depthwise layer's weights plus a bias each."""
        return sum((block[0].weight.numel() + block[1].running_mean.numel()) * 8 for block in (self.stem, self.depthwise))


def _model():
    torch.manual_seed(0)
    return randomise_batch_norm(ConvBatchNormNet().double().eval(), seed=1)


def _check_against_reference(model, explainer, x, target):
    """The explainer's logits and map against ``model``'s own forward and the reference's map."""
    result = explainer(x, target)
    torch.testing.assert_close(result.logits, model(x).detach(), rtol=1e-12, atol=1e-12)
    expected = reference_saliency(swap_in_reference_rules(model, "head"), x, target)
    torch.testing.assert_close(result.saliency, expected, rtol=1e-8, atol=1e-12)


BATCH_NORM_TENSORS = ["1.running_mean", "1.running_var", "1.weight", "1.bias"]
UPDATED = [(block, tensor) for block in ("stem", "depthwise", "biased", "late")
           for tensor in ["0.weight", *(["0.bias"] if block in ("stem", "biased") else []), *BATCH_NORM_TENSORS]]


@pytest.mark.parametrize("block, tensor", UPDATED)
def test_in_place_update_after_a_call_is_seen(block, tensor):
    model = _model()
    explainer = tsgb_fx.explainer(model)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    target = torch.tensor([1, 3])
    explainer(x, target)  # folds and caches
    index, name = tensor.split(".")
    source = getattr(getattr(model, block)[int(index)], name)
    with torch.no_grad():
        source.mul_(1.7).add_(0.05)
    _check_against_reference(model, explainer, x, target)


def test_replaced_data_and_loaded_state_are_seen():
    model = _model()
    explainer = tsgb_fx.explainer(model)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    target = torch.tensor([0, 4])
    explainer(x, target)
    model.stem[0].weight.data = model.stem[0].weight.data * -2.0  # new storage, same version counter
    _check_against_reference(model, explainer, x, target)
    other = randomise_batch_norm(_model(), seed=7)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.mul_(0.5)
    model.load_state_dict(other.state_dict())
    _check_against_reference(model, explainer, x, target)


def test_conversion_of_the_explainer_is_seen():
    model = _model().float()
    explainer = tsgb_fx.explainer(model)
    explainer(torch.randn(2, 3, 9, 9))  # folds in float32
    explainer.double()  # new storage for the shared parameters; new buffers in the explainer only
    _check_against_reference(copy.deepcopy(model).double(), explainer, torch.randn(2, 3, 9, 9, dtype=torch.float64),
                             torch.tensor([2, 2]))


def test_folds_are_kept_where_they_pay_and_go_with_the_model():
    def explain_once():
        model = _model()
        tsgb_fx.explainer(model)(torch.randn(1, 3, 9, 9, dtype=torch.float64))
        return conv_bn.cached_bytes(), model.folded_bytes()

    gc.collect()
    before = conv_bn.cached_bytes()
    during, expected = explain_once()
    gc.collect()
    assert during - before == expected
    assert conv_bn.cached_bytes() == before


def test_traced_graph_keeps_the_two_ops():
    graph = tsgb_fx.explainer(_model()).explicit(torch.randn(1, 3, 9, 9, dtype=torch.float64))
    batch_norms = [node for node in graph.graph.nodes if "batch_norm" in str(node.target)]
    assert len(batch_norms) == 4  # runtimes fold batch norms themselves; the graph keeps the model's weights
