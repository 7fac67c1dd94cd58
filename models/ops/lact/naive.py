"""LaCT token by token: the recipe for ``memory_scan_reference``, the definition ``ops/lact/chunk.py`` is
held to. Only torch is imported.
"""
from __future__ import annotations

import torch

from ...common.parts import Recipe, dot_product_loss, swiglu_memory
from ...common.reference import memory_scan_reference
from .chunk import NAMES, lact_commit


def lact_recipe(chunk_size: int, init_norms: dict, muon: bool, use_momentum: bool) -> Recipe:
    """LaCT in the generic frame: dot-product loss on SwiGLU, gradients summed over the chunk at its
    first weights, committed (momentum, Muon, weight norm) when the chunk completes; read before."""

    def inner_loss(theta, k_t, v_t, extra):
        return dot_product_loss(swiglu_memory(theta, k_t), v_t)

    def read(theta, q_t, extra):
        return swiglu_memory(theta, q_t)

    def token_step(anchor, theta, opt, grad, g, i):
        lrs = {"W0": g["lr0"], "W1": g["lr1"], "W2": g["lr2"]}
        pending = {n: opt["pending"][n] + lrs[n] * grad[n] for n in NAMES}
        return theta, {**opt, "pending": pending, "m_sum": opt["m_sum"] + g["m"][..., 0, 0]}

    def chunk_end(anchor, theta, opt, g):
        theta, mom = lact_commit(theta, opt["pending"], opt["m_sum"] / chunk_size, opt.get("momentum"), init_norms, muon)
        new = {"pending": {n: torch.zeros_like(p) for n, p in opt["pending"].items()},
               "m_sum": torch.zeros_like(opt["m_sum"])}
        if mom is not None:
            new["momentum"] = mom
        return theta, new

    return Recipe(inner_loss, read, token_step, chunk_size, chunk_end, lr_gates=("lr0", "lr1", "lr2"))


def lact_scan_reference(weights, pending, m_sum, momentum, q, k, v, lr0, lr1, lr2, m, init_norms, position: int,
                        chunk_size: int, muon: bool):
    """Same contract as :func:`lact_scan_chunked`, token by token through the generic reference."""
    B, H = q.shape[:2]
    opt = {"pending": pending if pending is not None else {n: torch.zeros_like(w) for n, w in weights.items()},
           "m_sum": m_sum if m_sum is not None else q.new_zeros(B, H)}
    if momentum is not None:
        opt["momentum"] = momentum
    recipe = lact_recipe(chunk_size, init_norms, muon, momentum is not None)
    gates = {"lr0": lr0, "lr1": lr1, "lr2": lr2, "m": m}
    o, weights, anchor, opt = memory_scan_reference(recipe, weights, None, opt, q, k, v, gates, {}, position)
    mid = anchor is not None
    return (o, weights, opt["pending"] if mid else None, opt["m_sum"] if mid else None, opt.get("momentum"))
