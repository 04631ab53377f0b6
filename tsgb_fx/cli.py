"""The ``tsgb`` command: explain photos, export the explainer to ONNX, inspect an ONNX file.

    tsgb explain IMAGE_OR_DIR... [--model NAME] [--weights FILE] [--target K | --top-k K]
                 [--conv-groups reference|layer] [--out DIR] [--device cpu|cuda]
                 [--batch-size B] [--size S] [--compile] [--channels-last]
    tsgb export [--model NAME] [--weights FILE] [--conv-groups ...] [--size S] --out model.onnx
    tsgb info model.onnx

Without ``--model`` the embedded ImageNet EfficientNet-Lite0 explains (see :mod:`tsgb_fx.models`).
A person's mistakes (missing path, file that is not an image, unknown model, weights that do not
fit, target out of range) print one line ``tsgb: error: ...`` on stderr and make the exit status
non-zero; the other images of a run are still explained. Exit status: 0 all done, 1 something
failed, 2 bad command line (argparse).

``tsgb explain`` explains batch after batch in one process, so it first calls
:func:`tsgb_fx.reuse_freed_memory`: each batch reuses the memory the last one freed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

PROG = "tsgb"
SHOWN_CLASSES = 3
"""Top classes printed per image (more when --top-k asks for more)."""
DISPLAY_SIDE = 640
"""Photos are shrunk to this longest side for the PNG (the map is resized to match)."""


class CommandError(Exception):
    """A mistake in what the person asked for; the message is the one line printed."""


def _error(message: str, write=None) -> None:
    line = f"{PROG}: error: " + " ".join(str(message).split())
    (write or (lambda text: print(text, file=sys.stderr)))(line)


def _note(message: str) -> None:
    print(f"{PROG}: note: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Images


def _image_extensions() -> frozenset[str]:
    from PIL import Image

    return frozenset(ext.lower() for ext in Image.registered_extensions())


def collect_images(inputs: Sequence[str]) -> tuple[list[Path], list[str], bool]:
    """The image files named by ``inputs`` (files, or folders: their image files, sorted).

    Returns (images, errors, any_folder). A named file that does not exist or that Pillow cannot
    identify is an error; in a folder only files with an image extension are taken, and one of
    those that Pillow cannot identify is an error too. Folders are not searched recursively.
    """
    from PIL import Image, UnidentifiedImageError

    extensions = _image_extensions()
    images: list[Path] = []
    errors: list[str] = []
    any_folder = False
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            any_folder = True
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in extensions and not p.name.startswith("."))
            if not found:
                errors.append(f"no image files in folder {path}")
            candidates = found
        elif path.exists():
            candidates = [path]
        else:
            errors.append(f"no such file or folder: {path}")
            continue
        for candidate in candidates:
            try:
                with Image.open(candidate) as image:  # reads the header only
                    image.size
            except (UnidentifiedImageError, OSError, ValueError) as error:
                reason = "not an image Pillow can read" if isinstance(error, UnidentifiedImageError) else str(error)
                errors.append(f"{candidate}: {reason}")
                continue
            images.append(candidate)
    return images, errors, any_folder


def load_image(path: Path, channels: int = 3):
    """The photo as a PIL image (RGB, or L for 1-channel models), EXIF orientation applied."""
    from PIL import Image, ImageOps

    if channels not in (1, 3):
        raise CommandError(f"models with {channels} input channels are not supported by the command (1 or 3)")
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        return image.convert("RGB" if channels == 3 else "L")


def preprocess(image, preprocessing, size: int) -> torch.Tensor:
    """(C, size, size) float tensor: bilinear squash to size x size, [0, 1], (x - mean) / std."""
    from PIL import Image

    resized = image.resize((size, size), Image.BILINEAR)
    array = np.asarray(resized, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[:, :, None]
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1)
    mean = torch.tensor(preprocessing.mean, dtype=torch.float32).reshape(-1, 1, 1)
    std = torch.tensor(preprocessing.std, dtype=torch.float32).reshape(-1, 1, 1)
    return (tensor - mean) / std


# ---------------------------------------------------------------------------------------------
# Model and explainer


@dataclass
class Setup:
    loaded: object  # tsgb_fx.models.LoadedModel
    explainer: object  # tsgb_fx.Explainer
    size: int
    classes: int
    device: torch.device


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda was asked for but torch sees no CUDA GPU (torch.cuda.is_available() is False)")
    return torch.device(name)


def _load(args) -> object:
    from .models import load_model

    try:
        loaded = load_model(args.model, args.weights)
    except ValueError as error:
        raise CommandError(str(error)) from error
    if loaded.random_weights:
        _note(f"{loaded.source} has random weights (no --weights given): the maps explain an untrained network")
    return loaded


def build(args) -> Setup:
    """Load the model, check it maps an image batch to logits, trace and rewrite it once."""
    import tsgb_fx

    device = _device(getattr(args, "device", "cpu"))
    loaded = _load(args)
    size = args.size or loaded.preprocessing.size
    model = loaded.model.to(device)
    # Batch 2: torch.export (the fallback tracer) keeps the batch dynamic only from a batch > 1.
    example = torch.zeros(2, loaded.preprocessing.channels, size, size, device=device)
    try:
        with torch.no_grad():
            logits = model(example)
    except Exception as error:
        raise CommandError(f"the model fails on a batch of shape {tuple(example.shape)}: {type(error).__name__}: {error}") from error
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        what = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise CommandError(f"the model must return logits of shape (N, K); it returned {what}")
    classes = logits.shape[1]
    if loaded.class_names is not None and len(loaded.class_names) != classes:
        loaded = replace(loaded, class_names=None)
    try:
        explainer = tsgb_fx.explainer(model, conv_groups=args.conv_groups, example_input=example,
                                      compile=getattr(args, "compile", False))
    except (tsgb_fx.TraceError, ValueError, TypeError) as error:
        raise CommandError(f"cannot build the explainer for {loaded.source}: {error}") from error
    return Setup(loaded, explainer, size, classes, device)


# ---------------------------------------------------------------------------------------------
# tsgb explain


def _png_path(out: Path, image: Path, taken: set[Path]) -> Path:
    path = out / f"{image.stem}_tsgb.png"
    counter = 2
    while path in taken:
        path = out / f"{image.stem}_{counter}_tsgb.png"
        counter += 1
    taken.add(path)
    return path


def _describe(loaded, index: int, probability: float) -> str:
    return f"{index} {loaded.class_name(index)} {probability:.3f}"


def explain_batch(setup: Setup, batch: torch.Tensor, target: int | None, top_k: int | None,
                  pad_to: int | None = None):
    """One explainer call for a batch; --top-k K explains K classes per image in one pass.

    Returns the Explanation (saliency (N, T, H, W) or (N, 1, H, W), target (N, T) or (N,)) and
    the softmax probabilities (N, K).

    ``pad_to``: a batch of fewer images is filled up to that many with copies of its last image,
    whose results are dropped. A compiled explainer (``--compile``) compiles once per batch size
    on a CPU, for minutes; padded, the last, shorter batch of a folder (or one with unreadable
    files) reuses the graph of the others. Each image's map is its own (the model runs in eval
    mode), so the copies change nothing else.
    """
    count = batch.shape[0]
    if pad_to is not None and count < pad_to:
        batch = torch.cat([batch, batch[-1:].expand(pad_to - count, *batch.shape[1:])])
        result, probabilities = explain_batch(setup, batch, target, top_k)
        kept = {field.name: getattr(result, field.name)[:count] for field in fields(result)}  # all per image
        return replace(result, **kept), probabilities[:count]
    e = setup.explainer
    if top_k is not None and top_k > 1:
        with torch.no_grad():
            logits = setup.loaded.model(batch)
        targets = logits.topk(top_k, dim=1).indices
        result = e(batch, target=targets)
    else:
        result = e(batch, target=target)
    probabilities = result.logits.float().softmax(dim=1)
    return result, probabilities


def cmd_explain(args) -> int:
    from tqdm import tqdm

    from .allocator import reuse_freed_memory
    from .viz import save_panels

    reuse_freed_memory()  # this process explains batch after batch: each reuses the memory of the last

    failed = False

    def report(message: str) -> None:
        nonlocal failed
        failed = True
        _error(message, write=lambda line: tqdm.write(line, file=sys.stderr))

    images, errors, any_folder = collect_images(args.inputs)
    for message in errors:
        report(message)
    if not images:
        if not errors:
            report("no images given")
        return 1
    try:
        setup = build(args)
    except CommandError as error:
        report(str(error))
        return 1
    if args.target is not None and not 0 <= args.target < setup.classes:
        report(f"--target {args.target} is out of range: the model has {setup.classes} classes (0..{setup.classes - 1})")
        return 1
    if args.top_k is not None and args.top_k > setup.classes:
        report(f"--top-k {args.top_k} is more than the model's {setup.classes} classes")
        return 1

    out = Path(args.out)
    taken: set[Path] = set()
    shown = max(SHOWN_CLASSES, args.top_k or 1)
    batch_size = min(args.batch_size, len(images))
    if args.compile:
        _note(f"--compile: the first batch compiles the explainer for batches of {batch_size} "
              "(minutes on a CPU); every later batch reuses it")
    progress = tqdm(total=len(images), unit="image", disable=not any_folder or args.quiet, file=sys.stderr)
    channels = setup.loaded.preprocessing.channels
    for start in range(0, len(images), batch_size):
        paths, photos, tensors = [], [], []
        for path in images[start : start + batch_size]:
            try:
                photo = load_image(path, channels)
                tensors.append(preprocess(photo, setup.loaded.preprocessing, setup.size))
            except CommandError as error:
                report(str(error))
                progress.update(1)
                continue
            except Exception as error:  # a truncated or corrupt file fails only when decoded
                report(f"{path}: cannot read the image: {error}")
                progress.update(1)
                continue
            photo.thumbnail((DISPLAY_SIDE, DISPLAY_SIDE))
            paths.append(path)
            photos.append(np.asarray(photo))
        if not paths:
            continue
        batch = torch.stack(tensors).to(setup.device)
        if args.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        try:
            result, probabilities = explain_batch(setup, batch, args.target, args.top_k,
                                                  pad_to=batch_size if args.compile else None)
        except (ValueError, TypeError) as error:
            for path in paths:
                report(f"{path}: {error}")
            progress.update(len(paths))
            continue
        saliency = result.saliency.float().cpu()
        targets = result.target.cpu()
        probabilities = probabilities.cpu()
        for i, path in enumerate(paths):
            explained = targets[i].reshape(-1).tolist()
            maps = [saliency[i, t] for t in range(saliency.shape[1])]
            titles = [f"{k} {setup.loaded.class_name(k)}  p={float(probabilities[i, k]):.2f}" for k in explained]
            png = _png_path(out, path, taken)
            try:
                save_panels(png, photos[i], maps, titles, photo_title=path.name)
            except OSError as error:
                report(f"cannot write {png}: {error}")
                progress.update(1)
                continue
            top = probabilities[i].topk(min(shown, setup.classes))
            top_text = " | ".join(_describe(setup.loaded, int(k), float(p)) for p, k in zip(top.values, top.indices))
            explained_text = ", ".join(str(k) for k in explained)
            tqdm.write(f"{path}  top: {top_text}  explained: {explained_text}  -> {png}", file=sys.stdout)
            progress.update(1)
    progress.close()
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------
# tsgb export / tsgb info


def cmd_export(args) -> int:
    try:
        import tsgb_export
    except ImportError as error:
        _error(f"tsgb export needs the ONNX exporter package tsgb_export (folder export/ of tsgb-fx) and onnx: {error}")
        return 1
    try:
        setup = build(args)
    except CommandError as error:
        _error(str(error))
        return 1
    example = torch.zeros(1, setup.loaded.preprocessing.channels, setup.size, setup.size, device=setup.device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pre = setup.loaded.preprocessing
    try:
        tsgb_export.to_onnx(setup.explainer, str(out), example, opset=args.opset, mean=pre.mean, std=pre.std)
    except Exception as error:  # the exporter's failures come in many types; say which and where
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        _error(f"ONNX export of {setup.loaded.source} failed: {type(error).__name__}: {reason}")
        return 1
    _add_metadata(out, setup)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): {setup.loaded.source}, input (N, {setup.loaded.preprocessing.channels}, {setup.size}, {setup.size})")
    return 0


def _add_metadata(path: Path, setup: Setup) -> None:
    """Add the model's source, preprocessing and class names to the file's metadata_props.

    Keys ``tsgb.model``, ``tsgb.preprocessing`` (JSON; :class:`tsgb_export.runtime.OnnxExplainer`
    reads mean/std from it when ``tsgb.mean``/``tsgb.std`` are absent) and ``tsgb.class_names``
    (JSON list); keys the exporter wrote are left as they are.
    """
    import json

    import onnx

    model = onnx.load(str(path), load_external_data=False)
    pre = setup.loaded.preprocessing
    entries = {
        "tsgb.model": setup.loaded.source,
        "tsgb.preprocessing": json.dumps(
            {"size": setup.size, "mean": list(pre.mean), "std": list(pre.std), "channels": pre.channels,
             "resize": "bilinear, squash to size x size", "scale": "[0, 1] then (x - mean) / std"}
        ),
    }
    if setup.loaded.class_names is not None:
        entries["tsgb.class_names"] = json.dumps(list(setup.loaded.class_names))
    existing = {prop.key for prop in model.metadata_props}
    for key, value in entries.items():
        if key not in existing:
            model.metadata_props.add(key=key, value=value)
    if model.graph.initializer and any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        return  # external weights: leave the file alone rather than rewrite its data references
    onnx.save(model, str(path))


def _dims(value_info) -> str:
    tensor = value_info.type.tensor_type
    dims = [d.dim_param if d.dim_param else (str(d.dim_value) if d.HasField("dim_value") else "?") for d in tensor.shape.dim]
    import onnx

    dtype = onnx.TensorProto.DataType.Name(tensor.elem_type).lower() if tensor.elem_type else "?"
    return f"{dtype} [{', '.join(dims)}]"


def cmd_info(args) -> int:
    try:
        import onnx
    except ImportError:
        _error("tsgb info needs the onnx package: pip install onnx")
        return 1
    path = Path(args.model)
    if not path.is_file():
        _error(f"no such file: {path}")
        return 1
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:
        _error(f"{path} is not an ONNX model: {type(error).__name__}: {error}")
        return 1
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    opsets = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import)
    print(f"{path}: ONNX IR {model.ir_version}, opset {opsets}, producer {model.producer_name} {model.producer_version}".rstrip())
    print(f"  {len(graph.node)} nodes, {len(initializers)} initializers")
    print("inputs:")
    for value in graph.input:
        if value.name not in initializers:
            print(f"  {value.name}: {_dims(value)}")
    print("outputs:")
    for value in graph.output:
        print(f"  {value.name}: {_dims(value)}")
    print("metadata:")
    if not model.metadata_props:
        print("  (none)")
    for prop in model.metadata_props:
        value = prop.value if len(prop.value) <= 200 else prop.value[:200] + f"... ({len(prop.value)} characters)"
        print(f"  {prop.key}: {value}")
    return 0


# ---------------------------------------------------------------------------------------------
# Command line


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        help="torchvision or timm model name (random weights unless --weights), or package.module:factory; "
        "default: the embedded ImageNet-trained EfficientNet-Lite0",
    )
    parser.add_argument("--weights", metavar="FILE", help="state dict for the model (torch.save file, read with weights_only=True)")
    parser.add_argument(
        "--conv-groups",
        choices=("reference", "layer"),
        default="reference",
        help="TSGB-Conv over all channels as the authors' code (reference) or per group (layer)",
    )
    parser.add_argument("--size", type=_positive, help="input side in pixels (default: the model's, 224)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="TSGB saliency maps for CNN classifiers.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{explain,export,info}")

    explain = commands.add_parser("explain", help="write a saliency overlay PNG per image")
    explain.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    _add_model_options(explain)
    which = explain.add_mutually_exclusive_group()
    which.add_argument("--target", type=int, metavar="K", help="explain class K for every image (default: each image's top-1)")
    which.add_argument("--top-k", type=_positive, metavar="K", help="explain each image's K best classes, side by side, in one pass")
    explain.add_argument("--out", default="out", metavar="DIR", help="folder for the PNGs (default: ./out)")
    explain.add_argument("--batch-size", type=_positive, default=8, metavar="B")
    explain.add_argument("--quiet", action="store_true", help="no progress bar")
    explain.add_argument(
        "--compile",
        action="store_true",
        help="explain with torch.compile of the explicit graph (same maps): a one-off compile first (the "
        "default model: 40 s on 2 CPU cores, then 146 instead of 394 ms per batch of 8), so it pays for "
        "folders of about a thousand images and more",
    )
    explain.add_argument(
        "--channels-last",
        action="store_true",
        help="hand each batch to the explainer in channels_last memory format (same maps up to float "
        "rounding): oneDNN's NHWC convolutions made batches of 8 of the default model 21%% faster on 2 CPU "
        "cores (273 -> 216 ms), and the five benchmark models' 5-26%% in the last two make bench runs "
        "(benchmarks/README.md); single images gain less, or lose",
    )
    explain.set_defaults(func=cmd_explain)

    export = commands.add_parser("export", help="write the explainer as an ONNX model (image -> logits, saliency)")
    _add_model_options(export)
    export.add_argument("--out", required=True, metavar="model.onnx")
    export.add_argument("--opset", type=_positive, help="ONNX opset (default: the exporter's)")
    export.set_defaults(func=cmd_export)

    info = commands.add_parser("info", help="print an ONNX model's inputs, outputs and metadata")
    info.add_argument("model", metavar="model.onnx")
    info.set_defaults(func=cmd_info)
    return parser


_CLI_PACKAGES = {"PIL": "pillow", "matplotlib": "matplotlib", "tqdm": "tqdm", "timm": "timm"}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``tsgb`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CommandError as error:
        _error(str(error))
        return 1
    except ModuleNotFoundError as error:
        if error.name and error.name.split(".")[0] in _CLI_PACKAGES:
            _error(f"tsgb {args.command} needs the package {_CLI_PACKAGES[error.name.split('.')[0]]}: pip install 'tsgb-fx[cli]'")
            return 1
        raise
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
