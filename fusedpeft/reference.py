"""The executable contract (docs/contract.md): what every backend must compute, in plain PyTorch.

Nothing here is optimised and nothing here is shared with the package: this module imports no
fusedpeft module, and no fusedpeft module imports it (tests/test_oracle_independence.py checks
both), so a bug in the production rules (fusedpeft/core/) cannot hide in the oracle too. Each rule
is restated from its primary source: the Philox4x32-10 generator from Random123's definition and
Triton's ``tl.rand``, LoRA / DoRA from PEFT's layer code, MoRA from the paper's reference code
(kongds/MoRA), the loss from docs/contract.md §4. Every backend (the optimised PyTorch path,
Triton, C++/CUDA) is tested against these functions on random inputs. Results are computed in
float32, or float64 for float64 inputs. Shapes: ``N`` rows (tokens), ``K`` in_features, ``D``
out_features, ``V`` vocabulary, ``H`` hidden size, ``R`` MoRA's r_hat.
"""

from __future__ import annotations

import math

import torch


def _wide(t: torch.Tensor) -> torch.Tensor:
    """t in the reference's compute dtype: float64 stays float64, everything else becomes float32."""
    return t.double() if t.dtype == torch.float64 else t.float()


# --------------------------------------------------------------------------------------------
# docs/contract.md §5: dropout randomness. Random123's Philox4x32-10 (Salmon et al., SC'11):
# a 128-bit counter (four 32-bit words) and a 64-bit key (two words); each of the 10 rounds
#   (hi0, lo0) = mulhilo(0xD2511F53, c0); (hi1, lo1) = mulhilo(0xCD9E8D57, c2)
#   c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
# and between rounds the key is bumped by the Weyl constants (0x9E3779B9, 0xBB67AE85).
# --------------------------------------------------------------------------------------------

_WORD = 2**32
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
TL_RAND_SCALE = 4.6566127342e-10  # Triton's uint_to_uniform_float for 32-bit words


