"""Relevance edges (tsgb_fx.rules.relevance): rule ops that exchange ``g * x`` give the reference map.

The reference (tests/reference_tsgb.py) divides exactly at every ratio rule and multiplies back in
every writer; the explainer skips both wherever the rewrite finds a relevance edge. The toy model
below has every kind of writer such an edge can meet, so each of the rewrite's conditions is
exercised: were a writer that keeps relevance at its zeros (a depthwise convolution summing all
channels without a mask) allowed to take the relevance, the map would differ (by 3e-3 here); a
folded ReLU, which would too, is refused by ``tsgb_conv`` itself.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tsgb_fx
from tsgb_fx.rules.conv import tsgb_conv
from tsgb_fx.rules.relevance import relevance_to_signal

from .explicit_models import calibrate_batch_norm
from .helpers import relative_error
from .reference_tsgb import reference_saliency, swap_in_reference_rules


def _conv_bn(cin, cout, groups=1, relu=False):
    layers = [nn.Conv2d(cin, cout, 3, padding=1, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([nn.ReLU()] if relu else []))


class DenseToy(nn.Module):
    """Concatenations read by batch norms, written by every kind of op (comments: what the rewrite does)."""

    def __init__(self):
        super().__init__()
        self.stem = _conv_bn(3, 8, relu=True)
        self.pool = nn.MaxPool2d(2)  # writer without a relevance form: converted back to the signal
        # zero over windows of dead units, which only layer groups or a mask drop: takes relevance with layer groups
        self.depthwise = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False)
        self.depthwise_bn = _conv_bn(8, 8, groups=8)  # its zeros masked by the batch-norm fold: takes it
        self.activated = _conv_bn(8, 8, relu=True)  # folded ReLU: keeps the signal form
        self.norm1 = nn.BatchNorm2d(32)
        self.grow = nn.Conv2d(32, 8, 3, padding=1)  # takes relevance
        self.side = nn.Conv2d(8, 8, 1)  # also read by the head: keeps the signal form
        self.norm2 = nn.BatchNorm2d(48)
        self.transition = nn.Conv2d(48, 16, 1)  # takes relevance from the pooling
        self.transition_pool = nn.AvgPool2d(2)  # reads and writes relevance
        self.norm3 = nn.BatchNorm2d(16)  # reads the pooling directly, not through a concatenation
        self.extra = nn.Conv2d(8, 8, 3, padding=1)
        self.norm4 = nn.BatchNorm2d(16)  # its concatenation is also read by the head: signal form
        self.fc = nn.Linear(40, 6)

    def forward(self, x):
        stem = self.stem(x)
        pooled = self.pool(stem)
        features = [pooled, self.depthwise(stem), self.depthwise_bn(pooled), self.activated(pooled)]
        grown = self.grow(F.relu(self.norm1(torch.cat(features, 1))))
        side = self.side(pooled)
        second = torch.cat([*features, grown, side], 1)
        pooled_again = self.transition_pool(self.transition(F.relu(self.norm2(second))))
        fourth = torch.cat([self.extra(pooled), pooled], 1)
        head = [
            F.relu(self.norm3(pooled_again)).mean((2, 3)),
            side.mean((2, 3)),
            F.relu(self.norm4(fourth)).mean((2, 3)) + fourth.mean((2, 3)),
        ]
        return self.fc(torch.cat(head, 1))


def _kwargs_by_module(explainer) -> dict[str, dict]:
    """Each rule node's keyword arguments, keyed by the module whose parameters it reads."""
    found = {}
    for node in explainer.graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        attributes = [arg.target for arg in node.all_input_nodes if arg.op == "get_attr"]
        if attributes:
            found[attributes[0].rsplit(".", 1)[0]] = node.kwargs
        elif "ratio_avg_pool" in node.name:
            found["transition_pool"] = node.kwargs
    return found


