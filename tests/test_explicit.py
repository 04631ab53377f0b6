"""The explicit graph (issue 3, item 1): forward plus rule backward as plain ATen ops.

Every map is checked against the autograd explainer (an independent computation: autograd
running the rule Functions), or against plain ``torch.autograd`` on the model for the gradient
methods, never against stored numbers. The round trip through ``torch.export.save``/``load``
(issue 7, item 7) is checked against the in-process graph the file came from, within 1e-6 by
:func:`~tests.helpers.map_error` (worst image's max pixel error over its max map value); on
every model of explicit_models (tiny to tf_efficientnet_lite0; tsgb, guided backprop on tiny,
gradient on the others) the loaded program reproduces the maps bit for bit (map_error 0), as it
runs the same ATen kernels in the same order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import fx, nn
from torch.fx.experimental.proxy_tensor import make_fx

import tsgb_fx
from tsgb_fx.explicit import DECOMPOSITIONS, explicit_module, export_program

from .explicit_models import MODELS, build, explainer_for, model_params
from .helpers import map_error, randomise_batch_norm, relative_error
from .reference_tsgb import reference_saliency, swap_in_reference_rules

aten = torch.ops.aten

TOLERANCE = 1e-5
FLOAT64_TOLERANCE = 1e-9
ROUND_TRIP = 1e-6  # issue 7: a saved program gives the same maps as the graph it came from
METHODS = ("tsgb", "gradient", "grad_x_input", "guided_backprop", "deconvnet")


def _reference(explainer, images, target):
    """The autograd explainer's (logits, saliency, target) for a target vector with -1 = top-1."""
    top1 = explainer(images).target
    chosen = torch.where(target < 0, top1, target)
    result = explainer(images, target=chosen)
    return result.logits, result.saliency, chosen


def _run(module, images, target):
    with torch.inference_mode():
        return module(images, target)


@pytest.fixture(scope="module")
def tiny():
    model, images = build("tiny")
    explainer = explainer_for("tiny", model, images)
    return model, images, explainer, explicit_module(explainer, images)


# ---------------------------------------------------------------------------------------------
# Parity with the autograd explainer


@pytest.mark.parametrize("name", model_params(default=("tiny", "resnet18")))
def test_parity_with_autograd_explainer(name):
    """In float64, to 1e-9: eager and the graph compute the same maps by different routes (box
    sums as sum pooling vs. convolutions, TSGB-FC on the target rows vs. all rows, channel sums in
    batch chunks vs. whole), so in float32 they differ by float32's own rounding, 1.5e-5 to
    4e-5 on vgg11_bn, mobilenet_v2 and tf_efficientnet_lite0. Float32 graphs are compared with
    onnxruntime and the autograd explainer in test_onnx.py."""
    model, images = build(name)
    model, images = model.double(), images.double()
    explainer = explainer_for(name, model, images)
    module = explicit_module(explainer, images)
    for target in (torch.full((3,), -1), torch.tensor([5, -1, 7])):
        logits, saliency = _run(module, images, target)
        ref_logits, ref_saliency, _ = _reference(explainer, images, target)
        assert saliency.shape == (3, 1, *images.shape[2:])
        print(f"{name} target={target.tolist()}: saliency rel L2 {relative_error(saliency, ref_saliency):.2e}")
        assert relative_error(saliency, ref_saliency) < FLOAT64_TOLERANCE
        assert relative_error(logits, ref_logits) < FLOAT64_TOLERANCE
        assert torch.equal(logits.argmax(1), ref_logits.argmax(1))
    # one graph, any batch size
    logits, saliency = _run(module, images[:1], torch.tensor([-1]))
    assert relative_error(saliency, explainer(images[:1]).saliency) < FLOAT64_TOLERANCE


