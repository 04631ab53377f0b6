"""Assemble benchmarks/README.md from the results that the benchmark scripts wrote.

Reads ``benchmarks/results/{speed,compile,onnx_extra,peers,memory,scaling}.json`` (any may be
missing: its section then says so) and, where present, ``benchmarks/results/gpu/*.json``
(``benchmarks/gpu.sh``), and rewrites README.md: the machine and its caveats, issue 4's targets
with PASS/MISS next to each measured ratio, the tables, the scaling plot and a paragraph on how
cost grows with batch and image size. Nothing here measures; ``make bench`` runs the scripts first.
``python -m benchmarks.report --results DIR --out FILE`` for other places.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from . import allocator, common, memory, peers, plot, speed
from .common import RESULTS_DIR, format_ms, format_ratio, format_seconds, markdown_table, ratio, verdict

HERE = Path(__file__).resolve().parent
EAGER_LIMIT = {"resnet50": 1.3}  # issue 4: 1.3x on ResNet-50, 1.5x on the other models
EAGER_DEFAULT_LIMIT = 1.5
ORT_LIMIT = 1.5
MEMORY_LIMIT = 1.5
BENCH_FILES = ("speed", "peers", "memory", "scaling", "allocator")  # what `make bench` writes, in order


def load(results: Path, name: str) -> dict | None:
    path = results / f"{name}.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------
# targets


def merged(paths: list[Path]) -> dict | None:
    """Several result files of one kind as one: the first file's machine and settings, all rows."""
    payloads = [json.loads(path.read_text()) for path in sorted(paths)]
    if not payloads:
        return None
    return {**payloads[0], "rows": [row for payload in payloads for row in payload["rows"]]}


def gpu_section(folder: Path) -> list[str]:
    """The CUDA results of ``benchmarks/gpu.sh`` (copied into ``folder``), or a line saying there are none.

    ``speed*.json`` and ``memory*.json`` are gpu.sh's two steps, ``compile_*.json`` its COMPILE=1 step.
    """
    speed_data = merged(list(folder.glob("speed*.json")))
    if speed_data is None:
        return ["Not run: `benchmarks/gpu.sh` on a CUDA machine writes these results; copy them into "
                "benchmarks/results/gpu/ and the next report includes them.", ""]
    m = speed_data["machine"]
    out = [f"`benchmarks/gpu.sh` on {m.get('gpu', 'a GPU')} ({m['date']}, torch {m['torch']}, "
           f"{m['cpu_count']} CPU cores; code {m.get('code', 'n/a')}). Measured on a lent machine, "
           "outside `make bench`; results copied into benchmarks/results/gpu/. ORT has no CUDA columns: "
           "that machine has no onnxruntime-gpu. At these sizes an eager explanation on CUDA is bound by "
           "launching its hundreds of small kernels from Python, not by the GPU; compile=True replays them "
           "as one CUDA graph (below).", "", speed.render(speed_data), ""]
    compiled = merged(list(folder.glob("compile_*.json")))
    if compiled is not None:
        out += ["compile=True on CUDA (`COMPILE=1`): the explicit graph compiled with "
                "`mode=\"reduce-overhead\"`, i.e. replayed as one CUDA graph:", "", speed.render(compiled), ""]
    memory_data = merged(list(folder.glob("memory*.json")))
    if memory_data is not None:
        out += [memory.render(memory_data), ""]
        if any(len(row["bytes"]) < len(memory_data["settings"]["cases"]) for row in memory_data["rows"]):
            out += ["n/a: not measured; gpu.sh's memory step ran past its time limit first.", ""]
    return out


def spread(row: dict, case: str, baseline: str | None) -> str:
    """" (rounds 1.19-1.45)": the lowest and highest single-round ratio (:func:`common.round_spread`)."""
    bounds = common.round_spread(row.get("times") or {}, case, baseline) if baseline else None
    return "" if bounds is None else f" (rounds {bounds[0]:.2f}-{bounds[1]:.2f})"


def busy(row: dict, data: dict) -> str:
    """" (load 4.9)" when the machine's 1-minute load exceeded its cores as the row finished."""
    load_now, cores = row.get("load"), (data.get("machine") or {}).get("cpu_count")
    return f" (load {load_now:.1f})" if load_now is not None and cores and load_now > cores else ""


