"""normalize="sequence" (packing-aware): each sequence's weighted mean, then the mean over the
sequences with a positive weight sum, against an explicit float64 formula written here; every
backend on the shared chunk loop; num_items_in_batch as the window's sequence count and
gradient accumulation over micro-batches; patch_causal_lm on packed batches (position_ids
restarting at 0, HF's DataCollatorWithFlattening format); bad input."""

import pytest
import torch
import transformers

import fusedpeft as fp
from helpers import runnable

V = 37


def _backends():
    """torch, cpu (when built) and triton (under the interpreter, tiny shapes): the shared chunk loop."""
    return runnable("cross_entropy")


def _problem(seed=0, rows=3, cols=9):
    """logits [rows, cols, V] float64, labels with ignored tokens, sequence ids of packed segments
    (a fully ignored one included), token weights, an instruction mask."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, cols, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (rows, cols), generator=g)
    labels[0, :2] = -100
    labels[2, 5:8] = -100  # sequence 6 below is fully ignored
    seq = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 2], [3, 3, 3, 3, 4, 4, 4, 4, 4], [5, 5, 5, 5, 5, 6, 6, 6, 7]])
    weights = torch.rand(rows, cols, generator=g, dtype=torch.float64) + 0.5
    mask = torch.rand(rows, cols, generator=g) < 0.3
    return logits, labels, seq[:rows, :cols], weights, mask


def _per_sequence_formula(logits, labels, seq, weights, mask, instruction_weight, reduction, num_items=None):
    """float64, token by token: w_t = [y_t != -100] x (instruction_weight if masked) x weight_t;
    per sequence s: m_s = sum_s w l / sum_s w; "mean": sum_{s: sum w > 0} m_s / (their count or
    num_items); "sum": sum of m_s; "none": w_t l_t / sum_{s(t)} w."""
    flat_z, flat_y = logits.reshape(-1, V), labels.reshape(-1)
    flat_s, flat_w, flat_m = seq.reshape(-1), weights.reshape(-1), mask.reshape(-1)
    terms = []
    sums = {}
    for t in range(flat_y.numel()):
        w = 0.0 if flat_y[t] == -100 else float(flat_w[t]) * (instruction_weight if flat_m[t] else 1.0)
        sums[int(flat_s[t])] = sums.get(int(flat_s[t]), 0.0) + w
        loss = torch.logsumexp(flat_z[t], 0) - flat_z[t, max(int(flat_y[t]), 0)]
        terms.append((int(flat_s[t]), w, loss))
    per_token = [w * loss / sums[s] if sums[s] > 0 else 0.0 * loss for s, w, loss in terms]
    if reduction == "none":
        return torch.stack([torch.as_tensor(p, dtype=torch.float64) for p in per_token]).reshape(labels.shape)
    total = sum(per_token)
    if reduction == "sum":
        return total
    count = sum(1 for v in sums.values() if v > 0) if num_items is None else num_items
    return total / count


def _ours(kind, logits, labels, backend, **kw):
    if kind == "masked":
        return fp.masked_cross_entropy(logits, labels, backend=backend, **kw)
    # hidden @ weight^T == logits exactly when weight is the identity (H = V)
    eye = torch.eye(V, dtype=logits.dtype)
    return fp.linear_cross_entropy(logits, eye, labels, backend=backend, chunk_budget_bytes=V * 8 * 4, **kw)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("kind", ["masked", "linear"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_sequence_normalize_matches_float64_formula(backend, kind, reduction):
    logits, labels, seq, weights, mask = _problem()
    z = logits.clone().requires_grad_()
    kw = dict(token_weights=weights, instruction_mask=mask, instruction_weight=0.4)
    got = _ours(kind, z, labels, backend, reduction=reduction, normalize="sequence", sequence_ids=seq, **kw)
    z64 = logits.clone().requires_grad_()
    want = _per_sequence_formula(z64, labels, seq, weights, mask, 0.4, reduction)
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-6, atol=1e-7)
    upstream = torch.rand_like(want) if reduction == "none" else torch.tensor(1.7, dtype=torch.float64)
    (g,) = torch.autograd.grad(got, z, upstream.to(got.dtype))
    (g64,) = torch.autograd.grad(want, z64, upstream)
    torch.testing.assert_close(g, g64, rtol=1e-6, atol=1e-8)


def test_sequence_default_is_one_sequence_per_row_and_token_default_unchanged():
    logits, labels, _, weights, _ = _problem()
    rows = torch.arange(3).unsqueeze(1).expand(3, 9)
    default = fp.masked_cross_entropy(logits, labels, token_weights=weights, normalize="sequence")
    explicit = fp.masked_cross_entropy(logits, labels, token_weights=weights, normalize="sequence",
                                       sequence_ids=rows)
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)
    token = fp.masked_cross_entropy(logits, labels, token_weights=weights, normalize="token")
    torch.testing.assert_close(token, fp.masked_cross_entropy(logits, labels, token_weights=weights))
    # one sequence holding everything == the token mean
    one = fp.masked_cross_entropy(logits, labels, token_weights=weights, normalize="sequence",
                                  sequence_ids=torch.zeros_like(labels))
    torch.testing.assert_close(one, token, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", ["masked", "linear"])
def test_gradient_accumulation_is_exact_over_micro_batches(kind):
    """num_items_in_batch = the window's number of sequences with weight: the micro-batch losses
    (and gradients) add up to the whole batch's mean over sequences."""
    logits, labels, seq, weights, mask = _problem(seed=3)
    z = logits.clone().requires_grad_()
    full = _ours(kind, z, labels, "torch", sequence_ids=seq, token_weights=weights, normalize="sequence")
    (g_full,) = torch.autograd.grad(full, z)
    count = torch.tensor(7.0)  # sequences 0-5 and 7 carry weight; 6 is fully ignored
    parts = []
    for rows in (slice(0, 1), slice(1, 3)):
        local = seq[rows] - seq[rows].min()  # ids only need to be unique within a call
        parts.append(_ours(kind, z[rows], labels[rows], "torch", sequence_ids=local, num_items_in_batch=count,
                           token_weights=weights[rows], normalize="sequence"))
    (g_parts,) = torch.autograd.grad(parts[0] + parts[1], z)
    torch.testing.assert_close(parts[0] + parts[1], full, rtol=1e-12, atol=0)
    torch.testing.assert_close(g_parts, g_full, rtol=1e-10, atol=1e-14)
    want = _per_sequence_formula(logits, labels, seq, weights, torch.zeros_like(mask), 0.0, "mean", num_items=7)
    torch.testing.assert_close(full.double(), want, rtol=1e-10, atol=0)


