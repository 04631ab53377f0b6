"""The ``tsgb`` command end to end, in-process through ``tsgb_fx.cli.main(argv)``.

Numbers are checked against independent computations: the top-1 class of the bundled cat photo
under the real ImageNet weights is 285 'Egyptian cat' with p = 0.79 (TSGB.md); for the tiny user
model the expected classes come from running the model here on images preprocessed here with
Pillow (squash, [0, 1], ImageNet mean/std).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import tsgb_fx
from tsgb_fx.cli import main
from tsgb_fx.data import sample_path

from .cli_models import tiny_cnn

PIL = pytest.importorskip("PIL")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
from PIL import Image  # noqa: E402

TINY = "tests.cli_models:tiny_cnn"
EGYPTIAN_CAT = 285
LINE = re.compile(r"^(?P<path>\S+)  top: (?P<top>.+?)  explained: (?P<explained>[\d, ]+)  -> (?P<png>\S+)$")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def parse(stdout: str) -> dict[str, dict]:
    """{image name: {"top": [(class, name, p)], "explained": [class], "png": Path}} from explain's lines."""
    results = {}
    for line in stdout.splitlines():
        match = LINE.match(line)
        assert match, f"unexpected output line: {line!r}"
        top = []
        for entry in match["top"].split(" | "):
            index, *name, probability = entry.split(" ")
            top.append((int(index), " ".join(name), float(probability)))
        explained = [int(k) for k in match["explained"].split(", ")]
        results[Path(match["path"]).name] = {"top": top, "explained": explained, "png": Path(match["png"])}
    return results


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("tsgb: error: ")]


