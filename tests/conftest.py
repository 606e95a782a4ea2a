"""Shared test set-up.

- Without a CUDA GPU, Triton kernels run on CPU tensors under the interpreter: TRITON_INTERPRET=1
  is set here, before anything imports triton.
- ``@pytest.mark.gpu`` tests are skipped without CUDA (bench/gpu_check.sh runs them on a GPU).
- Every test starts from the same RNG state; no CUDA call happens at import time.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if HAS_CUDA else "cpu"


# bench/gpu_check.sh's dry run: the gpu tests run on CPU tensors at tiny shapes (tests/test_gpu.py)
GPU_DRY_RUN = os.environ.get("FUSEDPEFT_GPU_DRY_RUN") == "1"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run bench/gpu_check.sh on one)")
    for item in items:
        if "gpu" in item.keywords and not (GPU_DRY_RUN and "gpu_dry_run" in item.keywords):
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture
def device():
    return DEVICE
