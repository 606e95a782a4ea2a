"""The executable contract (docs/contract.md): what every backend must compute, in plain, readable PyTorch.

Nothing here is optimised. Each function follows docs/contract.md §2-§5 line by line so a reader can check
it against the text; every backend (the optimised PyTorch path, Triton, C++/CUDA) is tested
against these functions on random inputs. Shapes: ``N`` rows (tokens), ``K`` in_features,
``D`` out_features, ``V`` vocabulary, ``H`` hidden size, ``R`` MoRA's r_hat.
"""

from __future__ import annotations

import math

import torch

# --------------------------------------------------------------------------------------------
# docs/contract.md §5: dropout randomness (Triton's tl.rand, Philox4x32-10, re-stated on int64 tensors)
# --------------------------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_UNIFORM_SCALE = 4.6566127342e-10  # float32(x) * this < 1 for every non-negative int32 x


def _wide(t: torch.Tensor) -> torch.Tensor:
    """t in the reference's compute dtype: float64 stays float64, everything else becomes float32."""
    return t.double() if t.dtype == torch.float64 else t.float()


def _mul32(const: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of const * x, for uint32 values held in int64.

    The product is < 2**64; int64 multiplication wraps modulo 2**64, so its bits are exactly the
    unsigned product's, and masking after the (arithmetic) shift recovers the high word.
    """
    product = x * const
    return (product >> 32) & _MASK32, product & _MASK32


def philox4x32(seed: int, counter: torch.Tensor, rounds: int = 10) -> tuple[torch.Tensor, ...]:
    """Philox4x32 with key (seed low 32 bits, seed high 32 bits) and counter (counter, 0, 0, 0).

    counter: int64 tensor of uint32 values, any shape. Returns the four uint32 output words as
    int64 tensors of counter's shape (Random123's known-answer vectors test this function).
    """
    return philox4x32_words(seed & _MASK32, (seed >> 32) & _MASK32, (counter, 0, 0, 0), rounds)


def philox4x32_words(k0: int, k1: int, ctr: tuple, rounds: int = 10) -> tuple[torch.Tensor, ...]:
    """Philox4x32 on an explicit key (k0, k1) and counter words (tensors or ints, uint32 values)."""
    base = next(c for c in ctr if isinstance(c, torch.Tensor))
    c0, c1, c2, c3 = (c if isinstance(c, torch.Tensor) else torch.full_like(base, c) for c in ctr)
    for _ in range(rounds):
        hi_b, lo_b = _mul32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """u = tl.rand(seed, offsets) for int32 offsets, bit for bit.

    offsets: integer tensor, any shape; taken modulo 2**32. Returns float32 in [0, 1).
    """
    return uniform_from_word(philox4x32(seed, offsets.to(torch.int64) & _MASK32)[0])


def uniform_from_word(word: torch.Tensor) -> torch.Tensor:
    """tl.rand's float32 in [0, 1) from Philox's first output word (uint32 values in int64)."""
    as_int32 = torch.where(word >= 2**31, word - 2**32, word)  # reinterpret the bits as int32
    folded = torch.where(as_int32 < 0, -as_int32 - 1, as_int32)
    return folded.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32, device=word.device)


def dropout_keep_mask(seed: int, n_rows: int, n_cols: int, p: float, row_start: int = 0,
                      device=None) -> torch.Tensor:
    """Bool [n_rows, n_cols] on ``device``: True where element (m, j) of the 2-D view x[M, K] is kept.

    Rows are global rows row_start .. row_start + n_rows - 1 of a K = n_cols wide input; the
    Philox counter of element (m, j) is (m * K + j) mod 2**32.
    """
    rows = torch.arange(row_start, row_start + n_rows, dtype=torch.int64, device=device).unsqueeze(1)
    cols = torch.arange(n_cols, dtype=torch.int64, device=device).unsqueeze(0)
    return philox_uniform(seed, rows * n_cols + cols) >= p


def dropout(x: torch.Tensor, p: float, seed: int | None) -> torch.Tensor:
    """docs/contract.md §5 dropout of x[..., K] (viewed as [M, K]): kept elements scaled by 1 / (1 - p)."""
    if p == 0.0:
        return x
    x2 = x.reshape(-1, x.shape[-1])
    keep = dropout_keep_mask(seed, x2.shape[0], x2.shape[1], p, device=x.device)
    return (x2 * keep / (1.0 - p)).to(x.dtype).reshape(x.shape)


def new_dropout_seed() -> torch.Tensor:
    """One 64-bit seed (0-dim int64 CPU tensor, in [0, 2**63 - 1)) from torch's default CPU generator."""
    return torch.randint(0, 2**63 - 1, (), dtype=torch.int64)


