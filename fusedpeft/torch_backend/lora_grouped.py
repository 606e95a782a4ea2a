"""Grouped LoRA on the PyTorch path: G layers that read the same x (q/k/v, gate/up).

Forward:  S = dropout(x) @ [A_0; ...; A_{G-1}]^T  [N, sum r_i]   (one pass over x, one mask)
          y_i = bias_i + scaling_i S_i @ B_i^T, then y_i += x @ W_i^T (addmm_, see lora.py)
Backward: dS_i = scaling_i dY_i @ B_i;  dB_i = scaling_i dY_i^T @ S_i;
          [dA_0; ...] = dS^T @ dropout(x)  (one pass over x);
          dX = dropout'(dS @ [A_0; ...]) + sum_i dY_i @ W_i.
Saved between them: x, S and the seed. The mask is regenerated block by block, as in lora.py.
"""

from __future__ import annotations

import torch

from fusedpeft.torch_backend.dropout import dropped_blocks


def _shrink(x: torch.Tensor, A: torch.Tensor, dropout_p: float, seed) -> torch.Tensor:
    if dropout_p == 0.0:
        return x @ A.t()
    S = x.new_empty(x.shape[0], A.shape[0])
    for rows, x_dropped in dropped_blocks(x, dropout_p, seed):
        torch.mm(x_dropped, A.t(), out=S[rows])
    return S


def lora_grouped_forward(x, weights, biases, lora_As, lora_Bs, scalings, dropout_p: float, seed):
    """x [N, K]; weights[i] [D_i, K]; biases[i] [D_i] | None; lora_As[i] [r_i, K]; lora_Bs[i]
    [D_i, r_i]; scalings[i] float -> (ys: list of [N, D_i], S [N, sum r_i]), all in x's dtype.

    seed: 0-dim int64 tensor, needed when dropout_p > 0; the one mask is shared by the group."""
    S = _shrink(x, torch.cat([A.to(x.dtype) for A in lora_As]), dropout_p, seed)
    ys = []
    for w, b, S_i, B, scaling in zip(weights, biases, S.split([A.shape[0] for A in lora_As], dim=1), lora_Bs,
                                     scalings):
        B_scaled = (B * scaling).to(x.dtype)
        y = S_i @ B_scaled.t() if b is None else torch.addmm(b, S_i, B_scaled.t())
        ys.append(y.addmm_(x, w.t()))
    return ys, S


def lora_grouped_backward(grad_ys, x, weights, lora_As, lora_Bs, S, scalings, dropout_p: float, seed,
                          need_x: bool, need_A: bool, need_B: bool):
    """grad_ys[i] [N, D_i] | None -> (grad_x [N, K] | None, grad_As: list of [r_i, K] | None,
    grad_Bs: list of [D_i, r_i] | None); grad_x in x's dtype, the others in the adapters' dtypes."""
    ranks = [A.shape[0] for A in lora_As]
    S_parts = S.split(ranks, dim=1)
    need_S = need_x or need_A
    dS_parts, grad_Bs, dys = [], [], []
    for g, B, S_i, scaling in zip(grad_ys, lora_Bs, S_parts, scalings):
        if g is None:
            dys.append(None)
            dS_parts.append(x.new_zeros(x.shape[0], B.shape[1]))
            grad_Bs.append(torch.zeros_like(B))
            continue
        dy = g.to(x.dtype)
        dys.append(dy)
        dS_parts.append(dy @ (B * scaling).to(x.dtype) if need_S else None)
        grad_Bs.append(torch.mm(S_i.t(), dy).t().contiguous().to(B.dtype).mul_(scaling) if need_B else None)
    grad_x = grad_As = None
    if need_S:
        dS = torch.cat(dS_parts, dim=1)
        A = torch.cat([A_i.to(x.dtype) for A_i in lora_As])
        acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        if dropout_p > 0.0:
            grad_x = torch.empty_like(x) if need_x else None
            dA = torch.zeros(A.shape, dtype=acc_dtype, device=x.device) if need_A else None
            branch = (lambda rows: dS[rows] @ A) if need_x else None
            for rows, x_dropped in dropped_blocks(x, dropout_p, seed, grad_x, branch):  # grad_x = dropout'(dS @ A)
                if need_A:
                    dA += (dS[rows].t() @ x_dropped).to(acc_dtype)
        else:
            dA = (dS.t() @ x).to(acc_dtype) if need_A else None
            grad_x = dS @ A if need_x else None
        if need_x:
            for dy, w in zip(dys, weights):
                if dy is not None:
                    grad_x.addmm_(dy, w)
        if need_A:
            grad_As = [g.to(A_i.dtype, copy=True) for g, A_i in zip(dA.split(ranks), lora_As)]
    return grad_x, grad_As, grad_Bs if need_B else None
