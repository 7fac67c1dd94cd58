"""TTT's chunked scan with the inner-loop knobs (the rules: ``common/knobs.py``; the definition:
``ops/ttt/naive.py``). Only torch is imported.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...common.knobs import _with_ones, clip_outer
from ...common.parts import InnerKnobs, gelu_tanh, head_layer_norm
from ...common.parts import gelu_tanh_grad_fused as gelu_tanh_grad
from ...common.parts import ln_fused_l2_grad_fused as ln_fused_l2_grad
from .chunk import fold_bias, unfold_bias


def _ttt_linear_steps(W, Ps, q, k, tgt, lr, scale, ln_w, ln_b, mse, tau, K):
    """TTT-Linear with K steps (common.reference.memory_scan_reference) over n ≤ b tokens of one mini-batch.
    Ps: K cumulative pending sums (step s: Σ_{k≤s} of earlier tokens) or None. With Ĝ^(s) the
    cumulative per-token errors Σ_{k≤s} G^(k), the keys at θ_j^(s) are read by the dual form itself:

        Z^(s) = K̃W̃₀ − s ⊙ K̃P_s − tril(sηᵀ ⊙ (KKᵀ + 1)) Ĝ^(s),   G^(s+1) = ∂ℓ/∂Z at Z^(s) (clipped)

    Returns (z̄, the K new pending sums)."""
    ka, qa = _with_ones(k), _with_ones(q)
    eta = torch.tril(scale[..., :, None] * lr[..., None, :])
    s_col = scale[..., None]
    mix_k = eta * (k @ k.transpose(-1, -2) + 1.0)
    z_k = ka @ W
    G_cum, ups = None, []
    for s in range(K):
        z = z_k
        if s:
            z = z - mix_k @ G_cum
            if Ps is not None:
                z = z - s_col * (ka @ Ps[s - 1])
        G = clip_outer(z - tgt if mse else ln_fused_l2_grad(z, tgt, ln_w, ln_b), ka, tau)
        G_cum = G if G_cum is None else G_cum + G
        up = (lr[..., None] * ka).transpose(-1, -2) @ G_cum
        ups.append(up if Ps is None else up + Ps[s])
    z_bar = qa @ W - (eta * (q @ k.transpose(-1, -2) + 1.0)) @ G_cum
    if Ps is not None:
        z_bar = z_bar - s_col * (qa @ Ps[-1])
    return z_bar, ups


def _ttt_mlp_steps(W1, W2, Ps, q, k, tgt, lr, scale, ln_w, ln_b, mse, tau, K):
    """TTT-MLP with K steps over n ≤ b tokens of one mini-batch (as :func:`_ttt_linear_steps`). Layer 1's
    inputs are the keys at every step, so its errors accumulate (Ĝ1); layer 2's inputs X̃2^(k) change
    with the step, so its term is a sum over the steps so far, and the backprop through each token's own
    W₂ iterate is a dual form too: G2_j W2_jᵀ = G2_j W2₀ᵀ − s_j G2_j P2ᵀ − Σ_k Σ_{l≤j} s_j η_l (G2_j·G2_l^(k)) x2_l^(k).
    Ps: K pairs [P1_s, P2_s] of cumulative pending sums, or None. Returns (z̄, K pairs of new sums)."""
    ka, qa = _with_ones(k), _with_ones(q)
    eta = torch.tril(scale[..., :, None] * lr[..., None, :])
    s_col = scale[..., None]
    mix_k = eta * (k @ k.transpose(-1, -2) + 1.0)
    z1_k = ka @ W1
    G1_cum, X2s, G2s, ups = None, [], [], []
    for s in range(K):
        z1 = z1_k
        if s:
            z1 = z1 - mix_k @ G1_cum
            if Ps is not None:
                z1 = z1 - s_col * (ka @ Ps[s - 1][0])
        x2a = _with_ones(gelu_tanh(z1))
        z2 = x2a @ W2
        back = W2[..., :-1, :].transpose(-1, -2)
        for X, G in zip(X2s, G2s):
            z2 = z2 - (eta * (x2a @ X.transpose(-1, -2))) @ G
        if s and Ps is not None:
            z2 = z2 - s_col * (x2a @ Ps[s - 1][1])
        G2 = z2 - tgt if mse else ln_fused_l2_grad(z2, tgt, ln_w, ln_b)
        d1 = G2 @ back
        for X, G in zip(X2s, G2s):
            d1 = d1 - (eta * (G2 @ G.transpose(-1, -2))) @ X[..., :-1]
        if s and Ps is not None:
            d1 = d1 - s_col * (G2 @ Ps[s - 1][1][..., :-1, :].transpose(-1, -2))
        G1 = clip_outer(d1 * gelu_tanh_grad(z1), ka, tau)
        G2 = clip_outer(G2, x2a, tau)
        G1_cum = G1 if G1_cum is None else G1_cum + G1
        X2s.append(x2a)
        G2s.append(G2)
        up1 = (lr[..., None] * ka).transpose(-1, -2) @ G1_cum
        up2 = sum((lr[..., None] * X).transpose(-1, -2) @ G for X, G in zip(X2s, G2s))
        ups.append([up1, up2] if Ps is None else [up1 + Ps[s][0], up2 + Ps[s][1]])
    z1b = qa @ W1 - (eta * (q @ k.transpose(-1, -2) + 1.0)) @ G1_cum
    if Ps is not None:
        z1b = z1b - s_col * (qa @ Ps[-1][0])
    x2b = _with_ones(gelu_tanh(z1b))
    z = x2b @ W2
    for X, G in zip(X2s, G2s):
        z = z - (eta * (x2b @ X.transpose(-1, -2))) @ G
    if Ps is not None:
        z = z - s_col * (x2b @ Ps[-1][1])
    return z, ups


def _ttt_segment(Ws, Ps, Rs, q, k, tgt, lr, scale, ln_w, ln_b, mse, tau, pre=None):
    """Dual form over n ≤ b tokens of one mini-batch with the knobs. Ws: folded [W̃1(, W̃2)] at θ₀;
    Ps: pending sums or None; Rs: λ(W̃ − W̃_init) or None; pre: (K̃, Q̃, sηᵀ, sηᵀ ⊙ (QKᵀ + 1)) when
    computed for all mini-batches at once. Returns (z̄, per-layer updates)."""
    if pre is None:
        ka, qa = _with_ones(k), _with_ones(q)
        eta = torch.tril(scale[..., :, None] * lr[..., None, :])  # s_i η_j, j ≤ i
        mix = eta * (q @ k.transpose(-1, -2) + 1.0)
    else:
        ka, qa, eta, mix = pre
    s_col = scale[..., None]
    pull = None if Rs is None else (scale * lr.cumsum(-1))[..., None]  # s_i Σ_{j≤i} η_j

    def grad_out(z):
        return z - tgt if mse else ln_fused_l2_grad(z, tgt, ln_w, ln_b)

    if len(Ws) == 1:
        (W,) = Ws
        G = clip_outer(grad_out(ka @ W), ka, tau)
        z = qa @ W - mix @ G
        ups = [(lr[..., None] * ka).transpose(-1, -2) @ G]
        xs = [qa]
    else:
        W1, W2 = Ws
        z1 = ka @ W1
        x2a = _with_ones(gelu_tanh(z1))
        G2 = grad_out(x2a @ W2)
        G1 = clip_outer((G2 @ W2[..., :-1, :].transpose(-1, -2)) * gelu_tanh_grad(z1), ka, tau)
        G2 = clip_outer(G2, x2a, tau)
        z1b = qa @ W1 - mix @ G1
        if Ps is not None:
            z1b = z1b - s_col * (qa @ Ps[0])
        if Rs is not None:
            z1b = z1b - pull * (qa @ Rs[0])
        x2b = _with_ones(gelu_tanh(z1b))
        z = x2b @ W2 - (eta * (x2b @ x2a.transpose(-1, -2))) @ G2
        ups = [(lr[..., None] * ka).transpose(-1, -2) @ G1, (lr[..., None] * x2a).transpose(-1, -2) @ G2]
        xs = [None, x2b]
    x_last = xs[-1]
    if Ps is not None:
        z = z - s_col * (x_last @ Ps[-1])
        ups = [u + P for u, P in zip(ups, Ps)]
    if Rs is not None:
        z = z - pull * (x_last @ Rs[-1])
        ups = [u + lr.sum(-1)[..., None, None] * R for u, R in zip(ups, Rs)]
    return z, ups


def _ttt_blocks(Ws, Ps, W_init, q, k, tgt, lr, token_offset, ln_w, ln_b, position: int, b: int, knobs: InnerKnobs):
    """One knob step (K = 1) over T tokens: the sequence is padded onto the mini-batch grid (tokens with
    η = 0 in front of a call that starts mid-mini-batch and after one that ends mid-mini-batch: they
    change nothing), everything that does not depend on θ₀ is computed for all mini-batches at once,
    and the loop holds only the θ₀-dependent products. Returns (z̄ [B, H, T, d], Ws, Ps-or-None)."""
    T, off = q.shape[2], position % b
    N = -(-(off + T) // b)
    back = N * b - off - T

    def blocks(x):  # [B, H, T, ...] → N × [B, H, b, ...]
        x = F.pad(x, (0, 0, off, back)) if x.dim() == 4 else F.pad(x, (off, back))
        return x.unflatten(2, (N, b)).movedim(2, 0)

    idx = torch.arange(b, device=q.device)
    scale = torch.clamp_min(1.0 / (idx.to(token_offset.dtype) + 1.0) + token_offset, 0.0)
    qb, kb, tb, lrb = (blocks(x) for x in (q, k, tgt, lr))
    eta = torch.tril(scale[:, None] * lrb[..., None, :])
    pre = zip(_with_ones(kb).unbind(0), _with_ones(qb).unbind(0), eta.unbind(0),
              (eta * (qb @ kb.transpose(-1, -2) + 1.0)).unbind(0))
    outs = []
    for i, (p, qi, ki, ti, li) in enumerate(zip(pre, qb.unbind(0), kb.unbind(0), tb.unbind(0), lrb.unbind(0))):
        Rs = None if W_init is None else [knobs.init_pull * (W - Wi) for W, Wi in zip(Ws, W_init)]
        z, ups = _ttt_segment(Ws, Ps, Rs, qi, ki, ti, li, scale, ln_w, ln_b, knobs.loss == "mse", knobs.grad_clip, p)
        outs.append(z)
        if i < N - 1 or back == 0:
            Ws, Ps = [W - scale[-1] * u for W, u in zip(Ws, ups)], None
        else:
            Ps = ups
    return torch.cat(outs, 2)[:, :, off : off + T], Ws, Ps


def ttt_scan_knobs(kind, anchor, pending, q, k, v, lr, token_offset, ln_weight, ln_bias, position, mini_batch_size,
                   knobs: InnerKnobs, init: dict | None):
    """TTT's chunk form with clipping, pull-to-init and the MSE loss (``lr`` and ``k`` already carry
    the schedule and next_token). Same contract as ``ops.ttt.chunk.ttt_scan_chunked``; one mini-batch
    (or a part of one) at a time."""
    b, T, K = mini_batch_size, q.shape[2], knobs.steps
    in_batch = (position + torch.arange(T, device=q.device)) % b
    scale = torch.clamp_min(1.0 / (in_batch.to(token_offset.dtype) + 1.0) + token_offset[in_batch], 0.0)
    mse = knobs.loss == "mse"
    tgt = v - k
    ln_w, ln_b = ln_weight[:, None, :], ln_bias[:, None, :]
    Ws = fold_bias(anchor)
    Ps = None
    if pending is not None and position % b != 0:  # K > 1: one folded sum per step, "W1@s" for s < K
        Ps = [fold_bias({n: pending[n if s == K else f"{n}@{s}"] for n in anchor}) for s in range(1, K + 1)]
        Ps = Ps if K > 1 else fold_bias(pending)
    W_init = fold_bias(init) if knobs.init_pull else None
    if K == 1:
        z_bar, Ws, Ps = _ttt_blocks(Ws, Ps, W_init, q, k, tgt, lr, token_offset, ln_w, ln_b, position, b, knobs)
        out = q + (z_bar if mse else head_layer_norm(z_bar, ln_w, ln_b))
        return out, unfold_bias(Ws), (None if Ps is None else unfold_bias(Ps))
    outs, start = [], 0
    while start < T:
        stop = min(T, start + b - (position + start) % b)
        sl = slice(start, stop)
        Rs = None if W_init is None else [knobs.init_pull * (W - Wi) for W, Wi in zip(Ws, W_init)]
        args = (q[:, :, sl], k[:, :, sl], tgt[:, :, sl], lr[:, :, sl], scale[sl], ln_w, ln_b, mse, knobs.grad_clip)
        if K > 1 and len(Ws) == 1:  # ups/Ps: one list of folded sums per step
            z, ups = _ttt_linear_steps(Ws[0], None if Ps is None else [P[0] for P in Ps], *args, K)
            ups = [[u] for u in ups]
        elif K > 1:
            z, ups = _ttt_mlp_steps(*Ws, Ps, *args, K)
        else:
            z, ups = _ttt_segment(Ws, Ps, Rs, *args)
        outs.append(z)
        if (position + stop) % b == 0:
            last = ups[-1] if K > 1 else ups
            Ws, Ps = [W - scale[stop - 1] * u for W, u in zip(Ws, last)], None
        else:
            Ps = ups
        start = stop
    z_bar = torch.cat(outs, 2)
    out = q + (z_bar if mse else head_layer_norm(z_bar, ln_w, ln_b))
    if Ps is not None and K > 1:
        pend = {}
        for s, P in enumerate(Ps, start=1):
            pend.update({(n if s == K else f"{n}@{s}"): t for n, t in unfold_bias(P).items()})
        return out, unfold_bias(Ws), pend
    return out, unfold_bias(Ws), (None if Ps is None else unfold_bias(Ps))
