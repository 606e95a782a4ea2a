"""MoRA's compress / decompress maps (docs/contract.md §3) on 2-D tensors, with no padded or reshaped copies.

Types 1-4 share M through index maps: ``compress`` sums input features into R slots and
``decompress_add_`` copies the R slots of M's output onto D outputs; the ``*_transpose``
functions are their adjoints (the backward). Type 6 works on chunks of the wrap-padded input:
chunk i (columns i R .. i R + R - 1 of cat(x, x[:, :pad])) goes through the block M·R_i and lands
on the output positions p with p mod (n R) in the chunk's range (``chunk_targets``).
All index arithmetic is on views of the caller's tensors; the only copies are [N, R] sized.
"""

from __future__ import annotations

import torch

from fusedpeft.core.mora import MoraGeometry, rope_tables, rotate_half


def _sum_groups(x: torch.Tensor, sizes: tuple[int, int], counts: tuple[int, int]) -> torch.Tensor:
    """x [N, L] cut into counts[0] runs of sizes[0] then counts[1] runs of sizes[1] -> run sums."""
    n = x.shape[0]
    first = counts[0] * sizes[0]
    parts = [x[:, :first].reshape(n, counts[0], sizes[0]).sum(-1)]
    if sizes[1] > 0:
        parts.append(x[:, first:].reshape(n, counts[1], sizes[1]).sum(-1))
    else:
        parts.append(x.new_zeros(n, counts[1]))
    return torch.cat(parts, dim=1)


def _add_groups_(out: torch.Tensor, h: torch.Tensor, sizes: tuple[int, int], counts: tuple[int, int]) -> None:
    """Adjoint of _sum_groups: out [N, L] += each value of h [N, R] repeated over its run."""
    n = out.shape[0]
    first = counts[0] * sizes[0]
    if counts[0]:
        out[:, :first].view(n, counts[0], sizes[0]).add_(h[:, : counts[0], None])
    if sizes[1] > 0:
        out[:, first:].view(n, counts[1], sizes[1]).add_(h[:, counts[0] :, None])


