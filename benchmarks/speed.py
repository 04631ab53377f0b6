"""Speed: tsgb-fx against the same model's plain forward, measured side by side in one run.

Per model and batch size, round-robin (see benchmarks/common.py), median of ``--repeats`` rounds
(more for quick rows with ``--min-seconds``):

* ``forward``: ``model(x)`` under ``torch.inference_mode()``: the baseline of every torch ratio
* ``gradient``: plain input gradient, ``torch.autograd.grad(model(x), x, one_hot)``
* ``tsgb_eager``: the explainer, ``e(x, target=...)`` (forward + one autograd pass with the rules)
* ``forward_channels_last`` / ``tsgb_eager_channels_last`` (``--channels-last``): the same two
  calls on the batch in ``torch.channels_last`` memory format (converted before the rounds, as a
  pipeline would hand it over; the model's weights stay as they are). oneDNN then runs every
  convolution in NHWC, and the layout carries through the explainer's rules; the ratio is still to
  the plain forward on the NCHW batch, and the forward's own channels_last time is shown beside it
* ``tsgb_explicit``: ``Explainer.explicit()``'s graph under ``torch.inference_mode()``
* ``tsgb_compiled`` (``--compile``): ``tsgb_fx.explainer(model, compile=True)``, i.e.
  ``torch.compile`` of the explicit graph behind the same API; its one-off compile time (first
  call per batch size, in a fresh inductor cache directory, so cold) is reported separately
* ``ort_forward`` / ``ort_tsgb``: onnxruntime running the plain model (``torch.onnx.export``,
  dynamo) and the exported explainer (``tsgb_export.to_onnx`` + ``OnnxExplainer``); the ORT
  ratio is to ORT's own forward.

One-off costs (explainer build, explicit trace, ONNX exports, compile) are reported in a second
table. Example::

    python -m benchmarks.speed --models resnet50 vgg16 --batch-sizes 1 8 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

from . import common
from .peers import PACKAGES as PEER_PACKAGES
from .peers import PEERS, Peers, add_peer_options
from .peers import render as render_peers
from .common import TARGET_CLASS, format_ms, format_ratio, format_seconds, markdown_table, ratio, ratio_cell

TORCH_CASES = ("forward", "forward_channels_last", "gradient", "tsgb_eager", "tsgb_eager_channels_last",
               "tsgb_explicit", "tsgb_compiled")
ORT_CASES = ("ort_forward", "ort_tsgb")
TIMED_COLUMNS = ("gradient", "tsgb_eager", "forward_channels_last", "tsgb_eager_channels_last", "tsgb_explicit",
                 "tsgb_compiled")  # after the forward, in the speed table's order
LABELS = {
    "forward": "forward (inference_mode)",
    "gradient": "input gradient (autograd)",
    "forward_channels_last": "forward, channels_last input",
    "tsgb_eager": "tsgb-fx eager",
    "tsgb_eager_channels_last": "tsgb-fx eager, channels_last input",
    "tsgb_explicit": "tsgb-fx explicit graph",
    "tsgb_compiled": "tsgb-fx compile=True",
    "ort_forward": "ORT forward",
    "ort_tsgb": "ORT tsgb-fx",
}


# ---------------------------------------------------------------------------------------------
# the cases


def torch_cases(model, explainer, explicit, x, compiled=None, channels_last=False) -> dict:
    import torch

    batch = x.shape[0]
    one_hot = torch.zeros(batch, _classes(model, x), device=x.device)
    one_hot[:, TARGET_CLASS] = 1.0
    target = torch.full((batch,), TARGET_CLASS, dtype=torch.long, device=x.device)

    def forward():
        with torch.inference_mode():
            return model(x)

    def gradient():
        with torch.enable_grad():
            image = x.detach().requires_grad_(True)
            return torch.autograd.grad(model(image), image, grad_outputs=one_hot)[0]

    def tsgb_eager():
        return explainer(x, target=TARGET_CLASS).saliency

    def tsgb_explicit():
        with torch.inference_mode():
            return explicit(x, target)

    cases = {"forward": forward, "gradient": gradient, "tsgb_eager": tsgb_eager}
    if channels_last:
        x_nhwc = x.contiguous(memory_format=torch.channels_last)

        def forward_channels_last():
            with torch.inference_mode():
                return model(x_nhwc)

        def tsgb_eager_channels_last():
            return explainer(x_nhwc, target=TARGET_CLASS).saliency

        cases.update(forward_channels_last=forward_channels_last, tsgb_eager_channels_last=tsgb_eager_channels_last)
    if explicit is not None:
        cases["tsgb_explicit"] = tsgb_explicit
    if compiled is not None:
        def tsgb_compiled():
            return compiled(x, target=TARGET_CLASS).saliency

        cases["tsgb_compiled"] = tsgb_compiled
    return cases


def _classes(model, x) -> int:
    import torch

    with torch.inference_mode():
        return model(x[:1]).shape[1]


def ort_providers(device: str) -> list[str] | None:
    """The ORT execution providers for ``device``; None when this onnxruntime cannot serve it."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    available = ort.get_available_providers()
    if device.startswith("cuda"):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in available else None
    return ["CPUExecutionProvider"]