AVG_POOLS = {  # kernel, stride, padding, ceil_mode, count_include_pad, divisor_override, input size
    "tiling": ((2, 2), (), (0, 0), False, True, None, (8, 6)),
    "dropped-rows": ((2, 3), (2, 3), (0, 0), False, True, None, (7, 11)),
    "divisor": ((2, 2), (2, 2), (0, 0), True, True, 3, (6, 6)),
    "tiling-3d": ((2, 2, 2), (), (0, 0, 0), False, True, None, (4, 5, 6)),
    "tiling-3d-exact": ((2, 3, 1), (2, 3, 1), (0, 0, 0), False, True, None, (4, 6, 5)),
    "ceil-partial-window": ((2, 2), (2, 2), (0, 0), True, True, None, (7, 7)),
    "overlapping-padded": ((3, 3), (2, 2), (1, 1), False, False, None, (9, 8)),
    "overlapping-padded-3d": ((3, 3, 3), (1, 1, 1), (1, 1, 1), False, True, None, (4, 5, 3)),
}


@pytest.mark.parametrize("case", list(AVG_POOLS))
def test_average_pooling_backward_decomposition_matches_torch(case):
    """The graph's avg_poolNd_backward (one window matrix per axis, or a broadcast where the windows
    tile the input) against torch's own kernel."""
    kernel, stride, padding, ceil_mode, count_include_pad, divisor, size = AVG_POOLS[case]
    spatial = len(kernel)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    pool = getattr(torch.nn.functional, f"avg_pool{spatial}d")
    y = pool(x, kernel, stride or None, padding, ceil_mode, count_include_pad, divisor)
    grad = torch.randn_like(y)
    backward = getattr(torch.ops.aten, f"avg_pool{spatial}d_backward").default
    arguments = (grad, x, kernel, stride, padding, ceil_mode, count_include_pad, divisor)
    assert torch.allclose(DECOMPOSITIONS[backward](*arguments), backward(*arguments), rtol=1e-12, atol=1e-15)
    traced = make_fx(DECOMPOSITIONS[backward])(*arguments)
    products = [node for node in traced.graph.nodes if node.target in (aten.mm.default, aten.bmm.default)]
    tiles = stride in ((), kernel) and not any(padding) and all(s % k == 0 for s, k in zip(size, kernel))
    assert bool(products) != tiles, case  # windows that tile the input are spread without matmuls


def test_saturated_relu6_units_carry_no_relevance_in_the_graph():
    """The graph's ReLU6 carrier (``out - threshold(out, below(6), 0)``, folded into TSGB-Conv) against the
    module-swapping reference, whose ReLU6 backward is torch's own, on a net where many units
    sit exactly at 0 and at 6."""
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )
    randomise_batch_norm(model, seed=4)
    with torch.no_grad():
        for norm in (model[1], model[4]):
            norm.weight.mul_(8.0)  # wide pre-activations: both bounds are hit
    model = model.double().eval()
    images = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    rectified = model[:3](images)
    assert (rectified == 6).float().mean() > 0.1 and (rectified == 0).float().mean() > 0.1
    target = torch.tensor([1, 3])
    _, saliency = _run(tsgb_fx.explainer(model).explicit(images), images, target)
    expected = reference_saliency(swap_in_reference_rules(model, "8"), images, target)
    assert relative_error(saliency, expected) < FLOAT64_TOLERANCE


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("clamp", [(0.0, 6.0), (-1.0, 1.0), (0.0, 1.0)])
def test_traced_rectifier_carrier_is_the_rectifier_backward(clamp, dtype):
    """The carrier the graph records equals torch's own rectifier backward applied to ``out``
    (``out`` where ``min < out < max``, else 0), bit for bit, on values at both bounds, one step
    inside each, and in between, in every floating dtype."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from tsgb_fx.rules.rectify import largest_below, relevance_carrier

    low, high = clamp
    torch.manual_seed(0)
    inside = torch.rand(200, dtype=torch.float64) * (high - low) + low
    edges = torch.tensor([low, high, largest_below(high, dtype), -largest_below(-low, dtype) if low else 1e-30])
    out = torch.cat([edges.to(torch.float64), inside]).to(dtype).clamp(low, high)
    traced = make_fx(lambda t: relevance_carrier(t, clamp), tracing_mode="symbolic")(out)
    ops = {node.target for node in traced.graph.nodes if node.op == "call_function"}
    assert (aten.threshold.default in ops) == (low == 0), ops  # ReLU6-like bounds: threshold, not masks
    assert not [node for node in traced.graph.nodes if node.op == "get_attr"]  # no tensor made while tracing
    expected = torch.ops.aten.hardtanh_backward(out, out, low, high)
    assert (out == high).any() and (expected == 0).any() and (expected != 0).any()
    assert torch.equal(traced(out), expected)


def test_silu_carriers_in_the_graph_match_the_reference():
    """The graph's SiLU carriers (``a * (1 + y - a)``, and ``|a| * (1 + y - a)`` where the reader
    leaves the sign to the fold) against the module-swapping reference, whose SiLU keeps torch's
    own backward, on pre-activations wide enough that ``silu'`` changes sign (``y < -1.28``)."""
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU(),  # read by a TSGB-Conv: unsigned
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.SiLU(),  # read by the pool
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )
    randomise_batch_norm(model, seed=5)
    with torch.no_grad():
        for norm in (model[1], model[4]):
            norm.weight.mul_(4.0)
    model = model.double().eval()
    images = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    explainer = tsgb_fx.explainer(model)
    folds = [site for site in explainer.graph_module.graph.nodes if site.kwargs.get("output_activation") == "silu"]
    assert [site.kwargs.get("activation_unsigned", False) for site in folds] == [True, False]
    assert (model[:2](images) < -1.28).float().mean() > 0.1
    target = torch.tensor([0, 4])
    _, saliency = _run(explainer.explicit(images), images, target)
    expected = reference_saliency(swap_in_reference_rules(model, "8"), images, target)
    assert relative_error(saliency, expected) < FLOAT64_TOLERANCE


