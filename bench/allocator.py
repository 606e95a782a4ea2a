"""Pin glibc's heap thresholds for CPU timing, so that no provider's step pays page faults that
depend on which providers ran before it.

glibc serves a large malloc (torch's CPU tensors of a few MiB) by mmap until a freed mmap chunk
raises its "dynamic" threshold, and hands the top of its heap back to the kernel (trim) once more
than twice that threshold is free there. Both move with the history of the process: measured at
2048 x 1024 -> 1024 (fp32, fwd+bwd), the base layer's step took ~0.9-1.9k page faults (~2 ms)
after the base and our layers alone, and none once PEFT's larger temporaries had run, so a
provider's time depended on the case's provider list. Pinned (mallopt, as MALLOC_MMAP_THRESHOLD_ /
MALLOC_TRIM_THRESHOLD_ would: a fixed 32 MiB mmap threshold, glibc's largest, and trim only above
1 GiB), freed heap memory is reused without faults by every provider alike, as jemalloc / tcmalloc,
which CPU training guides recommend, do by design; blocks over 32 MiB are mmapped afresh for every
provider alike. The heap keeps its peak for the rest of the run.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc refuses more (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD_BYTES = 1 << 30


def pin_glibc_heap() -> str | None:
    """Fix glibc's mmap threshold at 32 MiB and its trim threshold at 1 GiB for this process.
    Returns a line for the results' machine info, or None where the C library has no mallopt (not
    glibc) or refuses a setting."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)):
        return None
    return (f"glibc malloc pinned: mmap threshold {MMAP_THRESHOLD_BYTES >> 20} MiB, trim threshold "
            f"{TRIM_THRESHOLD_BYTES >> 20} MiB (bench/allocator.py)")