def ort_session_options(threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Each session has its own thread pool, whose threads spin for a while after a run. Run back
    # to back, as the rounds do, one session's spinning threads take the cores from the next:
    # measured here, ORT's ResNet-50 forward at batch 1 took 100-115 ms right after the explainer
    # and 60 ms with spinning off, for both sessions alike.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def export_plain_onnx(model, example, path: Path) -> Path:
    """The plain model as ONNX (dynamo exporter), batch dynamic, input ``image``, output ``logits``."""
    import torch
    from torch.export import Dim

    example = example[:1].expand(2, *example.shape[1:]).contiguous()  # a batch of 1 would be specialised
    with torch.inference_mode(False):
        torch.onnx.export(
            model, (example,), str(path), dynamo=True, input_names=["image"], output_names=["logits"],
            dynamic_shapes=({0: Dim("batch")},), verbose=False,
        )
    return path


class OrtPair:
    """ORT sessions for one model: the plain forward and the exported tsgb explainer."""

    def __init__(self, model, explainer, example, providers, threads, workdir: Path):
        from tsgb_export import to_onnx
        from tsgb_export.runtime import OnnxExplainer
        import onnxruntime as ort

        plain_path, tsgb_path = workdir / "plain.onnx", workdir / "tsgb.onnx"
        self.export_plain_s = common.once(lambda: export_plain_onnx(model, example, plain_path))
        self.export_tsgb_s = common.once(lambda: to_onnx(explainer, tsgb_path, example.cpu()))
        self.plain = ort.InferenceSession(str(plain_path), sess_options=ort_session_options(threads),
                                          providers=providers)
        self.tsgb = OnnxExplainer(tsgb_path, providers=providers, session_options=ort_session_options(threads))
        self.providers = list(self.tsgb.providers)
        if providers[0] not in self.providers or providers[0] not in self.plain.get_providers():
            raise RuntimeError(f"onnxruntime could not use {providers[0]} (sessions run on {self.providers}): "
                               f"its ratio would not be about this device")

    def cases(self, x) -> dict:
        import numpy as np

        image = x.detach().cpu().numpy()
        target = np.full(image.shape[0], TARGET_CLASS, dtype=np.int64)

        def ort_forward():
            return self.plain.run(["logits"], {"image": image})

        def ort_tsgb():
            return self.tsgb(image, target=target).saliency

        return {"ort_forward": ort_forward, "ort_tsgb": ort_tsgb}


# ---------------------------------------------------------------------------------------------
# the run


def run(args) -> dict:
    import torch

    import tsgb_fx
    from tsgb_fx.explicit import explicit_module

    common.check_device(args.device)
    threads = common.set_threads(args.threads)
    machine = common.machine_info(threads, args.device)
    sync = common.synchronizer(args.device)
    if args.peers:
        warnings.filterwarnings("ignore", module=r"captum\..*")  # "setting backward hooks on ReLU" per call
    if args.compile:  # a fresh inductor cache: the one-off time is a cold compile, not a cache hit
        compile_cache = tempfile.TemporaryDirectory(prefix="tsgb-bench-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = compile_cache.name
    providers = None if args.no_onnx else ort_providers(args.device)
    if not args.no_onnx and providers is None:
        print(f"onnxruntime cannot run on {args.device} here: ORT columns skipped", file=sys.stderr)
    rows = []
    for name in args.models:
        print(f"{name}: building", file=sys.stderr, flush=True)
        model = common.build_model(name, args.device)
        example = common.make_input(2, args.size, args.device)
        one_off = {}
        holder = {}
        one_off["explainer_s"] = common.once(lambda: holder.setdefault("e", tsgb_fx.explainer(model)))
        explainer = holder["e"]
        explicit = None
        if not args.no_explicit:
            one_off["explicit_s"] = common.once(lambda: holder.setdefault("g", explicit_module(explainer, example)))
            explicit = holder["g"]
        ort_pair = None
        workdir = tempfile.TemporaryDirectory(prefix=f"tsgb-bench-{name}-")
        if providers is not None and (args.onnx_models is None or name in args.onnx_models):
            try:
                ort_pair = OrtPair(model, explainer, example, providers, threads, Path(workdir.name))
                one_off["onnx_export_plain_s"] = ort_pair.export_plain_s
                one_off["onnx_export_tsgb_s"] = ort_pair.export_tsgb_s
                one_off["ort_providers"] = ort_pair.providers
            except Exception as error:  # noqa: BLE001 - the torch numbers still count
                print(f"{name}: ONNX export failed ({type(error).__name__}: {error}); ORT skipped",
                      file=sys.stderr)
                one_off["onnx_error"] = f"{type(error).__name__}: {error}"[:300]
        peer_methods = None
        if args.peers:
            with torch.inference_mode():
                classes = model(example[:1]).shape[1]
            peer_methods = Peers(model, classes, args.gradcam_trainable)
        for batch in args.batch_sizes:
            print(f"{name} batch {batch}: timing", file=sys.stderr, flush=True)
            x = common.make_input(batch, args.size, args.device)
            row_one_off = dict(one_off)
            compiled = None
            if args.compile:
                torch._dynamo.reset()  # a fresh compile per batch size: static shapes, cold time
                compiled = tsgb_fx.explainer(model, compile=True)

                def first_call():
                    compiled(x, target=TARGET_CLASS)

                try:
                    row_one_off["compile_s"] = common.once(first_call, sync)
                except Exception as error:  # noqa: BLE001
                    print(f"{name}: torch.compile failed ({type(error).__name__}: {error})", file=sys.stderr)
                    row_one_off["compile_error"] = f"{type(error).__name__}: {error}"[:300]
                    compiled = None
            cases = torch_cases(model, explainer, explicit, x, compiled, args.channels_last)
            if ort_pair is not None:
                cases.update(ort_pair.cases(x))
            if peer_methods is not None:
                cases.update(peer_methods.cases(x))
            times = common.time_cases(cases, repeats=args.repeats, warmup=args.warmup, sync=sync,
                                      min_seconds=args.min_seconds)
            row = {"model": name, "batch": batch, "size": args.size, "times": times,
                   "medians": common.medians(times), "one_off": row_one_off, "load": common.load_now()}
            if peer_methods is not None:
                row["errors"] = dict(peer_methods.errors)
            rows.append(row)
        workdir.cleanup()
        if peer_methods is not None:
            peer_methods.close()
        del model, explainer, explicit, ort_pair, peer_methods
    return {
        "kind": "speed",
        "machine": machine,
        "settings": {**common.settings(args), "compile": args.compile, "onnx": providers is not None,
                     "onnx_models": args.onnx_models, "explicit": not args.no_explicit, "peers": args.peers,
                     "channels_last": args.channels_last},
        "versions": common.package_versions(["torch", "torchvision", "onnxruntime", "onnxruntime-gpu", "onnx",
                                             *(PEER_PACKAGES if args.peers else [])]),
        "rows": rows,
    }


# ---------------------------------------------------------------------------------------------
# tables


def render(payload: dict) -> str:
    rows = payload["rows"]
    has = {case: any(row["medians"].get(case) is not None for row in rows) for case in (*TORCH_CASES, *ORT_CASES)}
    varied = common.rounds_varied(rows)
    columns = ["model", "batch", *(["rounds"] if varied else []), LABELS["forward"]]
    shown = [c for c in TIMED_COLUMNS if has[c]]
    columns += [LABELS[c] for c in shown]
    if has["ort_forward"] or has["ort_tsgb"]:
        columns += [LABELS["ort_forward"], LABELS["ort_tsgb"] + " (ratio to ORT forward)"]
    body = []
    for row in rows:
        m = row["medians"]
        cells = [row["model"], row["batch"], *([common.rounds_of(row["times"])] if varied else []),
                 format_ms(m.get("forward"))]
        cells += [ratio_cell(m.get(c), m.get("forward")) for c in shown]
        same_layout = ratio(m.get("tsgb_eager_channels_last"), m.get("forward_channels_last"))
        if same_layout is not None:  # the explainer against the forward on the same layout, too
            cells[shown.index("tsgb_eager_channels_last") - len(shown)] += f"; {format_ratio(same_layout)} its forward"
        if has["ort_forward"] or has["ort_tsgb"]:
            ort_fwd = m.get("ort_forward")
            cells += [
                "n/a" if ort_fwd is None else f"{format_ms(ort_fwd)} ({format_ratio(ratio(ort_fwd, m.get('forward')))} torch)",
                ratio_cell(m.get("ort_tsgb"), ort_fwd),
            ]
        body.append(cells)
    size = payload["settings"]["size"]
    title = (f"Time per call, ratio to the plain forward in `torch.inference_mode` (ORT: to ORT's forward); "
             f"{size}x{size}, {common.median_label(rows, payload['settings']['repeats'])}")
    return f"{title}\n\n{markdown_table(columns, body)}\n\n{render_one_off(payload)}"


def render_one_off(payload: dict) -> str:
    rows = payload["rows"]
    compile_shown = any("compile_s" in row["one_off"] or "compile_error" in row["one_off"] for row in rows)
    columns = ["model", "explainer build", "explicit trace", "ONNX export (plain)", "ONNX export (tsgb)"]
    if compile_shown:
        columns.append("torch.compile, first call per batch size")
    body = []
    for model in dict.fromkeys(row["model"] for row in rows):
        mine = [row for row in rows if row["model"] == model]
        o = mine[0]["one_off"]
        failed = "onnx_error" in o
        cells = [model, format_seconds(o.get("explainer_s")), format_seconds(o.get("explicit_s")),
                 "failed" if failed else format_seconds(o.get("onnx_export_plain_s")),
                 "failed" if failed else format_seconds(o.get("onnx_export_tsgb_s"))]
        if compile_shown:
            cells.append(", ".join(
                f"b{row['batch']}: " + ("failed" if "compile_error" in row["one_off"]
                                         else format_seconds(row["one_off"].get("compile_s")))
                for row in mine))
        body.append(cells)
    return "One-off costs\n\n" + markdown_table(columns, body)


def main(argv=None) -> dict:
    p = common.parser("tsgb-fx speed: ratios to the plain forward, side by side in one run")
    p.add_argument("--compile", action="store_true", help="also time tsgb_fx.explainer(model, compile=True) (a cold compile per batch size)")
    p.add_argument("--no-onnx", action="store_true", help="skip the onnxruntime columns (and the exports)")
    p.add_argument("--onnx-models", nargs="+", default=None,
                   help="ORT columns only for these of --models (the exports take a minute or more each)")
    p.add_argument("--no-explicit", action="store_true", help="skip the explicit graph")
    p.add_argument("--channels-last", action="store_true",
                   help="also time the forward and the eager explainer on a channels_last batch")
    p.add_argument("--peers", action="store_true",
                   help="also time the peers (benchmarks.peers) in the same rounds: one run, both tables")
    p.add_argument("--peers-json-out", type=Path, default=None, help="with --peers: the peers table's numbers")
    add_peer_options(p)
    args = p.parse_args(argv)
    payload = run(args)
    common.emit(args, payload, render(payload))
    if args.peers:
        peers_payload = peers_from_speed(payload)
        print()
        common.emit(argparse.Namespace(json_out=args.peers_json_out, markdown_out=None), peers_payload,
                    render_peers(peers_payload))
    return payload


def peers_from_speed(payload: dict) -> dict:
    """The peers table's payload from a ``--peers`` speed run (same rounds, same baseline)."""
    keep = ("forward", "tsgb_eager", "tsgb_compiled", *PEERS)
    rows = [{**{k: row[k] for k in ("model", "batch", "size")},
             "times": {k: v for k, v in row["times"].items() if k in keep},
             "medians": {k: v for k, v in row["medians"].items() if k in keep},
             "errors": row.get("errors", {}), "load": row.get("load")} for row in payload["rows"]]
    return {**payload, "kind": "peers", "rows": rows,
            "settings": {**payload["settings"], "measured_with": "benchmarks.speed --peers (same rounds)"}}


if __name__ == "__main__":
    main()
