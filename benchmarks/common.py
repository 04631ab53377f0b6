"""Measurement helpers shared by the benchmark scripts: models, inputs, timing, tables, output.

Timing protocol (every script): each case is warmed up, then the cases run round-robin (case A,
case B, ..., then again) ``repeats`` times, and each case's median is reported. Round-robin makes
the ratios robust to background load that changes during a run: a slow spell hits every case of
a round, not one case's whole series. With ``--min-seconds`` a row whose rounds are quick gets
more of them (up to ``MAX_ROUNDS_FACTOR`` times ``repeats``), until its rounds have run that long:
a median of 3 calls of 25 ms is at the mercy of one slow spell, and more rounds there cost little.
Clocks: ``time.perf_counter``; on CUDA every call is followed by ``torch.cuda.synchronize()``
inside the timed region.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
TARGET_CLASS = 1  # every method explains this class for every image (a fixed, valid ImageNet class)
MAX_ROUNDS_FACTOR = 5  # --min-seconds adds rounds up to this many times --repeats


# ---------------------------------------------------------------------------------------------
# numbers and tables (pure, tested)


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence (mean of the two middle values for an even count)."""
    if len(values) == 0:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def ratio(value: float | None, baseline: float | None) -> float | None:
    """``value / baseline``; None when either is missing or the baseline is not positive."""
    if value is None or baseline is None or not baseline > 0 or math.isnan(value):
        return None
    return value / baseline


def format_ms(seconds: float | None) -> str:
    """Seconds as milliseconds with 3 significant figures ("0.412" -> "412 ms", "1.5 ms")."""
    if seconds is None:
        return "n/a"
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f} ms"
    if ms >= 10:
        return f"{ms:.1f} ms"
    return f"{ms:.2f} ms"


def format_seconds(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds:.1f} s"


def format_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def format_mib(n_bytes: float | None) -> str:
    if n_bytes is None:
        return "n/a"
    mib = n_bytes / 2**20
    return f"{mib:.1f} MiB" if mib < 10 else f"{mib:.0f} MiB"


def ratio_cell(seconds: float | None, baseline: float | None) -> str:
    """``"1.23x (412 ms)"``: the ratio first (what the targets are about), the time after."""
    if seconds is None:
        return "n/a"
    return f"{format_ratio(ratio(seconds, baseline))} ({format_ms(seconds)})"


def verdict(value: float | None, limit: float) -> str:
    """PASS when ``value <= limit``, MISS when above, n/a when not measured."""
    if value is None:
        return "n/a"
    return "PASS" if value <= limit else "MISS"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> str:
    """A GitHub markdown table; ``align`` is one letter per column (l, r, c), default: first l, rest r."""
    if align is None:
        align = "l" + "r" * (len(headers) - 1)
    if len(align) != len(headers):
        raise ValueError(f"align has {len(align)} letters for {len(headers)} columns")
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {list(row)!r} has {len(row)} cells for {len(headers)} columns")
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = [
        "| " + " | ".join(str(h) for h in headers) + " |",
        "|" + "|".join(marks[a] for a in align) + "|",
    ]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# timing


def time_cases(
    cases: Mapping[str, Callable[[], object]],
    repeats: int = 5,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    min_seconds: float = 0.0,
) -> dict[str, list[float]]:
    """Run every case ``warmup`` times, then round-robin rounds; seconds per call.

    At least ``repeats`` rounds; then more, up to ``MAX_ROUNDS_FACTOR * repeats``, while the timed
    rounds so far took less than ``min_seconds`` in all. A case whose call raises is dropped from
    the rounds and recorded as an empty list with the error printed to stderr (a peer failing on
    one model must not lose the others' numbers).
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    sync = sync or (lambda: None)
    live = dict(cases)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for name, fn in list(live.items()):
        try:
            for _ in range(warmup):
                fn()
            sync()
        except Exception as error:  # noqa: BLE001 - reported, and the other cases go on
            print(f"  {name}: failed ({type(error).__name__}: {error})", file=sys.stderr)
            del live[name]
    rounds, elapsed = 0, 0.0
    while live and (rounds < repeats or (elapsed < min_seconds and rounds < MAX_ROUNDS_FACTOR * repeats)):
        for name, fn in list(live.items()):
            start = clock()
            try:
                fn()
                sync()
            except Exception as error:  # noqa: BLE001
                print(f"  {name}: failed ({type(error).__name__}: {error})", file=sys.stderr)
                del live[name]
                times[name] = []
                continue
            times[name].append(clock() - start)
            elapsed += times[name][-1]
        rounds += 1
    return times


def rounds_of(times: Mapping[str, Sequence[float]]) -> int:
    """How many rounds a row ran: the longest series (a failed case's is empty)."""
    return max((len(values) for values in times.values()), default=0)


def _round_counts(rows: Sequence[Mapping]) -> list[int]:
    """The distinct numbers of rounds the rows ran, ascending (rows without per-call times left out)."""
    return sorted({rounds_of(row["times"]) for row in rows} - {0})


def rounds_varied(rows: Sequence[Mapping]) -> bool:
    """The rows ran different numbers of rounds (``--min-seconds``): tables then show a column."""
    return len(_round_counts(rows)) > 1


def median_label(rows: Sequence[Mapping], repeats: int) -> str:
    """``median of 3``, or ``median of 3-15 rounds (column rounds: ...)`` where rows differ;
    ``repeats`` (the setting) where the rows keep no per-call times."""
    counts = _round_counts(rows) or [repeats]
    if len(counts) == 1:
        return f"median of {counts[0]}"
    return f"median of {counts[0]}-{counts[-1]} rounds (column rounds: quick rows ran more)"


def round_spread(times: Mapping[str, Sequence[float]], case: str, baseline: str) -> tuple[float, float] | None:
    """Lowest and highest ratio ``case / baseline`` of a single round; None below two rounds.

    The two ran back to back in each round, so the spread is how far one round's ratio moves on
    this machine: a verdict whose target lies inside it may flip from run to run.
    """
    ratios = [c / b for c, b in zip(times.get(case) or (), times.get(baseline) or ()) if b > 0]
    return (min(ratios), max(ratios)) if len(ratios) >= 2 else None


def medians(times: Mapping[str, Sequence[float]]) -> dict[str, float | None]:
    return {name: (median(values) if values else None) for name, values in times.items()}


def once(fn: Callable[[], object], sync: Callable[[], None] | None = None) -> float:
    """Seconds of one call (for one-off costs: export, compile)."""
    start = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# models and inputs (torch imported lazily: the pure helpers above are cheap to import)


def build_model(name: str, device: str = "cpu", seed: int = 0):
    """A torchvision classification model with random weights, eval mode, parameters frozen.

    Frozen (``requires_grad=False``) is how an explainer is normally set up, and it is the
    fastest setting for every method that uses autograd: no method computes weight gradients.
    """
    import torch
    import torchvision

    torch.manual_seed(seed)
    try:
        model = torchvision.models.get_model(name, weights=None)
    except ValueError as error:
        raise SystemExit(f"unknown torchvision model {name!r}: {error}") from error
    model.eval().requires_grad_(False)
    return model.to(device)


def make_input(batch: int, size: int, device: str = "cpu", seed: int = 1):
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator).to(device)


