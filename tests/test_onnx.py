"""ONNX export and the torch-free runtime (issue 3, items 2 and 3; issue 6; issue 7, item 7).

Parity is ONNX Runtime against the autograd explainer: relative L2 of the saliency below 1e-4
(or, where float32 itself cannot give the map to 1e-4, within four times torch float32's distance
from float64) and identical top-1 classes, for batches of 1 and 3 from one exported file.

The round trip (issue 7) is ONNX Runtime against the explicit graph the file was exported from,
same input, measured by :func:`~tests.helpers.map_error` (the worst image's max pixel error over
its max map value). float32 only: onnxruntime's CPU provider has no double Conv kernel
("Could not find an implementation for Conv(11)", onnxruntime 1.32), so a float64 file cannot
run there. In float32 the two runtimes sum convolutions in different orders (MLAS vs oneDNN),
and the gap is float32 rounding of the forward, growing with depth. Measured, map_error of ORT
against the torch graph, with torch float32 against a float64 torch graph in brackets:

============  =================  =================  =================
model         tsgb               gradient           guided_backprop
============  =================  =================  =================
tiny          4e-7  (3e-7)       2e-7  (2e-7)       1e-7  (2e-7)
resnet18      9e-6  (5e-6)       1e-6  (8e-7)       3e-7  (2e-7)
vgg11_bn      2e-5  (2e-5)       2e-6  (7e-3)       2e-7  (2e-7)
mobilenet_v2  8e-5  (6e-5)       9e-3  (1e-6)       3e-5  (2e-7)
============  =================  =================  =================

So 1e-6 holds on the tiny net (every method, seeds 0-2: at most 5.3e-7) and is not reachable in
float32 on deep nets, where torch itself is as far from float64; there the ONNX round trip
adds no more than float32 rounding (the slow test below). The 1e-3 to 1e-2 entries are not
drift but decisions: a pre-activation within ~1e-6 of a ReLU/ReLU6 boundary (mobilenet_v2,
image 1, features.12: 1.2e-6) falls on different sides in the two runtimes, and a gradient-type
map, piecewise constant in the activation pattern, jumps. TSGB's maps are continuous there.
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
from .helpers import map_error

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

from tsgb_export import to_onnx  # noqa: E402
from tsgb_fx.explicit import explicit_module  # noqa: E402
from tsgb_export.runtime import OnnxExplainer, OnnxExplanation  # noqa: E402

TOLERANCE = 1e-4
ROUND_TRIP = 1e-6  # issue 7: the file's maps are the explicit graph's (shallow nets, float32)
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


def _assert_parity(name, actual: np.ndarray, explainer, images: torch.Tensor, target=None):
    """ORT's saliency within TOLERANCE of the float32 autograd explainer's or, where float32
    cannot give the map that closely at all, within four times torch float32's own distance
    from the float64 explainer of the same seeded model. Needed on random-weight mobilenet_v2
    with one thread: on one image torch float32 is 1.2e-4 from float64 and ORT 7.9e-5 (a ReLU6
    unit at its saturation edge, where a TSGB map jumps: the relevance there is out * 1[out < 6])."""
    error = _relative(actual, explainer(images, target=target).saliency)
    if error < TOLERANCE:
        return
    explainer64 = explainer_for(name, build(name)[0].double(), images.double())
    float32 = explainer(images, target=target).saliency.double().numpy()
    floor = _relative(float32, explainer64(images.double(), target=target).saliency)
    print(f"{name}: ORT vs torch float32 {error:.1e}, torch float32 vs float64 {floor:.1e}")
    assert error <= 4 * floor


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
    _assert_parity(name, result.saliency, explainer, images)
    # batch 3, given targets mixed with -1
    target = np.array([7, -1, 3])
    result = runtime(x, target)
    chosen = torch.tensor([7, int(top1[1]), 3])
    np.testing.assert_array_equal(result.target, chosen.numpy())
    _assert_parity(name, result.saliency, explainer, images, chosen)
    assert _relative(result.logits, explainer(images, target=chosen).logits) < TOLERANCE
    # batch 1 from the same file
    result = runtime(x[1:2])
    np.testing.assert_array_equal(result.target, top1[1:2].numpy())
    _assert_parity(name, result.saliency, explainer, images[1:2])
    _assert_parity(name, runtime(x[2:3], target=5).saliency, explainer, images[2:3], 5)


# ---------------------------------------------------------------------------------------------
# Round trip: ONNX Runtime against the explicit graph the file came from (issue 7)


def _explicit_maps(explainer, images, target):
    """The in-process explicit graph's (logits, saliency): what to_onnx traced and exported."""
    graph = explicit_module(explainer, images)
    with torch.inference_mode():
        return graph(images, target)


def _float32_floor(name, saliency, images, target):
    """map_error of the torch float32 map against the same seeded model's float64 map: how
    exactly float32 can give this map at all, whatever the runtime."""
    model64 = build(name)[0].double()  # build() is seeded: the weights are the exported ones
    _, saliency64 = _explicit_maps(explainer_for(name, model64, images.double()), images.double(), target)
    return map_error(saliency, saliency64)


