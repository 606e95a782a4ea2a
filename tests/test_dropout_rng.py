"""docs/contract.md §5 dropout randomness: the reference Philox against published vectors and against Triton.

- reference.philox4x32_words against Random123's known-answer vectors for Philox4x32-10;
- reference.philox_uniform / dropout_keep_mask against Triton's own tl.randint / tl.rand, bit for
  bit, through a kernel that builds the [M, K] keep mask exactly as docs/contract.md §5 words it, with the
  32-bit counter wrapping past 2**31 and 2**32;
- statistics with 6-sigma binomial bounds, so the checks do not flake.

Kernels run under the interpreter on a CPU machine (about 1 ms per program): grids stay tiny.
"""

import math

import pytest
import torch
import triton
import triton.language as tl

from fusedpeft import reference

# seed 0, small seeds, seeds in the interpreter's uint32 range and just above 2**32 (low word
# small, high word 1), the largest seed new_dropout_seed() can draw, 2**63 - 1, and random 63-bit
SEEDS = [0, 7, 2**31 + 3, 2**32 + 5, 2**63 - 2, 2**63 - 1, 0x5DEECE66D2F1A3B7, 0x1B873593CC9E2D51]

# Random123 known-answer vectors for Philox4x32-10: (key k0, k1), counter (c0..c3) -> output words
PHILOX_KAT = [
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000, 0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0xA4093822, 0x299F31D0), (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@triton.jit
def philox_probe_kernel(offset_ptr, word_ptr, u_ptr, seed, n, BLOCK: tl.constexpr):
    """word = tl.randint(seed, offset) and u = tl.rand(seed, offset) for int32 offsets."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    offset = tl.load(offset_ptr + i, mask=mask, other=0)
    tl.store(word_ptr + i, tl.randint(seed, offset), mask=mask)
    tl.store(u_ptr + i, tl.rand(seed, offset), mask=mask)


@triton.jit
def keep_mask_kernel(keep_ptr, u_ptr, seed, p, row_start, col_start, K, n_rows, n_cols,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """docs/contract.md §5 keep mask of the window rows [row_start, +n_rows) x cols [col_start, +n_cols) of an
    [M, K] input: u = tl.rand(seed, (m * K + j) mod 2**32 as int32); keep = u >= p. Writes keep
    (int8) and u (float32) as [n_rows, n_cols]."""
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = row_start + r.to(tl.int64)
    j = col_start + c.to(tl.int64)
    offset = (m[:, None] * K + j[None, :]).to(tl.int32)  # keeps the low 32 bits
    u = tl.rand(seed, offset)
    mask = (r[:, None] < n_rows) & (c[None, :] < n_cols)
    out = r[:, None] * n_cols + c[None, :]
    tl.store(u_ptr + out, u, mask=mask)
    tl.store(keep_ptr + out, (u >= p).to(tl.int8), mask=mask)


def _keep_mask(device, seed, p, n_rows, n_cols, K, row_start=0, col_start=0):
    """Launch keep_mask_kernel; returns (keep bool [n_rows, n_cols], u float32) on the CPU."""
    keep = torch.empty(n_rows, n_cols, dtype=torch.int8, device=device)
    u = torch.empty(n_rows, n_cols, dtype=torch.float32, device=device)
    block_m, block_n = 16, 64
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_n))
    keep_mask_kernel[grid](keep, u, seed, p, row_start, col_start, K, n_rows, n_cols, BLOCK_M=block_m, BLOCK_N=block_n)
    return keep.bool().cpu(), u.cpu()


def _bits(x: torch.Tensor) -> torch.Tensor:
    """float32 -> its int32 bit pattern (for bit-for-bit comparisons)."""
    return x.contiguous().view(torch.int32)


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> the int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _assert_binomial(count: int, n: int, prob: float, what: str, sigmas: float = 6.0):
    """count ~ Binomial(n, prob) within `sigmas` standard deviations."""
    sd = math.sqrt(n * prob * (1 - prob))
    assert abs(count - n * prob) <= sigmas * sd, (
        f"{what}: {count} of {n}, expected {n * prob:.1f} +- {sigmas} x {sd:.1f}")


# --------------------------------------------------------------------------------------------
# Known-answer vectors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key, counter, expected", PHILOX_KAT, ids=["zeros", "ones", "pi"])
def test_philox4x32_10_known_answers(key, counter, expected):
    c0 = torch.tensor([counter[0]], dtype=torch.int64)
    words = reference.philox4x32_words(key[0], key[1], (c0, *counter[1:]))
    assert [int(w.item()) for w in words] == list(expected)


def test_philox4x32_is_elementwise_over_counter_tensors():
    """The vectorised form gives each element the words of its own counter (vector 3's key)."""
    counters = torch.tensor([[0, 1], [2**31, 2**32 - 1]], dtype=torch.int64)
    batched = reference.philox4x32_words(0xA4093822, 0x299F31D0, (counters, 0, 0, 0))
    for idx in [(0, 0), (0, 1), (1, 0), (1, 1)]:
        single = reference.philox4x32_words(0xA4093822, 0x299F31D0, (counters[idx].reshape(1), 0, 0, 0))
        assert [int(w[idx]) for w in batched] == [int(w.item()) for w in single]
    assert len({int(w) for w in batched[0].flatten()}) == 4


# --------------------------------------------------------------------------------------------
# Reference == Triton's tl.randint / tl.rand, bit for bit
# --------------------------------------------------------------------------------------------


def _probe_offsets() -> torch.Tensor:
    """int32 offsets covering the edges of the 32-bit counter and 100 random values."""
    edges = [0, 1, 2, 3, 1000, 2**31 - 2, 2**31 - 1, -(2**31), -(2**31) + 1, -2, -1]
    rand = torch.randint(-(2**31), 2**31, (100,), dtype=torch.int64, generator=torch.Generator().manual_seed(1))
    return torch.cat([torch.tensor(edges, dtype=torch.int64), rand]).to(torch.int32)


@pytest.mark.parametrize("seed", SEEDS, ids=hex)
def test_reference_matches_tl_rand_bit_for_bit(seed, device):
    offsets = _probe_offsets()
    n = offsets.numel()
    word = torch.empty(n, dtype=torch.int32, device=device)
    u = torch.empty(n, dtype=torch.float32, device=device)
    philox_probe_kernel[(triton.cdiv(n, 64),)](offsets.to(device), word, u, seed, n, BLOCK=64)
    expected_word = _as_int32(reference.philox4x32(seed, offsets.to(torch.int64) & 0xFFFFFFFF)[0])
    assert torch.equal(word.cpu(), expected_word)
    expected_u = reference.philox_uniform(seed, offsets)
    assert expected_u.dtype == torch.float32
    assert torch.equal(_bits(u.cpu()), _bits(expected_u))


# (K, row_start, n_rows): full rows, so keep == reference.dropout_keep_mask(..., row_start)
ROW_WINDOWS = {
    "small": (37, 0, 9),
    "crosses_2**31": (37, 2**31 // 37 - 2, 5),
    "crosses_2**32": (37, 2**32 // 37 - 2, 5),
    "past_3*2**32": (100, 3 * 2**32 // 100 - 1, 3),
}


@pytest.mark.parametrize("window", list(ROW_WINDOWS), ids=str)
@pytest.mark.parametrize("seed", SEEDS[1::2], ids=hex)
def test_keep_mask_matches_reference_across_the_counter_wrap(window, seed, device):
    K, row_start, n_rows = ROW_WINDOWS[window]
    counters = torch.arange(row_start * K, (row_start + n_rows) * K, dtype=torch.int64)
    if window.startswith("crosses"):  # the window really straddles the boundary
        boundary = 2**31 if window.endswith("31") else 2**32
        assert counters.min() < boundary <= counters.max()
    p = 0.3
    keep, u = _keep_mask(device, seed, p, n_rows, K, K, row_start=row_start)
    assert torch.equal(keep, reference.dropout_keep_mask(seed, n_rows, K, p, row_start))
    assert torch.equal(_bits(u), _bits(reference.philox_uniform(seed, counters.view(n_rows, K))))


def test_keep_mask_with_k_above_2_to_the_31(device):
    """A window of an input whose row length itself exceeds 2**31: m * K + j crosses 2**32 inside
    the window and is far above it in the last row; the counter is still (m * K + j) mod 2**32."""
    seed, p = SEEDS[-1], 0.5
    K = 2**31 + 12345
    row_start, n_rows, n_cols = 1, 3, 80
    col_start = 2**32 - K - 40  # row 1 crosses 2**32 at column 40 of the window
    keep, u = _keep_mask(device, seed, p, n_rows, n_cols, K, row_start=row_start, col_start=col_start)
    m = torch.arange(row_start, row_start + n_rows, dtype=torch.int64)[:, None]
    j = torch.arange(col_start, col_start + n_cols, dtype=torch.int64)[None, :]
    counters = m * K + j
    assert counters[0, 39] < 2**32 <= counters[0, 40] and counters.max() > 2**33
    expected_u = reference.philox_uniform(seed, counters)
    assert torch.equal(_bits(u), _bits(expected_u))
    assert torch.equal(keep, expected_u >= p)


# --------------------------------------------------------------------------------------------
# Statistics (6 sigma: a correct generator fails about once in 5e8 runs)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_fraction_is_one_minus_p(p, device):
    n_rows, K = 64, 257
    keep, _ = _keep_mask(device, SEEDS[3], p, n_rows, K, K)
    _assert_binomial(int(keep.sum()), keep.numel(), 1 - p, f"kept at p={p}")
    per_row = keep.sum(dim=1)
    assert per_row.min() > 0 and per_row.max() < K  # no row is all dropped or all kept


def test_reference_uniforms_are_uniform():
    """2**20 reference draws: each of 16 equal bins holds 1/16 of them (6 sigma), all in [0, 1)."""
    u = reference.philox_uniform(SEEDS[4], torch.arange(2**20, dtype=torch.int64))
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    counts = torch.histc(u, bins=16, min=0.0, max=1.0)
    for b, count in enumerate(counts.tolist()):
        _assert_binomial(int(count), u.numel(), 1 / 16, f"bin {b}")


@pytest.mark.parametrize("seed_a, seed_b", [(SEEDS[1], SEEDS[1] + 1), (SEEDS[1], SEEDS[1] + 2**32)],
                         ids=["low_word", "high_word"])
def test_different_seeds_give_independent_masks(seed_a, seed_b, device):
    """Seeds differing in the low or only in the high 32 bits (the Philox key's second word) give
    different masks, disagreeing on a 2 p (1 - p) fraction as independent masks would."""
    p, n_rows, K = 0.5, 32, 129
    keep_a, _ = _keep_mask(device, seed_a, p, n_rows, K, K)
    keep_b, _ = _keep_mask(device, seed_b, p, n_rows, K, K)
    assert not torch.equal(keep_a, keep_b)
    _assert_binomial(int((keep_a != keep_b).sum()), keep_a.numel(), 2 * p * (1 - p), "disagreements")


def test_rows_do_not_repeat(device):
    """Every row draws fresh counters: no two rows of the mask are equal, and neither are a row's
    halves (a kernel that ignored m, or used j alone, would repeat)."""
    keep, _ = _keep_mask(device, SEEDS[2], 0.5, 16, 128, 128)
    assert len({tuple(row.tolist()) for row in keep}) == 16
    assert not torch.equal(keep[:, :64], keep[:, 64:])
