"""Peak extra memory of one training step: what the step allocates beyond what was alive before it.

"Peak extra" = max over the step of (bytes allocated now) - (bytes allocated when it started), so
inputs, weights and anything else created before the step are excluded, and every temporary, saved
activation and gradient created during it counts.

- CUDA: ``torch.cuda.reset_peak_memory_stats`` / ``max_memory_allocated`` minus
  ``memory_allocated`` before the step (the caching allocator's own bookkeeping).
- CPU: torch.profiler with ``profile_memory=True`` records every allocation and free made through
  c10's CPU allocator (every tensor, including temporaries made inside C++ kernels such as
  log_softmax's output or an extension's workspace) with its size and time stamp. Sorting those
  events by time and summing the signed sizes gives the live bytes allocated during the step;
  its maximum is the peak. Frees of memory allocated before the step are left out (matched by
  address), so they cannot push the count below the starting point. Not seen: memory a library allocates
  with its own malloc (e.g. a BLAS scratch buffer), which is small for the ops benchmarked here.
  ``validate_cpu_method`` checks the method on steps whose answer is known.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import sys
import tempfile
from typing import Callable

import torch

# Lines kineto prints on stderr when a profile starts or stops (noise, not errors of the step).
_PROFILER_NOISE = re.compile(r"(USDT:|SyncActivityProfilerHandler|gpuGetDeviceCount|ActivityProfilerController|"
                             r"CuptiActivityProfiler|^\s*$|profiler_st|allocated before the profiling started)")


@contextlib.contextmanager
def _quiet_profiler_stderr():
    """Send fd 2 to a temporary file, then print back every line that is not profiler noise."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            for line in sink.read().decode(errors="replace").splitlines():
                if not _PROFILER_NOISE.search(line):
                    print(line, file=sys.stderr)


def _allocation_events(prof) -> list[tuple[int, int]]:
    """(time in ns, signed bytes) of every CPU allocation (+) made while ``prof`` ran and of every
    free (-) of such an allocation. Frees of blocks allocated before are left out: the profiler
    reports them with size 0, except when an earlier profiled step made them (then with their size,
    which would lower the count below its start; seen as a fake 8 MiB saving when consecutive
    steps reuse one input's .grad)."""
    from torch._C._profiler import _EventType

    raw = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            raw.append((node.start_time_ns, int(node.extra_fields.alloc_size), int(node.extra_fields.ptr)))
        stack.extend(node.children)
    raw.sort()
    events, live = [], set()
    for time_ns, size, ptr in raw:
        if size > 0:
            live.add(ptr)
            events.append((time_ns, size))
        elif size < 0 and ptr in live:
            live.discard(ptr)
            events.append((time_ns, size))
    return events


def cpu_peak_extra_bytes(step: Callable[[], None]) -> int:
    """Peak bytes allocated by ``step()`` on the CPU above what was allocated before it (see module doc)."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with _quiet_profiler_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
            step()
    live = peak = 0
    for _, size in _allocation_events(prof):
        live += size
        peak = max(peak, live)
    return peak


def cuda_peak_extra_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated by ``step()`` on ``device`` above ``memory_allocated`` before it."""
    gc.collect()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def peak_extra_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Peak extra bytes of one call of ``step`` on ``device`` (CUDA allocator stats or CPU profiler)."""
    if device.type == "cuda":
        return cuda_peak_extra_bytes(step, device)
    return cpu_peak_extra_bytes(step)


def validate_cpu_method(rows: int = 2048, cols: int = 32000) -> dict:
    """Check ``cpu_peak_extra_bytes`` on steps whose peak is known; raise AssertionError if it is off.

    - a no-op: 0 bytes;
    - one [rows, cols] float32 tensor allocated and dropped: rows * cols * 4 bytes;
    - the same tensor allocated inside a C++ op (``torch.exp`` of an existing tensor): the same;
    - an allocation kept alive plus a free of a tensor that existed before: only the new one;
    - the same when the freed tensor was allocated during the previous profiled step.
    Returns {check name: (measured bytes, expected bytes)}.
    """
    nbytes = rows * cols * 4
    existing = torch.zeros(rows, cols)
    kept: list[torch.Tensor] = []
    holder = [torch.empty(rows, cols)]
    checks = {
        "no-op": (lambda: None, 0),
        "one [rows, cols] fp32 tensor": (lambda: torch.empty(rows, cols), nbytes),
        "exp() of an existing tensor": (lambda: torch.exp(existing), nbytes),
        "keep one, free one made before": (lambda: (kept.append(torch.empty(rows, cols)), holder.clear()), nbytes),
        # kept[0] was allocated while the previous check was being profiled
        "free one made in the last profiled step, keep one": (
            lambda: (kept.pop(0), kept.append(torch.empty(rows, cols))), nbytes),
    }
    results = {}
    for name, (step, expected) in checks.items():
        measured = cpu_peak_extra_bytes(step)
        results[name] = (measured, expected)
        tolerance = 64 * 1024  # bookkeeping allocations of a few bytes are fine
        if abs(measured - expected) > tolerance:
            raise AssertionError(f"CPU peak-memory method is off for '{name}': measured {measured} bytes, "
                                 f"expected {expected}")
    return results
