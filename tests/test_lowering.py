"""tsgb_export.lowering: the explicit graph respelled for onnxruntime computes the same maps.

The rewrites (broadcasts kept narrow, ``where`` masks as products, channel sums as products with
ones, signs as clamped products, tiled spreads as transposed convolutions) must change no number
beyond the order of additions: the
lowered graph is compared with the graph it came from and with the autograd explainer, in
float64, on a net that has every pattern the rewrites look for: rectifiers whose backward is a
``where``, TSGB-Conv's channel-broadcast signals sliced back to one channel, two broadcast
signals summed where one activation feeds two strided convolutions, non-rectified inputs (the
in-place ``sign(x) * BoxT(r)``), a depthwise convolution and an average pool whose windows tile
its input.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import tsgb_fx
from tsgb_export.lowering import lower_for_onnx

from .helpers import randomise_batch_norm, relative_error

aten = torch.ops.aten


class DownsampleBlock(nn.Module):
    """A ResNet block whose input feeds a strided 3x3 and a strided 1x1 convolution."""

    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, groups=out_channels, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = nn.Sequential(nn.Conv2d(channels, out_channels, 1, stride=2, bias=False),
                                        nn.BatchNorm2d(out_channels))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.downsample(x))


def _net() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
        DownsampleBlock(8, 16), DownsampleBlock(16, 16),
        nn.AvgPool2d(2), nn.Conv2d(16, 16, 1),  # a convolution whose input is not rectified
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )
    return randomise_batch_norm(model).double().eval()


def _patterns(module) -> dict[str, int]:
    """How many nodes of the five kinds that the lowering removes the graph holds."""
    counts = {"expand into a broadcasting op or a slice": 0, "where with a zero branch": 0, "channel sum": 0,
              "sign": 0, "expand spread over tiles": 0}
    for node in module.graph.nodes:
        counts["sign"] += node.target is aten.sign.default
        counts["expand spread over tiles"] += node.target is aten.expand.default and any(
            user.target in (aten.clone.default, aten._unsafe_view.default, aten.view.default) for user in node.users
        )
        if node.target is aten.sum.dim_IntList and list(node.args[1]) == [1]:
            counts["channel sum"] += 1
        if node.target is aten.expand.default and any(
            user.target in (aten.add.Tensor, aten.mul.Tensor, aten.slice.Tensor, aten.mul_.Tensor)
            for user in node.users
        ):
            counts["expand into a broadcasting op or a slice"] += 1
        if node.target is aten.where.self and any(
            isinstance(a, torch.fx.Node) and a.target is aten.scalar_tensor.default for a in node.args[1:]
        ):
            counts["where with a zero branch"] += 1
    return counts


def test_lowered_graph_gives_the_same_maps_without_broadcasts_or_where_masks():
    model = _net()
    explainer = tsgb_fx.explainer(model)
    images = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    target = torch.tensor([1, 4, -1])
    graph = explainer.explicit(images)
    before = _patterns(graph)
    assert all(count > 0 for count in before.values()), before  # the net exercises every rewrite
    expected_logits, expected_saliency = graph(images, target)

    distinct_sums = {(node.args[0], tuple(node.args[1]), node.args[2]) for node in graph.graph.nodes
                     if node.target is aten.sum.dim_IntList}
    assert len(distinct_sums) < before["channel sum"]  # a rectified output is summed as y and as x

    lowered = lower_for_onnx(graph)
    assert _patterns(lowered) == dict.fromkeys(before, 0)
    products = [node for node in lowered.graph.nodes if node.target is aten.matmul.default]
    assert len(products) == len(distinct_sums)  # each tensor's sum is written once
    logits, saliency = lowered(images, target)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=0)
    assert relative_error(saliency, expected_saliency) < 1e-14
    top1 = expected_logits.argmax(1)
    autograd = explainer(images, target=torch.where(target < 0, top1, target)).saliency
    assert relative_error(saliency, autograd) < 1e-9


def test_a_broadcast_that_changes_the_shape_is_kept():
    """``a + expand(b)`` with ``a`` as narrow as ``b``: dropping the expand would narrow the sum, so
    the sum runs narrow and is expanded after it."""

    def f(a, b):
        return torch.relu(a + b.expand(-1, 4, -1, -1)).sum((2, 3)) + torch.ones(4)

    from torch.fx.experimental.proxy_tensor import make_fx

    a, b = torch.randn(2, 1, 3, 3, dtype=torch.float64), torch.randn(2, 1, 3, 3, dtype=torch.float64)
    traced = make_fx(f, tracing_mode="symbolic")(a, b)
    lowered = lower_for_onnx(traced)
    add = next(node for node in lowered.graph.nodes if node.target is aten.add.Tensor)
    assert not any(arg.target is aten.expand.default for arg in add.args)
    assert [user.target for user in add.users] == [aten.expand.default]
    torch.testing.assert_close(lowered(a, b), f(a, b), rtol=0, atol=0)


def test_sums_over_one_inner_axis_become_products_with_ones():
    """Any one inner axis, with or without keepdim, negative or not: the same sums in float64.
    Sums the rewrite leaves (the batch or the last axis, several axes, a dtype, integers) stay."""

    def f(x, counts):
        rewritten = (x.sum(1, keepdim=True), x.sum(-4, keepdim=True), x.sum(2), x.sum(3, keepdim=True))
        kept = (x.sum(0, keepdim=True), x.sum(-1), x.sum((1, 2)), x.sum(1, dtype=torch.float32), counts.sum(1))
        return rewritten + kept

    from torch.fx.experimental.proxy_tensor import make_fx

    x = torch.randn(2, 5, 4, 3, 6, dtype=torch.float64)
    counts = torch.randint(0, 9, (2, 7, 3))
    traced = make_fx(f, tracing_mode="fake")(x, counts)  # sizes known, as the explicit graph's after the batch
    lowered = lower_for_onnx(traced)
    left = sorted((str(node.args[1]), str(node.args[0].meta["val"].dtype)) for node in lowered.graph.nodes
                  if node.target is aten.sum.dim_IntList)
    assert left == sorted([("[0]", "torch.float64"), ("[-1]", "torch.float64"), ("[1, 2]", "torch.float64"),
                           ("[1]", "torch.float64"), ("[1]", "torch.int64")])  # the float64 [1]: dtype=float32
    assert sum(node.target is aten.matmul.default for node in lowered.graph.nodes) == 3  # sum(1) == sum(-4)
    for got, want in zip(lowered(x, counts), f(x, counts), strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


TILING_POOLS = {  # spatial, input size, kernel, divisor_override
    "1-d": (1, (6,), (3,), None),
    "2-d": (2, (4, 6), (2, 3), None),
    "2-d divisor": (2, (4, 4), (2, 2), 3),
    "3-d": (3, (2, 4, 6), (1, 2, 3), None),
}


@pytest.mark.parametrize("case", list(TILING_POOLS))
def test_tiled_spreads_become_transposed_convolutions(case):
    """The explicit graph's backward of an average pool whose windows tile the input (a broadcast)
    becomes a depthwise transposed convolution with a kernel of ones: the numbers of torch's own
    ``avg_poolNd_backward`` exactly (float64), with no expand left."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from tsgb_fx.explicit import DECOMPOSITIONS

    spatial, size, kernel, divisor = TILING_POOLS[case]
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    grad = torch.randn(2, 3, *(s // k for s, k in zip(size, kernel)), dtype=torch.float64)
    backward = getattr(aten, f"avg_pool{spatial}d_backward").default if spatial > 1 else None
    if backward is None:  # avg_pool1d has no backward op of its own: it runs as a 2-d pool
        x, grad, kernel, spatial = x.unsqueeze(2), grad.unsqueeze(2), (1, *kernel), 2
        backward = aten.avg_pool2d_backward.default
    arguments = (grad, x, list(kernel), list(kernel), [0] * spatial, False, True, divisor)
    traced = make_fx(DECOMPOSITIONS[backward], tracing_mode="fake")(*arguments)  # static sizes, as after the batch
    assert [node for node in traced.graph.nodes if node.target is aten.expand.default]
    lowered = lower_for_onnx(traced)
    assert not [node for node in lowered.graph.nodes if node.target is aten.expand.default]
    transposed = [node for node in lowered.graph.nodes if node.target is aten.convolution.default]
    assert len(transposed) == 1 and transposed[0].args[6] is True and transposed[0].args[8] == 3
    assert torch.equal(lowered(*arguments), backward(*arguments))


def _special_values(dtype: torch.dtype) -> torch.Tensor:
    """Zeros of both signs, infinities, the smallest subnormal and normal, the largest value, and
    random values across the range, in ``dtype``."""
    info = torch.finfo(dtype)
    smallest_subnormal = info.tiny * info.eps
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), smallest_subnormal, -smallest_subnormal,
                            3 * smallest_subnormal, info.tiny, -info.tiny, info.max, -info.max, 1.0, -1.0],
                           dtype=torch.float64)
    scales = torch.logspace(math.log10(info.tiny), math.log10(info.max), 50, dtype=torch.float64)
    return torch.cat([special, scales * torch.randn(50, dtype=torch.float64)]).clamp(-info.max, info.max).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_signs_become_clamped_products_equal_to_sign_for_every_value(dtype):
    """``sign(x)`` -> ``clamp(x * 2^e * 2^e, -1, 1)``: exactly torch's sign, subnormals and
    infinities included; an integer sign stays."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x, counts):
        return x.sign(), counts.sign()

    torch.manual_seed(0)
    x, counts = _special_values(dtype), torch.randint(-3, 4, (9,))
    lowered = lower_for_onnx(make_fx(f)(x, counts))
    signs = [node for node in lowered.graph.nodes if node.target is aten.sign.default]
    assert [node.args[0].meta["val"].dtype for node in signs] == [torch.int64]
    got, got_counts = lowered(x, counts)
    assert torch.equal(got, x.sign()) and got.dtype == dtype
    assert torch.equal(got_counts, counts.sign())


def test_onnxruntime_runs_the_clamped_sign_exactly():
    """onnxruntime keeps the two products apart (one constant 2^254 would be infinite) and does not
    flush subnormals: the exported float32 sign equals numpy's for every special value."""
    ort = pytest.importorskip("onnxruntime")
    from torch.fx.experimental.proxy_tensor import make_fx

    torch.manual_seed(0)
    x = _special_values(torch.float32)
    lowered = lower_for_onnx(make_fx(torch.sign)(x))
    program = torch.onnx.export(lowered.eval(), (x,), dynamo=True, verbose=False)
    assert "Sign" not in [node.op_type for node in program.model_proto.graph.node]
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert np.array_equal(got, np.sign(x.numpy()))