# --------------------------------------------------------------------------------------------
# docs/contract.md §2: LoRA
# --------------------------------------------------------------------------------------------


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, seed=None):
    """y = x @ W^T + bias + scaling * dropout(x) @ A^T @ B^T, computed in fp32 (fp64 for fp64 x),
    cast to x.dtype.

    x [..., K]; weight [D, K]; bias [D] or None; lora_A [r, K]; lora_B [D, r] -> [..., D].
    """
    xf = _wide(x)
    y = xf @ weight.to(xf.dtype).t()
    if bias is not None:
        y = y + bias.to(xf.dtype)
    x_dropped = dropout(xf, dropout_p, seed)
    y = y + scaling * (x_dropped @ lora_A.to(xf.dtype).t()) @ lora_B.to(xf.dtype).t()
    return y.to(x.dtype)


def lora_delta_weight(lora_A, lora_B, scaling):
    """ΔW = scaling * B @ A, [D, K], in fp32 (fp64 for fp64 adapters)."""
    return scaling * _wide(lora_B) @ _wide(lora_A)


# --------------------------------------------------------------------------------------------
# docs/contract.md §8: DoRA (PEFT's use_dora=True)
# --------------------------------------------------------------------------------------------


def dora_weight_norm(weight, lora_A, lora_B, scaling):
    """n [D] = ||W_i + scaling * (B @ A)_i||_2 per output row, directly from the [D, K] matrix, in
    fp32 (fp64 for fp64 inputs). weight [D, K]; lora_A [r, K]; lora_B [D, r]. Gradient-free."""
    w = _wide(weight.detach())
    return torch.linalg.vector_norm(w + lora_delta_weight(lora_A.detach(), lora_B.detach(), scaling).to(w.dtype),
                                    dim=1)


def dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p=0.0, seed=None):
    """y = base(x) + (m/n - 1) * (x' @ W^T) + (m/n) * scaling * x' @ A^T @ B^T, x' = dropout(x), n
    detached; computed in fp32 (fp64 for fp64 x), cast to x.dtype.

    x [..., K]; weight [D, K]; bias [D] or None; lora_A [r, K]; lora_B [D, r]; magnitude [D] -> [..., D].
    """
    xf = _wide(x)
    g = _wide(magnitude) / dora_weight_norm(weight, lora_A, lora_B, scaling).to(xf.dtype)
    w = weight.to(xf.dtype)
    y = xf @ w.t()
    if bias is not None:
        y = y + bias.to(xf.dtype)
    x_dropped = dropout(xf, dropout_p, seed)
    lora = (x_dropped @ lora_A.to(xf.dtype).t()) @ lora_B.to(xf.dtype).t()
    y = y + (g - 1) * (x_dropped @ w.t()) + g * scaling * lora
    return y.to(x.dtype)


def dora_merged_weight(weight, lora_A, lora_B, magnitude, scaling):
    """W' = (m/n)[:, None] * (W + scaling * B @ A) [D, K], in fp32 (fp64 for fp64 inputs)."""
    w = _wide(weight.detach())
    g = _wide(magnitude.detach()) / dora_weight_norm(weight, lora_A, lora_B, scaling).to(w.dtype)
    return g[:, None] * (w + lora_delta_weight(lora_A.detach(), lora_B.detach(), scaling).to(w.dtype))