def test_round_trip_matches_the_explicit_graph(tiny):
    """The tsgb file run through OnnxExplainer gives the maps of the explicit graph it was traced
    from, on the same 9 images: within 1e-6, or, where torch float32 is itself more than half
    of that away from the float64 graph, within twice torch's own float32 error: two float32
    computations of a map, each that far from the truth, can be twice that far apart. Measured
    1.0e-6 against a float32 floor of 7.0e-7 (7.6e-7 before the batch-norm fold changed the
    graph's rounding); over 160 random images the round trip's median was 2.5e-7 and its worst
    1.1e-6. TSGB-FC balances evidence for and against the target to a zero total, so the map is
    a difference of larger terms and carries their rounding."""
    explainer, images, path = tiny
    batch = torch.cat([images, -images, 0.5 * images.flip(0)])  # 9 images, mixed targets
    target = torch.tensor([-1, 3, -1, 0, 9, -1, 5, -1, 2])
    logits, saliency = _explicit_maps(explainer, batch, target)
    result = OnnxExplainer(path)(batch.numpy(), target.numpy())
    error, floor = map_error(result.saliency, saliency), _float32_floor("tiny", saliency, batch, target)
    print(f"tiny tsgb: ONNX round trip map_error {error:.1e}, torch float32 vs float64 {floor:.1e}")
    assert error <= max(ROUND_TRIP, 2 * floor)
    assert map_error(result.logits, logits) <= ROUND_TRIP
    np.testing.assert_array_equal(result.target, torch.where(target < 0, logits.argmax(1), target).numpy())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn", "mobilenet_v2"])
def test_round_trip_on_deep_nets_is_float32_rounding(name, tmp_path):
    """Where 1e-6 is out of reach (measured 9e-6, 2e-5, 8e-5): ORT's tsgb map is no farther
    from the torch graph than four times torch float32's own distance from the float64 graph
    (measured ratios 0.9 to 1.8): the file adds no error beyond float32 rounding."""
    explainer, images, path = _export(name, tmp_path)
    target = torch.tensor([5, -1, 7])
    _, saliency = _explicit_maps(explainer, images, target)
    error = map_error(OnnxExplainer(path)(images.numpy(), target.numpy()).saliency, saliency)
    floor = _float32_floor(name, saliency, images, target)
    print(f"{name} tsgb: ONNX round trip map_error {error:.1e}, torch float32 vs float64 {floor:.1e}")
    assert error <= max(4 * floor, ROUND_TRIP)


# ---------------------------------------------------------------------------------------------
# Methods whose attribution is the signal itself (issue 6)


def test_gradient_type_method_exports(tmp_path):
    """Guided backprop: saliency = sum_C(signal), not signal x image; the rule's gating ops run
    in ORT; the metadata says which method and how the map is formed."""
    model, images = build("tiny")
    explainer = tsgb_fx.explainer(model, method="guided_backprop")
    path = to_onnx(explainer, tmp_path / "tiny_guided.onnx", images[:1])
    runtime = OnnxExplainer(path)
    assert runtime.metadata["method"] == "guided_backprop"
    assert runtime.metadata["times_input"] is False
    assert runtime.metadata["saliency"].startswith("channel sum of (signal at the image)")
    target = np.array([7, -1, 3])
    result = runtime(images.numpy(), target)
    reference = explainer(images, target=torch.as_tensor(result.target))
    print(f"tiny guided_backprop: saliency rel L2 {_relative(result.saliency, reference.saliency):.2e}")
    assert _relative(result.saliency, reference.saliency) < TOLERANCE
    assert _relative(result.logits, reference.logits) < TOLERANCE
    times_input = (reference.attribution * images).sum(1, keepdim=True)  # what the file must not compute
    assert _relative(result.saliency, times_input) > 0.1
    _, saliency = _explicit_maps(explainer, images, torch.as_tensor(target))
    assert map_error(result.saliency, saliency) <= ROUND_TRIP


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
    # one MaxPool per max pool: torch's per-plane indices come from Range, not a second pool
    assert [node.op_type for node in model.graph.node].count("MaxPool") == 1


def test_onnxruntime_folds_everything_computed_from_weights_alone(tiny, tmp_path):
    """TSGB-FC's W+ and W- depend on the weights only: onnxruntime must compute them once, at
    load, not on every call (a CastLike in their path, which it cannot fold, used to prevent it)."""
    _, _, path = tiny
    assert "CastLike" not in {node.op_type for node in onnx.load(str(path)).graph.node}
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    optimised = onnx.load(options.optimized_model_filepath)
    constant = {initializer.name for initializer in optimised.graph.initializer}
    computed_from_constants = []
    for node in optimised.graph.node:  # topological order
        if node.op_type == "Constant" or (node.input and all(name in constant or not name for name in node.input)):
            constant.update(node.output)
            if node.op_type != "Constant":
                computed_from_constants.append(node.op_type)
    assert computed_from_constants == []


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
    assert json.loads(props["tsgb.times_input"]) is True
    assert props["tsgb.saliency"].startswith("channel sum of (TSGB signal at the image * image)")
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


def test_volumes_export_with_max_pooling(tmp_path):
    """A 3-d net (Conv3d, MaxPool3d with overlapping windows) round-trips through ORT."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool3d(3, stride=2, padding=1),
        torch.nn.Conv3d(4, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool3d(1),
        torch.nn.Flatten(), torch.nn.Linear(4, 3),
    ).eval()
    explainer = tsgb_fx.explainer(model)
    volumes = torch.randn(3, 2, 6, 8, 8)
    path = to_onnx(explainer, tmp_path / "volume.onnx", volumes[:2])
    assert [node.op_type for node in onnx.load(str(path)).graph.node].count("MaxPool") == 1
    result = OnnxExplainer(path, providers=["CPUExecutionProvider"])(volumes.numpy(), target=[0, 1, 2])
    expected = explainer(volumes, target=torch.tensor([0, 1, 2])).saliency
    assert _relative(result.saliency, expected) < TOLERANCE
