"""Which backends exist, which can run here, and why not.

Every op family (lora, mora, cross_entropy, dora) has up to four implementations behind one schema:

- ``triton``: Triton kernels (``fusedpeft/kernels/``), CUDA tensors (CPU tensors only under
  ``TRITON_INTERPRET=1``, for tests);
- ``cuda``: the CUDA kernels of the C++ extension ``fusedpeft._C`` (``csrc/cuda``);
- ``cpu``: the OpenMP C++ kernels of ``fusedpeft._C`` (``csrc/``);
- ``torch``: the optimised PyTorch path (``fusedpeft/torch_backend/``), any device.

``backend=None`` (or ``"auto"``) picks, per op family and device, the first usable entry of
``AUTO_ORDER``; the ``cuda`` backend is only chosen automatically once its gpu tests have
passed on a GPU (``VERIFIED_ON_GPU``). ``FUSEDPEFT_BACKEND`` sets the default. A backend asked for by name
that cannot run raises ``RuntimeError`` with the reason; it never falls back silently.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

BACKENDS = ("triton", "cuda", "cpu", "torch")
FAMILIES = ("lora", "mora", "cross_entropy", "dora")

# (family, backend) -> module that implements it. A module may define
# ``unavailable_reason(device) -> str | None`` for limits of its own (e.g. kernels not compiled
# for that device type); a pair not listed here is unavailable, with a reason.
IMPLEMENTATIONS: dict[tuple[str, str], str] = {
    ("lora", "triton"): "fusedpeft.kernels.lora",
    ("mora", "triton"): "fusedpeft.kernels.mora",
    ("cross_entropy", "triton"): "fusedpeft.kernels.cross_entropy",
    ("lora", "cuda"): "fusedpeft.cpp_backend.lora",
    ("mora", "cuda"): "fusedpeft.cpp_backend.mora",
    ("cross_entropy", "cuda"): "fusedpeft.cpp_backend.cross_entropy",
    ("lora", "cpu"): "fusedpeft.cpp_backend.lora",
    ("mora", "cpu"): "fusedpeft.cpp_backend.mora",
    ("cross_entropy", "cpu"): "fusedpeft.cpp_backend.cross_entropy",
    ("lora", "torch"): "fusedpeft.torch_backend.lora",
    ("mora", "torch"): "fusedpeft.torch_backend.mora",
    ("cross_entropy", "torch"): "fusedpeft.torch_backend.cross_entropy",
    ("dora", "triton"): "fusedpeft.kernels.dora",
    ("dora", "cuda"): "fusedpeft.cpp_backend.dora",
    ("dora", "cpu"): "fusedpeft.cpp_backend.dora",
    ("dora", "torch"): "fusedpeft.torch_backend.dora",
}

# (family, "cuda") pairs whose gpu tests have passed on a real GPU: the "cuda" backend is
# chosen automatically only for these. Record where each was verified.
VERIFIED_ON_GPU: set[tuple[str, str]] = set()

AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}


@functools.lru_cache(maxsize=None)
def _triton_problem() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the install
        return f"triton cannot be imported ({type(exc).__name__}: {exc}); pip install triton"
    return None


@functools.lru_cache(maxsize=None)
def _extension_problem() -> str | None:
    try:
        importlib.import_module("fusedpeft._C")
    except ImportError as exc:
        return f"the C++ extension fusedpeft._C is not built ({exc}); reinstall without FUSEDPEFT_SKIP_EXT=1"
    return None


def _implemented(family: str, backend: str) -> bool:
    return (family, backend) in IMPLEMENTATIONS


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(backend: str, family: str | None = None, device: torch.device | None = None) -> str | None:
    """None when ``backend`` can run ``family`` (any family when None) on ``device`` (any device
    when None), else a sentence that says why not."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; choose one of {BACKENDS} or None for automatic"
    families = (family,) if family else FAMILIES
    missing = [f for f in families if not _implemented(f, backend)]
    if len(missing) == len(families):
        what = family or "any op family"
        return f"fusedpeft has no {backend!r} implementation of {what} yet"
    if backend == "triton":
        problem = _triton_problem()
        if problem:
            return problem
        if device is not None and device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
            return f"Triton kernels need CUDA tensors (got {device.type}; CPU tensors only under TRITON_INTERPRET=1)"
        if device is None and not torch.cuda.is_available() and not _interpreting():
            return "no CUDA GPU is visible (set TRITON_INTERPRET=1 to run the kernels on CPU for testing)"
    if backend in ("cuda", "cpu"):
        problem = _extension_problem()
        if problem:
            return problem
        wanted = "cuda" if backend == "cuda" else "cpu"
        if device is not None and device.type != wanted:
            return f"the {backend!r} backend runs on {wanted} tensors, got {device.type} tensors"
        if backend == "cuda" and device is None and not torch.cuda.is_available():
            return "no CUDA GPU is visible"
    if family is not None and device is not None:
        own_reason = getattr(implementation(family, backend), "unavailable_reason", None)
        if own_reason is not None:
            return own_reason(device)
    return None


def available_backends() -> dict[str, str | None]:
    """backend name -> None if it can run at least one op family on this machine, else why not."""
    return {name: unavailable_reason(name) for name in BACKENDS}


def requested_backend(backend: str | None) -> str | None:
    """The backend asked for: the argument, else $FUSEDPEFT_BACKEND; None means automatic."""
    name = backend if backend is not None else os.environ.get("FUSEDPEFT_BACKEND") or None
    if name in (None, "auto"):
        return None
    if name not in BACKENDS:
        source = "backend" if backend is not None else "FUSEDPEFT_BACKEND"
        raise ValueError(f"{source}={name!r} is not a fusedpeft backend; choose one of {BACKENDS}, 'auto' or None")
    return name


def check_backend_name(backend: str | None) -> None:
    """Raise ValueError now (at layer construction) for a misspelt backend name."""
    if backend is not None and backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not a fusedpeft backend; choose one of {BACKENDS}, 'auto' or None")


# A pure function of its arguments and of the install: torch.compile takes its result as a constant
# instead of tracing the importlib look-ups behind it.
@torch.compiler.assume_constant_result
def resolve_backend(family: str, backend: str | None, device: torch.device) -> str:
    """The backend that runs ``family`` on ``device``: the one asked for, or the automatic choice."""
    name = requested_backend(backend)
    if name is not None:
        reason = unavailable_reason(name, family, device)
        if reason:
            raise RuntimeError(f"backend {name!r} cannot run fusedpeft {family} ops on {device.type} tensors: {reason}")
        return name
    for candidate in AUTO_ORDER.get(device.type, ("torch",)):
        if candidate == "cuda" and (family, candidate) not in VERIFIED_ON_GPU:
            continue
        if unavailable_reason(candidate, family, device) is None:
            return candidate
    return "torch"


def implementation(family: str, backend: str):
    """The module implementing ``family`` for ``backend`` (see IMPLEMENTATIONS)."""
    return importlib.import_module(IMPLEMENTATIONS[(family, backend)])
