"""ONNX export and the torch-free runtime (issue 3, items 2 and 3).

Parity is ONNX Runtime against the autograd explainer: relative L2 of the saliency below 1e-4
and identical top-1 classes, for batches of 1 and 3 from one exported file.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import tsgb_fx

from .explicit_models import build, explainer_for, model_params

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

from tsgb_export import to_onnx  # noqa: E402
from tsgb_export.runtime import OnnxExplainer, OnnxExplanation  # noqa: E402

TOLERANCE = 1e-4
ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _relative(actual: np.ndarray, expected: torch.Tensor) -> float:
    expected = expected.numpy()
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def _export(name: str, directory: Path, **options):
    model, images = build(name)
    explainer = explainer_for(name, model, images)
    path = to_onnx(explainer, directory / f"{name}.onnx", images[:1], **options)
    return explainer, images, path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One export of the tiny net (every decomposition), shared by most tests of this file."""
    return _export("tiny", tmp_path_factory.mktemp("onnx"), mean=MEAN, std=STD)


# ---------------------------------------------------------------------------------------------
# Parity: ONNX Runtime against the autograd explainer


@pytest.mark.parametrize("name", model_params(default=("tiny",)))
def test_parity_with_autograd_explainer(name, tmp_path, request):
    explainer, images, path = request.getfixturevalue("tiny") if name == "tiny" else _export(name, tmp_path)
    runtime = OnnxExplainer(path)
    x = images.numpy()
    top1 = explainer(images).target
    # batch 3, each image's top-1
    result = runtime(x)
    assert result.saliency.shape == (3, 1, *images.shape[2:]) and result.saliency.dtype == np.float32
    np.testing.assert_array_equal(result.target, top1.numpy())
    print(f"{name} batch 3 top-1: saliency rel L2 {_relative(result.saliency, explainer(images).saliency):.2e}")
    assert _relative(result.saliency, explainer(images).saliency) < TOLERANCE
    # batch 3, given targets mixed with -1
    target = np.array([7, -1, 3])
    result = runtime(x, target)
    chosen = torch.tensor([7, int(top1[1]), 3])
    np.testing.assert_array_equal(result.target, chosen.numpy())
    reference = explainer(images, target=chosen)
    print(f"{name} batch 3 given: saliency rel L2 {_relative(result.saliency, reference.saliency):.2e}")
    assert _relative(result.saliency, reference.saliency) < TOLERANCE
    assert _relative(result.logits, reference.logits) < TOLERANCE
    # batch 1 from the same file
    result = runtime(x[1:2])
    np.testing.assert_array_equal(result.target, top1[1:2].numpy())
    print(f"{name} batch 1: saliency rel L2 {_relative(result.saliency, explainer(images[1:2]).saliency):.2e}")
    assert _relative(result.saliency, explainer(images[1:2]).saliency) < TOLERANCE
    result = runtime(x[2:3], target=5)
    assert _relative(result.saliency, explainer(images[2:3], target=5).saliency) < TOLERANCE


# ---------------------------------------------------------------------------------------------
# The file: standard ops, full checker, interface, metadata


def test_standard_domain_only_and_full_checker(tiny):
    _, _, path = tiny
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert len(model.functions) == 0
    assert {entry.domain for entry in model.opset_import} <= {"", "ai.onnx"}
    domains = {node.domain for node in model.graph.node}
    assert domains <= {"", "ai.onnx"}, domains
    op_types = {node.op_type for node in model.graph.node}
    assert not {op for op in op_types if "Grad" in op or op.endswith("Backward")}, op_types
    assert {"Conv", "ConvTranspose", "ArgMax"} <= op_types  # the rules and the top-1 are in the graph


def test_interface(tiny):
    _, images, path = tiny
    graph = onnx.load(str(path)).graph

    def signature(values):
        return {
            value.name: (
                value.type.tensor_type.elem_type,
                [dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim],
            )
            for value in values
        }

    float32, int64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    size = images.shape[2]
    assert signature(graph.input) == {"image": (float32, ["N", 3, size, size]), "target": (int64, ["N"])}
    assert signature(graph.output) == {"logits": (float32, ["N", 10]), "saliency": (float32, ["N", 1, size, size])}


def test_large_batch(tiny):
    explainer, images, path = tiny
    batch = torch.cat([images, -images, images.flip(0), 0.5 * images] * 5)  # 60 images
    result = OnnxExplainer(path)(batch.numpy())
    reference = explainer(batch)
    np.testing.assert_array_equal(result.target, reference.target.numpy())
    assert _relative(result.saliency, reference.saliency) < TOLERANCE


def test_metadata_round_trip(tiny):
    _, images, path = tiny
    props = {entry.key: entry.value for entry in onnx.load(str(path)).metadata_props}
    assert props["tsgb.method"] == "tsgb"
    assert props["tsgb.version"] == tsgb_fx.__version__
    assert json.loads(props["tsgb.options"]) == {"conv_groups": "reference", "classifier": "last"}
    runtime = OnnxExplainer(path)
    assert runtime.metadata["method"] == "tsgb"
    assert runtime.metadata["input_shape"] == [3, images.shape[2], images.shape[3]]
    assert runtime.metadata["num_classes"] == 10
    assert runtime.mean == MEAN and runtime.std == STD
    assert runtime.input_shape == (3, images.shape[2], images.shape[3])
    assert runtime.num_classes == 10 and runtime.batch_size is None


