"""LaCT's chunk step (apply, then the gradient sums; momentum, Newton–Schulz and the weight norm at the
chunk's end; the equations: ``layers/lact.py``). Only torch is imported.
"""
from __future__ import annotations

import torch

from ...common.parts import column_norms, newton_schulz, swiglu_memory
from .triton import triton_lact_chunk, use_triton_lact


NAMES = ("W0", "W1", "W2")


def lact_grads(W: dict, k, v, lr0, lr1, lr2):
    """η-weighted gradient sums of ℓ = −⟨f_W(k), v⟩ over n tokens. k, v: [.., n, d]; lr*: [.., n]."""
    a, z = k @ W["W0"], k @ W["W2"]
    sig = torch.sigmoid(a)
    silu_a = a * sig
    h = silu_a * z
    e = v @ W["W1"].transpose(-1, -2)  # ∂⟨f, v⟩/∂h
    d_silu = sig * (1 + a * (1 - sig))
    return {
        "W0": -(lr0[..., None] * k).transpose(-1, -2) @ (e * z * d_silu),
        "W1": -(lr1[..., None] * h).transpose(-1, -2) @ v,
        "W2": -(lr2[..., None] * k).transpose(-1, -2) @ (e * silu_a),
    }


def lact_commit(W: dict, pending: dict, m_mean, momentum: dict | None, init_norms: dict, muon: bool):
    """The end of a chunk: Δ = −G (+ m̄ Δ_prev), [Newton–Schulz], W + Δ, weight-normalised.
    m_mean: [B, H] or None. Returns (W, momentum)."""
    delta = {n: -pending[n] for n in NAMES}
    if momentum is not None:
        delta = {n: delta[n] + m_mean[..., None, None] * momentum[n] for n in NAMES}
        momentum = delta
    if muon:
        delta = {n: newton_schulz(delta[n]) for n in NAMES}
    new = {n: W[n] + delta[n] for n in NAMES}
    return {n: new[n] / (column_norms(new[n]) + 1e-5) * init_norms[n] for n in NAMES}, momentum


def lact_scan_chunked(weights, pending, m_sum, momentum, q, k, v, lr0, lr1, lr2, m, init_norms, position: int,
                      chunk_size: int, muon: bool):
    """Apply-then-update over T tokens from absolute position ``position``.

    weights/pending/momentum: dicts of [B, H, ...] (pending None at a chunk boundary, momentum None
    without momentum); m_sum: [B, H] or None; q, k, v: [B, H, T, d]; lr*, m: [B, H, T].
    Returns (o, weights, pending-or-None, m_sum-or-None, momentum)."""
    C, T = chunk_size, q.shape[2]
    outs = []
    start = 0
    fused = use_triton_lact(q, weights)  # on CUDA: the fused apply + gradient kernels (models/triton_memory.py)
    while start < T:
        stop = min(T, start + C - (position + start) % C)
        sl = slice(start, stop)
        if fused:
            o, g = triton_lact_chunk(weights, q[:, :, sl], k[:, :, sl], v[:, :, sl], lr0[:, :, sl], lr1[:, :, sl],
                                     lr2[:, :, sl])
            outs.append(o.to(q.dtype))
        else:
            outs.append(swiglu_memory(weights, q[:, :, sl]))
            g = lact_grads(weights, k[:, :, sl], v[:, :, sl], lr0[:, :, sl], lr1[:, :, sl], lr2[:, :, sl])
        pending = g if pending is None else {n: pending[n] + g[n] for n in NAMES}
        ms = m[:, :, sl].sum(-1)
        m_sum = ms if m_sum is None else m_sum + ms
        if (position + stop) % C == 0:
            weights, momentum = lact_commit(weights, pending, m_sum / C, momentum, init_norms, muon)
            pending = m_sum = None
        start = stop
    return torch.cat(outs, 2), weights, pending, m_sum, momentum