@pytest.mark.parametrize("method", METHODS)
def test_every_method_matches_its_autograd_explainer(method):
    """Issue 6: the graph honours ``times_input`` (signal x image for tsgb and grad_x_input, the
    signal itself for gradient, guided backprop and deconvnet), so its map is the explainer's."""
    model, images = build("tiny")
    explainer = tsgb_fx.explainer(model, method=method)
    module = explainer.explicit(images)
    assert module.meta["tsgb_fx"]["method"] == method
    assert module.meta["tsgb_fx"]["times_input"] is explainer.times_input
    target = torch.tensor([5, -1, 7])
    logits, saliency = _run(module, images, target)
    ref_logits, ref_saliency, _ = _reference(explainer, images, target)
    print(f"{method}: saliency rel L2 {relative_error(saliency, ref_saliency):.2e}")
    assert relative_error(saliency, ref_saliency) < TOLERANCE
    assert relative_error(logits, ref_logits) < TOLERANCE


def test_gradient_methods_match_plain_autograd():
    """``gradient`` and ``grad_x_input`` against ``torch.autograd.grad`` on the untouched model:
    independent of the rewrite, of the rule Functions and of the explainer's forward."""
    model, images = build("tiny")
    target = torch.tensor([5, 2, 7])
    x = images.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x).gather(1, target[:, None]).sum(), x)
    expected = {"gradient": grad.sum(1, keepdim=True), "grad_x_input": (grad * images).sum(1, keepdim=True)}
    for method, reference in expected.items():
        _, saliency = _run(tsgb_fx.explainer(model, method=method).explicit(images), images, target)
        print(f"{method}: rel L2 to torch.autograd {relative_error(saliency, reference):.2e}")
        assert relative_error(saliency, reference) < TOLERANCE


def test_dynamic_batch_one_trace(tiny):
    _, images, explainer, module = tiny
    batch = torch.cat([images, images.flip(0), images * 0.5] * 2)  # 18 images
    for n in (1, 2, 5, 18):  # 18: past any size the trace might have guarded on (it saw 2)
        index = torch.arange(n)
        target = torch.where(index % 3 == 0, -1, index % 10)  # every third image: its top-1
        _, saliency = _run(module, batch[:n], target)
        _, ref_saliency, _ = _reference(explainer, batch[:n], target)
        assert relative_error(saliency, ref_saliency) < TOLERANCE


