"""The oracle stays independent of the code it checks (docs/architecture.md §3).

- No module of the package except fusedpeft/reference.py imports fusedpeft.reference, and the
  reference imports no fusedpeft module: a bug in a production rule (fusedpeft/core/) cannot also
  be in the oracle, so backend-vs-reference tests can see it.
- fusedpeft/core/ is the bottom layer: it imports torch, the standard library and itself only.
- core's rules agree with the reference's own restatement on fresh random inputs: the Philox
  stream (and Random123's known-answer vectors), the keep mask, the token weights, LoRA's scaling
  and ΔW, MoRA's r_hat, padding, RoPE tables, rotate-half and the geometry of one layer.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

from fusedpeft import reference as ref
from fusedpeft.core import lora as core_lora
from fusedpeft.core import mora as core_mora
from fusedpeft.core import philox as core_philox
from fusedpeft.core import token_weights as core_weights

PACKAGE = Path(ref.__file__).resolve().parent
MASK32 = 0xFFFFFFFF


def _imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` / ``from ... import`` statement of the file names, anywhere in it."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    return _names_in(path.read_text(), package)


def _names_in(source: str, package: str) -> set[str]:
    """Modules imported by ``source`` living in ``package`` (relative imports resolved;
    ``from a import b`` yields both a and a.b, since b may be a module)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _package_files() -> list[Path]:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20 and PACKAGE / "reference.py" in files
    return files


@pytest.mark.parametrize("source", ["import fusedpeft.reference", "from fusedpeft import reference as r",
                                    "from fusedpeft.reference import lora_scaling", "from .. import reference",
                                    "def f():\n    from ..reference import dropout\n"])
def test_import_scan_sees_every_form(source):
    assert "fusedpeft.reference" in _names_in(source, "fusedpeft.fused")


def test_no_package_module_imports_the_reference():
    offenders = [str(path.relative_to(PACKAGE.parent)) for path in _package_files()
                 if path.name != "reference.py" and "fusedpeft.reference" in _imported_modules(path)]
    assert offenders == [], f"production modules import the oracle: {offenders}"


def test_reference_imports_no_fusedpeft_module():
    names = _imported_modules(PACKAGE / "reference.py")
    assert sorted(n for n in names if n.split(".")[0] == "fusedpeft") == []


def test_core_imports_torch_only():
    """Besides torch and the standard library, a core module may import only other core modules."""
    for path in sorted((PACKAGE / "core").glob("*.py")):
        names = {n for n in _imported_modules(path) if not n.startswith("fusedpeft.core")}
        roots = {n.split(".")[0] for n in names}
        assert roots <= {"torch", "math", "functools", "dataclasses", "__future__"}, (path.name, roots)


# --------------------------------------------------------------------------------------------
# core == the reference's restatement
# --------------------------------------------------------------------------------------------

