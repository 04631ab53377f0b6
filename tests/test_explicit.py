"""The explicit graph (issue 3, item 1): forward plus rule backward as plain ATen ops.

Every map is checked against the autograd explainer (an independent computation: autograd
running the rule Functions), never against stored numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import fx

import tsgb_fx
from tsgb_fx.explicit import explicit_module, export_program

from .explicit_models import build, explainer_for, model_params
from .helpers import relative_error

TOLERANCE = 1e-5


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
    model, images = build(name)
    explainer = explainer_for(name, model, images)
    module = explicit_module(explainer, images)
    for target in (torch.full((3,), -1), torch.tensor([5, -1, 7])):
        logits, saliency = _run(module, images, target)
        ref_logits, ref_saliency, _ = _reference(explainer, images, target)
        assert saliency.shape == (3, 1, *images.shape[2:])
        print(f"{name} target={target.tolist()}: saliency rel L2 {relative_error(saliency, ref_saliency):.2e}")
        assert relative_error(saliency, ref_saliency) < TOLERANCE
        assert relative_error(logits, ref_logits) < TOLERANCE
        assert torch.equal(logits.argmax(1), ref_logits.argmax(1))
    # one graph, any batch size
    logits, saliency = _run(module, images[:1], torch.tensor([-1]))
    assert relative_error(saliency, explainer(images[:1]).saliency) < TOLERANCE


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


def test_pt2_round_trip_in_a_fresh_process(tiny, tmp_path):
    _, images, explainer, module = tiny
    program = export_program(module, images)
    path = tmp_path / "tiny_explicit.pt2"
    torch.export.save(program, path)
    batch = torch.cat([images, images[:2] * 2])  # 5 images: the saved batch is dynamic
    target = torch.tensor([-1, 3, -1, 0, 9])
    torch.save({"images": batch, "target": target}, tmp_path / "inputs.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        program = torch.export.load({str(path)!r})
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        with torch.inference_mode():
            logits, saliency = program.module()(inputs["images"], inputs["target"])
        torch.save({{"logits": logits, "saliency": saliency}}, {str(tmp_path / "out.pt")!r})
        print(sorted(m for m in sys.modules if m.startswith(("tsgb", "tests"))))
        """
    )
    env = {**os.environ, "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1].replace("'", '"')) == []  # no model class, no tsgb_fx
    out = torch.load(tmp_path / "out.pt")
    ref_logits, ref_saliency, _ = _reference(explainer, batch, target)
    assert relative_error(out["saliency"], ref_saliency) < TOLERANCE
    assert relative_error(out["logits"], ref_logits) < TOLERANCE


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
