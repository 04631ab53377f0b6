"""Opt-in: keep freed CPU tensor memory in the process, so the next explanation reuses it.

An eager explanation keeps every activation its backward reads until the backward is done, and
the rules form full-size temporaries (``|x|``, ``g * y``) that live for one channel sum. glibc's
``malloc`` hands blocks above its mmap threshold (128 KiB, rising to at most 32 MiB as large
blocks are freed) back to the kernel when they are freed, and trims the top of its heap; the
next call's tensors are then fresh pages, and the kernel zeroes each 4 KiB page on first touch.
On this project's 2-core machine (a virtual machine) a page fault costs about 2 microseconds:
``x.abs()`` of a MobileNetV2 activation at batch 8 (96 x 112 x 112 floats, 38.5 MB) took 19.7
ms with its 9,400 faults and 3.2 ms without, and an explanation of that batch made 14,000-35,000
faults per call.

:func:`reuse_freed_memory` sets two of glibc's ``mallopt`` parameters for the whole process:
``M_MMAP_THRESHOLD`` to 1 GiB (blocks below it come from the heap, where freed blocks are reused;
older glibc versions cap it at 32 MiB, which is then used) and ``M_TRIM_THRESHOLD`` to its maximum
(the heap is not shrunk). Once the heap has settled (a few calls), calls of the same size fault
10-100 times less. The price: the process keeps its peak memory after a call instead of returning it, which is what
a server or a batch job that explains image after image needs anyway, and wrong for a process that
explains once and then needs the memory for something else. PyTorch's CPU performance guides
reach the same end by preloading jemalloc or tcmalloc (``LD_PRELOAD``), which this needs no
installation for; the environment variables ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` do it for a process from outside. Both parameters must be set together:
fixing only the trim threshold also fixes the mmap threshold at its 128 KiB default, which makes
every large tensor fault on every call (4x slower measured here).

The ``tsgb explain`` command calls it. Maps do not change: only where tensors live does.
"""

from __future__ import annotations

import ctypes
import platform
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLDS = (1 << 30, 32 << 20)  # 1 GiB; older glibc versions accept at most 32 MiB
INT_MAX = 2**31 - 1  # mallopt takes an int


def reuse_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse, process-wide (module docstring); True if it now does.

    False where the C library is not glibc (macOS, Windows, musl: nothing is changed) or glibc
    refuses the settings. Calling it again is harmless.
    """
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # The mmap threshold first: setting the trim threshold alone would freeze it at 128 KiB.
    if not any(mallopt(M_MMAP_THRESHOLD, threshold) == 1 for threshold in MMAP_THRESHOLDS):
        return False
    return mallopt(M_TRIM_THRESHOLD, INT_MAX) == 1
