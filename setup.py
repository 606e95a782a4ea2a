"""Build script for fusedpeft.

The Python package always installs. The C++/CUDA extension ``fusedpeft._C`` is built from
``csrc/`` when that folder holds sources: the CPU sources (``csrc/*.cpp``) always, the CUDA
sources (``csrc/cuda/*.cu``) when torch is a CUDA build and a CUDA toolkit is found
(``CUDA_HOME``). ``FUSEDPEFT_SKIP_EXT=1`` skips the extension entirely. ``MAX_JOBS`` caps the
parallel compile jobs (default: what fits the cores and memory of the machine, at least 1).
Install with ``pip install --no-build-isolation -e .`` so the build uses the installed torch.
"""

import glob
import os

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


def _extensions():
    """Return (ext_modules, cmdclass) for fusedpeft._C, or ([], {}) when nothing is to be built."""
    if os.environ.get("FUSEDPEFT_SKIP_EXT", "0") == "1":
        return [], {}
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    if not cpu_sources:
        return [], {}

    import torch
    from torch.utils import cpp_extension

    os.environ.setdefault("MAX_JOBS", _default_max_jobs())
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    use_cuda = bool(cuda_sources) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        ext = cpp_extension.CUDAExtension(
            "fusedpeft._C",
            cpu_sources + cuda_sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math"]},
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
    install_requires=["torch>=2.4"],
    extras_require={
        "triton": ["triton>=3.0"],
        "hf": ["transformers>=4.46", "peft>=0.13", "safetensors>=0.4"],
        "dev": [
            "triton>=3.0",
            "transformers>=4.46",
            "peft>=0.13",
            "safetensors>=0.4",
            "pytest>=8",
            "pytest-benchmark>=4",
            "ninja",
            "matplotlib>=3.7",
            "numpy",
        ],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
