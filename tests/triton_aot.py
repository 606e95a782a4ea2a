"""Ahead-of-time compile of Triton kernels for sm_80 / sm_90 on a machine without a GPU.

docs/architecture.md §3.3: every shipped kernel config is compiled here for the GPU it will run on and checked:
it compiles, GEMM kernels use tensor cores (wgmma on sm_90), nothing spills to local memory and
shared memory fits the architecture's per-block limit.

    report = compile_for(kernel, {"x_ptr": "*fp16", "n": "i32"}, {"BLOCK": 1024}, arch=90)
    report.check()                        # AssertionError with a readable message on a problem
    print(report_table([report, ...]))    # markdown table for issue notes

How it works
- ``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32))``
  runs Triton's whole pipeline down to PTX and cubin without a driver. The signature maps each
  runtime argument name to a Triton type string ("*fp16", "*bf16", "*fp32", "i32", "i64", "fp32",
  ...); constexpr arguments are "constexpr" in the signature and get their value from
  ``constexprs`` (keyed by argument name). ``compile_for`` fills in the "constexpr" entries, so the
  caller lists runtime arguments only.
- Divisibility: Triton's launcher marks 16-byte aligned pointers and integer arguments that are
  multiples of 16 as such, and that decides the code (a 128x128x64 bf16 GEMM tile is only
  software-pipelined when its strides are known multiples of 16). ``aligned`` names the arguments
  to mark; by default the pointers only, so list the strides / sizes that are multiples of 16 in
  the real launches.
- Registers and spill bytes come from ``ptxas -v`` (Triton's bundled ptxas-blackwell) on the PTX,
  shared memory from the compiled metadata (``metadata.shared``, the dynamic shared memory the
  launch requests).
- ``TRITON_INTERPRET=1`` (tests/conftest.py sets it on CPU machines) gets in the way three times:
  ``@triton.jit`` returns an ``InterpretedFunction`` instead of a ``JITFunction`` (no
  ``cache_key``: ``triton.compile`` fails), triton.language's own @jit functions (tl.rand,
  tl.max, ...) are interpreted too, and constexpr functions return plain values while the flag is
  on. ``compile_for`` rebuilds a ``JITFunction`` for the kernel and every interpreted ``@triton.jit``
  function it can reach (globals, closures, attributes of imported modules, triton.language
  included) and switches the flag off while compiling. Interpreted launches also leave patched
  builtins behind in triton.language.core (see ``_interpreter_patches_undone``); those are
  swapped out while compiling.
- Nothing is cached across processes: Triton's compile cache is pointed at a temporary directory
  that lives as long as this process, and ptxas runs afresh on every call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect
import os
import re
import subprocess
import tempfile
import types
from pathlib import Path

import triton

try:  # triton >= 3.4 exposes its environment switches as knobs
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - older triton
    _knobs = None

try:
    from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction
except ImportError:  # pragma: no cover
    _InterpretedFunction = ()

from triton.runtime.jit import JITFunction as _JITFunction

# Per-block shared memory a kernel may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# ptxas --gpu-name for each arch; Triton itself targets sm_90a on Hopper (wgmma needs the "a").
PTXAS_GPU_NAME = {80: "sm_80", 90: "sm_90a"}

_CACHE_DIR: tempfile.TemporaryDirectory | None = None


@dataclasses.dataclass
class AotReport:
    """What one ahead-of-time compile produced, and the checks docs/architecture.md §3.3 asks of it."""

    name: str  # kernel name plus its constexprs, e.g. "matmul[BM=128, BN=128]"
    arch: int  # 80 or 90
    num_warps: int
    num_stages: int
    registers: int  # per thread, from ptxas -v
    spill_store_bytes: int
    spill_load_bytes: int
    stack_frame_bytes: int
    shared_memory_bytes: int  # dynamic (metadata.shared) plus any static smem ptxas reports
    uses_wgmma: bool  # Hopper warpgroup MMA (wgmma.mma_async) in the PTX
    uses_mma: bool  # warp-level tensor-core MMA (mma.sync) in the PTX, the Ampere path
    ptx: str = dataclasses.field(repr=False)
    ptxas_log: str = dataclasses.field(repr=False)

    @property
    def spills(self) -> bool:
        """True when ptxas had to spill registers to local memory."""
        return self.spill_store_bytes > 0 or self.spill_load_bytes > 0

    @property
    def shared_memory_limit(self) -> int:
        """Bytes of shared memory one block may use on this architecture."""
        return SHARED_MEMORY_LIMIT[self.arch]

    def problems(self, require_wgmma: bool = False) -> list[str]:
        """Readable descriptions of every failed check (empty when all pass)."""
        found = []
        if self.spills:
            found.append(
                f"register spills: {self.spill_store_bytes} bytes stored, {self.spill_load_bytes} bytes "
                f"loaded ({self.registers} registers, {self.num_warps} warps); use more warps or smaller tiles"
            )
        if self.shared_memory_bytes > self.shared_memory_limit:
            found.append(
                f"shared memory {self.shared_memory_bytes} bytes ({self.shared_memory_bytes / 1024:.1f} KiB) "
                f"exceeds the sm_{self.arch} limit of {self.shared_memory_limit // 1024} KiB; "
                f"use fewer stages or smaller tiles"
            )
        if require_wgmma and self.arch >= 90 and not self.uses_wgmma:
            found.append("no wgmma in the PTX: tl.dot did not lower to Hopper warpgroup MMA")
        if require_wgmma and self.arch < 90 and not self.uses_mma:
            found.append("no mma.sync in the PTX: tl.dot did not lower to tensor cores")
        return found

    def check(self, require_wgmma: bool = False) -> None:
        """Raise AssertionError listing every problem: spills, shared memory over the limit, and,
        with require_wgmma, a missing wgmma on sm_90 (on sm_80, which has no wgmma, a missing
        mma.sync)."""
        found = self.problems(require_wgmma)
        if found:
            raise AssertionError(f"{self.name} on sm_{self.arch}:\n  - " + "\n  - ".join(found))


def compile_for(
    kernel,
    signature: dict,
    constexprs: dict | None = None,
    arch: int = 90,
    num_warps: int = 4,
    num_stages: int = 3,
    aligned=None,
    **options,
) -> AotReport:
    """Compile ``kernel`` for sm_{arch} without a GPU and report registers, spills and shared memory.

    kernel: a ``@triton.jit`` function (also one decorated under TRITON_INTERPRET=1, or wrapped in
    ``@triton.autotune`` / ``@triton.heuristics``: the innermost function is compiled).
    signature: runtime argument name -> Triton type ("*fp16", "*bf16", "*fp32", "*i8", "i32", "i64",
    "fp32", ...). Constexpr arguments may be left out. constexprs: constexpr argument name -> value.
    aligned: names of arguments to mark as divisible by 16, as Triton's launcher does for 16-byte
    aligned pointers and integers that are multiples of 16; None marks every pointer argument.
    Mark the strides and sizes that are multiples of 16 in real launches: it can decide whether a
    loop is pipelined (see test_triton_aot.test_divisible_strides_let_the_loop_pipeline).
    options: further compile options (e.g. maxnreg=128, enable_fp_fusion=False).
    """
    if arch not in SHARED_MEMORY_LIMIT:
        raise ValueError(f"arch must be one of {sorted(SHARED_MEMORY_LIMIT)}, got {arch}")
    constexprs = dict(constexprs or {})
    with _compiler_mode():
        fn = as_jit_function(kernel)
        full_signature = _full_signature(fn, signature, constexprs)
        target = triton.backends.compiler.GPUTarget("cuda", arch, 32)
        attrs = _alignment_attrs(fn, full_signature, target, aligned)
        source = triton.compiler.ASTSource(fn=fn, signature=full_signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(source, target=target,
                                  options=dict(num_warps=num_warps, num_stages=num_stages, **options))
    ptx = compiled.asm["ptx"]
    log = run_ptxas(ptx, arch, fp_fusion=getattr(compiled.metadata, "enable_fp_fusion", True))
    usage = parse_ptxas_log(log)
    label = fn.__name__ + ("[" + ", ".join(f"{k}={v}" for k, v in constexprs.items()) + "]" if constexprs else "")
    return AotReport(
        name=label,
        arch=arch,
        num_warps=compiled.metadata.num_warps,
        num_stages=compiled.metadata.num_stages,
        registers=usage["registers"],
        spill_store_bytes=usage["spill_stores"],
        spill_load_bytes=usage["spill_loads"],
        stack_frame_bytes=usage["stack_frame"],
        shared_memory_bytes=compiled.metadata.shared + usage["static_smem"],
        uses_wgmma=re.search(r"(?<![\w.])wgmma\.mma_async", ptx) is not None,
        uses_mma=re.search(r"(?<![\w.])mma\.sync", ptx) is not None,
        ptx=ptx,
        ptxas_log=log,
    )


def report_table(reports) -> str:
    """Markdown table of reports (one row each) for issue notes; problems in the last column."""
    head = ["kernel", "arch", "warps", "stages", "regs", "spill st/ld (B)", "smem (KiB)", "wgmma", "mma.sync",
            "check"]
    rows = [head, ["---"] * len(head)]
    for r in reports:
        problems = r.problems()
        rows.append([
            r.name, f"sm_{r.arch}", str(r.num_warps), str(r.num_stages), str(r.registers),
            f"{r.spill_store_bytes}/{r.spill_load_bytes}",
            f"{r.shared_memory_bytes / 1024:.1f} / {r.shared_memory_limit // 1024}",
            "yes" if r.uses_wgmma else "no", "yes" if r.uses_mma else "no",
            "ok" if not problems else "; ".join(p.split(":")[0] for p in problems),
        ])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


# --------------------------------------------------------------------------------------------
# ptxas
# --------------------------------------------------------------------------------------------


def ptxas_path() -> Path:
    """Triton's bundled ptxas-blackwell (new enough for Triton's PTX), else its plain ptxas."""
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for name in ("ptxas-blackwell", "ptxas"):
        if (bin_dir / name).is_file():
            return bin_dir / name
    raise FileNotFoundError(f"no ptxas in {bin_dir}")


def run_ptxas(ptx: str, arch: int, fp_fusion: bool = True) -> str:
    """``ptxas -v`` on ptx for sm_{arch}; returns its log (raises RuntimeError when ptxas fails)."""
    with tempfile.TemporaryDirectory(prefix="fusedpeft-ptxas-") as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        cmd = [str(ptxas_path()), "-v", f"--gpu-name={PTXAS_GPU_NAME[arch]}", str(src), "-o", os.devnull]
        if not fp_fusion:
            cmd.insert(1, "--fmad=false")
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{log}")
    return log


def parse_ptxas_log(log: str) -> dict:
    """registers, spill_stores, spill_loads, stack_frame and static_smem (bytes) from a ptxas -v log
    of one kernel. Raises ValueError when the log does not contain the lines ptxas -v prints."""
    regs = re.search(r"Used (\d+) registers", log)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or frame is None:
        raise ValueError(f"unrecognised ptxas -v output:\n{log}")
    smem = re.search(r"Used \d+ registers.*?(\d+) bytes smem", log)
    return {
        "registers": int(regs.group(1)),
        "stack_frame": int(frame.group(1)),
        "spill_stores": int(frame.group(2)),
        "spill_loads": int(frame.group(3)),
        "static_smem": int(smem.group(1)) if smem else 0,
    }


# --------------------------------------------------------------------------------------------
# Compiling kernels that were decorated under TRITON_INTERPRET=1
# --------------------------------------------------------------------------------------------


def as_jit_function(kernel):
    """The compilable JITFunction behind kernel (unwrapping autotune/heuristics wrappers).

    A kernel decorated while TRITON_INTERPRET=1 is an InterpretedFunction: it is rebuilt as a
    JITFunction whose globals and closure see JITFunction versions of its interpreted helpers.
    """
    while not isinstance(kernel, (_JITFunction, _InterpretedFunction)) and hasattr(kernel, "fn"):
        kernel = kernel.fn
    if isinstance(kernel, _JITFunction):
        return kernel
    if _InterpretedFunction and isinstance(kernel, _InterpretedFunction):
        return _Rebuilder().function(kernel)
    raise TypeError(f"not a @triton.jit kernel: {kernel!r}")


class _Rebuilder:
    """Rebuilds interpreted @triton.jit functions as JITFunctions, sharing one copy of each
    globals dict, so helpers that call each other (or themselves) stay consistent."""

    def __init__(self):
        self.functions = {}  # id(InterpretedFunction) -> JITFunction
        self.namespaces = {}  # id(original globals dict) -> translated dict
        self.modules = {}  # id(module) -> module or translated stand-in

    def function(self, interpreted):
        if id(interpreted) in self.functions:
            return self.functions[id(interpreted)]
        py_fn = interpreted.fn
        namespace, fresh = self._namespace(py_fn.__globals__)
        closure = None
        if py_fn.__closure__:
            closure = tuple(types.CellType(self.value(c.cell_contents)) for c in py_fn.__closure__)
        rebuilt = types.FunctionType(py_fn.__code__, namespace, py_fn.__name__, py_fn.__defaults__, closure)
        for attr in ("__qualname__", "__module__", "__doc__", "__kwdefaults__"):
            setattr(rebuilt, attr, getattr(py_fn, attr))
        rebuilt.__annotations__ = dict(py_fn.__annotations__)  # tl.constexpr annotations
        jit_fn = _JITFunction(rebuilt, **_jit_kwargs(interpreted))
        self.functions[id(interpreted)] = jit_fn
        if fresh:
            for name, value in list(namespace.items()):
                namespace[name] = self.value(value)
        return jit_fn

    def value(self, value):
        """value with interpreted functions (directly or as module attributes) rebuilt."""
        if _InterpretedFunction and isinstance(value, _InterpretedFunction):
            return self.function(value)
        if isinstance(value, types.ModuleType):
            return self._module(value)
        return value

    def _namespace(self, original: dict) -> tuple[dict, bool]:
        key = id(original)
        if key in self.namespaces:
            return self.namespaces[key], False
        self.namespaces[key] = dict(original)
        return self.namespaces[key], True

    def _module(self, module):
        """module itself, or a stand-in module whose interpreted functions are rebuilt."""
        if id(module) in self.modules:
            return self.modules[id(module)]
        self.modules[id(module)] = module
        members = getattr(module, "__dict__", {})
        if not any(isinstance(v, _InterpretedFunction) for v in list(members.values())):
            return module
        stand_in = types.ModuleType(module.__name__, module.__doc__)
        stand_in.__dict__.update(members)
        self.modules[id(module)] = stand_in
        for name, member in list(members.items()):
            if isinstance(member, _InterpretedFunction):
                stand_in.__dict__[name] = self.function(member)
        return stand_in


def _jit_kwargs(interpreted) -> dict:
    """The @triton.jit options an InterpretedFunction was created with that JITFunction accepts."""
    kwargs = getattr(interpreted, "kwargs", None) or {}
    accepted = inspect.signature(_JITFunction.__init__).parameters
    return {k: v for k, v in kwargs.items() if k in accepted and v is not None}


def _full_signature(fn, signature: dict, constexprs: dict) -> dict:
    """signature in argument order with "constexpr" for constexpr arguments; checks coverage."""
    unknown = (set(signature) | set(constexprs)) - set(fn.arg_names)
    if unknown:
        raise ValueError(f"{fn.__name__} has no argument(s) {sorted(unknown)}; arguments: {fn.arg_names}")
    missing = [a for a in fn.arg_names if a not in signature and a not in constexprs]
    if missing:
        raise ValueError(f"{fn.__name__}: give a type in signature or a value in constexprs for {missing}")
    return {a: "constexpr" if a in constexprs else signature[a] for a in fn.arg_names}


def _alignment_attrs(fn, signature: dict, target, aligned) -> dict:
    """ASTSource attrs marking the chosen arguments as divisible by 16."""
    if aligned is None:
        aligned = [a for a, ty in signature.items() if ty.startswith("*")]
    wrong = [a for a in aligned if signature.get(a, "constexpr") == "constexpr"]
    if wrong:
        raise ValueError(f"aligned names {wrong}, which are not runtime arguments of {fn.__name__}")
    try:
        from triton.compiler.compiler import make_backend

        divisible = make_backend(target).parse_attr("D")  # [["tt.divisibility", 16]]
    except (ImportError, AttributeError):  # pragma: no cover - other triton versions
        divisible = [["tt.divisibility", 16]]
    return {(fn.arg_names.index(a),): divisible for a in aligned}


@contextlib.contextmanager
def _compiler_mode():
    """Interpreter off and Triton's compile cache in a per-process temporary directory."""
    global _CACHE_DIR
    # Import the code generator while the interpreter flag still has its current value: it
    # imports Gluon, which asserts at import time that triton's standard library consists of
    # JITFunctions unless the interpreter is on.
    importlib.import_module("triton.compiler.code_generator")
    if _CACHE_DIR is None:
        _CACHE_DIR = tempfile.TemporaryDirectory(prefix="fusedpeft-triton-aot-")
    saved_env = {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "TRITON_CACHE_DIR")}
    with contextlib.ExitStack() as stack:
        runtime = getattr(_knobs, "runtime", None)
        cache = getattr(_knobs, "cache", None)
        for group in (runtime, cache):
            if group is not None and hasattr(group, "scope"):
                stack.enter_context(group.scope())
        stack.enter_context(_interpreter_patches_undone())
        try:
            os.environ.pop("TRITON_INTERPRET", None)
            os.environ["TRITON_CACHE_DIR"] = _CACHE_DIR.name
            if runtime is not None and hasattr(type(runtime), "interpret"):
                runtime.interpret = False
            if cache is not None and hasattr(type(cache), "dir"):
                cache.dir = _CACHE_DIR.name
            yield
        finally:
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@contextlib.contextmanager
def _interpreter_patches_undone():
    """Put triton.language's own functions back while compiling.

    Each interpreted launch patches the builtins of the triton.language modules its kernel sees
    and restores them afterwards, but a nested @triton.jit call (tl.rand, tl.max, any helper)
    patches the modules the helper sees without restoring them: after such a launch,
    triton.language.core keeps interpreter versions of program_id, arange, load, ... and the code
    generator then fails ("'ir.value' object has no attribute 'dtype'"). The leaked values are
    restored on exit, so the interpreter finds everything as it left it.
    """
    import triton.language as tl

    modules = (tl, tl.core, tl.math)
    leaks = []
    for module in modules:
        for name, value in list(vars(module).items()):
            if _interpreter_made(value):
                leaks.append((module, name, value, _original(name, value, modules)))
    for module, name, _, original in leaks:
        setattr(module, name, original)
    try:
        yield
    finally:
        for module, name, value, _ in leaks:
            setattr(module, name, value)


def _interpreter_made(value) -> bool:
    """True for the stand-ins Triton's interpreter installs in triton.language."""
    fn = value.func if isinstance(value, functools.partial) else value  # multiple_of & co.
    return value is print or (isinstance(fn, types.FunctionType) and fn.__module__ == "triton.runtime.interpreter")


def _original(name: str, value, modules):
    """The function an interpreter stand-in replaced: the wrapped builtin, or the same name in a
    sibling triton.language module that is not patched."""
    wrapped = (getattr(value, "__kwdefaults__", None) or {}).get("member")
    if wrapped is not None and not _interpreter_made(wrapped):
        return wrapped
    for module in modules:
        candidate = vars(module).get(name)
        if candidate is not None and not _interpreter_made(candidate):
            return candidate
    raise RuntimeError(f"cannot undo the interpreter's patch of triton.language {name!r}; compile in a "
                       f"process that has not launched interpreted kernels")
