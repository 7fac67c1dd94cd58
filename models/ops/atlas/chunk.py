"""ATLAS' chunked scan (Omega rule over a sliding window, Muon; the equations: ``layers/atlas.py``) and its
polynomial features. Only torch is imported.
"""
from __future__ import annotations

import itertools
import math
from functools import lru_cache

import torch
from torch.utils.checkpoint import checkpoint

from ...common.backprop import gelu_tanh_grad
from ...common.parts import gelu_tanh, newton_schulz
from ...common.scan import chunk_sizes, split_chunks
from ..miras.chunk import coefficient_outer, decay_coefficients


NAMES = ("W1", "W2")
OPTIMIZERS = ("muon", "momentum", "sgd")

# ------------------------------------------------------------------------------ feature map


@lru_cache(maxsize=None)
def _monomials(dim: int, degree: int):
    """Index tuples of the degree-``degree`` monomials of ``dim`` variables and √(multinomial coefficient)."""
    idx = list(itertools.combinations_with_replacement(range(dim), degree))
    coef = [math.sqrt(math.factorial(degree) / math.prod(math.factorial(c) for c in
                                                         (t.count(j) for j in set(t)))) for t in idx]
    return torch.tensor(idx, dtype=torch.long), torch.tensor(coef, dtype=torch.float64)


def poly_feature_dim(dim: int, degree: int) -> int:
    """Σ_{i=1..p} C(dim + i − 1, i)."""
    return sum(math.comb(dim + i - 1, i) for i in range(1, degree + 1))