# --------------------------------------------------------------------------------------------
# docs/contract.md §3: MoRA
# --------------------------------------------------------------------------------------------

MORA_TYPES = (1, 2, 3, 4, 6)


def mora_r_hat(in_features: int, out_features: int, r: int, mora_type: int) -> int:
    """Side of the square matrix M: round(sqrt((k + d) * r)), floored to even for type 6."""
    r_hat = int(math.sqrt((in_features + out_features) * r) + 0.5)
    return r_hat // 2 * 2 if mora_type == 6 else r_hat


def mora_padding(in_features: int, r_hat: int, mora_type: int) -> int:
    """Number of wrap-padded features (types 1, 4, 6); 0 for types 2 and 3."""
    if mora_type in (2, 3) or in_features % r_hat == 0:
        return 0
    return r_hat - in_features % r_hat


def mora_rope_tables(r_hat: int, n_chunks: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [n_chunks, r_hat] in fp32: angle(i, j) = i * 10000^(-2 (j mod r_hat/2) / r_hat)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, r_hat, 2, dtype=torch.float32, device=device) / r_hat))
    positions = torch.arange(n_chunks, dtype=torch.float32, device=device)
    freqs = torch.outer(positions, inv_freq)
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(z: torch.Tensor) -> torch.Tensor:
    """[a, b] -> [-b, a] over the last dimension (HF-LLaMA rotate-half layout)."""
    half = z.shape[-1] // 2
    return torch.cat([-z[..., half:], z[..., :half]], dim=-1)


def _wrap_pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    if pad > x.shape[-1]:
        raise ValueError(f"MoRA wrap padding of {pad} features exceeds in_features={x.shape[-1]}")
    return torch.cat([x, x[..., :pad]], dim=-1) if pad else x


def _group_sizes(length: int, r_hat: int) -> list[int]:
    """Types 2/3 contiguous groups: the first length % r_hat groups hold one more element."""
    q, m = divmod(length, r_hat)
    return [q + 1] * m + [q] * (r_hat - m)


def _mora_compress(x: torch.Tensor, r_hat: int, mora_type: int) -> torch.Tensor:
    """x [..., K] -> z [..., R] for types 1-4."""
    k = x.shape[-1]
    if mora_type in (1, 4):
        x_ext = _wrap_pad(x, mora_padding(k, r_hat, mora_type))
        return x_ext.reshape(*x.shape[:-1], -1, r_hat).sum(dim=-2)
    groups = torch.split(x, _group_sizes(k, r_hat), dim=-1)
    return torch.stack([g.sum(dim=-1) for g in groups], dim=-1)


def _mora_decompress(y: torch.Tensor, out_features: int, mora_type: int) -> torch.Tensor:
    """y [..., R] -> [..., D] for types 1-4: tile (types 1, 3) or repeat_interleave (types 2, 4)."""
    r_hat = y.shape[-1]
    if mora_type in (1, 3):
        return y.repeat(*([1] * (y.dim() - 1)), math.ceil(out_features / r_hat))[..., :out_features]
    repeats = torch.tensor(_group_sizes(out_features, r_hat), device=y.device)
    return torch.repeat_interleave(y, repeats, dim=-1)


def mora_adapter(x: torch.Tensor, M: torch.Tensor, out_features: int, mora_type: int) -> torch.Tensor:
    """The MoRA branch alone: x [..., K] -> [..., D], computed in fp32 (fp64 for fp64 x)."""
    r_hat = M.shape[0]
    xf = _wide(x)
    Mf = M.to(xf.dtype)
    if mora_type != 6:
        return _mora_decompress(_mora_compress(xf, r_hat, mora_type) @ Mf.t(), out_features, mora_type)
    k = x.shape[-1]
    x_ext = _wrap_pad(xf, mora_padding(k, r_hat, 6))
    n = x_ext.shape[-1] // r_hat
    chunks = x_ext.reshape(*x.shape[:-1], n, r_hat)
    cos, sin = mora_rope_tables(r_hat, n, x.device)
    rotated = chunks * cos.to(xf.dtype) + rotate_half(chunks) * sin.to(xf.dtype)
    flat = (rotated @ Mf.t()).reshape(*x.shape[:-1], n * r_hat)
    if n * r_hat < out_features:
        flat = flat.repeat(*([1] * (flat.dim() - 1)), math.ceil(out_features / (n * r_hat)))
    return flat[..., :out_features]