def test_negative_target_is_top1_and_given_target_is_respected(tiny):
    _, images, explainer, module = tiny
    logits, top1_map = _run(module, images, torch.full((3,), -1))
    top1 = logits.argmax(1)
    _, given_map = _run(module, images, top1)
    assert torch.equal(top1_map, given_map)
    other = (top1 + 1) % logits.shape[1]
    _, other_map = _run(module, images, other)
    assert relative_error(other_map, explainer(images, target=other).saliency) < TOLERANCE
    assert relative_error(other_map, top1_map) > 1e-3  # a different class gives a different map


def test_export_traced_explainer_uses_its_fixed_size():
    model, images = build("tiny")
    explainer = tsgb_fx.explainer(model, tracer="export", example_input=images[:2])
    module = explainer.explicit()  # no example needed: the export trace fixed the size
    _, saliency = _run(module, images, torch.full((3,), -1))
    assert relative_error(saliency, explainer(images).saliency) < TOLERANCE


# ---------------------------------------------------------------------------------------------
# What the graph is made of


def test_graph_holds_plain_aten_ops_only(tiny):
    *_, module = tiny
    assert isinstance(module, fx.GraphModule)
    for node in module.graph.nodes:
        if node.op == "call_function":
            target = node.target
            assert isinstance(target, torch._ops.OpOverload) or target.__module__ == "_operator", target
            assert "backward" not in str(target), target
        assert node.op != "call_module", node.format_node()
    placeholders = [node.target for node in module.graph.nodes if node.op == "placeholder"]
    assert placeholders == ["image", "target"]


def test_no_autograd_at_run_time_and_model_untouched(tiny):
    model, images, _, module = tiny
    assert list(module.parameters()) == []  # parameters are held as buffers that need no grad
    assert not any(buffer.requires_grad for buffer in module.buffers())
    assert all(parameter.requires_grad for parameter in model.parameters())
    assert all(parameter.grad is None for parameter in model.parameters())
    with torch.inference_mode():
        logits, saliency = module(images, torch.full((3,), -1))
    assert logits.is_inference() and saliency.is_inference()
    logits, saliency = module(images, torch.full((3,), -1))  # and outside inference mode
    assert logits.grad_fn is None and saliency.grad_fn is None


def test_shares_the_model_weights():
    model, images = build("tiny")
    explainer = explainer_for("tiny", model, images)
    module = explicit_module(explainer, images)
    pointers = {buffer.data_ptr() for buffer in module.buffers()}
    assert model.stem.weight.data_ptr() in pointers
    with torch.no_grad():
        model.stem.weight.mul_(-1.5)  # an in-place update, as an optimiser step would do
    _, saliency = _run(module, images, torch.full((3,), -1))
    assert relative_error(saliency, explainer(images).saliency) < TOLERANCE


def test_wrong_input_shapes_raise(tiny):
    _, images, _, module = tiny
    with pytest.raises(RuntimeError, match="image must have shape"):
        module(torch.randn(2, 3, 16, 16), torch.full((2,), -1))
    with pytest.raises(RuntimeError, match="target must have one entry per image"):
        module(images, torch.full((2,), -1))


def test_needs_an_input_shape_when_none_is_known():
    explainer = tsgb_fx.explainer(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4)))
    with pytest.raises(tsgb_fx.TSGBError, match="example_input"):
        explicit_module(explainer)
    module = explicit_module(explainer, torch.randn(2, 3, 2, 2))
    images = torch.randn(3, 3, 2, 2)
    _, saliency = _run(module, images, torch.full((3,), -1))
    assert relative_error(saliency, explainer(images).saliency) < TOLERANCE


# ---------------------------------------------------------------------------------------------
# torch.export (.pt2) and torch.compile


def _load_and_run_in_a_fresh_process(paths, images, target, directory):
    """Run each saved program on (images, target) in a new interpreter that imports neither
    tsgb_fx nor the tests (so nothing of this process, and no model class, can help); returns
    each program's (logits, saliency)."""
    torch.save({"images": images, "target": target}, directory / "inputs.pt")
    outputs = [directory / f"out_{index}.pt" for index in range(len(paths))]
    script = textwrap.dedent(
        f"""
        import sys, torch
        inputs = torch.load({str(directory / "inputs.pt")!r})
        for path, out in zip({[str(p) for p in paths]!r}, {[str(o) for o in outputs]!r}):
            program = torch.export.load(path)
            with torch.inference_mode():
                logits, saliency = program.module()(inputs["images"], inputs["target"])
            torch.save({{"logits": logits, "saliency": saliency}}, out)
        print(sorted(m for m in sys.modules if m.startswith(("tsgb", "tests"))))
        """
    )
    env = {**os.environ, "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", script], cwd=directory, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1].replace("'", '"')) == []  # no model class, no tsgb_fx
    return [torch.load(out) for out in outputs]


