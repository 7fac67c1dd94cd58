"""Kimi Delta Attention's chunked form (the equations: ``layers/kda.py``). Only torch is imported.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kda_chunked(q, k, v, beta, log_alpha, S, chunk_size: int):
    """The WY form of the module docstring; same arguments and result as :func:`kda_reference`."""
    B, H, T, dk = k.shape
    dv = v.shape[-1]
    C = min(chunk_size, T)
    pad = (-T) % C
    if pad:  # padded tokens: β = 0 and α = 1 leave S unchanged and their outputs are dropped
        q, k, v, log_alpha = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v, log_alpha))
        beta = F.pad(beta, (0, pad))
    N = (T + pad) // C
    q, k, v, g = (t.unflatten(2, (N, C)) for t in (q, k, v, log_alpha))  # [B, H, N, C, d]
    beta = beta.unflatten(2, (N, C))
    G = g.cumsum(-2)  # log γ_t per channel
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    E = (G[..., :, None, :] - G[..., None, :, :]).masked_fill(~causal[..., None], float("-inf")).exp()  # [.., t, j, c]
    kE = k[..., None, :, :] * E  # k_jc e^{G_tc − G_jc}
    KK = (kE @ k[..., None]).squeeze(-1)  # [.., t, j]
    QK = (kE @ q[..., None]).squeeze(-1)  # j ≤ t
    gamma = G.exp()
    L = (beta[..., None] * KK).tril(-1)
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    rhs = torch.cat([beta[..., None] * v, beta[..., None] * gamma * k], -1)
    X = torch.linalg.solve_triangular(eye + L, rhs, upper=False, unitriangular=True)
    U_v, W = X[..., :dv], X[..., dv:]
    Qg = gamma * q
    K_end = (G[..., -1:, :] - G).exp() * k  # k_j ⊙ γ_C/γ_j
    g_end = gamma[..., -1, :, None]  # [B, H, N, d_k, 1]
    outs = []
    for n in range(N):
        U = U_v[:, :, n] - W[:, :, n] @ S
        outs.append(Qg[:, :, n] @ S + QK[:, :, n] @ U)
        S = g_end[:, :, n] * S + K_end[:, :, n].transpose(-1, -2) @ U
    return torch.stack(outs, 2).flatten(2, 3)[:, :, :T], S