@pytest.mark.slow
def test_exported_file_holds_the_lowered_ops(tmp_path):
    """The ONNX file has no Where masks and no Expand into elementwise ops; ORT gives the map."""
    pytest.importorskip("onnxruntime")
    from tsgb_export import to_onnx
    from tsgb_export.runtime import OnnxExplainer

    model = _net().float()
    explainer = tsgb_fx.explainer(model)
    images = torch.randn(2, 3, 16, 16)
    path = to_onnx(explainer, tmp_path / "net.onnx", images)
    graph = onnx.load(str(path)).graph
    producers = {output: node.op_type for node in graph.node for output in node.output}
    assert not [node for node in graph.node if node.op_type == "Where" and producers.get(node.input[0]) == "LessOrEqual"]
    elementwise = {"Add", "Mul", "Sub", "Div", "Slice"}
    users = {(producers.get(name), node.op_type) for node in graph.node for name in node.input}
    assert not [pair for pair in users if pair[0] == "Expand" and pair[1] in elementwise]
    assert not [node for node in graph.node if node.op_type == "ReduceSum"]  # channel sums are MatMuls
    assert not [node for node in graph.node if node.op_type == "Sign"]  # signs are clamped products
    assert not [node for node in graph.node if node.op_type == "Expand" and producers.get(node.input[0]) == "Reshape"]
    result = OnnxExplainer(path, providers=["CPUExecutionProvider"])(images.numpy(), target=[1, 3])
    expected = explainer(images, target=torch.tensor([1, 3])).saliency
    assert relative_error(torch.from_numpy(result.saliency), expected) < 1e-5