def test_pt2_round_trip_in_a_fresh_process(tiny, tmp_path):
    """Issue 7: save, load in a fresh process, same maps as the graph the file came from (1e-6
    by map_error; bit-identical when measured), and the autograd explainer's within 1e-5.

    Two programs: tsgb (signal x image) and guided backprop (the signal itself)."""
    model, images, explainer, module = tiny
    guided = tsgb_fx.explainer(model, method="guided_backprop")
    modules = {"tsgb": (explainer, module), "guided_backprop": (guided, guided.explicit(images))}
    paths = []
    for name, (_, graph) in modules.items():
        paths.append(tmp_path / f"tiny_{name}.pt2")
        torch.export.save(export_program(graph, images), paths[-1])
    batch = torch.cat([images, images[:2] * 2])  # 5 images: the saved batch is dynamic
    target = torch.tensor([-1, 3, -1, 0, 9])
    loaded = _load_and_run_in_a_fresh_process(paths, batch, target, tmp_path)
    for (name, (source, graph)), out in zip(modules.items(), loaded):
        logits, saliency = _run(graph, batch, target)
        print(f"{name}: .pt2 round trip map_error {map_error(out['saliency'], saliency):.1e}")
        assert map_error(out["saliency"], saliency) <= ROUND_TRIP
        assert map_error(out["logits"], logits) <= ROUND_TRIP
        ref_logits, ref_saliency, _ = _reference(source, batch, target)
        assert relative_error(out["saliency"], ref_saliency) < TOLERANCE
        assert relative_error(out["logits"], ref_logits) < TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name in MODELS if name != "tiny"])
def test_pt2_round_trip_on_every_model(name, tmp_path):
    """The 1e-6 round trip on the deep models, where float32 noise would show if the loaded
    program ran different kernels than the graph it came from (tsgb and gradient)."""
    model, images = build(name)
    explainers = [explainer_for(name, model, images)]
    options = {"tracer": "export", "example_input": images[:2]} if MODELS[name][2].get("tracer") == "export" else {}
    explainers.append(tsgb_fx.explainer(model, method="gradient", **options))
    graphs = [explicit_module(explainer, images) for explainer in explainers]
    paths = [tmp_path / f"{name}_{index}.pt2" for index in range(len(graphs))]
    for graph, path in zip(graphs, paths):
        torch.export.save(export_program(graph, images), path)
    target = torch.tensor([-1, 3, -1])
    for graph, out in zip(graphs, _load_and_run_in_a_fresh_process(paths, images, target, tmp_path)):
        logits, saliency = _run(graph, images, target)
        print(f"{name} {graph.meta['tsgb_fx']['method']}: .pt2 round trip map_error {map_error(out['saliency'], saliency):.1e}")
        assert map_error(out["saliency"], saliency) <= ROUND_TRIP
        assert map_error(out["logits"], logits) <= ROUND_TRIP


def test_torch_compile_smoke(tiny):
    _, images, explainer, module = tiny
    compiled = torch.compile(module, backend="aot_eager", dynamic=True)
    for n in (3, 2):
        _, saliency = _run(compiled, images[:n], torch.full((n,), -1))
        assert relative_error(saliency, explainer(images[:n]).saliency) < TOLERANCE


@pytest.mark.slow
def test_torch_compile_inductor(tiny):  # minutes of C++ compilation on 2 cores: the tiny net only
    _, images, explainer, module = tiny
    compiled = torch.compile(module)
    target = torch.tensor([-1, 2, -1])
    _, saliency = _run(compiled, images, target)
    _, ref_saliency, _ = _reference(explainer, images, target)
    assert relative_error(saliency, ref_saliency) < 1e-4  # inductor may fuse and reorder