def target_rows(speed_data, peers_data, memory_data, compile_data, onnx_extra=None,
                memory_compile=None) -> list[list[str]]:
    """Issue 4's targets, one row per model and batch size: [target, model, batch, measured, verdict].

    ORT rows come from the speed run, or for models it did not export, from ``onnx_extra`` (a
    separate speed run with ORT on those models, marked as such). ``memory_compile``: the memory
    run of ``make bench-compile`` (compile=True against the same baseline)."""
    rows = []
    separate = {(row["model"], row["batch"]): row for row in (onnx_extra or {}).get("rows", [])}
    for case, what in (("tsgb_eager", "torch eager explain"),
                       ("tsgb_eager_channels_last", "torch eager explain, channels_last input,")):
        for row in (speed_data or {}).get("rows", []):
            m = row["medians"]
            if case not in m:
                continue
            limit = EAGER_LIMIT.get(row["model"], EAGER_DEFAULT_LIMIT)
            r = ratio(m.get(case), m.get("forward"))
            measured = format_ratio(r) + spread(row, case, "forward")
            if case == "tsgb_eager_channels_last":  # the forward on the same layout, beside the verdict
                same_layout = ratio(m.get(case), m.get("forward_channels_last"))
                measured += f"; {format_ratio(same_layout)} its channels_last forward"
            rows.append([f"{what} <= {limit}x forward", row["model"], row["batch"], measured + busy(row, speed_data),
                         verdict(r, limit)])
    for row in (speed_data or {}).get("rows", []):
        source, origin = row, ""
        if not _has_ort(row) and _has_ort(separate.get((row["model"], row["batch"]), {})):
            source, origin = separate[(row["model"], row["batch"])], " (separate run)"
        m = source["medians"]
        if not _has_ort(source):
            why = "export failed" if "onnx_error" in row.get("one_off", {}) else "not measured in this run"
            rows.append([f"ORT explainer <= {ORT_LIMIT}x ORT forward", row["model"], row["batch"], why, "n/a"])
            continue
        r = ratio(m.get("ort_tsgb"), m.get("ort_forward"))
        rows.append([f"ORT explainer <= {ORT_LIMIT}x ORT forward", row["model"], row["batch"],
                     format_ratio(r) + spread(source, "ort_tsgb", "ort_forward") + origin
                     + busy(source, onnx_extra if origin else speed_data),
                     verdict(r, ORT_LIMIT)])
    rows += peer_rows(peers_data, "tsgb_eager", "faster than every peer (tsgb / fastest peer < 1)")
    for data, case, what in ((memory_data, "tsgb_eager", "explain"), (memory_compile, "tsgb_compiled", "compile=True")):
        for row in (data or {}).get("rows", []):
            b = row["bytes"]
            r = ratio(b.get(case), b.get("forward_grad"))
            rows.append([f"{what} peak memory <= {MEMORY_LIMIT}x forward with grad input", row["model"], row["batch"],
                         format_ratio(r), verdict(r, MEMORY_LIMIT)])
    for row in (compile_data or {}).get("rows", []):
        m, o = row["medians"], row["one_off"]
        compiled, eager = m.get("tsgb_compiled"), m.get("tsgb_eager")
        if compiled is None:
            measured, outcome = "failed" if "compile_error" in o else "n/a", "n/a"
        else:
            measured = (f"{format_ratio(ratio(compiled, m.get('forward')))} (eager "
                        f"{format_ratio(ratio(eager, m.get('forward')))}), compile {format_seconds(o.get('compile_s'))}")
            outcome = "pays" if eager is not None and compiled < eager else "does not pay"
        rows.append(["torch.compile of the explicit graph: reported", row["model"], row["batch"], measured, outcome])
    if (compile_data or {}).get("settings", {}).get("peers"):
        rows += peer_rows(compile_data, "tsgb_compiled",
                          "faster than every peer with compile=True (compiled / fastest peer < 1)")
    return rows


def peer_rows(data, case: str, target: str) -> list[list[str]]:
    """One target row per model and batch size: ``case``'s time over the fastest peer's, same rounds."""
    rows = []
    for row in (data or {}).get("rows", []):
        m = row["medians"]
        name, best = peers.fastest_peer(m)
        r = ratio(m.get(case), best)
        label = (f"{format_ratio(r)} of {peers.LABELS[name]}{spread(row, case, name)}{busy(row, data)}"
                 if name and r is not None else "n/a")
        rows.append([target, row["model"], row["batch"], label, "n/a" if r is None else ("PASS" if r < 1 else "MISS")])
    return rows


