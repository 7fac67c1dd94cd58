"""Miras token by token: the recipes for ``memory_scan_reference``, the definition ``ops/miras/chunk.py`` is
held to. Only torch is imported.
"""
from __future__ import annotations

import torch

from ...common.parts import Recipe
from ...common.reference import memory_scan_reference
from .chunk import huber_loss, lp_loss, lq_normaliser, miras_memory, softmax_memory


def miras_recipe(variant: str, chunk_size: int, p: float = 3.0, qn: float = 4.0) -> Recipe:
    """A Miras variant in the generic frame. Yaad's δ_t travels as the last channel of v."""

    def inner_loss(theta, k_t, v_t, extra):  # averaged over the features
        if variant == "yaad":
            e = miras_memory(theta, k_t, extra["ln_w"], extra["ln_b"]) - v_t[..., :-1]
            return huber_loss(e, v_t[..., -1:]) / e.shape[-1]
        e = miras_memory(theta, k_t, extra["ln_w"], extra["ln_b"]) - v_t
        return (lp_loss(e, p) if variant == "moneta" else 0.5 * e.pow(2).sum()) / e.shape[-1]

    def read(theta, q_t, extra):
        w = softmax_memory(theta) if variant == "memora" else theta
        return miras_memory(w, q_t, extra["ln_w"], extra["ln_b"])

    def token_step(anchor, theta, opt, grad, g, i):
        if variant != "moneta":  # Yaad: W, Memora: the logits L
            return {n: g["keep"] * theta[n] - g["lr"] * grad[n] for n in theta}, opt
        r = opt["norm"]
        theta = {n: g["keep"] * theta[n] - g["lr"] * r[n] * grad[n] for n in theta}  # W = r A, A linear
        if i == chunk_size - 1:
            r_new = {n: lq_normaliser(theta[n] / r[n], qn) for n in theta}
            theta, opt = {n: theta[n] / r[n] * r_new[n] for n in theta}, {"norm": r_new}
        return theta, opt

    def grad_point(anchor, theta, g):
        return softmax_memory(anchor) if variant == "memora" else anchor

    return Recipe(inner_loss, read, token_step, chunk_size, grad_point=grad_point)


def miras_scan_reference(variant: str, weights, anchor, opt, q, k, v, gates, ln_w, ln_b, position: int,
                         chunk_size: int, p: float = 3.0, qn: float = 4.0):
    """Same contract as :func:`miras_scan_chunked`, token by token through the generic reference."""
    if variant == "yaad":
        v = torch.cat([v, gates["delta"][..., None]], -1)
    g = {n: gates[n] for n in ("lr", "keep")}
    o, w, anc, opt = memory_scan_reference(miras_recipe(variant, chunk_size, p, qn), weights, anchor, opt, q, k, v, g,
                                           {"ln_w": ln_w, "ln_b": ln_b}, position)
    return o, w, anc, opt
