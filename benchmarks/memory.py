"""Memory: peak memory of one explain call against one forward with a gradient-requiring input.

Issue 4's target: an explain call's peak at most 1.5x that of a forward whose input requires
grad (the forward that keeps what a backward needs). Cases, each measured in a fresh process
(one per model and case; its batch sizes run in increasing order inside it):

* ``forward``: ``model(x)`` under ``torch.inference_mode()`` (for orientation)
* ``forward_grad``: ``model(x)`` with ``x.requires_grad_()``: the baseline of the ratio
* ``gradient``: that forward plus ``torch.autograd.grad`` to the input (plain input gradient)
* ``tsgb_eager``: ``tsgb_fx.explainer(model)(x, target=...)``
* ``tsgb_explicit`` (``--explicit``): the explicit graph under ``torch.inference_mode()``
* ``tsgb_compiled``: ``tsgb_fx.explainer(model, compile=True)(x, target=...)``; the warm-up
  call compiles for that batch size, so the measured call runs the compiled graph (its weight
  copies, packed by Inductor's freezing on a CPU, are held before the call and not counted)

Besides the peak, each batch size records what the process *holds* after its calls that it did
not hold before them (``held``): for ``tsgb_compiled`` the price of compiling (Inductor's state
and generated code, the frozen weights), where the other cases keep next to nothing.

What is measured is the peak *above* what the process held just before the call (weights,
the input, the interpreter), i.e. activations, saved tensors and workspaces:

* CPU: the kernel's resident-set high-water mark. Each case is called once untimed (warm-up),
  then ``VmHWM`` is reset to the current RSS (``/proc/self/clear_refs`` = 5) and the call's
  peak is ``VmHWM - VmRSS before``. glibc's mmap threshold is pinned (``MALLOC_MMAP_THRESHOLD_``)
  so large tensors are mmapped and returned to the kernel when freed: RSS then follows live
  tensors instead of the allocator's free lists. Where clear_refs is not writable the warm-up is
  skipped and ``ru_maxrss`` is used (less exact: one-off allocations count). tracemalloc sees
  none of torch's allocations, hence the kernel's numbers.
* CUDA: ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` before the call,
  after ``reset_peak_memory_stats()``.
"""

from __future__ import annotations

import gc
import json
import resource
import sys
from pathlib import Path

from . import common
from .common import TARGET_CLASS, format_mib, format_ratio, markdown_table, ratio

CASES = ("forward", "forward_grad", "gradient", "tsgb_eager", "tsgb_explicit", "tsgb_compiled")
LABELS = {
    "forward": "forward (inference_mode)",
    "forward_grad": "forward, input requires grad",
    "gradient": "input gradient (fwd + bwd)",
    "tsgb_eager": "tsgb-fx explain",
    "tsgb_explicit": "tsgb-fx explicit graph",
    "tsgb_compiled": "tsgb-fx compile=True",
}
OPTIONAL = ("tsgb_explicit", "tsgb_compiled")  # measured only when asked for (--explicit, --cases)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


# ---------------------------------------------------------------------------------------------
# inside the worker process


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_high_water_mark() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _case_fn(case: str, model, x, explainer, explicit):
    import torch

    if case == "forward":
        def fn():
            with torch.inference_mode():
                return model(x)
    elif case == "forward_grad":
        def fn():
            with torch.enable_grad():
                image = x.detach().requires_grad_(True)
                return model(image)  # the returned logits keep the graph (saved tensors) alive
    elif case == "gradient":
        def fn():
            with torch.enable_grad():
                image = x.detach().requires_grad_(True)
                logits = model(image)
                one_hot = torch.zeros_like(logits)
                one_hot[:, TARGET_CLASS] = 1.0
                return torch.autograd.grad(logits, image, grad_outputs=one_hot)[0]
    elif case in ("tsgb_eager", "tsgb_compiled"):
        def fn():
            return explainer(x, target=TARGET_CLASS)
    elif case == "tsgb_explicit":
        target = torch.full((x.shape[0],), TARGET_CLASS, dtype=torch.long, device=x.device)

        def fn():
            with torch.inference_mode():
                return explicit(x, target)
    else:
        raise ValueError(f"unknown case {case!r}; one of {CASES}")
    return fn


