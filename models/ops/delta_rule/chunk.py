"""The delta rule's chunked form (WY / UT transform; the equations: ``layers/deltanet.py``), split into the
state-independent preparation, the state pass and the chunk summary (context parallelism uses each).
Only torch is imported.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def delta_rule_prepare(q, k, v, beta, log_alpha, chunk_size: int) -> dict:
    """The state-independent part of the chunked (WY) delta rule (see :func:`delta_rule_chunked`):
    per chunk the pseudo-values U′, W and the decay-weighted Q, Kᵀ-at-the-end tensors."""
    B, H, T, dk = k.shape
    dv = v.shape[-1]
    C = min(chunk_size, T)
    pad = (-T) % C
    if log_alpha is None:
        log_alpha = torch.zeros_like(beta)
    if pad:  # padded tokens: β = 0 and α = 1 leave S unchanged and their outputs are dropped
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        beta, log_alpha = F.pad(beta, (0, pad)), F.pad(log_alpha, (0, pad))
    N = (T + pad) // C
    q, k, v = (t.unflatten(2, (N, C)) for t in (q, k, v))  # [B,H,N,C,d]
    beta, log_alpha = beta.unflatten(2, (N, C)), log_alpha.unflatten(2, (N, C))

    G = log_alpha.cumsum(-1)  # log γ_t within each chunk
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    diff = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf"))
    Gamma = diff.exp()  # Γ_tj = γ_t/γ_j for j ≤ t, else 0
    gamma = G.exp()[..., None]  # [B,H,N,C,1]
    L = (beta[..., None] * Gamma * (k @ k.transpose(-1, -2))).tril(-1)
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    rhs = torch.cat([beta[..., None] * v, beta[..., None] * gamma * k], -1)
    X = torch.linalg.solve_triangular(eye + L, rhs, upper=False, unitriangular=True)
    U_v, W = X[..., :dv], X[..., dv:]
    QK = q @ k.transpose(-1, -2) * Gamma
    Qg = gamma * q
    K_end = (G[..., -1:, None] - G[..., :, None]).exp() * k  # Γ_{C,j} k_j
    g_end = gamma[..., -1:, :]  # [B,H,N,1,1]
    return dict(U_v=U_v, W=W, QK=QK, Qg=Qg, K_end=K_end, g_end=g_end, T=T, N=N)


def delta_rule_run(prep: dict, S):
    """The chunk loop of :func:`delta_rule_chunked` from state S [B,H,dk,dv]; returns (o, S)."""
    U_v, W, QK, Qg, K_end, g_end = (prep[n] for n in ("U_v", "W", "QK", "Qg", "K_end", "g_end"))
    outs = []
    for n in range(prep["N"]):
        U = U_v[:, :, n] - W[:, :, n] @ S
        outs.append(Qg[:, :, n] @ S + QK[:, :, n] @ U)
        S = g_end[:, :, n] * S + K_end[:, :, n].transpose(-1, -2) @ U
    o = torch.stack(outs, 2).flatten(2, 3)[:, :, : prep["T"]]
    return o, S


def delta_rule_summary(prep: dict):
    """The piece as an affine map of its incoming state: S_out = A S_in + B, with
    A [B,H,dk,dk] and B [B,H,dk,dv]. Per chunk S ← (γ_C I − K_endᵀ W) S + K_endᵀ U′; the chunks
    are composed in order (for context parallelism by prefix combine, parallel/prefix.py)."""
    U_v, W, K_end, g_end = prep["U_v"], prep["W"], prep["K_end"], prep["g_end"]
    dk = W.shape[-1]
    eye = torch.eye(dk, dtype=W.dtype, device=W.device)
    Kt = K_end.transpose(-1, -2)
    A_n = g_end * eye - Kt @ W  # [B,H,N,dk,dk]
    B_n = Kt @ U_v  # [B,H,N,dk,dv]
    A, Bm = A_n[:, :, 0], B_n[:, :, 0]
    for n in range(1, prep["N"]):
        A, Bm = A_n[:, :, n] @ A, A_n[:, :, n] @ Bm + B_n[:, :, n]
    return A, Bm


def delta_rule_chunked(q, k, v, beta, log_alpha, S, chunk_size: int):
    """Chunked (WY) delta rule. q, k: [B,H,T,dk]; v: [B,H,T,dv]; beta: [B,H,T];
    log_alpha: [B,H,T] or None; S: [B,H,dk,dv]. Returns (o [B,H,T,dv], S after the last token)."""
    return delta_rule_run(delta_rule_prepare(q, k, v, beta, log_alpha, chunk_size), S)