def _has_ort(row: dict) -> bool:
    medians = row.get("medians", {})
    return medians.get("ort_forward") is not None or medians.get("ort_tsgb") is not None


# ---------------------------------------------------------------------------------------------
# prose


def growth_paragraph(scaling) -> str:
    if not scaling or not scaling.get("by_batch") or not scaling.get("by_size"):
        return "_The scaling sweep was not run._"
    s = scaling["settings"]

    def series(points, key, case):
        return [p[key] for p in points if p["medians"].get(case)], [p["medians"][case] for p in points
                                                                     if p["medians"].get(case)]

    parts = []
    batch = scaling["by_batch"]
    if len(batch) >= 2:
        lo, hi = batch[0], batch[-1]
        f_lo, f_hi = lo["medians"].get("forward"), hi["medians"].get("forward")
        e_lo, e_hi = lo["medians"].get("tsgb_eager"), hi["medians"].get("tsgb_eager")
        if None not in (f_lo, f_hi, e_lo, e_hi):
            k_f = plot.growth_exponent(*series(batch, "batch", "forward"))
            k_e = plot.growth_exponent(*series(batch, "batch", "tsgb_eager"))
            parts.append(
                f"From batch {lo['batch']} to {hi['batch']} ({s['model']}, {s['size']}x{s['size']}) the forward "
                f"goes from {format_ms(f_lo)} to {format_ms(f_hi)} per call ({format_ms(f_lo / lo['batch'])} to "
                f"{format_ms(f_hi / hi['batch'])} per image) and the explanation from {format_ms(e_lo)} to "
                f"{format_ms(e_hi)} ({format_ms(e_lo / lo['batch'])} to {format_ms(e_hi / hi['batch'])} per image): "
                f"time grows like batch^{k_f:.2f} for the forward and batch^{k_e:.2f} for the explanation "
                f"(1.00 = linear; below 1 = larger batches use the cores better). The explain/forward ratio "
                f"moves from {format_ratio(ratio(e_lo, f_lo))} to {format_ratio(ratio(e_hi, f_hi))}."
            )
    size = scaling["by_size"]
    if len(size) >= 2:
        lo, hi = size[0], size[-1]
        pixels = lambda p: p["size"] ** 2  # noqa: E731
        f_x, f_y = series(size, "size", "forward")
        e_x, e_y = series(size, "size", "tsgb_eager")
        k_f = plot.growth_exponent([x * x for x in f_x], f_y)
        k_e = plot.growth_exponent([x * x for x in e_x], e_y)
        f_lo, f_hi = lo["medians"].get("forward"), hi["medians"].get("forward")
        e_lo, e_hi = lo["medians"].get("tsgb_eager"), hi["medians"].get("tsgb_eager")
        if None not in (k_f, k_e, f_lo, f_hi, e_lo, e_hi):
            parts.append(
                f"From {lo['size']}x{lo['size']} to {hi['size']}x{hi['size']} pixels ({pixels(hi) / pixels(lo):.1f}x "
                f"the pixels, batch {s['size_batch']}) the forward goes from {format_ms(f_lo)} to {format_ms(f_hi)} "
                f"and the explanation from {format_ms(e_lo)} to {format_ms(e_hi)}: time grows like "
                f"pixels^{k_f:.2f} (forward) and pixels^{k_e:.2f} (explanation). The ratio moves from "
                f"{format_ratio(ratio(e_lo, f_lo))} to {format_ratio(ratio(e_hi, f_hi))}."
            )
    ratios = [ratio(p["medians"].get("tsgb_eager"), p["medians"].get("forward")) for p in (*batch, *size)]
    ratios = [r for r in ratios if r is not None]
    if ratios:
        parts.append(
            f"Over the whole sweep the explanation costs {min(ratios):.2f}x to {max(ratios):.2f}x the forward: "
            + ("roughly a constant multiple, i.e. it scales like the forward itself."
               if max(ratios) - min(ratios) <= 0.3 else
               "the multiple is not constant; with 2 shared cores part of that spread is noise (see the caveats).")
        )
    return "\n\n".join(parts)