def poly_features(x: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """φ(x) = [a_1 m_1(x), …, a_p m_p(x)]: x [B, H, T, d], coef a: [H, p] → [B, H, T, D] with
    ⟨m_i(x), m_i(y)⟩ = (x·y)^i (the monomials of degree i weighted by √(multinomial))."""
    feats = []
    for i in range(1, coef.shape[-1] + 1):
        idx, mult = _monomials(x.shape[-1], i)
        idx, mult = idx.to(x.device), mult.to(device=x.device, dtype=x.dtype)
        feats.append(coef[:, i - 1, None, None] * mult * x[..., idx].prod(-1))
    return torch.cat(feats, -1)


# ------------------------------------------------------------------------------ the chunked scan


def _backprop_at(w: dict, k, v, gamma):
    """Per-token layer inputs X and γ-weighted errors Δ of ½γ‖M(k) − v‖² at the weights w."""
    z1 = k @ w["W1"]
    h = gelu_tanh(z1)
    d2 = gamma[..., None] * (h @ w["W2"] - v)
    d1 = (d2 @ w["W2"].transpose(-1, -2)) * gelu_tanh_grad(z1)
    return [k, h], [d1, d2]


def _segment(cur, anc, mom, window, q, k, v, g, c: int, optimizer: str):
    """n tokens of one chunk from memory ``cur`` (momentum ``mom``), gradients at ``anc``; ``window``:
    the c − 1 tokens before the segment (φk, v, γ) or None for c = 1. Returns (o, cur, mom, window)."""
    n = q.shape[2]
    if window is not None:
        k_ext, v_ext = torch.cat([window["k"], k], 2), torch.cat([window["v"], v], 2)
        g_ext = torch.cat([window["gamma"], g["gamma"]], 2)
    else:
        k_ext, v_ext, g_ext = k, v, g["gamma"]
    xs, ds = _backprop_at(anc, k_ext, v_ext, g_ext)
    # ω_t = Σ_{j ∈ [t, t + c)} u_j over the extended tokens (token t of the segment is extended index t + c − 1)
    t_idx = torch.arange(n, device=q.device)[:, None]
    j_idx = torch.arange(n + c - 1, device=q.device)[None, :]
    band = ((j_idx >= t_idx) & (j_idx < t_idx + c)).to(q.dtype)
    if optimizer == "sgd":
        K, P_mom = band.expand(*q.shape[:2], *band.shape), None
    else:
        P_mom, C_mom = decay_coefficients(-torch.ones_like(g["theta"]), g["theta"])  # C_tj = Π_{j<i≤t} θ_i
        K = C_mom @ band
    P, C = decay_coefficients(g["lr"], g["alpha"])
    h = q
    new_w, new_m = {}, {}
    if optimizer != "muon":  # M_t is linear in (M, S, u_j): dual form, no per-token weights
        CK, CP = C @ K, (C @ P_mom[..., None])[..., 0] if P_mom is not None else None
        for i, name in enumerate(NAMES):
            X, D = xs[i], ds[i]
            z = P[..., None] * (h @ cur[name]) + (CK * (h @ X.transpose(-1, -2))) @ D
            new_w[name] = P[..., -1:, None] * cur[name] + (CK[..., -1, :, None] * X).transpose(-1, -2) @ D
            if CP is not None:
                z = z + CP[..., None] * (h @ mom[name])
                new_w[name] = new_w[name] + CP[..., -1:, None] * mom[name]
                new_m[name] = P_mom[..., -1:, None] * mom[name] + (K[..., -1, :, None] * X).transpose(-1, -2) @ D
            h = gelu_tanh(z) if i == 0 else z
    for i, name in enumerate(NAMES if optimizer == "muon" else ()):
        S = coefficient_outer(K, xs[i], ds[i])  # [B, H, n, d_in, d_out]
        if P_mom is not None:
            S = S + P_mom[..., None, None] * mom[name][:, :, None]
            new_m[name] = S[:, :, -1].clone()  # a copy: a view would keep every token's S alive past the checkpoint
        N = newton_schulz(S) if optimizer == "muon" else S
        M = P[..., None, None] * cur[name][:, :, None] + torch.einsum("bhtj,bhjio->bhtio", C, N)  # M_t per token
        z = (h[..., None, :] @ M)[..., 0, :]
        new_w[name] = M[:, :, -1].clone()
        h = gelu_tanh(z) if i == 0 else z
    if window is not None:
        keep = c - 1
        window = {"k": k_ext[:, :, -keep:], "v": v_ext[:, :, -keep:], "gamma": g_ext[:, :, -keep:]}
    return h, new_w, (new_m if P_mom is not None else None), window


def atlas_scan_chunked(weights: dict, anchor: dict | None, momentum: dict | None, window: dict | None, q, k, v,
                       gates: dict, position: int, chunk_size: int, c: int, optimizer: str):
    """Chunked ATLAS memory. q, k: features [B, H, T, D]; v: [B, H, T, d]; gates "lr", "theta", "alpha",
    "gamma": [B, H, T]; weights/anchor/momentum: {W1 [B, H, D, E], W2 [B, H, E, d]} (momentum None
    for ``sgd``); window: {"k", "v", "gamma"} of the c − 1 previous tokens (None when c = 1).
    Returns (o [B, H, T, d], weights, anchor-or-None, momentum, window)."""
    b, T = chunk_size, q.shape[2]
    cur, anc = weights, (weights if anchor is None else anchor)
    outs, stop = [], 0
    sizes = chunk_sizes(position, T, b)
    for size, (qc, kc, vc, gs) in zip(sizes, split_chunks(sizes, q, k, v, gates)):
        stop += size
        seg = (cur, anc, momentum, window, qc, kc, vc, gs, c, optimizer)
        # Muon: S_t, NS(S_t), M_t of every token are recomputed in the backward instead of kept
        o, cur, momentum, window = (checkpoint(_segment, *seg, use_reentrant=False)
                                    if optimizer == "muon" and torch.is_grad_enabled() else _segment(*seg))
        if (position + stop) % b == 0:
            anc = cur
        outs.append(o)
    return torch.cat(outs, 2), cur, None if (position + T) % b == 0 else anc, momentum, window
