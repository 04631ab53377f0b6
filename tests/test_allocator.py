"""reuse_freed_memory: later explanations reuse freed memory instead of faulting in fresh pages.

Each measurement runs in a fresh interpreter, so this test process's allocator stays as it is.
The count is the kernel's minor page faults (``ru_minflt``) of one explanation of a batch, the
median over nine calls: a property of the allocator, not a timing. With reuse nearly every call
faults no page, but now and then one call still grows the heap (1,456 faults once in 15 calls
here), which in a mean over five calls came within the test's margin.
"""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

import tsgb_fx
from tsgb_fx import allocator

glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                           reason="mallopt is glibc's")

FAULTS_PER_CALL = textwrap.dedent("""
    import resource, sys, torch, tsgb_fx
    from torch import nn
    torch.set_num_threads(1)
    if sys.argv[1] == "reuse":
        assert tsgb_fx.reuse_freed_memory()
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU()]
    for _ in range(6):  # activations of 2 MiB each: far above glibc's default mmap threshold
        layers += [nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU()]
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    explainer = tsgb_fx.explainer(model)
    x = torch.randn(4, 3, 64, 64)
    expected = explainer(x, target=1).saliency
    for _ in range(10):  # the reused heap settles over the first calls
        explainer(x, target=1)
    faults = []
    for _ in range(9):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.testing.assert_close(explainer(x, target=1).saliency, expected, rtol=0, atol=0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(sorted(faults)[len(faults) // 2])
""")


def _faults_per_call(mode: str) -> float:
    done = subprocess.run([sys.executable, "-c", FAULTS_PER_CALL, mode], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return float(done.stdout.split()[-1])


@glibc
def test_reused_memory_spares_later_calls_their_page_faults():
    default, reused = _faults_per_call("default"), _faults_per_call("reuse")
    assert default > 1000  # the explanation's freed tensors went back to the kernel, each call
    assert reused < default / 5


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda *args: pytest.fail("mallopt must not be looked up"))
    assert tsgb_fx.reuse_freed_memory() is False