def consistency_paragraph(speed_data, scaling) -> str:
    """The same configuration measured twice in one run (speed table, scaling sweep): how far apart?"""
    if not speed_data or not scaling:
        return ""
    s = scaling["settings"]
    pairs = []
    for point in scaling.get("by_batch", []):
        for row in speed_data["rows"]:
            if (row["model"], row["batch"], row["size"]) == (s["model"], point["batch"], s["size"]):
                pairs.append((row, point))
    if not pairs:
        return ""
    parts = []
    for row, point in pairs:
        a, b = row["medians"], point["medians"]
        parts.append(
            f"{row['model']} batch {row['batch']}: forward {format_ms(a.get('forward'))} vs "
            f"{format_ms(b.get('forward'))}, explain/forward {format_ratio(ratio(a.get('tsgb_eager'), a.get('forward')))}"
            f" vs {format_ratio(ratio(b.get('tsgb_eager'), b.get('forward')))}")
    spread = [max(x, y) / min(x, y) for row, point in pairs
              for x, y in [(row["medians"].get("forward"), point["medians"].get("forward"))] if x and y]
    verdict_text = ("they agree within 20 %" if spread and max(spread) <= 1.2 else
                    "**they disagree: at least one of the two was slowed by other processes, so treat this run's "
                    "absolute times, and the ratios of the affected rows, with caution**")
    return ("Consistency check, the same configuration measured twice in this run (speed table vs scaling "
            f"sweep): {'; '.join(parts)}: {verdict_text}.")


def code_line(datasets: dict[str, dict], note: str | None = None) -> str:
    """Which commit each script measured (the working tree is shared and moves during a run)."""
    codes: dict[str, list[str]] = {}
    for name, data in datasets.items():
        if data:
            codes.setdefault(data["machine"].get("code") or note or "not recorded", []).append(name)
    return "; ".join(f"{', '.join(names)}: {code}" for code, names in codes.items())


def machine_paragraph(datasets: dict[str, dict], elapsed_s: float | None, code_note: str | None = None,
                      note: str | None = None) -> str:
    first = next((d for d in datasets.values() if d), None)
    if first is None:
        return "_No results yet: run `make bench`._"
    m = first["machine"]
    loads = [f"{name} {d['machine']['load_average_at_start'][0]:.1f}" for name, d in datasets.items()
             if d and d["machine"].get("load_average_at_start")]
    row_loads = []
    for name, d in datasets.items():
        values = [row["load"] for row in (d or {}).get("rows", []) + (d or {}).get("by_batch", [])
                  + (d or {}).get("by_size", []) if row.get("load") is not None]
        if values:
            row_loads.append(f"{name} {max(values):.1f}")
    lines = [
        f"- Machine: {m['cpu']} ({m['cpu_count']} cores visible), {m['platform']}; {m['threads']} torch/ORT "
        f"intra-op threads (torch's default); device {m['device']}{', ' + m['gpu'] if m.get('gpu') else ''}.",
        f"- Code measured: {code_line(datasets, code_note)}.",
        f"- Date: {m['date']}; Python {m['python']}, torch {m['torch']}"
        + (f", onnxruntime {first['versions'].get('onnxruntime')}" if first.get("versions") else "") + ".",
        f"- 1-minute load average when each script started: {', '.join(loads) or 'n/a'}"
        + (f"; highest at the end of a row: {', '.join(row_loads)}" if row_loads else "")
        + f" ({m['cpu_count']} cores). **This machine is "
        f"shared: other processes (other engineers' builds and tests) may have been running during the "
        f"measurements.** Absolute milliseconds are therefore noisy; ratios are steadier because every case "
        f"of a row runs round-robin in the same rounds (below), but they are not immune.",
    ]
    if elapsed_s is not None:
        lines.append(f"- `make bench` (speed with peers, memory, scaling, allocator) took {elapsed_s / 60:.1f} "
                     f"minutes end to end; compile, onnx_extra and peers_extra, where present, are separate runs.")
    if note:
        lines.append(f"- Note on this run: {note}")
    return "\n".join(lines)


def run_stamp(data: dict) -> str:
    """When and how a separate run was measured: its date, threads and load at start."""
    m = data["machine"]
    return (f"{m['date']}, {m['threads']} threads, 1-minute load "
            f"{(m.get('load_average_at_start') or ['n/a'])[0]} at start")


