"""Kimi Delta Attention token by token (the definition ``ops/kda/chunk.py`` is held to). Only torch is imported.
"""
from __future__ import annotations

import torch


def kda_reference(q, k, v, beta, log_alpha, S):
    """Token by token. q, k, log_alpha: [B, H, T, d_k]; v: [B, H, T, d_v]; beta: [B, H, T];
    S: [B, H, d_k, d_v]. Returns (o [B, H, T, d_v], S after the last token)."""
    outs = []
    for t in range(q.shape[2]):
        S = log_alpha[:, :, t, :, None].exp() * S  # Diag(α_t) S
        k_t = k[:, :, t]
        u = beta[:, :, t, None] * (v[:, :, t] - (k_t[..., None] * S).sum(-2))  # β (v − Sᵀk)
        S = S + k_t[..., None] * u[..., None, :]
        outs.append((q[:, :, t, :, None] * S).sum(-2))
    return torch.stack(outs, 2), S
