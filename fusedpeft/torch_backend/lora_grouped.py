"""Grouped LoRA on the PyTorch path: G layers that read the same x (q/k/v, gate/up), built from
the single-layer pieces of lora.py.

Forward:  S = dropout(x) @ [A_0; ...; A_{G-1}]^T  [N, sum r_i]   (one pass over x, one mask)
          y_i = bias_i + scaling_i S_i @ B_i^T, then y_i += x @ W_i^T (addmm_, see lora.py)
Backward: dS_i = scaling_i dY_i @ B_i;  dB_i = scaling_i dY_i^T @ S_i;
          [dA_0; ...] = dS^T @ dropout(x)  (one pass over x);
          dX = dropout'(dS @ [A_0; ...]) + sum_i dY_i @ W_i.
Saved between them: x, S and the seed. The mask is regenerated block by block, as in lora.py.
"""

from __future__ import annotations

import torch

from fusedpeft.host.lora import expand_onto_base, lora_B_grad
from fusedpeft.torch_backend.lora import shrink, shrink_grads, shrink_output_grad


def lora_grouped_forward(x, weights, biases, lora_As, lora_Bs, scalings, dropout_p: float, seed):
    """x [N, K]; weights[i] [D_i, K]; biases[i] [D_i] | None; lora_As[i] [r_i, K]; lora_Bs[i]
    [D_i, r_i]; scalings[i] float -> (ys: list of [N, D_i], S [N, sum r_i]), all in x's dtype.

    seed: 0-dim int64 tensor, needed when dropout_p > 0; the one mask is shared by the group."""
    S = shrink(x, torch.cat([A.to(x.dtype) for A in lora_As]), dropout_p, seed)
    S_parts = S.split([A.shape[0] for A in lora_As], dim=1)
    ys = [expand_onto_base(S_i, x, w, b, B, scaling)
          for w, b, S_i, B, scaling in zip(weights, biases, S_parts, lora_Bs, scalings)]
    return ys, S


def lora_grouped_backward(grad_ys, x, weights, lora_As, lora_Bs, S, scalings, dropout_p: float, seed,
                          need_x: bool, need_A: bool, need_B: bool):
    """grad_ys[i] [N, D_i] | None -> (grad_x [N, K] | None, grad_As: list of [r_i, K] | None,
    grad_Bs: list of [D_i, r_i] | None); grad_x in x's dtype, the others in the adapters' dtypes."""
    ranks = [A.shape[0] for A in lora_As]
    need_S = need_x or need_A
    dS_parts, grad_Bs, base_grads = [], [], []
    for g, w, B, S_i, scaling in zip(grad_ys, weights, lora_Bs, S.split(ranks, dim=1), scalings):
        if g is None:
            dS_parts.append(x.new_zeros(x.shape[0], B.shape[1]))
            grad_Bs.append(torch.zeros_like(B))
            continue
        dy = g.to(x.dtype)
        base_grads.append((dy, w))
        dS_parts.append(shrink_output_grad(dy, B, scaling) if need_S else None)
        grad_Bs.append(lora_B_grad(S_i, dy, B, scaling) if need_B else None)
    grad_x = grad_As = None
    if need_S:
        A = torch.cat([A_i.to(x.dtype) for A_i in lora_As])
        grad_x, dA = shrink_grads(torch.cat(dS_parts, dim=1), x, A, dropout_p, seed, base_grads, need_x, need_A)
        if need_A:
            grad_As = [g.to(A_i.dtype, copy=True) for g, A_i in zip(dA.split(ranks), lora_As)]
    return grad_x, grad_As, grad_Bs if need_B else None