def versions_line(datasets: dict[str, dict]) -> str:
    versions = {}
    for data in datasets.values():
        if data:
            versions.update({k: v for k, v in data.get("versions", {}).items() if v != "not installed"})
    return ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))


# ---------------------------------------------------------------------------------------------
# the page


KEPT_BLOCK = re.compile(r"<!-- (\w+):begin -->.*?<!-- \1:end -->", re.S)


def kept_blocks(text: str) -> list[str]:
    """Sections other scripts own (``<!-- name:begin -->`` ... ``<!-- name:end -->``, e.g. quality.py's)."""
    return [match.group(0) for match in KEPT_BLOCK.finditer(text)]


def readme(results: Path, png: Path | None, keep: list[str] = (), code_note: str | None = None,
           note: str | None = None) -> str:
    speed_data = load(results, "speed")
    compile_data = load(results, "compile")
    peers_data = load(results, "peers")
    memory_data = load(results, "memory")
    memory_compile = load(results, "memory_compile")  # optional: `make bench-compile`'s memory step
    scaling = load(results, "scaling")
    peers_extra = load(results, "peers_extra")  # optional: a separate peers run, e.g. --gradcam-trainable
    onnx_extra = load(results, "onnx_extra")  # optional: `make bench-onnx`, ORT on the other models
    allocator_data = load(results, "allocator")
    elapsed = None
    started = results / "started"  # `make bench` writes the epoch second it began
    finished = [(results / f"{name}.json").stat().st_mtime for name in BENCH_FILES if (results / f"{name}.json").exists()]
    if started.exists() and finished:
        elapsed = max(finished) - float(started.read_text().strip())
    datasets = {"speed": speed_data, "peers": peers_data, "memory": memory_data, "scaling": scaling,
                "compile": compile_data, "onnx_extra": onnx_extra, "peers_extra": peers_extra,
                "memory_compile": memory_compile, "allocator": allocator_data}
    targets = target_rows(speed_data, peers_data, memory_data, compile_data, onnx_extra, memory_compile)

    out = [
        "# Benchmarks",
        "",
        "<!-- generated by `python -m benchmarks.report` (run by `make bench`); edit benchmarks/report.py, "
        "not this file -->",
        "",
        "Issue 4: what a tsgb-fx explanation costs next to the same model's plain forward pass, next to its "
        "peers, in memory, and as batch and image size grow. Random-weight torchvision models; every method "
        "explains the same class for every image.",
        "",
        "```bash",
        "make bench                                          # everything below, rewrites this file",
        "python -m benchmarks.speed  --models resnet50 vgg16 --batch-sizes 1 8 --repeats 5 [--min-seconds 20] [--compile] [--peers]",
        "python -m benchmarks.peers  --models resnet50 --batch-sizes 1 8 [--gradcam-trainable]",
        "python -m benchmarks.memory --models resnet50 --batch-sizes 1 8 [--explicit]",
        "python -m benchmarks.plot   # scaling.png",
        "benchmarks/gpu.sh           # the same on a CUDA machine, under 5 minutes (never run by tests)",
        "python -m benchmarks.quality  # the Quality section (another script; report.py keeps it)",
        "```",
        "",
        "## This run",
        "",
        machine_paragraph(datasets, elapsed, code_note, note),
        f"- Versions: {versions_line(datasets)}." if versions_line(datasets) else "",
        "",
        consistency_paragraph(speed_data, scaling),
        "",
        "## Issue 4 targets",
        "",
        "Every measured ratio against its target, from the tables below. MISS means the target is not met "
        "on this run; the verdict is on the ratio of the medians, and \"(rounds a-b)\" gives the lowest and "
        "highest ratio of a single round, where the cases ran back to back: a target inside that range may "
        "be met in one run and missed in the next. \"(load N)\" marks a row that finished while the "
        "machine's load exceeded its cores.",
        "",
        markdown_table(["target", "model", "batch", "measured", "verdict"], targets, "llrrl")
        if targets else "_No results._",
        "",
        "GPU: `benchmarks/gpu.sh` reports the same ratios and milliseconds on CUDA; it needs a GPU machine, "
        "so its results are in their own section (GPU) below, not in this table.",
        "",
        "## Speed",
        "",
        speed.render(speed_data) if speed_data else "_Not run._",
        "",
    ]
    if allocator_data:
        out += ["### Freed memory kept for the next call", "",
                "`tsgb_fx.reuse_freed_memory()` (called by `tsgb explain`) makes glibc keep the memory an "
                "explanation frees for the next call, instead of returning it to the kernel and faulting fresh "
                "pages in again (about 2 microseconds a page on this machine; `tsgb_fx/allocator.py`). The "
                "setting holds for a whole process, so `python -m benchmarks.allocator` runs alternating pairs "
                "of fresh processes, one model and batch size each, as `tsgb explain` would; the forward runs "
                "under the same allocator as the explanation.", "",
                allocator.render(allocator_data), ""]
    out += ["### torch.compile of the explicit graph", ""]
    if compile_data:
        out += [f"Measured separately with `make bench-compile` ({run_stamp(compile_data)}): compiling "
                f"takes minutes per model and batch size here, too long for `make bench`.", "",
                speed.render(compile_data), ""]
        if compile_data["settings"].get("peers"):
            out += ["The peers, timed in the same rounds as compile=True:", "",
                    peers.render(speed.peers_from_speed(compile_data)), ""]
    if memory_compile:
        out += [f"Memory of compile=True, from `make bench-compile` ({run_stamp(memory_compile)}). The peak of "
                "a call is measured after a warm-up call has compiled for its batch size; what compiling costs "
                "the process (Inductor's state and generated code, the weights that freezing packs into the "
                "graph) is held from then on, and is in the last column instead:", "",
                memory.render(memory_compile), ""]
    if not compile_data:
        out += ["Not measured in this run: `make bench-compile` adds it, with the peers in the same rounds "
                "(minutes per model and batch size on this machine), and the next report includes it.", ""]
    if onnx_extra:
        out += ["### onnxruntime on the other models", "",
                f"Measured separately with `make bench-onnx` ({run_stamp(onnx_extra)}): exporting an explainer "
                f"takes minutes per model here, too long for `make bench`. The ORT ratio is to ORT's own "
                f"forward of the same model, in the same rounds.", "", speed.render(onnx_extra), ""]
    out += ["## GPU", "", *gpu_section(results / "gpu")]
    out += [
        "## Peers",
        "",
        peers.render(peers_data) if peers_data else "_Not run._",
        "",
        "Each peer in its cheapest correct setting: parameters frozen; Captum and Zennit take "
        "`torch.autograd.grad` to the input; Grad-CAM's backward stops at its target block (with the "
        "library's default of trainable parameters, `loss.backward()` would also compute every weight "
        "gradient, which is slower). Zennit: `EpsilonPlusFlat`, no canonizer. "
        + (f"Measured in the same rounds as the speed table ({peers_data['settings']['measured_with']})."
           if peers_data and peers_data["settings"].get("measured_with") else ""),
        "",
    ]
    if peers_extra:
        out += [f"A separate peers run ({run_stamp(peers_extra)}; `python -m benchmarks.peers "
                f"--models {' '.join(peers_extra['settings']['models'])} --gradcam-trainable --json-out "
                f"benchmarks/results/peers_extra.json`), with Grad-CAM also in its documented setting "
                f"(trainable parameters, so `loss.backward()` computes every weight gradient):", "",
                peers.render(peers_extra), ""]
    out += [
        "## Memory",
        "",
        memory.render(memory_data) if memory_data else "_Not run._",
        "",
        "## Scaling with batch and image size",
        "",
    ]
    if png is not None and png.exists():
        out += [f"![time against batch size and image size: forward vs tsgb-fx explain]({png.name})", ""]
    out += [growth_paragraph(scaling), ""]
    if scaling:
        out += [plot.render(scaling), ""]
    for block in keep:
        out += [block, ""]
    out += [
        "## How it is measured",
        "",
        "- Timing: `time.perf_counter`; each case of a row is called once untimed at the row's own input "
        "size (warm-up: a new shape's first calls are slower), then all cases of the row run round-robin "
        "for the given number of rounds and each case's **median** is reported. A slow spell of the "
        "machine therefore hits all cases of a round. On CUDA each call is synchronised.",
        "- Baseline: the same model's forward under `torch.inference_mode()`; ORT columns are relative to "
        "ORT's own forward of the plain model (exported with `torch.onnx.export(..., dynamo=True)`, batch "
        "dynamic); the ORT explainer is `tsgb_export.to_onnx` run by `tsgb_export.runtime.OnnxExplainer` "
        "(its input checks included), both sessions with the same thread settings and thread spinning off "
        "(`session.intra_op.allow_spinning=0`: with it on, one session's idle threads spin on the cores the "
        "next session in the round needs, which slowed the ORT forward by up to 1.8x here).",
        "- tsgb-fx eager: `e(x, target=k)` (forward + one autograd pass with the TSGB rules, input checks "
        "included). Explicit graph: `Explainer.explicit()`'s forward+backward graph under "
        "`torch.inference_mode()`. Input gradient: `torch.autograd.grad(model(x), x, one_hot)`.",
        "- channels_last input (`--channels-last`): the same batch in `torch.channels_last` memory format, "
        "converted before the rounds as a data pipeline would hand it over, the model's weights left as they "
        "are; oneDNN then runs each convolution in NHWC and the explainer's rules keep that layout. Its "
        "ratio is still to the plain forward on the NCHW batch (the issue's baseline), with the ratio to "
        "the forward on the channels_last batch beside it. The peers run on the NCHW batch only.",
        "- Parameters are frozen for every method (nobody computes weight gradients). Peers that hook "
        "modules get their own copy of the model. Grad-CAM's backward stops at its target block "
        "(`layer4[-1]` / `features[-1]`); Zennit runs `EpsilonPlusFlat` without a canonizer.",
        "- Memory: one fresh process per model and case; the peak above what the process held just before "
        "the call (CPU: kernel RSS high-water mark reset through `/proc/self/clear_refs`, glibc mmap "
        "threshold pinned so freed tensors leave RSS; CUDA: `torch.cuda.max_memory_allocated`). "
        "Weights, the eager explainer's cached batch-norm folds (1.5-3.7 MiB for these models, "
        "`tsgb_fx/rules/conv_bn.py`) and the input are not counted.",
        "",
        "## Caveats",
        "",
        "- 2 shared cores: a background process during a round slows every case of that round, but a "
        "burst inside one call still skews that call; medians of few rounds are not precise to better "
        "than roughly 10-20 % here. `make bench` therefore gives a row more rounds (up to 5x "
        "`--repeats`) until its rounds have run `--min-seconds`; the batch-1 rows, whose verdicts flipped "
        "between runs at 3 rounds, get most of them. Rerun a row with more `--repeats` before drawing "
        "fine conclusions.",
        "- One-off costs (tracing, ONNX export, torch.compile) are not in the per-call ratios; the one-off "
        "tables give them per run. Exporting an explainer to ONNX takes half a minute to two minutes per "
        "model on this machine (DenseNet-121 the longest), so `make bench` runs ORT on "
        "`BENCH_ONNX_MODELS` (ResNet-50) only and `make bench-onnx` the others; rows without ORT numbers "
        "say so in the targets table.",
        "- Threads: torch's default (one per core). When other processes compete for the 2 cores, every "
        "parallel op waits at its barrier for a descheduled thread: in one trial a 20 ms MobileNetV2 "
        "forward took 2 s. The load averages above tell whether that happened; `make bench "
        "BENCH_THREADS=1` trades speed for robustness against it.",
        "- Random weights: ReLU sparsity and magnitudes differ from a trained model; the op count does not.",
        "",
    ]
    return "\n".join(out)


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description="rewrite benchmarks/README.md from benchmarks/results/*.json")
    p.add_argument("--results", type=Path, default=RESULTS_DIR)
    p.add_argument("--out", type=Path, default=HERE / "README.md")
    p.add_argument("--png", type=Path, default=HERE / "scaling.png")
    p.add_argument("--code-note", default=None, help="the code measured, for results that did not record it")
    p.add_argument("--note", default=None, help="a remark on this run, printed under 'This run'")
    args = p.parse_args(argv)
    keep = kept_blocks(args.out.read_text()) if args.out.exists() else []
    text = readme(args.results, args.png, keep, args.code_note, args.note)
    args.out.write_text(text)
    print(f"wrote {args.out} ({len(text.splitlines())} lines)")
    return args.out


if __name__ == "__main__":
    main()
