"""TTT token by token: the recipe of TTT-Linear / TTT-MLP for ``memory_scan_reference`` (the definition the
chunked forms ``ops/ttt/chunk.py`` and ``ops/ttt/knobs.py`` are held to). Only torch is imported.
"""
from __future__ import annotations

import torch

from ...common.parts import (INNER_MODELS, InnerKnobs, Recipe, head_layer_norm, l2_loss, ln_fused_l2_loss,
                             mini_batch_gd_step, token_index_scale)
from ...common.reference import memory_scan_reference


def ttt_recipe(kind: str, token_offset: torch.Tensor, mini_batch_size: int, loss: str = "ln_recon") -> Recipe:
    """TTT-Linear/MLP: LN-fused L2 on v − k, mini-batch GD (token-index scale), no retention.

    ``loss="mse"`` drops the LayerNorm from the inner model: ℓ = ½‖f(k) − (v − k)‖², o = q + f(q)
    (in both cases ℓ = ½‖f̂(k) − v‖² for the model f̂ that is read: f̂(x) = x + [LN](f(x)))."""
    model = INNER_MODELS[kind]

    def inner_loss(theta, k_t, v_t, extra):
        if loss == "mse":
            return l2_loss(model(theta, k_t), v_t - k_t)
        return ln_fused_l2_loss(model(theta, k_t), v_t - k_t, extra["ln_w"], extra["ln_b"])

    def read(theta, q_t, extra):
        if loss == "mse":
            return q_t + model(theta, q_t)
        return q_t + head_layer_norm(model(theta, q_t), extra["ln_w"], extra["ln_b"])

    def token_step(anchor, theta, opt, grad, gates, i):
        scale = token_index_scale(torch.tensor(i, device=token_offset.device), token_offset)
        theta, pending = mini_batch_gd_step(anchor, opt["pending"], grad, gates["lr"], scale)
        return theta, {"pending": pending}

    def chunk_end(anchor, theta, opt, gates):
        return theta, {"pending": {n: torch.zeros_like(p) for n, p in opt["pending"].items()}}

    return Recipe(inner_loss, read, token_step, mini_batch_size, chunk_end)


def pending_names(names, steps: int) -> list:
    """Names of TTT's pending sums with ``inner_steps`` K: the chain of step K under the plain names,
    steps s < K as "W1@s" (each the cumulative sum over steps ≤ s)."""
    return list(names) + [f"{n}@{s}" for s in range(1, steps) for n in names]


def ttt_scan_reference(
    kind: str,
    anchor: dict,
    pending: dict | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    token_offset: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    position: int,
    mini_batch_size: int,
    checkpoint_group: int = 0,
    knobs: InnerKnobs | None = None,
    init: dict | None = None,
    prev_key: torch.Tensor | None = None,
):
    """TTT through the generic reference: θ_t = θ₀ − s_i Σ_{j≤t} η_j ∇ℓ_j(θ₀), o_t = q_t + LN(f_{θ_t}(q_t)).

    q, k, v: [B, H, T, d]; lr: [B, H, T]; anchor/pending: dicts of [B, H, ...];
    ln_weight/ln_bias: [H, d]. Returns (o [B, H, T, d], anchor, pending-or-None).
    With ``knobs`` (init: θ_init, prev_key: see :func:`memory_scan_reference`) the return gets the
    last key as a 4th element.
    """
    B, H, T, d = q.shape
    steps = 1 if knobs is None else knobs.steps
    names = list(anchor)
    if pending is None:
        pending = {n: torch.zeros_like(anchor[n.split("@")[0]]) for n in pending_names(names, steps)}
    # mid mini-batch the current weights are θ₀ − s_{i−1} P, but only θ₀ and P enter the next step
    extra = {"ln_w": ln_weight.expand(B, H, d), "ln_b": ln_bias.expand(B, H, d)}
    if knobs is not None:
        recipe = ttt_recipe(kind, token_offset, mini_batch_size, "mse" if knobs.loss == "mse" else "ln_recon")
        opt = {"pending": pending}
        if steps > 1:  # one pending sum per step s (cumulative over steps ≤ s): "W1@s", …; chain K: "W1"
            opt = [{"pending": {n: pending[n if s == steps else f"{n}@{s}"] for n in names}} for s in range(1, steps + 1)]
        out, weights, mid_anchor, opt, last_key = memory_scan_reference(
            recipe, anchor, anchor, opt, q, k, v, {"lr": lr}, extra, position, knobs, init, prev_key)
        if isinstance(weights, list):
            weights = weights[-1]
        if mid_anchor is None:
            return out, weights, None, last_key
        if steps > 1:
            opt = {"pending": {(n if s == steps else f"{n}@{s}"): o["pending"][n]
                               for s, o in enumerate(opt, start=1) for n in names}}
        return out, mid_anchor, opt["pending"], last_key
    recipe = ttt_recipe(kind, token_offset, mini_batch_size)
    out, weights, mid_anchor, opt = memory_scan_reference(
        recipe, anchor, anchor, {"pending": pending}, q, k, v, {"lr": lr}, extra, position)
    if mid_anchor is None:
        return out, weights, None
    return out, mid_anchor, opt["pending"]