def _converted_writers(explainer) -> set[str]:
    """Names of the nodes whose output passes through relevance_to_signal."""
    graph = explainer.graph_module.graph
    return {node.args[0].name for node in graph.nodes if node.target is relevance_to_signal}


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    model = DenseToy()
    calibrate_batch_norm(model, size=16, seed=0)
    return model.double().eval()


@pytest.mark.parametrize("conv_groups, tracer", [("reference", "fx"), ("layer", "fx"), ("reference", "export")])
def test_relevance_edges_give_the_reference_map(toy, conv_groups, tracer):
    """torch.export spells the concatenations ``aten.cat``; symbolic tracing ``torch.cat``."""
    explainer = tsgb_fx.explainer(toy, conv_groups=conv_groups, tracer=tracer,
                                 example_input=torch.randn(1, 3, 16, 16, dtype=torch.float64))
    kwargs = _kwargs_by_module(explainer)
    assert [name for name in ("norm1", "norm2", "norm3", "norm4", "transition_pool")
            if kwargs[name].get("sends_relevance")] == ["norm1", "norm2", "norm3", "transition_pool"]
    takers = {name for name, arguments in kwargs.items() if arguments.get("output_relevance")}
    layer_groups = conv_groups == "layer"
    assert takers == {"grow", "transition", "transition_pool", "depthwise_bn.0"} | ({"depthwise"} if layer_groups else set())
    converted = _converted_writers(explainer)
    assert len(converted) == (3 if layer_groups else 4)  # pool, activated, side (and depthwise)
    assert not any("extra" in name for name in converted)

    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    result = explainer(x)
    reference = swap_in_reference_rules(toy, "fc", conv_groups)
    expected = reference_saliency(reference, x, result.target)
    assert relative_error(result.saliency, expected) < 1e-6
    assert result.saliency.abs().sum() > 0


def test_relevance_edges_in_the_explicit_graph_give_the_eager_map(toy):
    explainer = tsgb_fx.explainer(toy)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    graph = explainer.explicit(example_input=x)
    logits, saliency = graph(x, torch.tensor([1, 4]))
    expected = reference_saliency(swap_in_reference_rules(toy, "fc"), x, torch.tensor([1, 4]))
    assert relative_error(saliency, expected) < 1e-6


def test_relevance_edges_in_onnxruntime_give_the_reference_map(toy, tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from tsgb_export import to_onnx
    from tsgb_export.runtime import OnnxExplainer

    model = copy.deepcopy(toy).float()
    x, target = torch.randn(2, 3, 16, 16), torch.tensor([1, 4])
    to_onnx(tsgb_fx.explainer(model), tmp_path / "toy.onnx", example_input=x)
    saliency = torch.from_numpy(OnnxExplainer(tmp_path / "toy.onnx")(x.numpy(), target.numpy()).saliency)
    expected = reference_saliency(swap_in_reference_rules(toy, "fc"), x.double(), target)
    assert relative_error(saliency.double(), expected) < 1e-4  # float32 against float64


def test_relevance_to_signal_divides_the_summed_relevance_by_the_input():
    x = torch.tensor([2.0, -4.0, 0.0, 0.5], dtype=torch.float64, requires_grad=True)
    out = relevance_to_signal(x)
    assert torch.equal(out, x)
    (signal,) = torch.autograd.grad(out, x, torch.tensor([1.0, 2.0, 3.0, -1.0], dtype=torch.float64))
    assert torch.equal(signal[[0, 1, 3]], torch.tensor([0.5, -0.5, -2.0], dtype=torch.float64))
    assert signal[2] == 3e10  # the reciprocal of 0 is bounded at 1 / eps (tsgb_fx.rules.ratio)


def test_output_relevance_refuses_a_folded_activation_by_name():
    x, weight = torch.randn(1, 2, 4, 4), torch.randn(3, 2, 1, 1)
    with pytest.raises(ValueError, match="output_relevance"):
        tsgb_conv(x, weight, output_clamp=(0.0, None), output_relevance=True)
