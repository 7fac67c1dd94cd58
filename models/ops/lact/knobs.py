"""LaCT's chunk step with the inner-loop knobs (the rules: ``common/knobs.py``). Only torch is imported.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ...common.knobs import lr_schedule, next_token_pairs
from ...common.parts import InnerKnobs, clip_factor, l2_loss, swiglu_memory
from ...common.reference import memory_scan_reference
from .chunk import NAMES, lact_commit, lact_grads
from .naive import lact_recipe


def lact_clipped_lrs(W: dict, k, v, lrs: list, tau: float | None) -> list:
    """LaCT's per-token gradients are outer products (W0: kᵀ(e ⊙ z ⊙ silu′(a)), W1: hᵀv, W2: kᵀ(e ⊙ silu(a))),
    so clipping each to norm ≤ τ is a per-token factor on its lr: returns the clipped [lr0, lr1, lr2]."""
    if tau is None:
        return lrs
    a, z = k @ W["W0"], k @ W["W2"]
    sig = torch.sigmoid(a)
    h = a * sig * z
    e = v @ W["W1"].transpose(-1, -2)
    kn = k.norm(dim=-1)
    norms = [kn * (e * z * sig * (1 + a * (1 - sig))).norm(dim=-1), h.norm(dim=-1) * v.norm(dim=-1),
             kn * (e * a * sig).norm(dim=-1)]
    return [lr * clip_factor(n, tau) for lr, n in zip(lrs, norms)]


def lact_scan_knobs(weights, pending, m_sum, momentum, q, k, v, lr0, lr1, lr2, m, init_norms, position: int,
                    chunk_size: int, muon: bool, knobs: InnerKnobs, init: dict | None):
    """LaCT's chunk form with clipping and the pull-to-init (``lr*`` and ``k`` already carry the
    schedule and next_token); same contract as ``ops.lact.chunk.lact_scan_chunked``. The gradients of a chunk
    are taken at its first weights W, so the pull adds (Σ_i η_{n,i}) λ(W_n − W_n,init) to each sum."""
    C, T = chunk_size, q.shape[2]
    outs, start = [], 0
    while start < T:
        stop = min(T, start + C - (position + start) % C)
        sl = slice(start, stop)
        outs.append(swiglu_memory(weights, q[:, :, sl]))
        vs = v[:, :, sl]
        if knobs.loss == "mse":  # ℓ = ½‖f(k) − v‖² = the dot-product loss's gradients with v → v − f_W(k)
            vs = vs - swiglu_memory(weights, k[:, :, sl])
        lrs = lact_clipped_lrs(weights, k[:, :, sl], vs, [lr0[:, :, sl], lr1[:, :, sl], lr2[:, :, sl]],
                               knobs.grad_clip)
        g = lact_grads(weights, k[:, :, sl], vs, *lrs)
        if knobs.init_pull:
            g = {n: g[n] + lr.sum(-1)[..., None, None] * knobs.init_pull * (weights[n] - init[n])
                 for n, lr in zip(NAMES, [lr0[:, :, sl], lr1[:, :, sl], lr2[:, :, sl]])}
        pending = g if pending is None else {n: pending[n] + g[n] for n in NAMES}
        ms = m[:, :, sl].sum(-1)
        m_sum = ms if m_sum is None else m_sum + ms
        if (position + stop) % C == 0:
            weights, momentum = lact_commit(weights, pending, m_sum / C, momentum, init_norms, muon)
            pending = m_sum = None
        start = stop
    return torch.cat(outs, 2), weights, pending, m_sum, momentum


def lact_scan_with_knobs(layer, state_args, q, k, v, lr0, lr1, lr2, m, init_norms, position: int, prev_key):
    """``LaCTLayer``'s fast-weight scan with the knobs, chunked or token by token (``scan_impl``).
    state_args: (weights, pending, m_sum, momentum). Returns (o, weights, pending, m_sum, momentum, last key)."""
    knobs, B, compute = layer.knobs, q.shape[0], q.dtype
    weights, pending, m_sum, momentum = state_args
    init = {n: getattr(layer, n).to(compute).unsqueeze(0).expand(B, *getattr(layer, n).shape) for n in NAMES}
    if layer.scan_impl == "reference":
        H = q.shape[1]
        opt = {"pending": pending if pending is not None else {n: torch.zeros_like(w) for n, w in weights.items()},
               "m_sum": m_sum if m_sum is not None else q.new_zeros(B, H)}
        if momentum is not None:
            opt["momentum"] = momentum
        recipe = lact_recipe(layer.chunk_size, init_norms, layer.muon, momentum is not None)
        if knobs.loss == "mse":
            recipe = replace(recipe, inner_loss=lambda theta, k_t, v_t, extra: l2_loss(swiglu_memory(theta, k_t), v_t))
        o, weights, anchor, opt, last_key = memory_scan_reference(
            recipe, weights, None, opt, q, k, v, {"lr0": lr0, "lr1": lr1, "lr2": lr2, "m": m}, {}, position, knobs,
            init, prev_key)
        mid = anchor is not None
        return (o, weights, opt["pending"] if mid else None, opt["m_sum"] if mid else None, opt.get("momentum"),
                last_key if knobs.next_token else None)
    lr0, lr1, lr2 = (lr_schedule(lr, position, knobs) for lr in (lr0, lr1, lr2))
    last_key = None
    if knobs.next_token:
        k, (lr0, lr1, lr2), last_key = next_token_pairs(k, [lr0, lr1, lr2], prev_key)
    return (*lact_scan_knobs(weights, pending, m_sum, momentum, q, k, v, lr0, lr1, lr2, m, init_norms, position,
                             layer.chunk_size, layer.muon, knobs, init), last_key)