def mora_linear(x, weight, bias, M, mora_type, dropout_p=0.0, seed=None):
    """y = x @ W^T + bias + mora_adapter(dropout(x)), computed in fp32 (fp64 for fp64 x), cast to
    x.dtype.

    x [..., K]; weight [D, K]; bias [D] or None; M [R, R] -> [..., D].
    """
    xf = _wide(x)
    y = xf @ weight.to(xf.dtype).t()
    if bias is not None:
        y = y + bias.to(xf.dtype)
    y = y + mora_adapter(dropout(xf, dropout_p, seed), M, weight.shape[0], mora_type)
    return y.to(x.dtype)


def _input_slots(in_features: int, r_hat: int, mora_type: int) -> list[tuple[int, int]]:
    """(input column, slot of z it is summed into) for every feature of the padded input."""
    if mora_type in (2, 3):
        sizes = _group_sizes(in_features, r_hat)
        return [(q, slot) for slot, group in enumerate(_cumulative(sizes)) for q in group]
    pad = mora_padding(in_features, r_hat, mora_type)
    return [(i % in_features, i % r_hat) for i in range(in_features + pad)]


def _cumulative(sizes):
    """Consecutive ranges of the given sizes: [0, s0), [s0, s0 + s1), ..."""
    start = 0
    for size in sizes:
        yield range(start, start + size)
        start += size


def _output_slots(out_features: int, r_hat: int, mora_type: int) -> list[int]:
    """Slot of y that output p copies, for every output feature."""
    if mora_type in (1, 3):
        return [p % r_hat for p in range(out_features)]
    return [slot for slot, group in enumerate(_cumulative(_group_sizes(out_features, r_hat))) for _ in group]