def tiny_expected(path: Path, size: int, model=None) -> torch.Tensor:
    """The tiny model's probabilities for the photo, preprocessed here independently of the CLI."""
    image = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
    array = (np.asarray(image, dtype=np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    x = torch.from_numpy(array).permute(2, 0, 1)[None]
    with torch.no_grad():
        return (model or tiny_cnn())(x).softmax(dim=1)[0]


@pytest.fixture(autouse=True)
def _importable_tests_package(monkeypatch):
    """`tests.cli_models` must import as the CLI would from the repository root."""
    monkeypatch.chdir(Path(__file__).resolve().parents[1])


@pytest.fixture(scope="session")
def _built():
    return {}


@pytest.fixture
def build_once(_built, monkeypatch):
    """Make ``tsgb_fx.cli.build`` build each (model, weights, size, groups, device) once per session.

    The first test to ask builds through the real code path; later ones reuse its explainer
    (building the torch.export explainer of the default model takes several seconds).
    """
    import tsgb_fx.cli as cli

    real_build = cli.build

    def build(args):
        key = (args.model, args.weights, args.size, args.conv_groups, args.device)
        if key not in _built:
            _built[key] = real_build(args)
        return _built[key]

    monkeypatch.setattr(cli, "build", build)


@pytest.fixture
def folder(tmp_path) -> Path:
    """Two photos, one .png that is not an image and a text file (ignored: no image extension)."""
    images = tmp_path / "photos"
    images.mkdir()
    shutil.copy(sample_path("chelsea"), images / "cat.png")
    shutil.copy(sample_path("coffee"), images / "coffee.png")
    (images / "broken.png").write_text("this is not a PNG")
    (images / "notes.txt").write_text("not an image either")
    return images


# ---------------------------------------------------------------------------------------------
# The embedded pretrained default on the bundled photo


def test_explain_cat_photo_with_default_model(tmp_path, capsys, build_once):
    out = tmp_path / "out"
    status = main(["explain", str(sample_path("chelsea")), "--out", str(out)])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert errors(captured.err) == []
    result = parse(captured.out)["chelsea.png"]
    index, name, probability = result["top"][0]
    assert (index, name) == (EGYPTIAN_CAT, "Egyptian cat")
    assert 0.75 < probability < 0.83  # TSGB.md: p = 0.79
    assert len(result["top"]) == 3 and result["explained"] == [EGYPTIAN_CAT]
    png = result["png"]
    assert png.parent == out and png.is_file()
    with Image.open(png) as image:
        image.load()
        assert image.format == "PNG"
        picture = np.asarray(image.convert("RGB")).astype(int)
    height, width = picture.shape[:2]
    assert 2.2 < width / height < 3.2  # photo and overlay side by side, each 451 x 300
    # The right panel is a colour overlay on a grey photo: it has strongly coloured pixels.
    right = picture[:, width // 2 + 10 : -10]
    chroma = right.max(axis=2) - right.min(axis=2)
    assert (chroma > 100).mean() > 0.01


def test_top_k_explains_three_classes_per_image_in_one_pass(tmp_path, capsys, monkeypatch, build_once):
    calls = []
    forward = tsgb_fx.Explainer.forward

    def recording_forward(self, x, target=None):
        calls.append((tuple(x.shape), None if target is None else tuple(torch.as_tensor(target).shape)))
        return forward(self, x, target)

    monkeypatch.setattr(tsgb_fx.Explainer, "forward", recording_forward)
    status = main(["explain", str(sample_path("chelsea")), "--top-k", "3", "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert calls == [((1, 3, 224, 224), (1, 3))]  # three classes, one call
    results = parse(captured.out)
    assert results["chelsea.png"]["top"][0][0] == EGYPTIAN_CAT
    for result in results.values():
        assert result["explained"] == [entry[0] for entry in result["top"]]
        probabilities = [entry[2] for entry in result["top"]]
        assert probabilities == sorted(probabilities, reverse=True)
        with Image.open(result["png"]) as image:
            width, height = image.size
        assert 4.5 < width / height < 6.0  # photo + three overlays side by side


# ---------------------------------------------------------------------------------------------
# A user's own model through package.module:factory


def test_user_model_from_factory_in_a_folder_with_bad_files(folder, tmp_path, capsys):
    out = tmp_path / "out"
    missing = tmp_path / "nowhere.jpg"
    status = main(["explain", str(folder), str(missing), "--model", TINY, "--size", "32", "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert status == 1
    lines = errors(captured.err)
    assert len(lines) == 2, captured.err
    assert any("broken.png" in line and "not an image" in line for line in lines)
    assert any(str(missing) in line and "no such file" in line for line in lines)
    results = parse(captured.out)
    assert set(results) == {"cat.png", "coffee.png"}  # the good images are still explained
    names = tiny_cnn().class_names
    for image_name, result in results.items():
        expected = tiny_expected(folder / image_name, 32)
        index, name, probability = result["top"][0]
        assert index == int(expected.argmax()) and name == names[index]
        assert probability == pytest.approx(float(expected.max()), abs=1e-3)
        assert result["explained"] == [index]
        assert result["png"].is_file()
    assert sorted(p.name for p in out.iterdir()) == ["cat_tsgb.png", "coffee_tsgb.png"]


def test_folder_gets_a_progress_bar(folder, tmp_path, capsys):
    (folder / "broken.png").unlink()
    status = main(["explain", str(folder), "--model", TINY, "--size", "32", "--batch-size", "1", "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "2/2" in captured.err and "image" in captured.err  # tqdm's final state, unit "image"
    assert set(parse(captured.out)) == {"cat.png", "coffee.png"}


def test_images_are_batched(tmp_path, capsys, monkeypatch):
    calls = []
    forward = tsgb_fx.Explainer.forward

    def recording_forward(self, x, target=None):
        calls.append((tuple(x.shape), None if target is None else tuple(torch.as_tensor(target).shape)))
        return forward(self, x, target)

    monkeypatch.setattr(tsgb_fx.Explainer, "forward", recording_forward)
    images = [str(sample_path(name)) for name in ("chelsea", "coffee", "chelsea")]
    status = main(["explain", *images, "--model", TINY, "--size", "32", "--batch-size", "2", "--top-k", "2",
                   "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert calls == [((2, 3, 32, 32), (2, 2)), ((1, 3, 32, 32), (1, 2))]
    assert len(captured.out.splitlines()) == 3 and len(list((tmp_path / "out").iterdir())) == 3
    for line in captured.out.splitlines():
        (name, result), = parse(line).items()
        expected = tiny_expected(sample_path(name.removesuffix(".png")), 32)
        assert result["explained"] == expected.topk(2).indices.tolist()


def test_compile_pads_the_last_batch_so_one_compiled_graph_explains_the_folder(tmp_path, capsys, monkeypatch):
    """--compile: a short last batch is filled with copies of its last image, so the one graph
    compiled for the first batch explains it too, and the copies' results are dropped. The third
    photo is the first one again: its maps must not depend on its batch or on the padding, and
    they are the eager explainer's maps of the photo, preprocessed here."""
    import tsgb_fx.viz

    built, calls, drawn = [], [], {}
    factory, forward = tsgb_fx.explainer, tsgb_fx.Explainer.forward
    monkeypatch.setattr(tsgb_fx, "explainer", lambda model, **options: built.append(factory(model, **options)) or built[-1])

    def recording_forward(self, x, target=None):
        calls.append(tuple(x.shape))
        return forward(self, x, target)

    monkeypatch.setattr(tsgb_fx.Explainer, "forward", recording_forward)
    monkeypatch.setattr(tsgb_fx.viz, "save_panels", lambda png, photo, maps, *rest, **options: drawn.update(
        {Path(png).name: torch.stack(maps)}))
    photos = tmp_path / "photos"
    photos.mkdir()
    samples = {"a.png": "chelsea", "b.png": "coffee", "c.png": "chelsea"}
    for name, sample in samples.items():
        shutil.copy(sample_path(sample), photos / name)
    status = main(["explain", str(photos), "--model", TINY, "--size", "32", "--batch-size", "2", "--top-k", "2",
                   "--compile", "--out", str(tmp_path / "out"), "--quiet"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "--compile" in captured.err
    assert calls == [(2, 3, 32, 32), (2, 3, 32, 32)]
    assert len(built) == 1 and built[0].compiled_graphs is not None and len(built[0].compiled_graphs) == 1
    results = parse(captured.out)
    assert sorted(results) == sorted(samples) and sorted(drawn) == ["a_tsgb.png", "b_tsgb.png", "c_tsgb.png"]
    eager = tsgb_fx.explainer(tiny_cnn())
    for name, sample in samples.items():
        top2 = tiny_expected(sample_path(sample), 32).topk(2).indices
        assert results[name]["explained"] == top2.tolist()
        image = Image.open(sample_path(sample)).convert("RGB").resize((32, 32), Image.BILINEAR)
        x = torch.from_numpy((np.asarray(image, dtype=np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).permute(2, 0, 1)
        expected = eager(x[None], target=top2[None]).saliency[0]
        maps = drawn[name.replace(".png", "_tsgb.png")]
        assert torch.allclose(maps, expected, rtol=1e-4, atol=1e-5 * expected.abs().max())
    assert torch.allclose(drawn["a_tsgb.png"], drawn["c_tsgb.png"], rtol=1e-5, atol=1e-6 * drawn["a_tsgb.png"].abs().max())


def test_target_is_explained_for_every_image_and_names_do_not_collide(tmp_path, capsys):
    first, second = tmp_path / "a", tmp_path / "b"
    for directory in (first, second):
        directory.mkdir()
        shutil.copy(sample_path("chelsea"), directory / "photo.png")
    status = main(["explain", str(first), str(second), "--model", TINY, "--size", "32", "--target", "4",
                   "--out", str(tmp_path / "out"), "--quiet"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    lines = [parse(line)["photo.png"] for line in captured.out.splitlines()]
    assert [line["explained"] for line in lines] == [[4], [4]]
    assert len({line["png"] for line in lines}) == 2 and all(line["png"].is_file() for line in lines)


def test_conv_groups_reaches_the_explainer(tmp_path, capsys, monkeypatch):
    built = []
    factory = tsgb_fx.explainer
    monkeypatch.setattr(tsgb_fx, "explainer", lambda model, **options: built.append(options) or factory(model, **options))
    pictures = []
    for groups in ("reference", "layer"):
        out = tmp_path / groups
        assert main(["explain", str(sample_path("coffee")), "--model", TINY, "--size", "32", "--conv-groups", groups,
                     "--out", str(out)]) == 0
        capsys.readouterr()
        pictures.append(np.asarray(Image.open(out / "coffee_tsgb.png").convert("RGB")).astype(int))
    assert [options["conv_groups"] for options in built] == ["reference", "layer"]
    assert np.abs(pictures[0] - pictures[1]).max() > 0  # the tiny model has a depthwise conv: maps differ


def test_weights_file_is_loaded_into_the_model(tmp_path, capsys):
    model = tiny_cnn()
    with torch.no_grad():  # make class 2 win on every photo
        model.classifier.bias.copy_(torch.tensor([0.0, 0.0, 50.0, 0.0, 0.0]))
    weights = tmp_path / "tiny.pt"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, weights)
    status = main(["explain", str(sample_path("coffee")), "--model", TINY, "--weights", str(weights),
                   "--size", "32", "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    top = parse(captured.out)["coffee.png"]["top"][0]
    assert top[0] == 2 and top[2] == pytest.approx(float(tiny_expected(sample_path("coffee"), 32, model)[2]), abs=1e-3)


def test_named_torchvision_model_warns_about_random_weights(tmp_path, capsys):
    status = main(["explain", str(sample_path("coffee")), "--model", "resnet18", "--size", "64",
                   "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "random weights" in captured.err and "torchvision resnet18" in captured.err
    assert parse(captured.out)["coffee.png"]["png"].is_file()


def test_named_models_resolve_to_torchvision_then_timm():
    from tsgb_fx.models import load_model

    timm = pytest.importorskip("timm")
    loaded = load_model("resnet10t")  # timm only
    assert loaded.source == "timm resnet10t" and loaded.random_weights
    assert isinstance(loaded.model, timm.models.ResNet) and not loaded.model.training
    assert loaded.preprocessing.size == timm.data.resolve_data_config({}, model=loaded.model)["input_size"][-1]
    assert len(loaded.class_names) == 1000 and loaded.class_names[EGYPTIAN_CAT] == "Egyptian cat"


# ---------------------------------------------------------------------------------------------
# A person's mistakes: one line on stderr, non-zero exit


def run_failing(argv, capsys) -> str:
    status = main(argv)
    captured = capsys.readouterr()
    assert status != 0
    lines = errors(captured.err)
    assert len(lines) == 1 and captured.err.strip() == lines[0], captured.err
    return lines[0]


def test_missing_path(tmp_path, capsys):
    line = run_failing(["explain", str(tmp_path / "cat.jpg"), "--out", str(tmp_path)], capsys)
    assert "no such file or folder" in line and "cat.jpg" in line


def test_file_that_is_not_an_image(tmp_path, capsys):
    fake = tmp_path / "notes.txt"
    fake.write_text("hello")
    line = run_failing(["explain", str(fake), "--out", str(tmp_path)], capsys)
    assert "notes.txt" in line and "not an image" in line


def test_unknown_model_name(tmp_path, capsys):
    line = run_failing(["explain", str(sample_path("coffee")), "--model", "resnet_nonexistent", "--out", str(tmp_path)], capsys)
    assert "unknown model 'resnet_nonexistent'" in line


@pytest.mark.parametrize(
    "spec, message",
    [
        ("tests.no_such_module:factory", "cannot import module 'tests.no_such_module'"),
        ("tests.cli_models:missing_factory", "has no attribute 'missing_factory'"),
        ("tests.cli_models:not_a_model", "returned str, not a torch.nn.Module"),
    ],
)
def test_bad_user_factory(spec, message, tmp_path, capsys):
    line = run_failing(["explain", str(sample_path("coffee")), "--model", spec, "--out", str(tmp_path)], capsys)
    assert message in line


def test_weights_that_do_not_fit(tmp_path, capsys):
    from .cli_models import wider_cnn

    weights = tmp_path / "wider.pt"
    torch.save(wider_cnn().state_dict(), weights)
    line = run_failing(["explain", str(sample_path("coffee")), "--model", TINY, "--weights", str(weights),
                        "--out", str(tmp_path)], capsys)
    assert "does not fit the model" in line and "wrong shape" in line and "features.0.weight (16, 3, 3, 3) vs (8, 3, 3, 3)" in line


def test_weights_file_that_is_not_a_state_dict(tmp_path, capsys):
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"\x00garbage")
    line = run_failing(["explain", str(sample_path("coffee")), "--model", TINY, "--weights", str(weights),
                        "--out", str(tmp_path)], capsys)
    assert "cannot read weights file" in line


def test_missing_weights_file(tmp_path, capsys):
    line = run_failing(["explain", str(sample_path("coffee")), "--model", TINY, "--weights", str(tmp_path / "w.pt"),
                        "--out", str(tmp_path)], capsys)
    assert "weights file not found" in line


@pytest.mark.parametrize("target", ["5", "-1"])
def test_target_out_of_range(target, tmp_path, capsys):
    line = run_failing(["explain", str(sample_path("coffee")), "--model", TINY, "--size", "32", "--target", target,
                        "--out", str(tmp_path / "out")], capsys)
    assert f"--target {target} is out of range: the model has 5 classes (0..4)" in line
    assert not (tmp_path / "out").exists()


def test_top_k_more_than_classes(tmp_path, capsys):
    line = run_failing(["explain", str(sample_path("coffee")), "--model", TINY, "--size", "32", "--top-k", "6",
                        "--out", str(tmp_path)], capsys)
    assert "--top-k 6 is more than the model's 5 classes" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when no GPU is there")
def test_cuda_without_a_gpu(tmp_path, capsys):
    line = run_failing(["explain", str(sample_path("coffee")), "--model", TINY, "--device", "cuda", "--out", str(tmp_path)], capsys)
    assert "no CUDA GPU" in line


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_explains_like_cpu(tmp_path, capsys):
    outputs = []
    for device in ("cpu", "cuda"):
        assert main(["explain", str(sample_path("coffee")), "--model", TINY, "--size", "32", "--device", device,
                     "--out", str(tmp_path / device)]) == 0
        outputs.append(parse(capsys.readouterr().out)["coffee.png"]["top"])
    assert [entry[0] for entry in outputs[0]] == [entry[0] for entry in outputs[1]]


def test_target_and_top_k_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["explain", "x.png", "--target", "1", "--top-k", "2"])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# tsgb export and tsgb info


def test_export_and_info_tiny_model(tmp_path, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("tsgb_export")
    path = tmp_path / "tiny.onnx"
    status = main(["export", "--model", TINY, "--size", "32", "--out", str(path)])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert path.is_file() and str(path) in captured.out
    assert main(["info", str(path)]) == 0
    info = capsys.readouterr().out
    inputs = info.split("inputs:\n")[1].split("outputs:\n")[0]
    outputs = info.split("outputs:\n")[1].split("metadata:\n")[0]
    assert inputs.splitlines() == ["  image: float [N, 3, 32, 32]", "  target: int64 [N]"]
    assert outputs.splitlines() == ["  logits: float [N, 5]", "  saliency: float [N, 1, 32, 32]"]
    assert '"size": 32' in info and "tsgb.class_names" in info and "red thing" in info


@pytest.mark.slow
def test_export_default_model_runs_in_onnxruntime(tmp_path, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    runtime = pytest.importorskip("tsgb_export.runtime")
    path = tmp_path / "lite0.onnx"
    assert main(["export", "--out", str(path)]) == 0, capsys.readouterr().err
    image = Image.open(sample_path("chelsea")).convert("RGB").resize((224, 224), Image.BILINEAR)
    x = (np.asarray(image, dtype=np.float32)[None].transpose(0, 3, 1, 2) / 255.0 - 0.5) / 0.5
    explainer = runtime.OnnxExplainer(str(path))
    assert explainer.mean == [0.5, 0.5, 0.5] and explainer.std == [0.5, 0.5, 0.5]  # recorded by the command
    result = explainer(x)
    assert int(result.target[0]) == EGYPTIAN_CAT
    assert float(np.exp(result.logits[0] - result.logits[0].max()).sum() ** -1) == pytest.approx(0.79, abs=0.03)


def test_info_on_a_file_that_is_not_onnx(tmp_path, capsys):
    pytest.importorskip("onnx")
    fake = tmp_path / "model.onnx"
    fake.write_bytes(b"not a protobuf at all \xff\xfe")
    line = run_failing(["info", str(fake)], capsys)
    assert "is not an ONNX model" in line


def test_info_on_a_missing_file(tmp_path, capsys):
    line = run_failing(["info", str(tmp_path / "model.onnx")], capsys)
    assert "no such file" in line


# ---------------------------------------------------------------------------------------------
# Overlay arithmetic


def test_positive_normalised_clips_negatives_and_scales_by_percentile():
    from tsgb_fx.viz import positive_normalised

    saliency = np.array([[-3.0, 0.0, 1.0], [2.0, 4.0, 100.0]])
    # positive values 1, 2, 4, 100; their 50th percentile (numpy's linear rule) is 3
    expected = np.array([[0.0, 0.0, 1 / 3], [2 / 3, 1.0, 1.0]])
    np.testing.assert_allclose(positive_normalised(torch.tensor(saliency)[None], percentile=50), expected)
    np.testing.assert_allclose(positive_normalised(saliency, percentile=100), np.clip(saliency, 0, None) / 100)
    assert not positive_normalised(-np.ones((4, 4))).any()


def test_channels_last_hands_the_explainer_nhwc_batches_with_the_same_maps(tmp_path, capsys, monkeypatch):
    """--channels-last: every batch reaches the explainer in channels_last memory format, and the
    maps are those of the same run without the flag (float rounding apart)."""
    import tsgb_fx.viz

    layouts, drawn = [], {}
    forward = tsgb_fx.Explainer.forward

    def recording_forward(self, x, target=None):
        layouts.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        return forward(self, x, target)

    monkeypatch.setattr(tsgb_fx.Explainer, "forward", recording_forward)
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, sample in {"a.png": "chelsea", "b.png": "coffee", "c.png": "chelsea"}.items():
        shutil.copy(sample_path(sample), photos / name)
    for flags in ([], ["--channels-last"]):
        monkeypatch.setattr(tsgb_fx.viz, "save_panels", lambda png, photo, maps, *rest, flags=tuple(flags), **options:
                            drawn.setdefault(flags, {}).update({Path(png).name: torch.stack(maps)}))
        status = main(["explain", str(photos), "--model", TINY, "--size", "32", "--batch-size", "2",
                       "--out", str(tmp_path / "out"), "--quiet", *flags])
        assert status == 0, capsys.readouterr().err
    assert layouts == [False, False, True, True]  # two batches per run
    plain, nhwc = drawn[()], drawn[("--channels-last",)]
    assert sorted(plain) == sorted(nhwc) == ["a_tsgb.png", "b_tsgb.png", "c_tsgb.png"]
    for name in plain:
        torch.testing.assert_close(nhwc[name], plain[name], rtol=1e-4, atol=1e-6 * plain[name].abs().max().item())