def test_modules_take_normalize_and_sequence_ids():
    logits, labels, seq, weights, _ = _problem()
    want = fp.masked_cross_entropy(logits, labels, token_weights=weights, normalize="sequence", sequence_ids=seq)
    got = fp.MaskedCrossEntropyLoss(normalize="sequence")(logits, labels, token_weights=weights, sequence_ids=seq)
    torch.testing.assert_close(got, want)
    eye = torch.eye(V, dtype=logits.dtype)
    lce = fp.LinearCrossEntropyLoss(normalize="sequence")
    assert "normalize='sequence'" in repr(lce)
    torch.testing.assert_close(lce(logits, eye, labels, token_weights=weights, sequence_ids=seq), want)


@pytest.mark.parametrize("call,error,match", [
    (lambda z, y, s: fp.masked_cross_entropy(z, y, normalize="sample"), ValueError, "normalize must be 'token'"),
    (lambda z, y, s: fp.linear_cross_entropy(z, torch.eye(V, dtype=z.dtype), y, normalize=None), ValueError,
     "normalize must be"),
    (lambda z, y, s: fp.masked_cross_entropy(z, y, normalize="sequence", sequence_ids=s[:, :5]), ValueError,
     r"sequence_ids has shape \(3, 5\) but must have labels' shape \(3, 9\)"),
    (lambda z, y, s: fp.linear_cross_entropy(z, torch.eye(V, dtype=z.dtype), y, normalize="sequence",
                                             sequence_ids=s.flatten()), ValueError, "sequence_ids has shape"),
    (lambda z, y, s: fp.masked_cross_entropy(z, y, sequence_ids=s), ValueError,
     "sequence_ids is only used with normalize='sequence'"),
    (lambda z, y, s: fp.masked_cross_entropy(z, y, normalize="sequence", sequence_ids=s.float()), TypeError,
     "sequence_ids must be an integer tensor"),
    (lambda z, y, s: fp.masked_cross_entropy(z, y, normalize="sequence", sequence_ids=s + 30), ValueError,
     r"sequence_ids must lie in \[0, 27\)"),
    (lambda z, y, s: fp.MaskedCrossEntropyLoss(normalize="tokens"), ValueError, "normalize must be"),
    (lambda z, y, s: fp.LinearCrossEntropyLoss(normalize="seq"), ValueError, "normalize must be"),
])
def test_bad_input(call, error, match):
    logits, labels, seq, _, _ = _problem()
    with pytest.raises(error, match=match):
        call(logits, labels, seq)


