"""ATLAS token by token: the recipe for ``memory_scan_reference``, the definition ``ops/atlas/chunk.py`` is
held to. Only torch is imported.
"""
from __future__ import annotations

import torch

from ...common.parts import Recipe, gelu_tanh, newton_schulz
from ...common.reference import memory_scan_reference


def atlas_memory(theta: dict, x: torch.Tensor) -> torch.Tensor:
    """M(x) = GELU(x W1) W2."""
    return gelu_tanh(x @ theta["W1"]) @ theta["W2"]


def atlas_recipe(chunk_size: int, optimizer: str) -> Recipe:
    """ATLAS in the generic frame: k_t holds the window's c feature vectors flattened [1, c·D], v_t the
    window's values with γ as the last channel [1, c·(d + 1)]; the loss is the γ-weighted window sum."""

    def inner_loss(theta, k_t, v_t, extra):
        k_w = k_t.reshape(-1, theta["W1"].shape[-2])
        v_w = v_t.reshape(k_w.shape[0], -1)
        return 0.5 * (v_w[:, -1:] * (atlas_memory(theta, k_w) - v_w[:, :-1]).pow(2)).sum()

    def read(theta, q_t, extra):
        return atlas_memory(theta, q_t)

    def token_step(anchor, theta, opt, grad, g, i):
        if optimizer == "sgd":
            return {n: g["alpha"] * theta[n] - g["lr"] * grad[n] for n in theta}, opt
        mom = {n: g["theta"] * opt["momentum"][n] + grad[n] for n in theta}
        step = {n: newton_schulz(s) for n, s in mom.items()} if optimizer == "muon" else mom
        return {n: g["alpha"] * theta[n] - g["lr"] * step[n] for n in theta}, {"momentum": mom}

    return Recipe(inner_loss, read, token_step, chunk_size)


def atlas_scan_reference(weights, anchor, momentum, window, q, k, v, gates, position: int, chunk_size: int, c: int,
                         optimizer: str):
    """Same contract as :func:`atlas_scan_chunked`, token by token through the generic reference."""
    gv = torch.cat([v, gates["gamma"][..., None]], -1)
    if window is not None:
        k_ext = torch.cat([window["k"], k], 2)
        gv_ext = torch.cat([torch.cat([window["v"], window["gamma"][..., None]], -1), gv], 2)
    else:
        k_ext, gv_ext = k, gv
    k_win = k_ext.unfold(2, c, 1).movedim(-1, -2).flatten(-2)  # [B, H, T, c·D]: token t's window
    v_win = gv_ext.unfold(2, c, 1).movedim(-1, -2).flatten(-2)
    opt = {} if momentum is None else {"momentum": momentum}
    g = {n: gates[n] for n in ("lr", "theta", "alpha")}
    o, w, anc, opt = memory_scan_reference(atlas_recipe(chunk_size, optimizer), weights, anchor, opt, q, k_win,
                                           v_win, g, {}, position)
    if window is not None:
        keep = c - 1
        window = {"k": k_ext[:, :, -keep:], "v": gv_ext[:, :, -keep:, :-1], "gamma": gv_ext[:, :, -keep:, -1]}
    return o, w, anc, opt.get("momentum"), window