def _runs(length: int, r_hat: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Contiguous groups of docs/contract.md §3: (sizes, counts) = ((q + 1, q), (length % R, R - length % R))."""
    q, m = divmod(length, r_hat)
    return (q + 1, q), (m, r_hat - m)


# ----------------------------------------------------------------------------- types 1-4


def compress(x: torch.Tensor, g: MoraGeometry) -> torch.Tensor:
    """x [N, K] -> z [N, R]: strided sum over the wrap-padded chunks (types 1, 4) or sums of
    contiguous groups (types 2, 3)."""
    if g.mora_type in (2, 3):
        return _sum_groups(x, *_runs(g.in_features, g.r_hat))
    n, r = x.shape[0], g.r_hat
    full = g.full_chunks * r
    z = x[:, :full].reshape(n, g.full_chunks, r).sum(1) if full else x.new_zeros(n, r)
    if g.pad:
        rest = g.in_features - full
        z[:, :rest] += x[:, full:]
        z[:, rest:] += x[:, : g.pad]
    return z


def compress_transpose_add_(out: torch.Tensor, h: torch.Tensor, g: MoraGeometry) -> None:
    """out [N, K] += compress^T(h [N, R]): every input feature receives the slot it was summed into."""
    if g.mora_type in (2, 3):
        _add_groups_(out, h, *_runs(g.in_features, g.r_hat))
        return
    n, r = out.shape[0], g.r_hat
    full = g.full_chunks * r
    if full:
        out[:, :full].view(n, g.full_chunks, r).add_(h[:, None, :])
    if g.pad:
        rest = g.in_features - full
        out[:, full:] += h[:, :rest]
        out[:, : g.pad] += h[:, rest:]


def decompress_add_(y: torch.Tensor, y_slots: torch.Tensor, g: MoraGeometry) -> None:
    """y [N, D] += decompress(y_slots [N, R]): tile (types 1, 3) or repeat_interleave (types 2, 4)."""
    n, d, r = y.shape[0], g.out_features, g.r_hat
    if g.mora_type in (2, 4):
        _add_groups_(y, y_slots, *_runs(d, r))
        return
    tiles = d // r
    if tiles:
        y[:, : tiles * r].view(n, tiles, r).add_(y_slots[:, None, :])
    y[:, tiles * r :] += y_slots[:, : d - tiles * r]


def decompress_transpose(grad_y: torch.Tensor, g: MoraGeometry) -> torch.Tensor:
    """grad_y [N, D] -> [N, R]: the sum over the outputs that copy each slot."""
    n, d, r = grad_y.shape[0], g.out_features, g.r_hat
    if g.mora_type in (2, 4):
        return _sum_groups(grad_y, *_runs(d, r))
    tiles = d // r
    out = grad_y[:, : tiles * r].reshape(n, tiles, r).sum(1) if tiles else grad_y.new_zeros(n, r)
    out[:, : d - tiles * r] += grad_y[:, tiles * r :]
    return out


def _slots(length: int, r_hat: int, tiled: bool, device) -> torch.Tensor:
    """Slot of every position [length]: p mod R (tiled) or its contiguous group's index."""
    if tiled:
        return torch.arange(length, device=device) % r_hat
    (big, small), (n_big, n_small) = _runs(length, r_hat)
    sizes = torch.tensor([big] * n_big + [small] * n_small, device=device)
    return torch.repeat_interleave(torch.arange(r_hat, device=device), sizes)


def _regions(length: int, r_hat: int, tiled: bool) -> list[tuple[int, int, int, int, int, int]]:
    """Cut positions 0..length-1 into runs viewable as [a, b] whose slot depends on one axis.

    Returns (start, stop, a, b, slot_axis, first_slot): position start + i b + j has slot
    first_slot + (j if slot_axis == 1 else i). Tiled maps (p -> p mod R) give full tiles plus a
    remainder; contiguous groups give the runs of q + 1 and of q positions.
    """
    if tiled:
        tiles, rest = divmod(length, r_hat)
        runs = [(0, tiles * r_hat, tiles, r_hat, 1, 0)] if tiles else []
        return runs + ([(tiles * r_hat, length, 1, rest, 1, 0)] if rest else [])
    (big, small), (n_big, n_small) = _runs(length, r_hat)
    runs = [(0, n_big * big, n_big, big, 0, 0)] if n_big else []
    return runs + ([(n_big * big, length, n_small, small, 0, n_big)] if small else [])


def shared_merged_weight(weight: torch.Tensor, M: torch.Tensor, g: MoraGeometry) -> torch.Tensor:
    """W + ΔW [D, K] for types 1-4, in weight's dtype: ΔW[p, q] = M[slot(p), slot(q)] (+ the
    wrapped copy for types 1, 4), written as broadcast adds over [a, b] views — no gather."""
    out = torch.empty_like(weight)
    M_w = M.to(weight.dtype)
    out_runs = _regions(g.out_features, g.r_hat, tiled=g.mora_type in (1, 3))
    in_runs = _regions(g.in_features, g.r_hat, tiled=g.mora_type in (1, 4))
    for r0, r1, a1, b1, axis1, slot1 in out_runs:
        n1 = b1 if axis1 else a1
        for c0, c1, a2, b2, axis2, slot2 in in_runs:
            n2 = b2 if axis2 else a2
            block = M_w[slot1 : slot1 + n1, slot2 : slot2 + n2].reshape(
                1 if axis1 else n1, n1 if axis1 else 1, 1 if axis2 else n2, n2 if axis2 else 1)
            torch.add(weight[r0:r1, c0:c1].view(a1, b1, a2, b2), block,
                      out=out[r0:r1, c0:c1].view(a1, b1, a2, b2))
    if g.pad:
        out_slot = _slots(g.out_features, g.r_hat, g.mora_type in (1, 3), M.device)
        wrap_slot = (torch.arange(g.pad, device=M.device) + g.in_features) % g.r_hat
        out[:, : g.pad] += M_w.index_select(0, out_slot).index_select(1, wrap_slot)
    return out


# ----------------------------------------------------------------------------- type 6


def rope_blocks(M: torch.Tensor, g: MoraGeometry) -> torch.Tensor:
    """B_i = M·R_i for every chunk -> [n, R, R], in M's dtype (fp32 when M is 16-bit)."""
    Mc = M.float() if M.element_size() < 4 else M
    cos, sin = (t.to(Mc.dtype) for t in rope_tables(g.r_hat, g.n_chunks, M.device))
    half = g.r_hat // 2
    swapped = torch.cat([Mc[:, half:], -Mc[:, :half]], dim=1)
    return Mc[None] * cos[:, None, :] + swapped[None] * sin[:, None, :]


def rotate_rows(c: torch.Tensor, chunk: int | slice, g: MoraGeometry) -> torch.Tensor:
    """c [R, R] -> c R_i^T: the rotation of chunk i applied along c's last dimension.

    With a slice of chunks, c is [n, R, R] and chunk j of the slice is rotated by its own table."""
    cos, sin = (t[chunk].to(c.dtype) for t in rope_tables(g.r_hat, g.n_chunks, c.device))
    if isinstance(chunk, slice):
        cos, sin = cos[:, None, :], sin[:, None, :]
    return c * cos + rotate_half(c) * sin


def chunk_targets(chunk: int, g: MoraGeometry) -> list[tuple[int, int]]:
    """Output column ranges [start, stop) that copy chunk ``chunk`` (tiled when n R < D)."""
    span = g.n_chunks * g.r_hat
    targets = []
    for tile_start in range(0, g.out_features, span):
        start = tile_start + chunk * g.r_hat
        if start < g.out_features:
            targets.append((start, min(start + g.r_hat, g.out_features)))
    return targets


def chunk_input(x: torch.Tensor, chunk: int, g: MoraGeometry) -> torch.Tensor:
    """Chunk i of cat(x, x[:, :pad]) -> [N, R] (a view except for the wrapped last chunk)."""
    start = chunk * g.r_hat
    if start + g.r_hat <= g.in_features:
        return x[:, start : start + g.r_hat]
    return torch.cat([x[:, start:], x[:, : g.pad]], dim=1)


def chunk_input_add_(out: torch.Tensor, values: torch.Tensor, chunk: int, g: MoraGeometry) -> None:
    """Adjoint of chunk_input: out [N, K] += values [N, R] on the chunk's (wrapped) columns."""
    start = chunk * g.r_hat
    inside = min(g.r_hat, g.in_features - start)
    out[:, start : start + inside] += values[:, :inside]
    if inside < g.r_hat:
        out[:, : g.r_hat - inside] += values[:, inside:]


def chunk_output_grad(grad_y: torch.Tensor, chunk: int, g: MoraGeometry) -> torch.Tensor:
    """Gradient of chunk i's output: grad_y summed over its targets -> [N, R] (zero-padded)."""
    targets = chunk_targets(chunk, g)
    start, stop = targets[0]
    if len(targets) == 1 and stop - start == g.r_hat:
        return grad_y[:, start:stop]
    out = grad_y.new_zeros(grad_y.shape[0], g.r_hat)
    for start, stop in targets:
        out[:, : stop - start] += grad_y[:, start:stop]
    return out