def test_static_batch_and_rule_options(tmp_path):
    model, images = build("tiny")
    explainer = tsgb_fx.explainer(model, conv_groups="layer", classifier="all")
    path = to_onnx(explainer, tmp_path / "static.onnx", images, dynamic_batch=False)
    runtime = OnnxExplainer(path)
    assert runtime.metadata["options"] == {"conv_groups": "layer", "classifier": "all"}
    assert runtime.mean is None and runtime.std is None
    assert runtime.batch_size == 3
    assert _relative(runtime(images.numpy()).saliency, explainer(images).saliency) < TOLERANCE
    with pytest.raises(ValueError, match="batch size 3"):
        runtime(images[:1].numpy())


def test_to_onnx_argument_errors(tiny, tmp_path):
    explainer, images, _ = tiny
    with pytest.raises(TypeError, match="tsgb_fx.Explainer"):
        to_onnx(torch.nn.Identity(), tmp_path / "x.onnx", images)
    with pytest.raises(TypeError, match="torch.Tensor"):
        to_onnx(explainer, tmp_path / "x.onnx", images.numpy())
    with pytest.raises(ValueError, match="3 channels"):
        to_onnx(explainer, tmp_path / "x.onnx", images, mean=[0.5, 0.5])


# ---------------------------------------------------------------------------------------------
# The runtime: inputs checked, CUDA preferred, no torch on its path


def test_runtime_checks_its_inputs(tiny):
    _, images, path = tiny
    runtime = OnnxExplainer(path)
    x = images.numpy()
    with pytest.raises(ValueError, match=r"shape \(N, 3, 32, 32\)"):
        runtime(x[:, :, :16])
    with pytest.raises(ValueError, match=r"shape \(N, 3, 32, 32\)"):
        runtime(x[0])
    with pytest.raises(TypeError, match="float"):
        runtime((x * 255).astype(np.uint8))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        runtime(x, target=[1, 2])
    with pytest.raises(TypeError, match="integer"):
        runtime(x, target=np.array([1.0, 2.0, 3.0]))
    with pytest.raises(TypeError, match="boolean"):
        runtime(x, target=True)
    with pytest.raises(ValueError, match="out of range"):
        runtime(x, target=[0, 10, 1])
    with pytest.raises(ValueError, match="out of range"):
        runtime(x, target=-2)
    with pytest.raises(ValueError, match="NaN"):
        runtime(np.full_like(x, np.nan))
    with pytest.raises(TypeError, match="numpy array"):
        runtime("image.png")
    result = runtime(x.astype(np.float64), target=np.int32(4))  # float64 and numpy ints are converted
    assert isinstance(result, OnnxExplanation) and result.target.tolist() == [4, 4, 4]


def test_runtime_prefers_cuda(tiny, monkeypatch):
    import onnxruntime

    _, _, path = tiny
    chosen = {}

    class Session:
        def __init__(self, path, sess_options=None, providers=None):
            chosen["providers"] = providers
            raise RuntimeError("stop here")

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "InferenceSession", Session)
    with pytest.raises(RuntimeError, match="stop here"):
        OnnxExplainer(path)
    assert chosen["providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(RuntimeError, match="stop here"):
        OnnxExplainer(path)
    assert chosen["providers"] == ["CPUExecutionProvider"]


def test_runtime_without_torch_in_a_subprocess(tiny, tmp_path):
    explainer, images, path = tiny
    np.save(tmp_path / "images.npy", images.numpy())
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # any import of torch now raises ImportError
        import numpy as np
        from tsgb_export.runtime import OnnxExplainer
        result = OnnxExplainer({str(path)!r})(np.load({str(tmp_path / "images.npy")!r}), target=[-1, 2, 4])
        np.save({str(tmp_path / "saliency.npy")!r}, result.saliency)
        np.save({str(tmp_path / "target.npy")!r}, result.target)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnx", "onnxscript", "tsgb_fx") and sys.modules[m] is not None)
        print("loaded:", loaded)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loaded: []" in done.stdout
    target = torch.tensor([int(explainer(images[:1]).target), 2, 4])
    np.testing.assert_array_equal(np.load(tmp_path / "target.npy"), target.numpy())
    assert _relative(np.load(tmp_path / "saliency.npy"), explainer(images, target=target).saliency) < TOLERANCE


def test_pyproject_lists_every_package():
    """export/ is mapped to tsgb_export, so packages are listed; a new subpackage must be added."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    assert config["package-dir"]["tsgb_export"] == "export"
    found = {
        ".".join(init.parent.relative_to(ROOT).parts).replace("export", "tsgb_export", 1)
        for folder in ("tsgb_fx", "export")
        for init in (ROOT / folder).rglob("__init__.py")
    }
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"