def measure_peak(fn, device: str) -> dict:
    """Peak bytes above the state before one call of ``fn`` (see the module docstring)."""
    if device.startswith("cuda"):
        import torch

        fn()
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        del result
        return {"bytes": peak, "method": "torch.cuda.max_memory_allocated"}
    warm = _reset_high_water_mark()
    if warm:
        fn()
        gc.collect()
        rss_before = _status_kib("VmRSS")
        _reset_high_water_mark()
        result = fn()
        peak_kib = _status_kib("VmHWM")
        method = "VmHWM after clear_refs, warm"
    else:
        gc.collect()
        rss_before = _status_kib("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result = fn()
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        method = "ru_maxrss, cold"
    del result
    gc.collect()
    return {"bytes": max(peak_kib - rss_before, 0) * 1024, "method": method}


def held_now(device: str) -> int:
    """Bytes the process holds now: resident set on a CPU, allocated tensors on CUDA."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.memory_allocated()
    return (_status_kib("VmRSS") or 0) * 1024


def worker(model_name: str, case: str, batch_sizes, size: int, device: str, threads: int | None) -> list[dict]:
    import tsgb_fx
    from tsgb_fx.explicit import explicit_module

    common.set_threads(threads)
    model = common.build_model(model_name, device)
    explainer = tsgb_fx.explainer(model, compile=case == "tsgb_compiled") if case.startswith("tsgb") else None
    explicit = explicit_module(explainer, common.make_input(2, size, device)) if case == "tsgb_explicit" else None
    results = []
    for batch in sorted(batch_sizes):
        x = common.make_input(batch, size, device)
        gc.collect()
        before = held_now(device)
        peak = measure_peak(_case_fn(case, model, x, explainer, explicit), device)
        gc.collect()
        results.append({"batch": batch, **peak, "held": held_now(device) - before})
        del x
        gc.collect()
    return results


# ---------------------------------------------------------------------------------------------
# the parent: one fresh process per model and case


def run_worker(model_name: str, case: str, args) -> list[dict]:
    arguments = ["--worker", case, "--models", model_name, "--batch-sizes", *map(str, args.batch_sizes),
                 "--size", str(args.size), "--device", args.device]
    if args.threads is not None:
        arguments += ["--threads", str(args.threads)]
    results, error = common.run_fresh("benchmarks.memory", arguments, MALLOC_ENV)
    if error is not None:
        print(f"  {model_name} {case}: worker failed ({error})", file=sys.stderr)
        return [{"batch": b, "bytes": None, "error": error[:300]} for b in args.batch_sizes]
    return results


def run(args, progress=None) -> dict:
    """Measure every model and case; ``progress(payload)`` is called after each worker (partial results)."""
    common.check_device(args.device)
    threads = common.set_threads(args.threads)
    default = [c for c in CASES if c not in OPTIONAL] + (["tsgb_explicit"] if args.explicit else [])
    cases = list(args.cases) if args.cases else default
    rows = {(m, b): {"model": m, "batch": b, "size": args.size, "bytes": {}, "held": {}, "method": None}
            for m in args.models for b in args.batch_sizes}
    machine = common.machine_info(threads, args.device)

    def payload(rows):
        return {
            "kind": "memory",
            "machine": machine,
            "settings": {**common.settings(args), "cases": cases, "malloc_env": MALLOC_ENV},
            "rows": [row for row in rows.values() if row["bytes"]],
        }

    for name in args.models:
        for case in cases:
            print(f"{name} {case}: measuring in a fresh process", file=sys.stderr, flush=True)
            runs = [run_worker(name, case, args) for _ in range(args.repeats)]
            for batch in args.batch_sizes:
                values = [r["bytes"] for results in runs for r in results if r["batch"] == batch and r["bytes"] is not None]
                row = rows[(name, batch)]
                row["bytes"][case] = common.median(values) if values else None
                held = [r["held"] for results in runs for r in results if r["batch"] == batch and "held" in r]
                row["held"][case] = common.median(held) if held else None
                row["method"] = next((r.get("method") for results in runs for r in results if r.get("method")),
                                     row["method"])
            if progress is not None:
                progress(payload(rows))
    return payload(rows)


def render(payload: dict) -> str:
    cases = payload["settings"]["cases"]
    explains = [c for c in ("tsgb_eager", "tsgb_compiled") if c in cases]
    compiled_held = "tsgb_compiled" in cases and any((row.get("held") or {}).get("tsgb_compiled") is not None
                                                     for row in payload["rows"])
    columns = ["model", "batch", *(LABELS[c] for c in cases),
               *(f"{'explain' if c == 'tsgb_eager' else 'compile=True'} / forward with grad input" for c in explains)]
    columns += ["compile=True: held after compiling for this batch size"] if compiled_held else []
    body = []
    for row in payload["rows"]:
        b = row["bytes"]
        cells = [row["model"], row["batch"], *(format_mib(b.get(c)) for c in cases)]
        cells += [format_ratio(ratio(b.get(c), b.get("forward_grad"))) for c in explains]
        cells += [format_mib((row.get("held") or {}).get("tsgb_compiled"))] if compiled_held else []
        body.append(cells)
    methods = sorted({row["method"] for row in payload["rows"] if row["method"]})
    size = payload["settings"]["size"]
    title = (f"Peak memory of one call above the process's memory just before it ({', '.join(methods) or 'n/a'}); "
             f"{size}x{size}, fresh process per model and case")
    return f"{title}\n\n{markdown_table(columns, body)}"


def main(argv=None) -> dict | None:
    p = common.parser("tsgb-fx peak memory: explain vs forward with a gradient-requiring input", repeats=1)
    p.add_argument("--explicit", action="store_true", help="also measure the explicit graph (slow: traces it)")
    p.add_argument("--cases", nargs="+", choices=CASES, default=None,
                   help=f"cases to measure (default: all but {' and '.join(OPTIONAL)}); {', '.join(CASES)}")
    p.add_argument("--worker", choices=CASES, help=argparse_suppress())
    args = p.parse_args(argv)
    if args.worker:
        results = worker(args.models[0], args.worker, args.batch_sizes, args.size, args.device, args.threads)
        print(json.dumps(results))
        return None
    def save_partial(partial):  # a run cut short (gpu.sh's timeout) keeps what it measured
        if args.json_out is not None:
            args.json_out.parent.mkdir(parents=True, exist_ok=True)
            args.json_out.write_text(json.dumps(partial, indent=1) + "\n")

    payload = run(args, save_partial)
    common.emit(args, payload, render(payload))
    return payload


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
