"""Build script for fusedpeft.

The Python package always installs. The C++/CUDA extension ``fusedpeft._C`` is built from
``csrc/``: the CPU sources (``csrc/*.cpp``, ``csrc/cpu/*.cpp``) always, the CUDA sources
(``csrc/cuda/*.cu`` and their torch bindings ``csrc/cuda/*.cpp``) when torch is a CUDA build and a
CUDA toolkit is found (``CUDA_HOME``, else the toolkit of the ``nvcc`` on PATH, resolved through
wrapper scripts), for ``TORCH_CUDA_ARCH_LIST`` (default ``8.0;9.0a``).
``FUSEDPEFT_SKIP_EXT=1`` skips the extension entirely, ``FUSEDPEFT_SKIP_CUDA=1`` builds it for the
CPU only. ``MAX_JOBS`` caps the parallel compile jobs (default: what fits the cores and memory of
the machine, at least 1). Install with ``pip install --no-build-isolation -e .`` so the build uses
the installed torch; ``python setup.py build_ext --inplace`` rebuilds the extension in place.
"""

import glob
import os
import shutil
import subprocess

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _default_max_jobs():
    """About one job per core, and one per 8 GiB of memory (nvcc peaks near that)."""
    cores = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 8.0
    return str(max(1, min(cores, int(mem_gib // 8))))


def _toolkit_root():
    """CUDA_HOME if set, else the root of the toolkit that the nvcc on PATH really runs.

    The nvcc on PATH may be a wrapper script outside the toolkit; nvcc --dryrun prints the
    directory of the real binary (_HERE_), whose parent is the toolkit root."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (out.stdout + out.stderr).splitlines():
        if "_HERE_=" in line:
            return os.path.dirname(line.split("_HERE_=", 1)[1].strip())
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def _nvidia_wheel_includes(torch_dir):
    """Header folders of the nvidia-* wheels next to torch (ATen's CUDA headers include cublas_v2.h)."""
    site = os.path.dirname(torch_dir)
    return sorted(os.path.dirname(h) for h in glob.glob(os.path.join(site, "nvidia", "*", "include", "cublas_v2.h")))


def _extensions():
    """Return (ext_modules, cmdclass) for fusedpeft._C, or ([], {}) when nothing is to be built."""
    if os.environ.get("FUSEDPEFT_SKIP_EXT", "0") == "1":
        return [], {}
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    cuda_bindings = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    if not cpu_sources:
        return [], {}

    import torch

    toolkit = None
    if cuda_sources and torch.version.cuda is not None and os.environ.get("FUSEDPEFT_SKIP_CUDA", "0") != "1":
        toolkit = _toolkit_root()
        if toolkit is not None:
            os.environ["CUDA_HOME"] = toolkit  # read by torch.utils.cpp_extension at import
    from torch.utils import cpp_extension

    os.environ.setdefault("MAX_JOBS", _default_max_jobs())
    cxx_flags = ["-O3", "-g0", "-fopenmp"]
    if toolkit is not None and cpp_extension.CUDA_HOME is not None:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        ext = cpp_extension.CUDAExtension(
            "fusedpeft._C",
            cpu_sources + cuda_bindings + cuda_sources,
            include_dirs=_nvidia_wheel_includes(os.path.dirname(torch.__file__)),
            define_macros=[("FUSEDPEFT_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "fusedpeft._C", cpu_sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"]
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


def _readme() -> str:
    path = os.path.join(ROOT, "README.md")
    return open(path).read() if os.path.exists(path) else ""


ext_modules, cmdclass = _extensions()

setup(
    name="fusedpeft",
    version="0.1.0",
    description="Fused LoRA, MoRA and masked/weighted cross-entropy for fine-tuning LLMs",
    long_description=_readme(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fusedpeft", "fusedpeft.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.11"],
    extras_require={
        "triton": ["triton>=3.6"],
        "hf": ["transformers>=4.46", "peft>=0.13", "safetensors>=0.4"],
        "trl": ["trl>=1.16,<1.17"],  # the fused_lm_head contract fusedpeft/integrations/trl.py serves
        "dev": [
            "triton>=3.6",
            "transformers>=4.46",
            "peft>=0.13",
            "safetensors>=0.4",
            "pytest>=8",
            "pytest-benchmark>=4",
            "ninja",
            "matplotlib>=3.7",
            "numpy",
            "hypothesis>=6.100",
            "bitsandbytes>=0.46",
            "trl>=1.16,<1.17",
        ],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
