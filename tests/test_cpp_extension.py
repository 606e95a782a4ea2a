"""The C++/CUDA extension fusedpeft._C (csrc/): its CPU kernels against the reference, op by op,
forward and gradients at odd shapes in fp32/fp16/bf16/fp64; dropout masks bit-identical to the
reference and to Triton's tl.rand (interpreter); argument errors; which dispatch keys have kernels.
The layers' and losses' own parity tests (test_lora_layer.py, ...) also run the "cpu" backend.
gpu-marked tests (bench/gpu_check.sh) compare the CUDA kernels with the reference, the CPU
kernels and the Triton backend."""

import os

import pytest
import torch

from fusedpeft import backends
from fusedpeft import reference as ref
from fusedpeft.ops.cross_entropy import cross_entropy, linear_cross_entropy
from fusedpeft.ops.lora import lora_linear
from fusedpeft.ops.mora import mora_linear
from helpers import DTYPES, assert_within, grads

if backends.unavailable_reason("cpu") is not None:
    pytest.skip(f"the C++ extension is not available: {backends.unavailable_reason('cpu')}", allow_module_level=True)

import fusedpeft._C as ext  # noqa: E402
from fusedpeft.cpp_backend import OP_NAMES, has_kernels_for  # noqa: E402

ops = torch.ops.fusedpeft_C
SEED = 0x5DEECE66D2F1A3B7
CUDA = torch.cuda.is_available()


def _baseline(fn, dtype, *tensors):
    """fn evaluated by plain PyTorch in ``dtype`` (the error budget of assert_within)."""
    return fn(*(t.detach().to(dtype) if torch.is_tensor(t) and t.is_floating_point() else t for t in tensors))


# ----------------------------------------------------------------------------------- registration


def test_cpu_backend_is_automatic_on_cpu():
    assert has_kernels_for("CPU")
    for family in backends.FAMILIES:
        assert backends.resolve_backend(family, None, torch.device("cpu")) == "cpu"


def test_cuda_kernels_registered_for_cuda_dispatch_key():
    if not ext.built_with_cuda:
        pytest.skip("fusedpeft._C was built without CUDA (no nvcc or a CPU-only torch at install time)")
    for name in OP_NAMES:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedpeft_C::{name}", "CUDA"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedpeft_C::{name}", "CPU"), name


# ----------------------------------------------------------------------------------- dropout masks


@pytest.mark.parametrize("p", [0.05, 0.5])
@pytest.mark.parametrize("seed", [0, 2**32 + 5, SEED, 2**63 - 1])
def test_dropout_masks_bit_identical_to_reference(p, seed):
    """Every kernel that drops x regenerates exactly reference.dropout_keep_mask."""
    n, k = 37, 129
    keep = ref.dropout_keep_mask(seed, n, k, p)
    scale = torch.tensor(1.0 / (1.0 - p), dtype=torch.float64)
    ones = torch.ones(n, k, dtype=torch.float64)
    expected = keep.double() * scale
    f64 = dict(dtype=torch.float64)
    shrink = ops.lora_shrink(ones, torch.eye(k, **f64), p, seed)  # dropout(x) @ I
    _, grad_A = ops.lora_shrink_backward(ones, torch.eye(n, **f64), torch.ones(n, k, **f64), p, seed, False, True)
    grad_x, _ = ops.lora_shrink_backward(ones, torch.ones(n, 1, **f64), torch.ones(1, k, **f64), p, seed, True, False)
    compress = ops.mora_compress(ones, k, 2, p, seed, None, None)  # groups of one feature: dropout(x) itself
    compress_t = ops.mora_compress_backward(ones, k, k, 2, p, seed, None, None, torch.float64)
    for name, got in [("lora_shrink", shrink), ("lora grad_A", grad_A), ("lora grad_x", grad_x),
                      ("mora_compress", compress), ("mora_compress_backward", compress_t)]:
        assert torch.equal(got, expected), name


_ISA_CHECK = """
import sys, torch
import fusedpeft._C as ext
from fusedpeft import reference as ref
seed, p, first, n = {seed}, {p}, {first}, {n}
keep = torch.empty(n, dtype=torch.uint8)
ext.philox_keep(keep, seed, p, first)
expected = ref.philox_uniform(seed, torch.arange(first, first + n, dtype=torch.int64)) >= p
print(ext.philox_isa(), int((keep.bool() != expected).sum()), int(keep.sum()))
"""


