"""Hope token by token (the definitions ``ops/hope/chunk.py`` is held to). Only torch is imported.
"""
from __future__ import annotations

import torch

from ...common.backprop import soft_clamp_factor
from ...common.parts import deep_mlp_memory, l2_loss, l2_normalize
from .chunk import MEMORIES, RESIDUAL, _mlp


def self_modifying_reference(weights: dict, anchor: dict | None, q, u, lr_bias, decay_bias, base_lr: float,
                             position: int, chunk_size: int, max_grad_norm: float | None = None):
    """Same contract as :func:`self_modifying_chunked`, one token at a time (gradients by torch.func.grad)."""

    def grad_fn(residual):
        loss = (lambda th, k_t, v_t: l2_loss(_mlp(th, k_t, True), v_t)) if residual else \
            (lambda th, k_t, v_t: l2_loss(_mlp(th, k_t, False), v_t))
        return torch.func.vmap(torch.func.vmap(torch.func.grad(loss)))

    grads = {True: grad_fn(True), False: grad_fn(False)}
    read = torch.func.vmap(torch.func.vmap(lambda th, x: _mlp(th, x, True)))
    gens = {r: torch.func.vmap(torch.func.vmap(lambda th, x, r=r: _mlp(th, x, r))) for r in (True, False)}

    def gen(theta, x, residual):
        return gens[residual](theta, x)
    cur, anc = dict(weights), anchor
    outs = []
    for t in range(q.shape[2]):
        if (position + t) % chunk_size == 0:
            anc = cur
        u_t = u[:, :, t : t + 1]
        k_t = l2_normalize(gen(anc["key"], u_t, True))
        v_t = gen(anc["value"], u_t, True)
        lr = base_lr * torch.sigmoid(gen(anc["lr"], u_t, False) + lr_bias[:, None, None])  # [B, H, 1, 1]
        keep = torch.sigmoid(gen(anc["decay"], u_t, False) + decay_bias[:, None, None])
        new = {}
        for m in MEMORIES:
            target = gen(anc[m], v_t, RESIDUAL[m])  # v̂_□,t
            g = grads[RESIDUAL[m]](anc[m], k_t, target)
            g = {n: x * soft_clamp_factor(x.norm(dim=(-2, -1), keepdim=True), max_grad_norm) for n, x in g.items()}
            new[m] = {n: keep * cur[m][n] - lr * g[n] for n in g}
        cur = new
        outs.append(read(cur["memory"], q[:, :, t : t + 1]))
    return torch.cat(outs, 2), cur, None if (position + q.shape[2]) % chunk_size == 0 else anc


def cms_level_reference(weights: dict, pending: dict, k, v, lr, position: int, span: int):
    """Same contract as :func:`cms_level_chunked`, one token at a time."""
    grad = torch.func.vmap(torch.func.vmap(torch.func.grad(lambda th, k_t, v_t: l2_loss(deep_mlp_memory(th, k_t), v_t))))
    read = torch.func.vmap(torch.func.vmap(deep_mlp_memory))
    outs = []
    for t in range(k.shape[2]):
        outs.append(read(weights, k[:, :, t : t + 1]))
        g = grad(weights, k[:, :, t : t + 1], v[:, :, t : t + 1])
        pending = {n: pending[n] + lr[:, :, t, None, None] * g[n] for n in g}
        if (position + t + 1) % span == 0:
            weights = {n: weights[n] - pending[n] for n in weights}
            pending = {n: torch.zeros_like(p) for n, p in pending.items()}
    return torch.cat(outs, 2), weights, pending