# Random123 known-answer vectors for Philox4x32-10 (kat_vectors): key, counter -> output words
PHILOX_KAT = [
    ((0x00000000, 0x00000000), (0x00000000,) * 4, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF,) * 4, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0xA4093822, 0x299F31D0), (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("key, counter, expected", PHILOX_KAT, ids=["zeros", "ones", "pi"])
def test_philox_known_answers_core_and_reference(key, counter, expected):
    c0 = torch.tensor([counter[0]], dtype=torch.int64)
    for words in (core_philox.philox4x32_words(key[0], key[1], (c0, *counter[1:])),
                  ref.philox4x32_words(key[0], key[1], (c0, *counter[1:]))):
        assert [int(w.item()) for w in words] == list(expected)


@pytest.mark.parametrize("seed", [0, 7, 2**32 + 5, 2**63 - 1, None], ids=["0", "7", "2^32+5", "2^63-1", "random"])
def test_philox_stream_and_keep_mask_agree(seed):
    seed = int(ref.new_dropout_seed()) if seed is None else seed
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    counters = torch.randint(0, 2**32, (4096,), dtype=torch.int64)
    counters[:4] = torch.tensor([0, 2**31 - 1, 2**31, 2**32 - 1])
    core_words = core_philox.philox4x32_words(k0, k1, (counters, 0, 0, 0))
    ref_words = ref.philox4x32(seed, counters)
    assert all(torch.equal(a, b) for a, b in zip(core_words, ref_words))
    u = core_philox.uniform_from_word(core_words[0])
    assert u.dtype == torch.float32 and torch.equal(u, ref.philox_uniform(seed, counters))
    # the mask over rows 3 .. 12 of a K = 37 input, counters past 2**32 wrapping
    rows, cols, p = torch.arange(3, 13), torch.arange(37), 0.3
    big_rows = rows + 2**32 // 37
    for r in (rows, big_rows):
        mask = core_philox.keep_mask(k0, k1, r[:, None] * 37 + cols[None, :], p)
        assert torch.equal(mask, ref.dropout_keep_mask(seed, 10, 37, p, row_start=int(r[0])))


def test_new_dropout_seed_draws_the_same():
    state = torch.get_rng_state()
    a = core_philox.new_dropout_seed()
    torch.set_rng_state(state)
    b = ref.new_dropout_seed()
    assert a.dtype == b.dtype == torch.int64 and a.shape == () and int(a) == int(b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_token_weights_agree(dtype):
    labels = torch.randint(0, 11, (3, 17))
    labels[torch.rand(3, 17) < 0.3] = -100
    labels[0, :4] = 7
    mask = torch.rand(3, 17) < 0.5
    weights = torch.rand(3, 17, dtype=dtype)
    cases = [dict(), dict(ignore_index=7), dict(instruction_mask=mask, instruction_weight=0.1),
             dict(instruction_mask=mask.int(), instruction_weight=0.37, token_weights=weights),
             dict(token_weights=weights, dtype=torch.float64)]
    for kw in cases:
        want, got = ref.token_loss_weights(labels, **kw), core_weights.token_loss_weights(labels, **kw)
        assert got.dtype == want.dtype and got.shape == labels.shape, kw
        assert torch.equal(got, want), kw


def test_lora_scaling_and_delta_agree():
    for r in (1, 2, 3, 8, 16, 64, 100):
        for alpha in (1, 8, 16.0, 0.5):
            for rslora in (False, True):
                assert core_lora.lora_scaling(r, alpha, rslora) == ref.lora_scaling(r, alpha, rslora)
    assert ref.lora_scaling(16, 8, True) == 2.0 and ref.lora_scaling(16, 8) == 0.5
    for dtype, tol in ((torch.float32, 1e-6), (torch.float64, 1e-14), (torch.bfloat16, 1e-6)):
        A, B = torch.randn(5, 13, dtype=dtype), torch.randn(9, 5, dtype=dtype)
        got, want = core_lora.lora_delta_weight(A, B, 0.75), ref.lora_delta_weight(A, B, 0.75)
        assert got.dtype == want.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_mora_sizes_agree():
    assert core_mora.MORA_TYPES == ref.MORA_TYPES
    for k in range(1, 70):
        for d in (1, 3, 64, 130):
            for r in (1, 2, 5, 8):
                for t in ref.MORA_TYPES:
                    r_hat = ref.mora_r_hat(k, d, r, t)
                    assert core_mora.mora_r_hat(k, d, r, t) == r_hat, (k, d, r, t)
                    if r_hat:
                        assert core_mora.mora_padding(k, r_hat, t) == ref.mora_padding(k, r_hat, t), (k, r_hat, t)
    # worked values: round half up, floor to even for type 6, wrap padding to the next multiple
    assert ref.mora_r_hat(4096, 4096, 8, 1) == 256 and ref.mora_r_hat(30, 50, 2, 6) == 12
    assert ref.mora_padding(30, 12, 6) == 6 and ref.mora_padding(30, 12, 2) == 0 and ref.mora_padding(24, 12, 1) == 0


@pytest.mark.parametrize("r_hat,n_chunks", [(2, 1), (6, 3), (12, 5), (64, 9), (130, 2)])
def test_mora_rope_tables_and_rotate_half_agree(r_hat, n_chunks):
    cos, sin = core_mora.rope_tables(r_hat, n_chunks, torch.device("cpu"))
    assert core_mora.rope_tables(r_hat, n_chunks, torch.device("cpu"))[0] is cos  # cached
    want_cos, want_sin = ref.mora_rope_tables(r_hat, n_chunks)
    assert cos.dtype == want_cos.dtype == torch.float32
    assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)  # docs/contract.md §3: fp32 tables
    z = torch.randn(4, r_hat, dtype=torch.float64)
    assert torch.equal(core_mora.rotate_half(z), ref.rotate_half(z))


@pytest.mark.parametrize("k,d,r_hat,mora_type", [(30, 50, 12, 6), (50, 30, 12, 6), (24, 40, 8, 1), (13, 7, 5, 4),
                                                 (13, 7, 5, 2), (7, 13, 9, 3), (64, 16, 10, 6)])
def test_mora_geometry_matches_the_reference_layout(k, d, r_hat, mora_type):
    """n_chunks, span, the chunks reaching an output and the output tiles, against the layout of
    the reference's type-6 forward (pad, reshape into chunks, truncate or tile to d)."""
    g = core_mora.MoraGeometry(k, d, r_hat, mora_type)
    assert (g.K, g.D, g.R) == (k, d, r_hat)
    pad = ref.mora_padding(k, r_hat, mora_type)
    assert g.pad == pad
    if mora_type in (2, 3):
        assert g.in_contig and g.n_chunks * r_hat <= k
    else:
        assert g.n_chunks == math.ceil(k / r_hat) == (k + pad) // r_hat and g.full_chunks == k // r_hat
    assert g.span == g.n_chunks * r_hat
    assert g.out_contig == (mora_type in (2, 4))
    if mora_type == 6:
        # which chunk feeds each output: probe the reference with M = identity and one-hot chunks
        M = torch.eye(r_hat, dtype=torch.float64)
        reached = set()
        for chunk in range(g.n_chunks):
            x = torch.zeros(1, k + pad, dtype=torch.float64)
            x[0, chunk * r_hat] = 1.0  # position 0 of a chunk is unrotated for cos = 1 at j = 0
            x = x[:, :k] if chunk * r_hat < k else None
            if x is None:
                continue
            if ref.mora_adapter(x, M, d, 6).abs().sum() > 0:
                reached.add(chunk)
        assert len(reached) == g.used
        assert g.n_tiles == math.ceil(d / g.span)