@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
def test_every_philox_instruction_set_matches_reference(isa):
    """Each hand-vectorised generator (FUSEDPEFT_CPU_ISA caps the choice) against the reference,
    with a length that leaves a scalar tail and offsets that wrap past 2^32."""
    import os
    import subprocess
    import sys

    code = _ISA_CHECK.format(seed=SEED, p=0.3, first=2**32 - 700, n=1000 + 13)
    env = dict(os.environ, FUSEDPEFT_CPU_ISA=isa)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    used, mismatches, kept = out.split()
    if used != isa:
        pytest.skip(f"this CPU cannot run {isa} (the generator fell back to {used})")
    assert int(mismatches) == 0
    assert 600 < int(kept) < 820  # about 70 % of 1013 kept: the comparison saw a real mask


def test_philox_keep_rejects_a_wrong_buffer():
    with pytest.raises(RuntimeError, match="keep must be a contiguous uint8 CPU tensor, got Float"):
        ext.philox_keep(torch.empty(8), SEED, 0.5, 0)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the Triton kernel under the interpreter")
def test_dropout_mask_matches_triton_interpreter():
    from test_dropout_rng import keep_mask_kernel  # Triton's tl.rand, run by the interpreter on CPU

    n, k, p = 5, 77, 0.3
    keep = torch.empty(n, k, dtype=torch.int8)
    u = torch.empty(n, k, dtype=torch.float32)
    keep_mask_kernel[(1, 3)](keep, u, SEED, p, 0, 0, k, n, k, BLOCK_M=8, BLOCK_N=32)
    dropped = ops.lora_shrink(torch.ones(n, k), torch.eye(k), p, SEED)
    assert torch.equal(dropped != 0, keep.bool())


# ----------------------------------------------------------------------------------- cross-entropy


@pytest.mark.parametrize("dtype,atol", DTYPES + [(torch.float64, 1e-12)])
@pytest.mark.parametrize("vocab", [1003, 4099])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 7.0}])
def test_cross_entropy_matches_reference(dtype, atol, vocab, options):
    """Vocabularies below and above the kernel's 2048-wide block (the online logsumexp merges blocks)."""
    n = 13
    logits = (torch.randn(n, vocab) * 4).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (n,))
    labels[3] = -100
    mask = torch.rand(n) < 0.3
    kw = dict(instruction_mask=mask, instruction_weight=0.0, token_weights=torch.rand(n, dtype=torch.float64) + 0.5,
              **options)
    loss = cross_entropy(logits, labels, backend="cpu", **kw)
    z64 = logits.detach().double().requires_grad_()
    expected = ref.masked_cross_entropy(z64, labels, **kw)
    baseline = _baseline(lambda z: ref.masked_cross_entropy(z, labels, **kw), dtype, logits)
    assert_within(loss, expected, baseline, atol, "loss")
    (g,) = grads(loss, [logits], torch.ones(()))
    (g64,) = grads(expected, [z64], torch.ones((), dtype=torch.float64))
    z_b = logits.detach().clone().requires_grad_()
    (g_b,) = grads(ref.masked_cross_entropy(z_b, labels, **kw), [z_b], torch.ones(()))
    assert_within(g, g64, g_b, atol, "grad_logits")
    assert torch.all(g[3] == 0) and torch.all(g[mask] == 0)


