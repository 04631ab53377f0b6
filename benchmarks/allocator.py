"""Allocator: explanations in processes that keep freed memory against processes that do not.

``tsgb_fx.reuse_freed_memory()`` (:mod:`tsgb_fx.allocator`, called by ``tsgb explain``) changes
glibc's malloc for the whole process, for good, so the two settings cannot share a process. Per
model and batch size, ``--pairs`` pairs of fresh processes run one after the other, the default
allocator first, then the reusing one; each does what ``tsgb explain`` does with one model and one
batch size: builds the explainer, calls it ``--warmup`` times, then times the forward and the
explanation round-robin for ``--repeats`` rounds, counting the explanations' minor page faults
(``ru_minflt``). Alternating the pairs spreads a slow spell of the machine over both settings;
each setting's medians are over all of its rounds. The forward runs under the same allocator as
the explanation, so the ratio compares like with like::

    python -m benchmarks.allocator --models mobilenet_v2 efficientnet_b0 --batch-sizes 8 --pairs 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from . import common
from .common import TARGET_CLASS, format_ms, format_ratio, markdown_table, ratio

MODES = ("default", "reuse")


def worker(model_name: str, batch: int, size: int, mode: str, repeats: int, warmup: int,
           threads: int | None) -> dict:
    """One process's rounds: ``{"times": {"forward": [...], "tsgb_eager": [...]}, "faults_per_call", "reused"}``."""
    import resource

    import torch

    import tsgb_fx

    reused = tsgb_fx.reuse_freed_memory() if mode == "reuse" else False  # before any tensor exists
    common.set_threads(threads)
    model = common.build_model(model_name)
    explainer = tsgb_fx.explainer(model)
    x = common.make_input(batch, size)

    def forward():
        with torch.inference_mode():
            model(x)

    def explain():
        explainer(x, target=TARGET_CLASS)

    for _ in range(warmup):
        forward()
        explain()
    times = {"forward": [], "tsgb_eager": []}
    faults = 0
    for _ in range(repeats):
        for case, call in (("forward", forward), ("tsgb_eager", explain)):
            faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            call()
            times[case].append(time.perf_counter() - start)
            if case == "tsgb_eager":
                faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
    return {"times": times, "faults_per_call": faults / repeats, "reused": reused}


def run_worker(model_name: str, batch: int, mode: str, args) -> dict | None:
    arguments = ["--worker", mode, "--models", model_name, "--batch-sizes", str(batch), "--size", str(args.size),
                 "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    if args.threads is not None:
        arguments += ["--threads", str(args.threads)]
    result, error = common.run_fresh("benchmarks.allocator", arguments)
    if error is not None:
        print(f"  {model_name} batch {batch} {mode}: worker failed ({error})", file=sys.stderr)
    return result


def run(args) -> dict:
    threads = common.set_threads(args.threads)
    machine = common.machine_info(threads)
    rows = []
    for name in args.models:
        for batch in args.batch_sizes:
            print(f"{name} batch {batch}: {args.pairs} pair(s) of fresh processes", file=sys.stderr, flush=True)
            times = {f"{case}_{mode}": [] for mode in MODES for case in ("forward", "tsgb_eager")}
            faults = {mode: [] for mode in MODES}
            reused = None
            for _ in range(args.pairs):
                for mode in MODES:
                    result = run_worker(name, batch, mode, args)
                    if result is None:
                        continue
                    for case, values in result["times"].items():
                        times[f"{case}_{mode}"] += values
                    faults[mode].append(result["faults_per_call"])
                    if mode == "reuse":
                        reused = result["reused"]
            rows.append({"model": name, "batch": batch, "size": args.size, "times": times,
                         "medians": common.medians(times), "reused": reused,
                         "faults_per_call": {mode: common.median(v) if v else None for mode, v in faults.items()}})
    return {"kind": "allocator", "machine": machine,
            "settings": {**common.settings(args), "pairs": args.pairs}, "rows": rows}


def render(payload: dict) -> str:
    columns = ["model", "batch", "forward: default", "forward: reused", "explain: default", "explain: reused",
               "explain reused / default", "explain / forward: default", "explain / forward: reused",
               "page faults per explanation: default", "page faults per explanation: reused"]
    body = []
    for row in payload["rows"]:
        m, f = row["medians"], row["faults_per_call"]
        if row["reused"] is False:  # not glibc: the "reused" processes ran the default allocator
            m = {**m, "forward_reuse": None, "tsgb_eager_reuse": None}
        body.append([row["model"], row["batch"], format_ms(m.get("forward_default")), format_ms(m.get("forward_reuse")),
                     format_ms(m.get("tsgb_eager_default")), format_ms(m.get("tsgb_eager_reuse")),
                     format_ratio(ratio(m.get("tsgb_eager_reuse"), m.get("tsgb_eager_default"))),
                     format_ratio(ratio(m.get("tsgb_eager_default"), m.get("forward_default"))),
                     format_ratio(ratio(m.get("tsgb_eager_reuse"), m.get("forward_reuse"))),
                     "n/a" if f.get("default") is None else f"{f['default']:,.0f}",
                     "n/a" if f.get("reuse") is None or row["reused"] is False else f"{f['reuse']:,.0f}"])
    s = payload["settings"]
    title = (f"Time per call, median of {s['pairs']} x {s['repeats']} rounds per setting ({s['pairs']} alternating "
             f"pair(s) of processes, {s['warmup']} warm-up call(s) each); {s['size']}x{s['size']}")
    return f"{title}\n\n{markdown_table(columns, body)}"


def main(argv=None) -> dict | None:
    p = common.parser("tsgb-fx explanations with and without tsgb_fx.reuse_freed_memory()", batch_sizes=(8,),
                      repeats=5)
    p.set_defaults(warmup=2)
    p.add_argument("--pairs", type=int, default=2, help="alternating pairs of processes (default, then reuse)")
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.models[0], args.batch_sizes[0], args.size, args.worker, args.repeats,
                                args.warmup, args.threads)))
        return None
    payload = run(args)
    common.emit(args, payload, render(payload))
    return payload


if __name__ == "__main__":
    main()