def synchronizer(device: str) -> Callable[[], None] | None:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return None


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (None: keep torch's default); returns the count in use."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


# ---------------------------------------------------------------------------------------------
# command line and output


def parser(description: str, *, models: Sequence[str] = ("resnet50",), batch_sizes: Sequence[int] = (1, 8),
           repeats: int = 5) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--models", nargs="+", default=list(models), help="torchvision model names (random weights)")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=list(batch_sizes))
    p.add_argument("--size", type=int, default=224, help="image height and width")
    p.add_argument("--repeats", type=int, default=repeats, help="timed rounds; the median is reported")
    p.add_argument("--min-seconds", type=float, default=0.0,
                   help=f"add rounds (up to {MAX_ROUNDS_FACTOR}x --repeats) until a row's rounds have run this long")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per case before the rounds")
    p.add_argument("--threads", type=int, default=None, help="torch (and ORT) intra-op threads; default torch's")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--json-out", type=Path, default=None, help="write the raw numbers here (report.py reads them)")
    p.add_argument("--markdown-out", type=Path, default=None, help="write the printed table here")
    return p


def run_fresh(module: str, arguments: Sequence[str], env: Mapping[str, str] | None = None):
    """``python -m module *arguments`` in a fresh interpreter, from the repository root.

    For what a process keeps for good once done (peak memory, allocator settings). Returns
    ``(result, None)``, ``result`` the JSON of the worker's last line of output, or ``(None, error)``
    with the last line of its stderr when it failed.
    """
    import subprocess

    environment = {**os.environ, **(env or {})}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environment.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-m", module, *arguments], capture_output=True, text=True,
                          env=environment, cwd=ROOT)
    if done.returncode != 0:
        return None, (done.stderr.strip().splitlines() or ["no output"])[-1]
    return json.loads(done.stdout.strip().splitlines()[-1]), None


def check_device(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: torch sees no CUDA device on this machine")


def machine_info(threads: int, device: str = "cpu") -> dict:
    import torch

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_at_start": _load_average(),
        "code": _git_state(),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_state() -> str | None:
    """The commit measured, and which package files differ from it (the working tree is shared)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "tsgb_fx", "export"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return None
    changed = sorted(line[3:] for line in dirty if line.strip())
    return commit + (f" + uncommitted changes in {', '.join(changed)}" if changed else "") if commit else None


def load_now() -> float | None:
    """The 1-minute load average now (recorded per row: was the machine busy while it ran?)."""
    average = _load_average()
    return average[0] if average else None


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def package_versions(names: Sequence[str]) -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def emit(args: argparse.Namespace, payload: dict, markdown: str) -> None:
    """Print the table; write ``--json-out`` / ``--markdown-out`` where asked."""
    print(markdown, flush=True)
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(payload, indent=1) + "\n")
    if args.markdown_out is not None:
        args.markdown_out.parent.mkdir(parents=True, exist_ok=True)
        args.markdown_out.write_text(markdown + "\n")


def settings(args: argparse.Namespace) -> dict:
    return {
        "models": list(args.models),
        "batch_sizes": list(args.batch_sizes),
        "size": args.size,
        "repeats": args.repeats,
        "min_seconds": getattr(args, "min_seconds", 0.0),
        "warmup": args.warmup,
    }
