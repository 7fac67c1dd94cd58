"""Miras' chunked scans (Moneta, Yaad, Memora; frozen gradients inside a chunk; the equations:
``layers/miras.py``), its attentional biases and retentions. Only torch is imported.
"""
from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from ...common.backprop import gelu_tanh_grad
from ...common.parts import gelu_tanh, head_layer_norm
from ...common.scan import chunk_sizes, split_chunks


VARIANTS = ("moneta", "yaad", "memora")
NAMES = ("W1", "W2")
LN_EPS = 1e-6
LP_EPS = 1e-6  # ε of the smooth |x| = √(x² + ε) in Moneta's ℓ_p


# ------------------------------------------------------------------------------ memory and losses


def miras_memory(theta: dict, x: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor) -> torch.Tensor:
    """M(x) = x + LN_{γ,β}(GELU(x W1) W2)."""
    return x + head_layer_norm(gelu_tanh(x @ theta["W1"]) @ theta["W2"], ln_w, ln_b, LN_EPS)


def lp_loss(e: torch.Tensor, p: float) -> torch.Tensor:
    """(1/p) Σ (e² + ε)^{p/2}: the smooth ℓ_p attentional bias (p = 2: ½‖e‖² up to ε)."""
    return (e * e + LP_EPS).pow(p / 2).sum() / p


def lp_grad(e: torch.Tensor, p: float) -> torch.Tensor:
    """∂/∂e of :func:`lp_loss`: e (e² + ε)^{(p−2)/2} (≈ sign(e)|e|^{p−1})."""
    return e * (e * e + LP_EPS).pow((p - 2) / 2)