def _mulhilo(multiplier: int, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high word, low word) of the 64-bit product multiplier * value, value uint32 held in int64.

    The multiplier is split into 16-bit halves so that every partial product stays below 2**48
    and nothing overflows int64: value * multiplier = value * m_hi * 2**16 + value * m_lo.
    """
    m_hi, m_lo = divmod(multiplier, 2**16)
    low_part = value * m_lo                      # < 2**48
    high_part = value * m_hi                     # < 2**48, to be shifted left by 16
    lower_sum = low_part + (high_part % 2**16) * 2**16   # the product's bits 0..48
    low = lower_sum % _WORD
    high = high_part // 2**16 + lower_sum // _WORD
    return high, low


def philox4x32_words(k0: int, k1: int, ctr: tuple, rounds: int = 10) -> tuple[torch.Tensor, ...]:
    """Philox4x32 on the key (k0, k1) and the counter words ctr = (c0, c1, c2, c3), each an int
    or an int64 tensor of uint32 values (all tensors of one shape) -> the four output words,
    int64 tensors of uint32 values of that shape."""
    shape_like = [c for c in ctr if isinstance(c, torch.Tensor)][0]
    c = [w.to(torch.int64) if isinstance(w, torch.Tensor) else torch.full_like(shape_like, w, dtype=torch.int64)
         for w in ctr]
    key = [k0, k1]
    for round_index in range(rounds):
        if round_index > 0:
            key = [(key[0] + PHILOX_W0) % _WORD, (key[1] + PHILOX_W1) % _WORD]
        hi0, lo0 = _mulhilo(PHILOX_M0, c[0])
        hi1, lo1 = _mulhilo(PHILOX_M1, c[2])
        c = [hi1 ^ c[1] ^ key[0], lo1, hi0 ^ c[3] ^ key[1], lo0]
    return tuple(c)


def philox4x32(seed: int, counter: torch.Tensor, rounds: int = 10) -> tuple[torch.Tensor, ...]:
    """tl.randint's Philox call: key = (seed mod 2**32, seed // 2**32), counter = (counter, 0, 0, 0).

    seed: a non-negative int below 2**64; counter: int64 tensor of uint32 values, any shape.
    Returns the four output words as int64 tensors of counter's shape."""
    return philox4x32_words(seed % _WORD, seed // _WORD % _WORD, (counter, 0, 0, 0), rounds)


def uniform_from_word(word: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float: the word (uint32 in int64) read as a signed int32 x, x < 0
    replaced by ~x (= -x - 1), then float32(x) * float32(4.6566127342e-10) -> float32 in [0, 1)."""
    signed = torch.where(word < 2**31, word, word - _WORD)
    non_negative = torch.where(signed < 0, torch.bitwise_not(signed), signed)
    scale = torch.tensor(TL_RAND_SCALE, dtype=torch.float32)
    return non_negative.float() * scale.to(word.device)


def philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """u = tl.rand(seed, offsets) for 32-bit offsets, bit for bit.

    offsets: integer tensor, any shape; taken modulo 2**32. Returns float32 in [0, 1)."""
    return uniform_from_word(philox4x32(seed, offsets.to(torch.int64) % _WORD)[0])


def dropout_keep_mask(seed: int, n_rows: int, n_cols: int, p: float, row_start: int = 0,
                      device=None) -> torch.Tensor:
    """Bool [n_rows, n_cols] on ``device``: True where element (m, j) of the 2-D view x[M, K] is kept.

    Rows are global rows row_start .. row_start + n_rows - 1 of a K = n_cols wide input; the
    Philox counter of element (m, j) is (m * K + j) mod 2**32, and it is kept when u >= p.
    """
    m = torch.arange(row_start, row_start + n_rows, dtype=torch.int64, device=device)
    j = torch.arange(n_cols, dtype=torch.int64, device=device)
    counters = m[:, None] * n_cols + j[None, :]
    return philox_uniform(seed, counters) >= p


def dropout(x: torch.Tensor, p: float, seed: int | None) -> torch.Tensor:
    """docs/contract.md §5 dropout of x[..., K] (viewed as [M, K]): kept elements scaled by 1 / (1 - p)."""
    if p == 0.0:
        return x
    x2 = x.reshape(-1, x.shape[-1])
    keep = dropout_keep_mask(seed, x2.shape[0], x2.shape[1], p, device=x.device)
    return (x2 * keep / (1.0 - p)).to(x.dtype).reshape(x.shape)


def new_dropout_seed() -> torch.Tensor:
    """The one draw per forward from torch's default CPU generator: a 0-dim int64 CPU tensor,
    uniform over [0, 2**63 - 1) (tests replay the layers' draw with it)."""
    return torch.randint(low=0, high=2**63 - 1, size=(), dtype=torch.int64)


# --------------------------------------------------------------------------------------------
# docs/contract.md §2: LoRA (PEFT's LoraLayer: scaling, forward, get_delta_weight)
# --------------------------------------------------------------------------------------------


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """PEFT's update_layer: lora_alpha / sqrt(r) with rsLoRA, else lora_alpha / r."""
    if use_rslora:
        return alpha / math.sqrt(r)
    return alpha / r


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
    """PEFT's get_delta_weight: (B @ A) * scaling [D, K], in fp32 (fp64 for fp64 adapters)."""
    return (_wide(lora_B) @ _wide(lora_A)) * scaling


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
# docs/contract.md §3: MoRA, restated from the paper's reference code (kongds/MoRA, peft-mora's
# update_layer and _apply_mora)
# --------------------------------------------------------------------------------------------

MORA_TYPES = (1, 2, 3, 4, 6)


def mora_r_hat(in_features: int, out_features: int, r: int, mora_type: int) -> int:
    """update_layer's new_r: sqrt((k + d) * r) rounded half up; type 6 drops an odd last unit (RoPE pairs)."""
    r_hat = math.floor(math.sqrt((in_features + out_features) * r) + 0.5)
    if mora_type == 6:
        r_hat -= r_hat % 2
    return r_hat


def mora_padding(in_features: int, r_hat: int, mora_type: int) -> int:
    """_apply_mora's pad_size: types 1, 4, 6 extend x to the next multiple of r_hat (with a copy of
    its first features); types 2 and 3 group without padding."""
    if mora_type in (2, 3):
        return 0
    return (-in_features) % r_hat


def mora_rope_tables(r_hat: int, n_chunks: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """_apply_mora's cos, sin [n_chunks, r_hat] in fp32: inv_freq = 1 / 10000^(arange(0, r, 2) / r),
    position t = chunk index, emb = cat(outer(t, inv_freq), same)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, r_hat, 2, device=device).float() / r_hat))
    t = torch.arange(n_chunks, device=device)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(z: torch.Tensor) -> torch.Tensor:
    """HF-LLaMA rotate-half over the last dimension: halves (a, b) -> (-b, a)."""
    a, b = z.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


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
    """w_t (labels' shape) as docs/contract.md §4 words it: 0 where y_t == ignore_index, else 1,
    times instruction_weight where instruction_mask is set, times token_weights when given.

    In ``dtype`` (float64 losses pass float64 so that instruction_weight is not rounded to
    float32), or float64 when token_weights are float64."""
    counted = labels != ignore_index
    w = torch.zeros(labels.shape, dtype=dtype, device=labels.device)
    w[counted] = 1.0
    if instruction_mask is not None:
        factor = torch.full(labels.shape, instruction_weight, dtype=dtype, device=labels.device)
        w = w * torch.where(instruction_mask.bool(), factor, torch.ones_like(factor))
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
