"""tsgb_fx.pooling: max pools routed through the channels-last kernel give torch's own numbers.

The values and the input gradient of :func:`max_pool2d` are compared exactly with ``F.max_pool2d``
and autograd on inputs full of ties (rectified zeros, small integers, all-zero windows), where
the argmax is decided by the kernels' tie-breaking; :func:`route_max_pools` is checked on every
spelling it swaps, the ones it must leave, and a whole explainer against the reference rules.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import tsgb_fx
from tsgb_fx.pooling import max_pool2d, route_max_pools

from .helpers import relative_error
from .reference_tsgb import reference_saliency, swap_in_reference_rules

WINDOWS = {  # kernel_size, stride, padding, dilation, ceil_mode
    "resnet stem": (3, 2, 1, 1, False),
    "2x2": (2, None, 0, 1, False),
    "dilated, ceil": (3, 2, 1, 2, True),
    "rectangular": ((3, 2), (1, 2), (1, 0), 1, False),
}


def _inputs_with_ties() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "rectified": torch.relu(torch.randn(2, 5, 13, 11)),
        "small integers": torch.randint(0, 3, (2, 5, 13, 11)).float(),
        "zeros": torch.zeros(1, 3, 6, 6),
    }


@pytest.mark.parametrize("window", list(WINDOWS))
@pytest.mark.parametrize("data", list(_inputs_with_ties()))
def test_routed_max_pool_equals_torchs_values_and_gradient(window, data):
    x = _inputs_with_ties()[data]
    routed_input, plain_input = x.clone().requires_grad_(), x.clone().requires_grad_()
    routed = max_pool2d(routed_input, *WINDOWS[window])
    plain = F.max_pool2d(plain_input, *WINDOWS[window])
    assert torch.equal(routed, plain) and routed.is_contiguous()
    signal = torch.randn_like(plain)
    routed.backward(signal)
    plain.backward(signal)
    assert torch.equal(routed_input.grad, plain_input.grad)
    assert torch.equal(x, _inputs_with_ties()[data])  # the caller's tensor is untouched


def test_channels_last_and_unbatched_inputs_keep_their_layout():
    x = torch.randn(2, 4, 9, 9).contiguous(memory_format=torch.channels_last)
    pooled = max_pool2d(x, 3, 2, 1)
    assert pooled.is_contiguous(memory_format=torch.channels_last) and torch.equal(pooled, F.max_pool2d(x, 3, 2, 1))
    unbatched = torch.randn(4, 9, 9)
    assert torch.equal(max_pool2d(unbatched, 2), F.max_pool2d(unbatched, 2))


class Spellings(nn.Module):
    """Every spelling route_max_pools swaps, and two it must leave (indices asked for)."""

    def __init__(self):
        super().__init__()
        self.pool = nn.MaxPool2d(3, stride=1, padding=1)
        self.pool_with_indices = nn.MaxPool2d(2, return_indices=True)

    def forward(self, x):
        x = self.pool(x)
        x = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        x = torch.max_pool2d(x, [3, 3], [1, 1], [1, 1])
        x = F.max_pool2d(x, 2, ceil_mode=True)
        values, _ = self.pool_with_indices(x)
        kept, _ = F.max_pool2d(values, 1, return_indices=True)
        return kept


def test_route_max_pools_swaps_every_spelling_and_leaves_those_with_indices():
    model = Spellings()
    graph_module = fx.symbolic_trace(model)
    assert route_max_pools(graph_module) == 4
    targets = [node.target for node in graph_module.graph.nodes if node.op in ("call_function", "call_module")]
    assert targets.count(max_pool2d) == 4 and "pool_with_indices" in targets
    assert not hasattr(graph_module, "pool") and hasattr(model, "pool")  # the model keeps its modules
    x = torch.relu(torch.randn(2, 3, 11, 11))
    routed_input, plain_input = x.clone().requires_grad_(), x.clone().requires_grad_()
    routed, plain = graph_module(routed_input), model(plain_input)
    assert torch.equal(routed, plain)
    routed.sum().backward()
    plain.sum().backward()
    assert torch.equal(routed_input.grad, plain_input.grad)


def test_explainer_routes_max_pools_and_keeps_the_reference_maps():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    ).double().eval()
    explainer = tsgb_fx.explainer(model)
    graph = explainer.graph_module.graph
    assert sum(node.target is max_pool2d for node in graph.nodes) == 2
    images = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    target = torch.tensor([1, 4, 0])
    expected = reference_saliency(swap_in_reference_rules(model, "9"), images, target)  # "9": the classifier
    assert relative_error(explainer(images, target=target).saliency, expected) < 1e-10
