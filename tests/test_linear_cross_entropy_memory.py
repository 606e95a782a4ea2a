"""Peak extra memory of linear_cross_entropy forward + backward stays within its chunk budget
(plus its outputs), while F.cross_entropy on full logits needs several rows x V buffers; with the
default budget it stays at or below PyTorch's own chunked F.linear_cross_entropy (torch >= 2.13),
measured the same way in the same run, frozen and trainable heads.

CPU: bench/memory.py's profiler-event method (every c10 CPU allocation and free during the step).
The op keeps the gradients computed in the forward and, on the graph's last backward, scales them
in place and hands them over, so the gradients count once; the rest is small row vectors.
GPU (marked gpu): the CUDA allocator's peak at V = 128256, H = 4096, 8192 rows, bf16.
"""

import sys
from pathlib import Path

import pytest
import torch

import fusedpeft as fp
from fusedpeft.backends import unavailable_reason
from fusedpeft.kernels._common import interpreting

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.memory import cpu_peak_extra_bytes, cuda_peak_extra_bytes  # noqa: E402


def _problem(rows, hidden_size, vocab, dtype, device, trainable):
    hidden = torch.randn(rows, hidden_size, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, device=device) / hidden_size**0.5).to(dtype).requires_grad_(trainable)
    labels = torch.randint(0, vocab, (rows,), device=device)
    labels[::3] = -100
    return hidden, weight, labels


def _steps(hidden, weight, labels, budget, backend, **kw):
    def clear():
        hidden.grad = None
        weight.grad = None

    def fused():
        clear()
        fp.linear_cross_entropy(hidden, weight, labels, chunk_budget_bytes=budget, backend=backend, **kw).backward()

    def eager():
        clear()
        torch.nn.functional.cross_entropy(hidden @ weight.t(), labels).backward()

    return fused, eager


def _output_bytes(hidden, weight):
    return sum(t.numel() * t.element_size() for t in (hidden, weight) if t.requires_grad)


@pytest.mark.parametrize("backend,trainable,chunks_alive", [
    ("torch", False, 1),
    ("torch", True, 1),
    pytest.param("cpu", False, 1, marks=pytest.mark.skipif(
        unavailable_reason("cpu", "cross_entropy", torch.device("cpu")) is not None,
        reason="the C++ extension is not built")),
    pytest.param("cpu", True, 1, marks=pytest.mark.skipif(
        unavailable_reason("cpu", "cross_entropy", torch.device("cpu")) is not None,
        reason="the C++ extension is not built")),
    # The interpreter launches on a host copy of every tensor argument: one more chunk alive.
    pytest.param("triton", False, 2, marks=pytest.mark.skipif(
        not interpreting(), reason="Triton on CPU tensors needs the interpreter (the gpu test covers CUDA)")),
])
def test_cpu_peak_within_chunk_budget(backend, trainable, chunks_alive):
    rows, vocab = (36, 3000) if backend == "triton" else (512, 4000)  # the interpreter is slow
    hidden, weight, labels = _problem(rows, 64, vocab, torch.float32, "cpu", trainable)
    logits_bytes = rows * vocab * 4
    budget = logits_bytes // 4
    fused, eager = _steps(hidden, weight, labels, budget, backend)
    fused()  # first call: lazy initialisation out of the measurement
    eager()
    fused_peak = cpu_peak_extra_bytes(fused)
    eager_peak = cpu_peak_extra_bytes(eager)
    # the gradients computed in the forward are the ones handed over (scaled in place)
    bound = chunks_alive * budget + _output_bytes(hidden, weight) + 64 * rows + 64 * 1024
    assert eager_peak >= 2 * logits_bytes, f"eager peak {eager_peak} should hold logits and their gradient"
    assert fused_peak <= bound, f"{backend}: peak {fused_peak} B > {chunks_alive} x chunk budget {budget} + outputs"
    assert fused_peak <= 0.5 * eager_peak


def _torch_chunked(hidden, weight, labels):
    def step():
        hidden.grad = None
        weight.grad = None
        torch.nn.functional.linear_cross_entropy(hidden, weight, labels, ignore_index=-100,
                                                 options=torch.nn.LinearCrossEntropyOptions()).backward()

    return step


@pytest.mark.skipif(not hasattr(torch.nn, "LinearCrossEntropyOptions"),
                    reason=f"torch {torch.__version__} has no chunked F.linear_cross_entropy (added in 2.13)")
@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=pytest.mark.skipif(
    unavailable_reason("cpu", "cross_entropy", torch.device("cpu")) is not None,
    reason="the C++ extension is not built"))])
@pytest.mark.parametrize("trainable,dtype", [(False, torch.float32), (True, torch.float32), (True, torch.bfloat16)])
def test_cpu_default_peak_not_above_torch_chunked(backend, trainable, dtype):
    """Default chunk budget: our peak <= torch's chunked path's peak (+1%), same method, same run;
    a trainable head's gradient (and, for a bf16 head, any fp32 accumulator) counted."""
    hidden, weight, labels = _problem(1024, 256, 8192, dtype, "cpu", trainable)
    fused, _ = _steps(hidden, weight, labels, None, backend)
    chunked = _torch_chunked(hidden, weight, labels)
    fused()
    chunked()
    fused_peak = cpu_peak_extra_bytes(fused)
    chunked_peak = cpu_peak_extra_bytes(chunked)
    assert fused_peak <= 1.01 * chunked_peak, (
        f"{backend}: peak {fused_peak / 2**20:.2f} MiB > torch chunked {chunked_peak / 2**20:.2f} MiB")


@pytest.mark.gpu
def test_cuda_peak_llama3_head_bf16():
    """Triton backend, frozen head: peak <= budget + 2 x grad_hidden + one chunk of compacted
    hidden rows and their gradient, and <= 10% of eager F.cross_entropy on full logits."""
    rows, hidden_size, vocab = 8192, 4096, 128256
    hidden, weight, labels = _problem(rows, hidden_size, vocab, torch.bfloat16, "cuda", False)
    budget = 256 * 2**20
    fused, eager = _steps(hidden, weight, labels, budget, "triton")
    fused()
    eager()
    fused_peak = cuda_peak_extra_bytes(fused, hidden.device)
    eager_peak = cuda_peak_extra_bytes(eager, hidden.device)
    chunk_rows = budget // (vocab * 2)
    bound = budget + 2 * _output_bytes(hidden, weight) + 2 * chunk_rows * hidden_size * 2 + 2**20
    assert fused_peak <= bound, f"peak {fused_peak / 2**20:.1f} MiB > {bound / 2**20:.1f} MiB"
    assert fused_peak <= 0.1 * eager_peak, f"peak {fused_peak / 2**20:.1f} MiB vs eager {eager_peak / 2**20:.1f} MiB"