# ------------------------------------------------------------------------ patch_causal_lm, packed


def _llama():
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, initializer_range=0.2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).double().eval()


def _packed(lengths_per_row):
    """DataCollatorWithFlattening's format: rows of concatenated sequences, position_ids restarting
    at 0, the first label of every sequence -100 (never predicted across a boundary)."""
    g = torch.Generator().manual_seed(1)
    ids, pos, labels = [], [], []
    for lengths in lengths_per_row:
        row_ids = torch.randint(3, V, (sum(lengths),), generator=g)
        ids.append(row_ids)
        pos.append(torch.cat([torch.arange(n) for n in lengths]))
        lab = row_ids.clone()
        starts = torch.cumsum(torch.tensor([0, *lengths[:-1]]), 0)
        lab[starts] = -100
        labels.append(lab)
    return torch.stack(ids), torch.stack(pos), torch.stack(labels)


def _hand_sequence_mean(model, ids, pos, labels, num_items=None):
    """float64 per-sequence mean of HF's own logits, shifted as HF shifts; sequences from position_ids."""
    logits = transformers.LlamaForCausalLM.forward(model, input_ids=ids, position_ids=pos).logits
    means = []
    for b in range(ids.shape[0]):
        starts = (pos[b] == 0).nonzero().flatten().tolist() + [ids.shape[1]]
        for s, e in zip(starts[:-1], starts[1:]):
            z, y = logits[b, s:e - 1], labels[b, s + 1:e]  # target of position t is labels[t + 1]
            keep = y != -100
            if keep.any():
                means.append(torch.nn.functional.cross_entropy(z[keep], y[keep], reduction="mean"))
    return sum(means) / (len(means) if num_items is None else num_items)


def test_patch_causal_lm_packed_batch_sequence_mean():
    model = _llama()
    ids, pos, labels = _packed([[4, 6, 3], [5, 8]])
    want = _hand_sequence_mean(model, ids, pos, labels)
    fp.patch_causal_lm(model, normalize="sequence")
    got = model(input_ids=ids, position_ids=pos, labels=labels).loss
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    params = [p for p in model.parameters() if p.requires_grad]
    want_grads = torch.autograd.grad(_hand_sequence_mean(model, ids, pos, labels), params)
    got_grads = torch.autograd.grad(model(input_ids=ids, position_ids=pos, labels=labels).loss, params)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-9)
    # token normalisation of the same packed batch: one mean over all targets
    fp.patch_causal_lm(model)
    token = model(input_ids=ids, position_ids=pos, labels=labels).loss
    hf = transformers.LlamaForCausalLM.forward(model, input_ids=ids, position_ids=pos, labels=labels).loss
    torch.testing.assert_close(token.double(), hf.double(), rtol=1e-6, atol=0)


def test_patch_causal_lm_packed_gradient_accumulation():
    """Micro-batches with num_items_in_batch = the window's sequence count add up to the big batch."""
    model = fp.patch_causal_lm(_llama(), normalize="sequence")
    ids, pos, labels = _packed([[4, 6, 3], [5, 8], [7, 6]])
    params = [p for p in model.parameters() if p.requires_grad]
    full = model(input_ids=ids, position_ids=pos, labels=labels).loss
    full_grads = torch.autograd.grad(full, params)
    count = torch.tensor(7)
    parts = [model(input_ids=ids[r], position_ids=pos[r], labels=labels[r], num_items_in_batch=count).loss
             for r in (slice(0, 1), slice(1, 3))]
    part_grads = torch.autograd.grad(parts[0] + parts[1], params)
    torch.testing.assert_close(parts[0] + parts[1], full, rtol=1e-10, atol=0)
    for a, b in zip(part_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(full.double(), _hand_sequence_mean(model, ids, pos, labels), rtol=1e-6, atol=0)


def test_patch_causal_lm_sequence_without_position_ids_is_one_sequence_per_row():
    model = _llama()
    ids, pos, labels = _packed([[13], [13]])
    want = _hand_sequence_mean(model, ids, pos, labels)
    got = fp.patch_causal_lm(model, normalize="sequence")(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)


def test_patch_causal_lm_bad_normalize_and_position_ids():
    with pytest.raises(ValueError, match="normalize must be"):
        fp.patch_causal_lm(_llama(), normalize="packed")
    model = fp.patch_causal_lm(_llama(), normalize="sequence")
    ids, pos, labels = _packed([[4, 6], [5, 5]])
    with pytest.raises(ValueError, match="position_ids, which must be a tensor broadcastable to labels"):
        model(input_ids=ids, position_ids=pos[:, :7], labels=labels)
