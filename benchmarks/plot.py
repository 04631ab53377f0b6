"""Scaling: time of the plain forward and of a tsgb-fx explanation against batch size and image size.

Two sweeps on one model (default ResNet-50): batch sizes at a fixed image size, image sizes at a
fixed batch. At every point the forward (``torch.inference_mode``) and the eager explainer run
round-robin (see benchmarks/common.py). Writes ``benchmarks/scaling.png`` (matplotlib, Agg) and,
with ``--json-out``, the points, from which report.py states how the cost grows.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from . import common
from .common import TARGET_CLASS, format_ms, format_ratio, markdown_table, ratio

HERE = Path(__file__).resolve().parent


def measure(model, explainer, batch: int, size: int, repeats: int, warmup: int, device: str) -> dict:
    import torch

    x = common.make_input(batch, size, device)

    def forward():
        with torch.inference_mode():
            return model(x)

    times = common.time_cases(
        {"forward": forward, "tsgb_eager": lambda: explainer(x, target=TARGET_CLASS).saliency},
        repeats=repeats, warmup=warmup, sync=common.synchronizer(device),
    )
    return {"batch": batch, "size": size, "times": times, "medians": common.medians(times), "load": common.load_now()}


def run(args) -> dict:
    import tsgb_fx

    common.check_device(args.device)
    threads = common.set_threads(args.threads)
    machine = common.machine_info(threads, args.device)
    model = common.build_model(args.model, args.device)
    explainer = tsgb_fx.explainer(model)
    by_batch, by_size = [], []
    for batch in args.batch_sizes:
        print(f"{args.model} batch {batch} at {args.size}: timing", file=sys.stderr, flush=True)
        by_batch.append(measure(model, explainer, batch, args.size, args.repeats, args.warmup, args.device))
    for size in args.sizes:
        print(f"{args.model} batch {args.size_batch} at {size}: timing", file=sys.stderr, flush=True)
        by_size.append(measure(model, explainer, args.size_batch, size, args.repeats, args.warmup, args.device))
    return {
        "kind": "scaling",
        "machine": machine,
        "settings": {"model": args.model, "size": args.size, "batch_sizes": list(args.batch_sizes),
                     "sizes": list(args.sizes), "size_batch": args.size_batch, "repeats": args.repeats,
                     "warmup": args.warmup},
        "by_batch": by_batch,
        "by_size": by_size,
    }


def plot(payload: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import ticker
    from matplotlib.figure import Figure

    s = payload["settings"]
    figure = Figure(figsize=(10, 4), dpi=110, layout="constrained")
    left, right = figure.subplots(1, 2)
    panels = (
        (left, payload["by_batch"], "batch", "batch size", f"{s['model']}, {s['size']}x{s['size']}"),
        (right, payload["by_size"], "size", "image side (pixels)", f"{s['model']}, batch {s['size_batch']}"),
    )
    for axis, points, key, xlabel, title in panels:
        xs = [p[key] for p in points]
        for case, label, style in (("forward", "forward (inference_mode)", "o-"),
                                   ("tsgb_eager", "tsgb-fx explain", "s-")):
            ys = [(p["medians"].get(case) or math.nan) * 1e3 for p in points]
            axis.plot(xs, ys, style, label=label)
        for p in points:
            r = ratio(p["medians"].get("tsgb_eager"), p["medians"].get("forward"))
            if r is not None:
                axis.annotate(format_ratio(r), (p[key], p["medians"]["tsgb_eager"] * 1e3),
                              textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xticks(xs, [str(x) for x in xs])
        axis.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        axis.yaxis.set_minor_formatter(ticker.NullFormatter())
        axis.margins(x=0.08, y=0.15)
        axis.set_xlabel(xlabel)
        axis.set_ylabel("ms per call (median)")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    machine = payload["machine"]
    figure.suptitle(f"tsgb-fx scaling on {machine['device']} ({machine['threads']} threads), "
                    f"labels: explain / forward", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def render(payload: dict) -> str:
    rows = []
    for sweep in ("by_batch", "by_size"):
        for p in payload[sweep]:
            m = p["medians"]
            rows.append([p["batch"], f"{p['size']}x{p['size']}", format_ms(m.get("forward")),
                         format_ms(m.get("tsgb_eager")), format_ratio(ratio(m.get("tsgb_eager"), m.get("forward")))])
    title = f"Scaling of {payload['settings']['model']}, median of {payload['settings']['repeats']}"
    return f"{title}\n\n" + markdown_table(["batch", "image", "forward", "tsgb-fx explain", "ratio"], rows)


def growth_exponent(xs, ys) -> float | None:
    """Least-squares slope of log(y) on log(x): time grows like x**slope."""
    points = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x and y]
    if len(points) < 2:
        return None
    mx = sum(p[0] for p in points) / len(points)
    my = sum(p[1] for p in points) / len(points)
    sxx = sum((p[0] - mx) ** 2 for p in points)
    if sxx == 0:
        return None
    return sum((p[0] - mx) * (p[1] - my) for p in points) / sxx


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="time against batch size and image size: forward vs tsgb-fx explain")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--size", type=int, default=224, help="image size of the batch sweep")
    p.add_argument("--sizes", nargs="+", type=int, default=[128, 160, 224, 288])
    p.add_argument("--size-batch", type=int, default=1, help="batch size of the image-size sweep")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=HERE / "scaling.png")
    p.add_argument("--json-out", type=Path, default=None)
    p.add_argument("--markdown-out", type=Path, default=None)
    p.add_argument("--from-json", type=Path, default=None, help="redraw the plot from a --json-out file; measure nothing")
    args = p.parse_args(argv)
    if args.from_json is not None:
        payload = json.loads(args.from_json.read_text())
        print(f"plot: {plot(payload, args.out)}")
        return payload
    payload = run(args)
    plot(payload, args.out)
    payload["png"] = str(args.out)
    common.emit(args, payload, render(payload))
    print(f"plot: {args.out}", file=sys.stderr)
    return payload


if __name__ == "__main__":
    main()