def test_cross_entropy_in_place_gradient_and_skipped_rows():
    z = torch.randn(6, 3001)
    labels = torch.randint(0, 3001, (6,))
    scale = torch.tensor([0.5, 0.0, 1.0, 2.0, 0.0, 1.5])
    loss, lse = ops.ce_forward(z, labels, scale, 0.1, 1e-4, 0.0)
    grad = ops.ce_backward(z, labels, scale, lse, 0.1, 1e-4, 0.0)
    buffer = z.clone()
    loss_inplace = ops.ce_loss_and_grad_(buffer, labels, scale, 0.1, 1e-4, 0.0)
    torch.testing.assert_close(buffer, grad, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(loss_inplace, loss)
    assert torch.all(lse[[1, 4]] == 0) and torch.all(loss[[1, 4]] == 0) and torch.all(grad[[1, 4]] == 0)
    torch.testing.assert_close(lse[[0, 2, 3, 5]], torch.logsumexp(z, 1)[[0, 2, 3, 5]])


@pytest.mark.parametrize("dtype,atol", DTYPES[:2])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_matches_reference(dtype, atol, reduction):
    hidden = torch.randn(11, 24).to(dtype).requires_grad_()
    weight = (torch.randn(1003, 24) / 5).to(dtype).requires_grad_()
    bias = torch.randn(1003).to(dtype).requires_grad_()
    labels = torch.randint(0, 1003, (11,))
    labels[0] = -100
    kw = dict(reduction=reduction, label_smoothing=0.05, z_loss=1e-3, softcap=9.0)
    loss = linear_cross_entropy(hidden, weight, labels, bias, chunk_budget_bytes=4 * 1003 * 4, backend="cpu", **kw)
    inputs64 = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    expected = ref.linear_cross_entropy(inputs64[0], inputs64[1], labels, inputs64[2], **kw)
    baseline = _baseline(lambda h, w, b: ref.linear_cross_entropy(h, w, labels, b, **kw), dtype, hidden, weight, bias)
    assert_within(loss, expected, baseline, atol, "loss")
    grad_out = torch.randn_like(expected)
    got = grads(loss, [hidden, weight, bias], grad_out.to(loss.dtype))
    want = grads(expected, inputs64, grad_out)
    base_inputs = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    base = grads(ref.linear_cross_entropy(*base_inputs[:2], labels, base_inputs[2], **kw), base_inputs,
                 grad_out.to(torch.float32))
    for name, g, g64, gb in zip(("hidden", "weight", "bias"), got, want, base):
        assert_within(g, g64, gb, atol, f"grad_{name}")


# ----------------------------------------------------------------------------------- LoRA and MoRA


@pytest.mark.parametrize("dtype,atol", DTYPES + [(torch.float64, 1e-12)])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_lora_matches_reference(dtype, atol, dropout_p):
    x = torch.randn(7, 33).to(dtype).requires_grad_()
    weight = (torch.randn(65, 33) / 6).to(dtype)
    bias = torch.randn(65).to(dtype)
    adapter_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    A = (torch.randn(5, 33) / 6).to(adapter_dtype).requires_grad_()
    B = torch.randn(65, 5).to(adapter_dtype).requires_grad_()
    seed = torch.tensor(SEED)
    y = lora_linear(x, weight, bias, A, B, 0.7, dropout_p, seed, backend="cpu")
    inputs64 = [t.detach().double().requires_grad_() for t in (x, A, B)]
    y64 = ref.lora_linear(inputs64[0], weight.double(), bias.double(), *inputs64[1:], 0.7, dropout_p, int(seed))
    base_inputs = [t.detach().to(dtype).requires_grad_() for t in (x, A, B)]
    y_b = ref.lora_linear(base_inputs[0], weight, bias, *base_inputs[1:], 0.7, dropout_p, int(seed)).to(dtype)
    assert_within(y, y64, y_b, atol, "y")
    grad_y = torch.randn(7, 65, dtype=torch.float64)
    for name, g, g64, gb in zip(("x", "A", "B"), grads(y, [x, A, B], grad_y.to(dtype)), grads(y64, inputs64, grad_y),
                                grads(y_b, base_inputs, grad_y.to(dtype))):
        assert_within(g, g64, gb, atol, f"grad_{name}")


def test_lora_dropout_over_many_blocks_and_threads():
    """Rows spread over several blocks of the shrink kernels (worker threads; adapters require grad)."""
    x = torch.randn(200, 700, requires_grad=True)
    weight, A, B = torch.randn(90, 700) / 30, (torch.randn(6, 700) / 30).requires_grad_(), torch.randn(90, 6)
    B.requires_grad_()
    y = lora_linear(x, weight, None, A, B, 1.5, 0.2, torch.tensor(SEED), backend="cpu")
    inputs64 = [t.detach().double().requires_grad_() for t in (x, A, B)]
    y64 = ref.lora_linear(inputs64[0], weight.double(), None, *inputs64[1:], 1.5, 0.2, SEED)
    base_inputs = [t.detach().clone().requires_grad_() for t in (x, A, B)]
    y_b = ref.lora_linear(base_inputs[0], weight, None, *base_inputs[1:], 1.5, 0.2, SEED)
    assert_within(y, y64, y_b, 1e-5, "y")
    grad_y = torch.randn(200, 90, dtype=torch.float64)
    for name, g, g64, gb in zip(("x", "A", "B"), grads(y, [x, A, B], grad_y.float()), grads(y64, inputs64, grad_y),
                                grads(y_b, base_inputs, grad_y.float())):
        assert_within(g, g64, gb, 1e-5, f"grad_{name}")


# (dtype, atol, strategy) x (k, d, r_hat, dropout_p), but for the merged strategy, which is dropout-free
MORA_CASES = [(*kind, *shape) for kind in ((torch.float32, 1e-5, "explicit"), (torch.float32, 1e-5, "merged"),
                                           (torch.float16, 1e-3, "explicit"))
              for shape in ((33, 65, 8, 0.0), (65, 33, 6, 0.25), (30, 7, 6, 0.0))
              if not (kind[2] == "merged" and shape[3])]


@pytest.mark.parametrize("mora_type", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("dtype,atol,strategy,k,d,r_hat,dropout_p", MORA_CASES)
def test_mora_matches_reference(mora_type, dtype, atol, strategy, k, d, r_hat, dropout_p):
    """Odd sizes: wrap padding, n R < D (tiled type-6 chunks) and n R > D (truncated), dropout."""
    from fusedpeft.cpp_backend import mora as cpp_mora

    n = 70 if strategy == "merged" else 9
    x = torch.randn(n, k).to(dtype).requires_grad_()
    weight = (torch.randn(d, k) / 5).to(dtype)
    bias = torch.randn(d).to(dtype)
    M = (torch.randn(r_hat, r_hat) / 4).requires_grad_()
    seed = torch.tensor(SEED)
    y = mora_linear(x, weight, bias, M, mora_type, dropout_p, seed, backend="cpu")
    assert cpp_mora.choose_strategy(x, dropout_p) == strategy
    x64, M64 = (t.detach().double().requires_grad_() for t in (x, M))
    y64 = ref.mora_linear(x64, weight.double(), bias.double(), M64, mora_type, dropout_p, int(seed))
    x_b, M_b = x.detach().clone().requires_grad_(), M.detach().to(dtype).requires_grad_()
    y_b = ref.mora_linear(x_b, weight, bias, M_b, mora_type, dropout_p, int(seed)).to(dtype)
    assert_within(y, y64, y_b, atol, "y")
    grad_y = torch.randn(n, d, dtype=torch.float64)
    for name, g, g64, gb in zip(("x", "M"), grads(y, [x, M], grad_y.to(dtype)), grads(y64, [x64, M64], grad_y),
                                grads(y_b, [x_b, M_b], grad_y.to(dtype))):
        assert_within(g, g64, gb, atol, f"grad_{name}")


@pytest.mark.parametrize("k,d,r_hat", [(1024, 1024, 128), (230, 230, 46), (33, 65, 8), (30, 7, 6), (90, 300, 14)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_mora_type6_merge_and_weight_grad_match_reference(k, d, r_hat, dtype):
    """The merged-strategy pieces of type 6 on their own: W + ΔW and dM, against autograd of the
    float64 reference (wrap padding, tiled chunks (n R < D) and truncated ones (n R > D)). Plain
    chunks in float32 take the AVX-512 kernel where the CPU has it: 150 rows = 64 + 64 + 22, R = 46
    leaves partial 12 x 32 tiles."""
    from fusedpeft.host.mora_maps import rope_tables

    n_chunks = -(-k // r_hat)
    cos, sin = rope_tables(r_hat, n_chunks, torch.device("cpu"))
    weight, x, grad_y = (torch.randn(*shape).to(dtype) for shape in ((d, k), (150, k), (150, d)))
    M = torch.randn(r_hat, r_hat, dtype=torch.float64) / 4
    M64 = M.clone().requires_grad_()
    y_branch = ref.mora_linear(x.double(), torch.zeros(d, k, dtype=torch.float64), None, M64, 6, 0.0, None)
    (grad_M64,) = torch.autograd.grad(y_branch, M64, grad_y.double())
    delta64 = ref.mora_linear(torch.eye(k, dtype=torch.float64), torch.zeros(d, k, dtype=torch.float64), None, M, 6,
                              0.0, None).t()  # ΔW [D, K]: the branch applied to the unit vectors

    merged = ops.mora_rope_merge(weight, M.to(torch.float32 if dtype == torch.bfloat16 else dtype), r_hat, cos, sin)
    assert merged.dtype == dtype
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(merged.double(), weight.double() + delta64, atol=tol * (1 + delta64.abs().max()),
                               rtol=tol)
    grad_M = ops.mora_rope_weight_grad(x, grad_y, r_hat, cos, sin)
    assert grad_M.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    scale = float(grad_M64.abs().max())
    assert float((grad_M.double() - grad_M64).abs().max()) <= {torch.float64: 1e-12, torch.float32: 1e-5,
                                                               torch.bfloat16: 1e-5}[dtype] * scale


# ----------------------------------------------------------------------------------- argument errors


def test_errors_name_the_argument():
    z, labels, scale = torch.randn(4, 10), torch.zeros(4, dtype=torch.long), torch.ones(4)
    with pytest.raises(RuntimeError, match=r"ce_forward: logits must be a 2-D tensor \[N, V\], got shape \[40\]"):
        ops.ce_forward(z.view(-1), labels, scale, 0.0, 0.0, 0.0)
    with pytest.raises(RuntimeError, match=r"ce_forward: labels must be Long, got Int"):
        ops.ce_forward(z, labels.int(), scale, 0.0, 0.0, 0.0)
    with pytest.raises(RuntimeError, match=r"ce_backward: lse must have shape \[4\], got shape \[3\]"):
        ops.ce_backward(z, labels, scale, torch.zeros(3), 0.0, 0.0, 0.0)
    with pytest.raises(RuntimeError, match=r"labels\[2\] = 10 is outside \[0, 10\)"):
        ops.ce_forward(z, torch.tensor([0, 1, 10, 3]), scale, 0.0, 0.0, 0.0)
    with pytest.raises(RuntimeError, match=r"ce_forward: row_scale must be Float, got Double"):
        ops.ce_forward(z, labels, scale.double(), 0.0, 0.0, 0.0)
    with pytest.raises(RuntimeError, match=r"ce_loss_and_grad_: logits must be contiguous"):
        ops.ce_loss_and_grad_(torch.randn(10, 4).t(), labels, scale, 0.0, 0.0, 0.0)
    x = torch.randn(3, 8)
    with pytest.raises(RuntimeError,
                       match=r"lora_shrink: lora_A must have shape \[r, 8\] to match x \[3, 8\], got \[2, 7\]"):
        ops.lora_shrink(x, torch.randn(2, 7), 0.0, 0)
    with pytest.raises(RuntimeError, match=r"lora_shrink: dropout_p must be in \[0, 1\), got 1"):
        ops.lora_shrink(x, torch.randn(2, 8), 1.0, 0)
    with pytest.raises(RuntimeError, match=r"lora_shrink: x must be float16, bfloat16, float32 or float64, got Long"):
        ops.lora_shrink(x.long(), torch.randn(2, 8), 0.0, 0)
    with pytest.raises(RuntimeError, match=r"lora_shrink_backward: grad_S must have shape \[3, 2\], got \[3, 5\]"):
        ops.lora_shrink_backward(x, torch.randn(3, 5), torch.randn(2, 8), 0.0, 0, True, True)
    with pytest.raises(RuntimeError, match=r"mora_compress: mora_type must be 1, 2, 3, 4 or 6, got 5"):
        ops.mora_compress(x, 4, 5, 0.0, 0, None, None)
    with pytest.raises(RuntimeError, match=r"mora_compress: cos and sin tables are required for mora_type 6"):
        ops.mora_compress(x, 4, 6, 0.0, 0, None, None)
    with pytest.raises(RuntimeError, match=r"mora_compress: wrap padding 5 exceeds in_features 3"):
        ops.mora_compress(torch.randn(2, 3), 8, 1, 0.0, 0, None, None)
    with pytest.raises(RuntimeError,
                       match=r"mora_decompress: y_slots must have r_hat \(4\) columns, got shape \[3, 5\]"):
        ops.mora_decompress(torch.randn(3, 5), 9, 4, 1, None, torch.float32)
    with pytest.raises(RuntimeError, match=r"mora_compress_backward: grad_z must have 4 columns for mora_type 1"):
        ops.mora_compress_backward(torch.randn(3, 5), 8, 4, 1, 0.0, 0, None, None, torch.float32)
    cos, sin = torch.ones(2, 4), torch.zeros(2, 4)
    with pytest.raises(RuntimeError, match=r"mora_rope_merge: M must have shape \[4, 4\], got shape \[4, 3\]"):
        ops.mora_rope_merge(torch.randn(6, 8), torch.randn(4, 3), 4, cos, sin)
    with pytest.raises(RuntimeError, match=r"mora_rope_merge: r_hat must be even for mora_type 6, got 3"):
        ops.mora_rope_merge(torch.randn(6, 8), torch.randn(3, 3), 3, cos, sin)
    with pytest.raises(RuntimeError, match=r"mora_rope_weight_grad: cos must have shape \[2, 4\], got shape \[3, 4\]"):
        ops.mora_rope_weight_grad(torch.randn(5, 8), torch.randn(5, 6), 4, torch.ones(3, 4), sin)
    with pytest.raises(RuntimeError,
                       match=r"mora_rope_weight_grad: grad_y must have 5 rows like x, got shape \[4, 6\]"):
        ops.mora_rope_weight_grad(torch.randn(5, 8), torch.randn(4, 6), 4, cos, sin)


# ----------------------------------------------------------------------------------- GPU (gpu_check.sh)


def _cuda_backend_or_skip():
    reason = backends.unavailable_reason("cuda", "lora", torch.device("cuda"))
    if reason:
        pytest.skip(reason)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_cuda_kernels_match_cpu_kernels(dtype):
    """Op by op: same masks (bit for bit), same values within the dtype's rounding."""
    _cuda_backend_or_skip()
    n, k, r, vocab = 67, 1031, 12, 5003
    x = torch.randn(n, k).to(dtype)
    A = torch.randn(r, k) / 10
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    for p in (0.0, 0.1):
        cpu = ops.lora_shrink(x, A, p, SEED)
        gpu = ops.lora_shrink(x.cuda(), A.cuda(), p, SEED).cpu()
        torch.testing.assert_close(gpu.float(), cpu.float(), **tol)
        gS = torch.randn(n, r)
        for got, want in zip(ops.lora_shrink_backward(x.cuda(), gS.cuda(), A.cuda(), p, SEED, True, True),
                             ops.lora_shrink_backward(x, gS, A, p, SEED, True, True)):
            torch.testing.assert_close(got.cpu().float(), want.float(), **tol)
            assert torch.equal(got.cpu() == 0, want == 0)
    z = (torch.randn(n, vocab) * 3).to(dtype)
    labels = torch.randint(0, vocab, (n,))
    scale = (torch.rand(n) > 0.2).float()
    for options in ((0.0, 0.0, 0.0), (0.1, 1e-3, 15.0)):
        loss, lse = ops.ce_forward(z, labels, scale, *options)
        loss_g, lse_g = ops.ce_forward(z.cuda(), labels.cuda(), scale.cuda(), *options)
        torch.testing.assert_close(loss_g.cpu(), loss, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(lse_g.cpu(), lse, rtol=1e-4, atol=1e-4)
        grad = ops.ce_backward(z, labels, scale, lse, *options)
        grad_g = ops.ce_backward(z.cuda(), labels.cuda(), scale.cuda(), lse_g, *options)
        torch.testing.assert_close(grad_g.cpu().float(), grad.float(), **tol)
    for mora_type in (1, 2, 3, 4, 6):
        r_hat = 10
        cos, sin = ref.mora_rope_tables(r_hat, (k + (-k) % r_hat) // r_hat)
        tables = (cos, sin) if mora_type == 6 else (None, None)
        z_cpu = ops.mora_compress(x, r_hat, mora_type, 0.1, SEED, *tables)
        z_gpu = ops.mora_compress(x.cuda(), r_hat, mora_type, 0.1, SEED, *(t.cuda() if t is not None else None
                                                                             for t in tables))
        torch.testing.assert_close(z_gpu.cpu(), z_cpu, rtol=1e-4, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["lora", "mora", "cross_entropy"])
def test_gpu_cuda_backend_matches_triton_backend(family):
    _cuda_backend_or_skip()
    if backends.unavailable_reason("triton", family, torch.device("cuda")):
        pytest.skip(backends.unavailable_reason("triton", family, torch.device("cuda")))
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(512, 1024, device=dev, dtype=dt)
    W = torch.randn(768, 1024, device=dev, dtype=dt) / 32
    seed = torch.tensor(SEED)
    if family == "lora":
        A = (torch.randn(16, 1024, device=dev) / 32).requires_grad_()
        B = (torch.randn(768, 16, device=dev) / 4).requires_grad_()
        outs = [lora_linear(x, W, None, A, B, 2.0, 0.05, seed, backend=b) for b in ("cuda", "triton")]
    elif family == "mora":
        M = (torch.randn(88, 88, device=dev) / 10).requires_grad_()
        outs = [mora_linear(x, W, None, M, 6, 0.05, seed, backend=b) for b in ("cuda", "triton")]
    else:
        logits = torch.randn(512, 32000, device=dev, dtype=dt)
        labels = torch.randint(0, 32000, (512,), device=dev)
        outs = [cross_entropy(logits, labels, label_smoothing=0.1, backend=b) for b in ("cuda", "triton")]
    torch.testing.assert_close(outs[0].float(), outs[1].float(), rtol=2e-2, atol=2e-2)
