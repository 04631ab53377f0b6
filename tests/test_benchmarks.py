"""The benchmark helpers' logic: medians, ratios, tables, round-robin timing, verdicts, README assembly.

Nothing here asserts a time: timings depend on the machine. The smoke runs only check that a
command finishes and prints a table.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import allocator, common, memory, peers, plot, quality, report, speed

ROOT = Path(__file__).resolve().parents[1]


# -- numbers ------------------------------------------------------------------------------------


def test_median_odd_even_and_empty():
    assert common.median([3.0, 1.0, 2.0]) == 2.0
    assert common.median([4.0, 1.0, 3.0, 2.0]) == 2.5
    with pytest.raises(ValueError):
        common.median([])


def test_ratio_handles_missing_and_zero_baselines():
    assert common.ratio(3.0, 2.0) == 1.5
    assert common.ratio(None, 2.0) is None
    assert common.ratio(1.0, None) is None
    assert common.ratio(1.0, 0.0) is None
    assert common.ratio(math.nan, 1.0) is None


def test_formatting():
    assert common.format_ms(0.4123) == "412 ms"
    assert common.format_ms(0.01234) == "12.3 ms"
    assert common.format_ms(0.001234) == "1.23 ms"
    assert common.format_ms(None) == "n/a"
    assert common.format_ratio(1.2345) == "1.23x"
    assert common.format_mib(3 * 2**20) == "3.0 MiB"
    assert common.format_mib(300 * 2**20) == "300 MiB"
    assert common.ratio_cell(0.3, 0.2) == "1.50x (300 ms)"
    assert common.ratio_cell(None, 0.2) == "n/a"


def test_verdict_is_inclusive_and_never_hides_a_miss():
    assert common.verdict(1.3, 1.3) == "PASS"
    assert common.verdict(1.31, 1.3) == "MISS"
    assert common.verdict(None, 1.3) == "n/a"


def test_markdown_table():
    table = common.markdown_table(["model", "ratio"], [["a|b", "1.00x"], ["c", 2]])
    assert table.splitlines() == [
        "| model | ratio |",
        "|:---|---:|",
        "| a\\|b | 1.00x |",
        "| c | 2 |",
    ]
    with pytest.raises(ValueError):
        common.markdown_table(["a", "b"], [["only one"]])
    with pytest.raises(ValueError):
        common.markdown_table(["a", "b"], [], align="l")


def test_growth_exponent_of_a_power_law():
    xs = [1, 2, 4, 8]
    assert plot.growth_exponent(xs, [3 * x**2 for x in xs]) == pytest.approx(2.0)
    assert plot.growth_exponent([1], [1.0]) is None


# -- timing ---------------------------------------------------------------------------------------


class FakeClock:
    """Each reading advances by the seconds the last case 'took'."""

    def __init__(self):
        self.now, self.cost = 0.0, 0.0

    def __call__(self):
        self.now += self.cost
        self.cost = 0.0
        return self.now


def test_time_cases_warms_up_then_runs_round_robin():
    clock, calls = FakeClock(), []

    def case(name, seconds):
        def fn():
            calls.append(name)
            clock.cost = seconds
        return fn

    times = common.time_cases({"a": case("a", 1.0), "b": case("b", 2.0)}, repeats=3, warmup=2, clock=clock)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert times == {"a": [1.0] * 3, "b": [2.0] * 3}
    assert common.medians(times) == {"a": 1.0, "b": 2.0}


def test_time_cases_adds_rounds_until_min_seconds_up_to_a_cap():
    clock = FakeClock()

    def case(seconds):
        def fn():
            clock.cost = seconds
        return fn

    cases = {"a": case(1.0), "b": case(2.0)}  # 3 s per round
    times = common.time_cases(cases, repeats=2, warmup=0, clock=clock, min_seconds=10.0)
    assert times == {"a": [1.0] * 4, "b": [2.0] * 4}  # 6 s after the 2 rounds asked for, 12 s after 4
    capped = common.time_cases(cases, repeats=2, warmup=0, clock=clock, min_seconds=1e6)
    assert common.rounds_of(capped) == 2 * common.MAX_ROUNDS_FACTOR
    assert common.rounds_of(common.time_cases(cases, repeats=2, warmup=0, clock=clock)) == 2


def test_tables_name_the_rounds_when_rows_ran_different_numbers():
    payload = _speed_payload()
    assert "median of 3" in speed.render(payload) and "rounds" not in speed.render(payload)
    payload["rows"][0]["times"] = {"forward": [0.1] * 9, "gradient": []}
    payload["rows"][1]["times"] = {"forward": [1.0] * 3}
    text = speed.render(payload)
    assert "median of 3-9 rounds" in text
    assert "| resnet50 | 1 | 9 | 100 ms |" in text and "| vgg16 | 8 | 3 | 1000 ms |" in text


def test_time_cases_drops_a_failing_case_and_keeps_the_others(capsys):
    def broken():
        raise RuntimeError("no")

    times = common.time_cases({"ok": lambda: None, "broken": broken}, repeats=2, warmup=1)
    assert len(times["ok"]) == 2 and times["broken"] == []
    assert common.medians(times)["broken"] is None
    assert "broken: failed (RuntimeError: no)" in capsys.readouterr().err
    with pytest.raises(ValueError):
        common.time_cases({"ok": lambda: None}, repeats=0)


# -- tables and the report --------------------------------------------------------------------------

MACHINE = {"date": "2026-01-01 00:00 UTC", "platform": "Linux", "cpu": "Test CPU", "cpu_count": 2, "threads": 2,
           "device": "cpu", "python": "3.11", "torch": "2.x", "load_average_at_start": [1.0, 1.0, 1.0]}


def _speed_payload():
    rows = [
        {"model": "resnet50", "batch": 1, "size": 224, "times": {},
         "medians": {"forward": 0.1, "gradient": 0.2, "tsgb_eager": 0.12, "tsgb_explicit": 0.11,
                     "ort_forward": 0.08, "ort_tsgb": 0.2},
         "one_off": {"explainer_s": 0.5, "explicit_s": 9.0, "onnx_export_plain_s": 8.0, "onnx_export_tsgb_s": 60.0}},
        {"model": "vgg16", "batch": 8, "size": 224, "times": {},
         "medians": {"forward": 1.0, "gradient": 2.0, "tsgb_eager": 1.4, "tsgb_explicit": 1.6},
         "one_off": {"explainer_s": 0.5}},
    ]
    return {"kind": "speed", "machine": MACHINE, "settings": {"size": 224, "repeats": 3}, "versions": {}, "rows": rows}


def _peers_payload():
    medians = {"forward": 0.1, "tsgb_eager": 0.12, "captum_gbp": 0.2, "zennit_epf": 0.9, "gradcam": 0.1}
    return {"kind": "peers", "machine": MACHINE, "settings": {"size": 224, "repeats": 3}, "versions": {},
            "rows": [{"model": "resnet50", "batch": 1, "size": 224, "times": {}, "medians": medians, "errors": {}}]}


def _memory_payload():
    return {"kind": "memory", "machine": MACHINE,
            "settings": {"size": 224, "repeats": 1, "cases": ["forward_grad", "gradient", "tsgb_eager"]},
            "rows": [{"model": "resnet50", "batch": 1, "size": 224, "method": "VmHWM",
                      "bytes": {"forward_grad": 100 * 2**20, "gradient": 110 * 2**20, "tsgb_eager": 140 * 2**20}}]}


def test_speed_table_has_ratios_to_the_right_baselines():
    text = speed.render(_speed_payload())
    assert "| resnet50 | 1 | 100 ms | 2.00x (200 ms) | 1.20x (120 ms) | 1.10x (110 ms) | 80.0 ms (0.80x torch) | 2.50x (200 ms) |" in text
    assert "| vgg16 | 8 | 1000 ms | 2.00x (2000 ms) | 1.40x (1400 ms) | 1.60x (1600 ms) | n/a | n/a |" in text
    assert "| resnet50 | 0.5 s | 9.0 s | 8.0 s | 60.0 s |" in text


def test_channels_last_columns_and_targets_keep_the_nchw_forward_as_baseline():
    payload = _speed_payload()
    payload["rows"][1]["medians"].update(forward_channels_last=0.8, tsgb_eager_channels_last=1.2)
    text = speed.render(payload)
    assert "| forward, channels_last input | tsgb-fx eager, channels_last input |" in text
    assert "| 0.80x (800 ms) | 1.20x (1200 ms); 1.50x its forward |" in text
    assert "| resnet50 | 1 | 100 ms | 2.00x (200 ms) | 1.20x (120 ms) | n/a | n/a | 1.10x (110 ms) |" in text
    rows = report.target_rows(payload, None, None, None)
    channels_last = [row for row in rows if "channels_last" in row[0]]
    assert [(row[1], row[2], row[4]) for row in channels_last] == [("vgg16", 8, "PASS")]  # only where measured
    assert channels_last[0][3].startswith("1.20x; 1.50x its channels_last forward")


def _allocator_payload(reused=True):
    medians = {"forward_default": 0.1, "tsgb_eager_default": 0.2, "forward_reuse": 0.08, "tsgb_eager_reuse": 0.12}
    return {"kind": "allocator", "machine": MACHINE, "settings": {"size": 224, "repeats": 3, "warmup": 2, "pairs": 2},
            "rows": [{"model": "mobilenet_v2", "batch": 8, "size": 224, "times": {}, "medians": medians,
                      "reused": reused, "faults_per_call": {"default": 30000.0, "reuse": 12.0}}]}


def test_allocator_table_compares_each_setting_with_its_own_forward():
    text = allocator.render(_allocator_payload())
    assert "median of 2 x 3 rounds per setting" in text
    assert "| mobilenet_v2 | 8 | 100 ms | 80.0 ms | 200 ms | 120 ms | 0.60x | 2.00x | 1.50x | 30,000 | 12 |" in text
    not_glibc = allocator.render(_allocator_payload(reused=False))  # nothing was reused: no such columns' values
    assert "| mobilenet_v2 | 8 | 100 ms | n/a | 200 ms | n/a | n/a | 2.00x | n/a | 30,000 | n/a |" in not_glibc


def test_fastest_peer_and_peers_table():
    payload = _peers_payload()
    assert peers.fastest_peer(payload["rows"][0]["medians"]) == ("gradcam", 0.1)
    assert peers.fastest_peer({"forward": 1.0}) == (None, None)
    assert peers.render(payload).splitlines()[-1].endswith("| 1.20x |")


def test_last_conv_block():
    nn = pytest.importorskip("torch").nn

    class ResNetLike(nn.Module):  # torchvision's attribute names, without its import time
        def __init__(self):
            super().__init__()
            self.layer4 = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))

    class VGGLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2))

    resnet, vgg = ResNetLike(), VGGLike()
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 5, 3), nn.Flatten())
    assert peers.last_conv_block(resnet) is resnet.layer4[-1]
    assert peers.last_conv_block(vgg) is vgg.features[-1]
    assert peers.last_conv_block(plain) is plain[1]


def test_targets_say_pass_and_miss_honestly():
    rows = report.target_rows(_speed_payload(), _peers_payload(), _memory_payload(), None)
    verdicts = {(row[0].split(" <=")[0].split(" (")[0], row[1], row[2]): (row[3], row[4]) for row in rows}
    assert verdicts[("torch eager explain", "resnet50", 1)] == ("1.20x", "PASS")  # limit 1.3 on ResNet-50
    assert verdicts[("torch eager explain", "vgg16", 8)] == ("1.40x", "PASS")     # limit 1.5 elsewhere
    assert verdicts[("ORT explainer", "resnet50", 1)] == ("2.50x", "MISS")
    assert verdicts[("ORT explainer", "vgg16", 8)] == ("not measured in this run", "n/a")  # said, not hidden
    assert verdicts[("faster than every peer", "resnet50", 1)] == ("1.20x of pytorch-grad-cam GradCAM", "MISS")
    assert verdicts[("explain peak memory", "resnet50", 1)] == ("1.40x", "PASS")


def test_ort_targets_come_from_a_separate_run_where_the_speed_run_had_none():
    onnx_extra = {"kind": "speed", "machine": MACHINE, "settings": {"size": 224, "repeats": 3}, "rows": [
        {"model": "vgg16", "batch": 8, "size": 224, "times": {}, "one_off": {},
         "medians": {"forward": 1.0, "tsgb_eager": 1.3, "ort_forward": 0.5, "ort_tsgb": 0.7}},
        {"model": "resnet50", "batch": 1, "size": 224, "times": {}, "one_off": {},  # the speed run has its own
         "medians": {"forward": 0.1, "ort_forward": 0.1, "ort_tsgb": 0.1}}]}
    rows = report.target_rows(_speed_payload(), None, None, None, onnx_extra)
    ort = {(row[1], row[2]): (row[3], row[4]) for row in rows if row[0].startswith("ORT")}
    assert ort[("vgg16", 8)] == ("1.40x (separate run)", "PASS")
    assert ort[("resnet50", 1)] == ("2.50x", "MISS")


def test_targets_show_the_single_round_spread_of_each_ratio():
    payload = _speed_payload()  # medians: forward 0.1, eager 0.12, ORT forward 0.08, ORT tsgb 0.2
    payload["rows"][0]["times"] = {"forward": [0.1, 0.1, 0.2], "tsgb_eager": [0.11, 0.12, 0.24],
                                   "ort_forward": [0.08, 0.1, 0.08], "ort_tsgb": [0.2, 0.2, 0.16]}
    peers_payload = _peers_payload()  # medians: tsgb 0.12, fastest peer Grad-CAM 0.1
    peers_payload["rows"][0]["times"] = {"tsgb_eager": [0.12, 0.13], "gradcam": [0.1, 0.13]}
    rows = report.target_rows(payload, peers_payload, None, None)
    measured = {(row[0].split(" <=")[0].split(" (")[0], row[1]): row[3] for row in rows}
    assert measured[("torch eager explain", "resnet50")] == "1.20x (rounds 1.10-1.20)"  # 0.11/0.1 .. 0.24/0.2
    assert measured[("ORT explainer", "resnet50")] == "2.50x (rounds 2.00-2.50)"
    assert measured[("faster than every peer", "resnet50")] == "1.20x of pytorch-grad-cam GradCAM (rounds 1.00-1.20)"
    assert measured[("torch eager explain", "vgg16")] == "1.40x"  # no rounds recorded: no spread claimed
    assert common.round_spread({"forward": [0.1], "tsgb_eager": [0.2]}, "tsgb_eager", "forward") is None


def _compile_with_peers_payload():
    """A ``speed --compile --peers`` run: compile=True and the peers in the same rounds."""
    medians = {"forward": 0.1, "tsgb_eager": 0.15, "tsgb_compiled": 0.08, "captum_gbp": 0.2, "gradcam": 0.11}
    slower = {**medians, "tsgb_compiled": 0.12}
    rows = [{"model": "resnet50", "batch": batch, "size": 224, "times": {}, "medians": m,
             "one_off": {"compile_s": 60.0}, "errors": {}} for batch, m in ((1, medians), (8, slower))]
    return {"kind": "speed", "machine": MACHINE, "settings": {"size": 224, "repeats": 3, "peers": True},
            "versions": {}, "rows": rows}


def test_compiled_peer_targets_compare_compile_true_with_the_fastest_peer_of_its_own_run():
    rows = report.target_rows(None, _peers_payload(), None, _compile_with_peers_payload())
    compiled = {row[2]: (row[3], row[4]) for row in rows if "with compile=True" in row[0]}
    assert compiled == {1: ("0.73x of pytorch-grad-cam GradCAM", "PASS"),  # 0.08 / 0.11
                        8: ("1.09x of pytorch-grad-cam GradCAM", "MISS")}  # 0.12 / 0.11
    eager = [row for row in rows if row[0].startswith("faster than every peer (")]
    assert [row[3] for row in eager] == ["1.20x of pytorch-grad-cam GradCAM"]  # from the peers run, not this one
    table = peers.render(speed.peers_from_speed(_compile_with_peers_payload()))
    assert "tsgb-fx compile=True" in table and "compile=True / fastest peer" in table
    assert table.splitlines()[-2].endswith("| 0.80x (80.0 ms) | 2.00x (200 ms) | n/a | 1.10x (110 ms) | 1.36x | 0.73x |")
    no_peers = _compile_with_peers_payload()
    no_peers["settings"]["peers"] = False
    assert not [row for row in report.target_rows(None, None, None, no_peers) if "with compile=True" in row[0]]
    assert "compile=True" not in peers.render(_peers_payload())


def test_readme_assembles_sections_and_keeps_foreign_blocks(tmp_path):
    for name, payload in (("speed", _speed_payload()), ("peers", _peers_payload()), ("memory", _memory_payload())):
        (tmp_path / f"{name}.json").write_text(json.dumps(payload))
    out = tmp_path / "README.md"
    out.write_text("old\n<!-- quality:begin -->\n## Quality\nkept\n<!-- quality:end -->\nold\n")
    report.main(["--results", str(tmp_path), "--out", str(out), "--png", str(tmp_path / "none.png")])
    text = out.read_text()
    assert "## Issue 4 targets" in text and "| MISS |" in text and "| PASS |" in text
    assert "<!-- quality:begin -->\n## Quality\nkept\n<!-- quality:end -->" in text
    assert "old" not in text.split("<!-- quality:begin -->")[0]
    assert "other processes" in text  # the caveat about the shared machine is always stated
    assert "_The scaling sweep was not run._" in text


def test_gpu_section_merges_the_runs_of_gpu_sh(tmp_path):
    assert "Not run" in report.gpu_section(tmp_path)[0]
    cuda = {**MACHINE, "device": "cuda", "gpu": "Test GPU"}
    first, second = _speed_payload(), _speed_payload()
    first["rows"], second["rows"] = first["rows"][:1], second["rows"][1:]  # resnet50 and vgg16 apart
    memory_payload = _memory_payload()
    memory_payload["rows"].append({"model": "vgg16", "batch": 1, "size": 224, "method": "cuda",
                                   "bytes": {"forward_grad": 2**20}})  # its step ran out of time
    for name, payload in (("speed.json", first), ("speed_more.json", second), ("memory.json", memory_payload)):
        (tmp_path / name).write_text(json.dumps({**payload, "machine": cuda}))
    text = "\n".join(report.gpu_section(tmp_path))
    assert "Test GPU" in text and "compile=True on CUDA" not in text
    assert "| resnet50 | 1 | 100 ms |" in text and "| vgg16 | 8 | 1000 ms |" in text
    assert "| resnet50 | 1 | 100 MiB | 110 MiB | 140 MiB | 1.40x |" in text
    assert "n/a: not measured" in text


def test_busy_rows_are_marked_and_runs_are_cross_checked():
    speed_payload = _speed_payload()
    speed_payload["rows"][0]["load"] = 4.9  # above the 2 cores of MACHINE
    rows = report.target_rows(speed_payload, None, None, None)
    assert rows[0][3] == "1.20x (load 4.9)" and rows[0][4] == "PASS"
    assert rows[1][3] == "1.40x"
    scaling = {"settings": {"model": "resnet50", "size": 224},
               "by_batch": [{"batch": 1, "medians": {"forward": 0.05, "tsgb_eager": 0.1}}]}
    text = report.consistency_paragraph(speed_payload, scaling)
    assert "forward 100 ms vs 50.0 ms" in text and "disagree" in text
    scaling["by_batch"][0]["medians"] = {"forward": 0.105, "tsgb_eager": 0.12}
    assert "agree within 20 %" in report.consistency_paragraph(speed_payload, scaling)


def test_optional_peer_column_only_when_measured():
    payload = _peers_payload()
    assert "trainable" not in peers.render(payload)
    payload["rows"][0]["medians"]["gradcam_trainable"] = 0.3
    assert "GradCAM, trainable parameters" in peers.render(payload)


def test_memory_table():
    text = memory.render(_memory_payload())
    assert text.splitlines()[-1] == "| resnet50 | 1 | 100 MiB | 110 MiB | 140 MiB | 1.40x |"


def _memory_compile_payload():
    return {"kind": "memory", "machine": MACHINE,
            "settings": {"size": 224, "repeats": 1, "cases": ["forward_grad", "tsgb_compiled"]},
            "rows": [{"model": "resnet50", "batch": 8, "size": 224, "method": "VmHWM",
                      "bytes": {"forward_grad": 200 * 2**20, "tsgb_compiled": 320 * 2**20},
                      "held": {"forward_grad": 0, "tsgb_compiled": 250 * 2**20}}]}


def test_compiled_memory_gets_its_own_column_ratio_and_target():
    text = memory.render(_memory_compile_payload())
    header, *_, last = text.splitlines()[2:]
    assert "tsgb-fx compile=True" in header and "compile=True / forward with grad input" in header
    assert "explain / forward" not in header  # no eager column in that run: no ratio for it either
    assert header.rstrip(" |").endswith("held after compiling for this batch size")
    assert last == "| resnet50 | 8 | 200 MiB | 320 MiB | 1.60x | 250 MiB |"
    assert "held after" not in memory.render(_memory_payload())  # eager runs: no such column
    rows = report.target_rows(None, None, _memory_payload(), None, memory_compile=_memory_compile_payload())
    memory_rows = {(row[0], row[1], row[2]): (row[3], row[4]) for row in rows}
    assert memory_rows[("compile=True peak memory <= 1.5x forward with grad input", "resnet50", 8)] == ("1.60x", "MISS")
    assert memory_rows[("explain peak memory <= 1.5x forward with grad input", "resnet50", 1)] == ("1.40x", "PASS")


# -- quality: mosaics and hand-drawn boxes -----------------------------------------------------------


@pytest.mark.parametrize("count, cells", [(9, 4), (9, 9), (6, 4), (10, 9)])
def test_mosaic_layouts_put_every_photo_in_every_cell_once(count, cells):
    layouts = quality.mosaic_layouts(count, cells)
    assert len(layouts) == count
    assert all(len(layout) == cells and len(set(layout)) == cells for layout in layouts)  # no photo twice
    visits = {}
    for layout in layouts:
        for cell, photo in enumerate(layout):
            visits[photo, cell] = visits.get((photo, cell), 0) + 1
    assert visits == {(photo, cell): 1 for photo in range(count) for cell in range(cells)}


def test_mosaic_layouts_need_enough_photos():
    with pytest.raises(ValueError):
        quality.mosaic_layouts(8, 9)


@pytest.mark.parametrize("grid, size, edges", [
    (2, None, [0, 112, 224]),  # the benchmark's mosaics: 112 x 112 cells whatever the grid
    (3, None, [0, 112, 224, 336]),
    (3, 224, [0, 75, 149, 224]),  # a size that the grid does not divide: the metric's uneven cells
])
def test_make_mosaic_fills_exactly_the_metric_cells(grid, size, edges):
    import numpy as np
    import torch

    from tsgb_fx import metrics

    levels = [20 * k + 10 for k in range(grid * grid)]  # one grey level per photo
    photos = [np.full((30 + k, 40, 3), level, dtype=np.uint8) for k, level in enumerate(levels)]
    mosaic = quality.make_mosaic(photos, grid, size)
    expected = torch.empty(3, edges[-1], edges[-1])
    for k, level in enumerate(levels):  # the cells, row-major, from the edges written out above
        row, col = divmod(k, grid)
        expected[:, edges[row] : edges[row + 1], edges[col] : edges[col + 1]] = (level / 255 - 0.5) / 0.5
    assert torch.allclose(mosaic, expected)
    # a map that marks photo k's pixels scores 1 for cell k in the grid pointing game
    for k, level in enumerate(levels):
        marked = torch.isclose(mosaic[0], torch.tensor((level / 255 - 0.5) / 0.5)).float()[None]
        assert metrics.grid_pointing_game(marked, k, grid=grid).tolist() == [1.0]


def test_scale_boxes_keeps_the_map_pixels_whose_centres_lie_in_the_box():
    import numpy as np

    cases = [((451, 300), [0, 0, 390, 300]), ((600, 400), [172, 17, 410, 306]), ((741, 500), [92, 85, 688, 452]),
             ((10, 7), [3, 1, 4, 6]), ((500, 500), [0, 0, 500, 500])]
    for (width, height), box in cases:
        [(x0, y0, x1, y1)] = quality.scale_boxes([box], (width, height), 224)
        centres = np.arange(224) + 0.5  # map pixel centres, mapped back into the photo below
        inside_x = (centres * width / 224 >= box[0]) & (centres * width / 224 < box[2])
        inside_y = (centres * height / 224 >= box[1]) & (centres * height / 224 < box[3])
        assert inside_x[x0:x1].all() and not inside_x[:x0].any() and not inside_x[x1:].any()
        assert inside_y[y0:y1].all() and not inside_y[:y0].any() and not inside_y[y1:].any()


def test_box_file_covers_every_photo_with_boxes_inside_it():
    boxes = quality.load_boxes()
    assert set(boxes) == {photo.name for photo in quality.PHOTOS}
    for photo in quality.PHOTOS:
        array = photo.load()
        entry = boxes[photo.name]
        assert entry["size"] == [array.shape[1], array.shape[0]], photo.name  # drawn on this very photo
        for x0, y0, x1, y1 in entry["boxes"]:
            assert 0 <= x0 < x1 <= array.shape[1] and 0 <= y0 < y1 <= array.shape[0], photo.name
        assert entry["encloses"] and isinstance(entry["misread"], bool) and isinstance(entry["class"], int)


def test_load_boxes_rejects_a_box_outside_its_photo(tmp_path):
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps({"photos": {"a": {"size": [10, 8], "boxes": [[0, 0, 11, 8]]}}}))
    with pytest.raises(ValueError, match="outside"):
        quality.load_boxes(path)
    path.write_text(json.dumps({"photos": {"a": {"size": [10, 8], "boxes": [[0, 0, 10, 8]]}}}))
    assert quality.load_boxes(path)["a"]["boxes"] == [[0, 0, 10, 8]]


# -- smoke runs (a table comes out; no time is checked) ------------------------------------------------


def _run(*args, timeout=120):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_speed_command_prints_a_table():
    out = _run("benchmarks.speed", "--models", "resnet18", "--batch-sizes", "1", "--size", "32", "--repeats", "1",
               "--warmup", "0", "--no-onnx", "--no-explicit", "--threads", "1")
    assert "| resnet18 | 1 |" in out and "tsgb-fx eager" in out


def test_allocator_command_runs_both_settings_in_fresh_processes():
    out = _run("benchmarks.allocator", "--models", "resnet18", "--batch-sizes", "1", "--size", "32", "--pairs", "1",
               "--repeats", "1", "--warmup", "1", "--threads", "1")
    row = next(line for line in out.splitlines() if line.startswith("| resnet18 | 1 |"))
    assert "n/a" not in row  # both settings measured, faults counted


@pytest.mark.slow
def test_speed_command_with_every_column():
    out = _run("benchmarks.speed", "--models", "resnet18", "--batch-sizes", "1", "--size", "64", "--repeats", "1",
               timeout=600)
    assert "| resnet18 | 1 |" in out and "ORT tsgb-fx" in out and "tsgb-fx explicit graph" in out


@pytest.mark.slow
def test_memory_command_measures_in_fresh_processes(tmp_path):
    out = _run("benchmarks.memory", "--models", "resnet18", "--batch-sizes", "1", "--size", "64",
               "--cases", "forward_grad", "tsgb_eager", "--json-out", str(tmp_path / "m.json"), timeout=300)
    assert "| resnet18 | 1 |" in out
    row = json.loads((tmp_path / "m.json").read_text())["rows"][0]
    assert row["bytes"]["forward_grad"] > 0 and row["bytes"]["tsgb_eager"] > 0