def huber_loss(e: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Yaad's bias per token: ½‖e‖² if ‖e‖₂ ≤ δ else δ‖e‖₁ (e: [.., n, d], δ: [.., n, 1])."""
    small = e.norm(dim=-1, keepdim=True) <= delta
    return torch.where(small, 0.5 * e * e, delta * e.abs()).sum()


def huber_grad(e: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """∂/∂e of :func:`huber_loss`: e inside the threshold, δ·sign(e) outside."""
    small = e.norm(dim=-1, keepdim=True) <= delta
    return torch.where(small, e, delta * torch.sign(e))


def softmax_memory(logits: dict) -> dict:
    """Memora's constrained weights W = c·softmax(L) over the input dim, c = √d_in."""
    return {n: math.sqrt(t.shape[-2]) * torch.softmax(t, dim=-2) for n, t in logits.items()}


def lq_normaliser(a: torch.Tensor, q: float) -> torch.Tensor:
    """r(A) = 1/‖A‖_q^{q−2} of each matrix (last two dims), so that W = r·A."""
    return a.abs().pow(q).sum((-2, -1), keepdim=True).pow(-(q - 2) / q)


# ------------------------------------------------------------------------------ the chunked scans


def _backprop_at(w: dict, k, v, ln_w, ln_b, dloss):
    """Per-token layer inputs X and errors Δ of ℓ(M_w(k) − v) (∂ℓ_j/∂W_l = X_{l,j}ᵀ Δ_{l,j}).
    dloss(e) = ∂ℓ/∂e per token."""
    z1 = k @ w["W1"]
    h1 = gelu_tanh(z1)
    z2 = h1 @ w["W2"]
    zc = z2 - z2.mean(-1, keepdim=True)
    rstd = torch.rsqrt(zc.pow(2).mean(-1, keepdim=True) + LN_EPS)  # (native_layer_norm's rstd has no gradient)
    x_hat = zc * rstd
    pred = k + ln_w * x_hat + ln_b
    g_hat = ln_w * dloss(pred - v) / v.shape[-1]  # ℓ is averaged over the features
    d2 = (g_hat - g_hat.mean(-1, keepdim=True) - x_hat * (g_hat * x_hat).mean(-1, keepdim=True)) * rstd
    d1 = (d2 @ w["W2"].transpose(-1, -2)) * gelu_tanh_grad(z1)
    return [k, h1], [d1, d2]


def decay_coefficients(lr: torch.Tensor, keep: torch.Tensor):
    """S_t = keep_t S_{t−1} − lr_t u_t over n tokens ([.., n]) as S_t = P_t S_0 + Σ_j C_tj u_j.
    Returns P [.., n] and C [.., n, n] (row t, column j; zero above the diagonal)."""
    cum = torch.log(keep).cumsum(-1)
    n = lr.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=lr.device).tril()
    gap = torch.where(causal, cum[..., :, None] - cum[..., None, :], float("-inf"))
    return cum.exp(), -lr[..., None, :] * gap.exp()


def coefficient_outer(K: torch.Tensor, X: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """Σ_j K_tj X_jᵀ D_j for every t: K [.., n, m], X [.., m, i], D [.., m, o] → [.., n, i, o] (the
    per-token outer products u_j = X_jᵀ D_j are never formed)."""
    return (K[..., :, :, None] * X[..., None, :, :]).transpose(-1, -2) @ D[..., None, :, :]


def _dual_layer(h, w, P, C, X, D):
    """h [.., n, d_in] read through W_t = P_t W + Σ_{j≤t} C_tj X_jᵀ D_j without forming W_t."""
    return P[..., None] * (h @ w) + (C * (h @ X.transpose(-1, -2))) @ D


def _dual_update(w, P, C, X, D):
    """W_n (the last token's weights) of :func:`_dual_layer`."""
    return P[..., -1:, None] * w + (C[..., -1, :, None] * X).transpose(-1, -2) @ D


def _linear_segment(variant, cur, anc, opt, q, k, v, g, ln_w, ln_b, ends: bool, p: float, qn: float):
    """Yaad / Moneta on n tokens of one chunk (dual form). Returns (o, weights, opt)."""
    if variant == "yaad":
        dloss = lambda e: huber_grad(e, g["delta"][..., None])  # noqa: E731
        scales = {n: 1.0 for n in NAMES}
    else:
        dloss = lambda e: lp_grad(e, p)  # noqa: E731
        scales = {n: opt["norm"][n][..., 0] for n in NAMES}  # [B, H, 1]: W = r A, r frozen in the chunk
    xs, ds = _backprop_at(anc, k, v, ln_w, ln_b, dloss)
    h = q
    new, new_norm = {}, {}
    for i, n in enumerate(NAMES):
        P, C = decay_coefficients(g["lr"] * scales[n], g["keep"])
        z = _dual_layer(h, cur[n], P, C, xs[i], ds[i])
        new[n] = _dual_update(cur[n], P, C, xs[i], ds[i])
        if variant == "moneta" and ends:  # renormalise: W = r(A) A with A = W̃ / r_old
            r_old = opt["norm"][n]
            new_norm[n] = lq_normaliser(new[n] / r_old, qn)
            ratio = new_norm[n] / r_old
            new[n] = new[n] * ratio
            z = torch.cat([z[..., :-1, :], z[..., -1:, :] * ratio], -2)
        h = gelu_tanh(z) if i == 0 else z
    o = q + head_layer_norm(h, ln_w, ln_b, LN_EPS)
    if variant == "moneta" and ends:
        opt = {"norm": new_norm}
    return o, new, opt


def _memora_segment(cur, anc, q, k, v, g, ln_w, ln_b):
    """Memora on n tokens of one chunk: the logits L_t are materialised per token."""
    xs, ds = _backprop_at(softmax_memory(anc), k, v, ln_w, ln_b, lambda e: e)
    P, C = decay_coefficients(g["lr"], g["keep"])
    h = q
    new = {}
    for i, n in enumerate(NAMES):
        L = P[..., None, None] * cur[n][:, :, None] + coefficient_outer(C, xs[i], ds[i])  # [B, H, n, d_in, d_out]
        W = math.sqrt(L.shape[-2]) * torch.softmax(L, dim=-2)
        z = (h[..., None, :] @ W)[..., 0, :]
        new[n] = L[:, :, -1].clone()  # a copy: a view would keep every token's L alive past the checkpoint
        h = gelu_tanh(z) if i == 0 else z
    return q + head_layer_norm(h, ln_w, ln_b, LN_EPS), new


def miras_scan_chunked(variant: str, weights: dict, anchor: dict | None, opt: dict, q, k, v, gates: dict, ln_w, ln_b,
                       position: int, chunk_size: int, p: float = 3.0, qn: float = 4.0):
    """Chunked Miras memory. q, k, v: [B, H, T, d]; gates: "lr", "keep" (+ Yaad's "delta") [B, H, T];
    weights/anchor: {W1, W2} [B, H, d_in, d_out] (Memora: the logits); opt: Moneta {"norm": {W1, W2}}
    [B, H, 1, 1], else {}; ln_w/ln_b: [B, H, d]. Returns (o [B, H, T, d], weights, anchor-or-None, opt)."""
    b, T = chunk_size, q.shape[2]
    cur, anc = weights, (weights if anchor is None else anchor)
    lw, lb = ln_w[:, :, None], ln_b[:, :, None]
    outs, stop = [], 0
    sizes = chunk_sizes(position, T, b)
    for size, (qc, kc, vc, gs) in zip(sizes, split_chunks(sizes, q, k, v, gates)):
        stop += size
        ends = (position + stop) % b == 0
        if variant == "memora":  # per-token weights: recomputed in the backward instead of kept
            seg = (cur, anc, qc, kc, vc, gs, lw, lb)
            o, cur = checkpoint(_memora_segment, *seg, use_reentrant=False) if torch.is_grad_enabled() else \
                _memora_segment(*seg)
        else:
            o, cur, opt = _linear_segment(variant, cur, anc, opt, qc, kc, vc, gs, lw, lb, ends, p, qn)
        if ends:
            anc = cur
        outs.append(o)
    return torch.cat(outs, 2), cur, None if (position + T) % b == 0 else anc, opt