def mora_delta_weight(M: torch.Tensor, in_features: int, out_features: int, mora_type: int) -> torch.Tensor:
    """ΔW [D, K] in fp32 (fp64 for fp64 M) with x @ ΔW^T == mora_adapter(x): the merge of the
    MoRA reference.

    Types 1-4: ΔW[p, q] = sum of M[slot_out(p), slot_in(i)] over padded inputs i that copy column q.
    Type 6: block-diagonal blocks M·R_i over the padded input, the last block's wrapped columns
    folded onto columns 0..pad-1, rows truncated (or tiled) to D.
    """
    Mf = _wide(M)
    r_hat = M.shape[0]
    if mora_type != 6:
        compress = torch.zeros(r_hat, in_features, dtype=Mf.dtype, device=M.device)
        for column, slot in _input_slots(in_features, r_hat, mora_type):
            compress[slot, column] += 1.0
        expand = torch.zeros(out_features, r_hat, dtype=Mf.dtype, device=M.device)
        for p, slot in enumerate(_output_slots(out_features, r_hat, mora_type)):
            expand[p, slot] = 1.0
        return expand @ Mf @ compress
    pad = mora_padding(in_features, r_hat, 6)
    n = (in_features + pad) // r_hat
    cos, sin = (t.to(Mf.dtype) for t in mora_rope_tables(r_hat, n, M.device))
    # M·R_i: column b of M times cos, plus column b of M rotated back by half, times sin
    m_swapped = torch.cat([Mf[:, r_hat // 2 :], -Mf[:, : r_hat // 2]], dim=1)
    blocks = [Mf * cos[i] + m_swapped * sin[i] for i in range(n)]
    full = torch.block_diag(*blocks)  # [n R, n R] over the padded input
    delta = full[:, :in_features].clone()
    delta[:, :pad] += full[:, in_features:]
    rows = torch.arange(out_features, device=M.device) % (n * r_hat)
    return delta[rows]


# --------------------------------------------------------------------------------------------
# docs/contract.md §4: masked / weighted cross-entropy
# --------------------------------------------------------------------------------------------


def token_loss_weights(labels, *, instruction_mask=None, instruction_weight=0.0, token_weights=None,
                       ignore_index=-100, dtype=torch.float32) -> torch.Tensor:
    """w_t (dtype, labels' shape; float64 with float64 token_weights): 0 on ignore_index, else
    1 x instruction_weight on masked tokens x token_weights (float64 losses pass dtype=float64 so
    that instruction_weight is not rounded to float32)."""
    w = (labels != ignore_index).to(dtype)
    if instruction_mask is not None:
        w = torch.where(instruction_mask.bool(), w * instruction_weight, w)
    if token_weights is not None:
        w = w * _wide(token_weights)
    return w


def per_token_loss(logits, labels, *, label_smoothing=0.0, z_loss=0.0, softcap=None, ignore_index=-100):
    """l_t (float32, or float64 for float64 logits; labels' shape) from logits [..., V]; the label
    of ignored rows is not read."""
    z = _wide(logits)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lse = torch.logsumexp(z, dim=-1)
    safe_labels = torch.where(labels == ignore_index, torch.zeros_like(labels), labels)
    z_target = z.gather(-1, safe_labels.unsqueeze(-1).long()).squeeze(-1)
    eps = label_smoothing
    return (1 - eps) * (lse - z_target) + eps * (lse - z.mean(dim=-1)) + z_loss * lse**2


def reduce_weighted(loss_per_token, w, reduction="mean", num_items_in_batch=None):
    """Apply docs/contract.md §4's reductions to w_t * l_t."""
    weighted = w * loss_per_token
    if reduction == "none":
        return weighted
    total = weighted.sum()
    if reduction == "sum":
        return total
    denom = w.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch).to(total)
    return torch.where(denom > 0, total / torch.where(denom > 0, denom, 1.0), torch.zeros_like(total))


def masked_cross_entropy(logits, labels, *, instruction_mask=None, instruction_weight=0.0, token_weights=None,
                         ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None,
                         num_items_in_batch=None):
    """docs/contract.md §4 from logits [..., V] and labels [...]; float32 result."""
    w = token_loss_weights(labels, instruction_mask=instruction_mask, instruction_weight=instruction_weight,
                           token_weights=token_weights, ignore_index=ignore_index)
    loss = per_token_loss(logits, labels, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                          ignore_index=ignore_index)
    return reduce_weighted(loss, w, reduction, num_items_in_batch)


def linear_cross_entropy(hidden, weight, labels, bias=None, *, chunk_rows=1024, instruction_mask=None,
                         instruction_weight=0.0, token_weights=None, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0, z_loss=0.0, softcap=None, num_items_in_batch=None):
    """masked_cross_entropy(hidden @ weight^T + bias, labels) computed chunk_rows rows at a time.

    hidden [..., H]; weight [V, H]; bias [V] or None; labels [...]. Each chunk's logits are
    recomputed in backward (activation checkpointing), so at most one chunk of logits is alive.
    """
    w = token_loss_weights(labels, instruction_mask=instruction_mask, instruction_weight=instruction_weight,
                           token_weights=token_weights, ignore_index=ignore_index).reshape(-1)
    h2, y2 = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)

    def chunk_loss(h, y):
        logits = h @ weight.t() if bias is None else h @ weight.t() + bias
        return per_token_loss(logits, y, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                              ignore_index=ignore_index)

    losses = [
        torch.utils.checkpoint.checkpoint(chunk_loss, h2[s : s + chunk_rows], y2[s : s + chunk_rows],
                                          use_reentrant=False)
        for s in range(0, h2.shape[0], chunk_rows)
    ]
    loss = torch.cat(losses) if losses else h2.new_zeros(0, dtype=torch.float32)
    out = reduce_weighted(loss, w, reduction, num_items_in_batch)
    return out.reshape(labels.shape) if reduction == "none" else out
