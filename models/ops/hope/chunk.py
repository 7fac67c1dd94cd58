"""Hope's chunked forms: the self-modifying Titans and the continuum-memory levels (the equations:
``layers/hope.py``). Only torch is imported.
"""
from __future__ import annotations

import torch

from ...common.backprop import backprop_at
from ...common.parts import deep_mlp_memory, l2_normalize
from ...common.scan import chunk_sizes, split_chunks
from ..titans.chunk import titans_scan_chunked
from ..tnt.chunk import advance_chunk, chunk_end_coefficients


MEMORIES = ("key", "value", "lr", "decay", "memory")
RESIDUAL = {"key": True, "value": True, "lr": False, "decay": False, "memory": True}


def _mlp(theta: dict, x: torch.Tensor, residual: bool) -> torch.Tensor:
    y = deep_mlp_memory(theta, x)
    return x + y if residual else y


def hope_generate(anchors: dict, u, lr_bias, decay_bias, base_lr: float):
    """k, v, η, α and the five targets v̂_□ from the chunk-start memories. u: [B, H, n, d];
    biases [H]. Returns (k, {□: target of the MLP part}, η [B, H, n], 1 − α [B, H, n])."""
    k = l2_normalize(_mlp(anchors["key"], u, True))
    v = _mlp(anchors["value"], u, True)
    lr = base_lr * torch.sigmoid(_mlp(anchors["lr"], u, False)[..., 0] + lr_bias[:, None])
    keep = torch.sigmoid(_mlp(anchors["decay"], u, False)[..., 0] + decay_bias[:, None])
    # the residual memories learn MLP(k) ≈ v̂ − k
    targets = {m: _mlp(anchors[m], v, RESIDUAL[m]) - (k if RESIDUAL[m] else 0) for m in MEMORIES}
    return k, targets, lr, 1 - keep


def self_modifying_chunked(weights: dict, anchor: dict | None, q, u, lr_bias, decay_bias, base_lr: float,
                           position: int, chunk_size: int, max_grad_norm: float | None = None):
    """Chunked self-modifying memory. weights/anchor: □ → {W1, W2} [B, H, ...]; q, u [B, H, T, d].
    Returns (o [B, H, T, d], weights, anchor-or-None)."""
    cur, anc = dict(weights), anchor
    T, outs, t = q.shape[2], [], 0
    sizes = chunk_sizes(position, T, chunk_size)
    for size, (qc, uc) in zip(sizes, split_chunks(sizes, q, u)):
        pos = position + t
        if pos % chunk_size == 0:
            anc = cur
        k, targets, lr, forget = hope_generate(anc, uc, lr_bias, decay_bias, base_lr)
        eta = torch.zeros_like(lr)
        coeffs = chunk_end_coefficients(lr, eta, forget)  # shared by the four memories that are not read
        new = {}
        for m in MEMORIES[:-1]:
            names = sorted(cur[m])
            w, _ = advance_chunk([cur[m][n] for n in names], [anc[m][n] for n in names], None, k, targets[m], lr, eta,
                            forget, max_grad_norm, coeffs)
            new[m] = dict(zip(names, w))
        y, new["memory"], _, _ = titans_scan_chunked(cur["memory"], None if pos % chunk_size == 0 else anc["memory"],
                                                     None, qc, k, targets["memory"], lr, eta, forget, pos,
                                                     chunk_size, max_grad_norm)
        outs.append(qc + y)
        cur = new
        t += size
    return torch.cat(outs, 2), cur, None if (position + T) % chunk_size == 0 else anc


def cms_level_chunked(weights: dict, pending: dict, k, v, lr, position: int, span: int):
    """One CMS level: reads MLP_{θ_s}(k) and accumulates Σ η ∇ℓ at θ_s, applied at each span end.
    weights (θ_s) / pending: {W1, W2} [B, H, ...]; k, v [B, H, T, d]; lr [B, H, T]."""
    names = sorted(weights, key=lambda n: int(n[1:]))
    T, outs, stop = k.shape[2], [], 0
    sizes = chunk_sizes(position, T, span)
    for size, (kc, vc, lc) in zip(sizes, split_chunks(sizes, k, v, lr)):
        stop += size
        outs.append(deep_mlp_memory(weights, kc))
        xs, ds = backprop_at([weights[n] for n in names], kc, vc)
        pending = {n: pending[n] + (lc[..., None] * X).transpose(-1, -2) @ D for n, X, D in zip(names, xs, ds)}
        if (position + stop) % span == 0:
            weights = {n: weights[n] - pending[n] for n in names}
            pending = {n: torch.zeros_like(p) for n, p in pending.items()}
    return torch.cat(outs, 2), weights, pending
