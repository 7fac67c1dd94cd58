"""Token-by-token reference of every memory layer: the executable definition, slow and plain.

One generic loop (:func:`memory_scan_reference`) runs any layer given its four parts as a
:class:`parts.Recipe`. Per (batch, head), for token t at in-chunk index i = t mod b:

    g_t = ∇_θ ℓ(θ'; k_t, v_t)      θ' = grad_point(anchor, θ_{t-1}) (the chunk's first weights for
                                     "frozen-gradient" chunking), by ``torch.func.grad``
    θ_t, opt = token_step(anchor, θ_{t-1}, opt, g_t, gates_t, i)     optimizer + retention
    o_t = read(θ_t, q_t)
    if i = b − 1:  θ_t, opt = chunk_end(…);  anchor ← θ_t

TTT (:func:`ttt_scan_reference`) is one recipe of it; the other layers build theirs in their
own files. Only torch is imported: this file is copied into exported Hugging Face folders.
"""
from __future__ import annotations

import torch

from .parts import INNER_MODELS, Recipe, head_layer_norm, ln_fused_l2_loss, mini_batch_gd_step, token_index_scale


def memory_scan_reference(
    recipe: Recipe,
    weights: dict,
    anchor: dict | None,
    opt: dict,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gates: dict,
    extra: dict,
    position: int,
):
    """Runs T tokens one at a time from (weights, anchor, opt) at absolute position ``position``.

    q, k, v: [B, H, T, d]; gates: name → [B, H, T]; extra: name → [B, H, ...] per-head slow tensors;
    weights/anchor/opt: dicts of [B, H, ...] (opt may nest one level). anchor None = ``weights``.
    Returns (o [B, H, T, d_out], weights, anchor-or-None (None at a chunk boundary), opt).
    """
    b = recipe.chunk_size
    T = q.shape[2]
    grad_fn = torch.func.vmap(torch.func.vmap(torch.func.grad(recipe.inner_loss)))
    read_fn = torch.func.vmap(torch.func.vmap(recipe.read))
    anchor = weights if anchor is None else anchor
    outputs = []
    for t in range(T):
        i = (position + t) % b
        g_t = {n: g[:, :, t, None, None] for n, g in gates.items()}
        point = recipe.grad_point(anchor, weights, g_t)
        grad = grad_fn(point, k[:, :, t : t + 1], v[:, :, t : t + 1], extra)
        weights, opt = recipe.token_step(anchor, weights, opt, grad, g_t, i)
        outputs.append(read_fn(weights, q[:, :, t : t + 1], extra))
        if i == b - 1:
            weights, opt = recipe.chunk_end(anchor, weights, opt, g_t)
            anchor = weights
    at_boundary = (position + T) % b == 0
    return torch.cat(outputs, dim=2), weights, (None if at_boundary else anchor), opt


def ttt_recipe(kind: str, token_offset: torch.Tensor, mini_batch_size: int) -> Recipe:
    """TTT-Linear/MLP: LN-fused L2 on v − k, mini-batch GD (token-index scale), no retention."""
    model = INNER_MODELS[kind]

    def inner_loss(theta, k_t, v_t, extra):
        return ln_fused_l2_loss(model(theta, k_t), v_t - k_t, extra["ln_w"], extra["ln_b"])

    def read(theta, q_t, extra):
        return q_t + head_layer_norm(model(theta, q_t), extra["ln_w"], extra["ln_b"])

    def token_step(anchor, theta, opt, grad, gates, i):
        scale = token_index_scale(torch.tensor(i, device=token_offset.device), token_offset)
        theta, pending = mini_batch_gd_step(anchor, opt["pending"], grad, gates["lr"], scale)
        return theta, {"pending": pending}

    def chunk_end(anchor, theta, opt, gates):
        return theta, {"pending": {n: torch.zeros_like(p) for n, p in opt["pending"].items()}}

    return Recipe(inner_loss, read, token_step, mini_batch_size, chunk_end)


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
):
    """TTT through the generic reference: θ_t = θ₀ − s_i Σ_{j≤t} η_j ∇ℓ_j(θ₀), o_t = q_t + LN(f_{θ_t}(q_t)).

    q, k, v: [B, H, T, d]; lr: [B, H, T]; anchor/pending: dicts of [B, H, ...];
    ln_weight/ln_bias: [H, d]. Returns (o [B, H, T, d], anchor, pending-or-None).
    """
    B, H, T, d = q.shape
    if pending is None:
        pending = {n: torch.zeros_like(t) for n, t in anchor.items()}
    # mid mini-batch the current weights are θ₀ − s_{i−1} P, but only θ₀ and P enter the next step
    extra = {"ln_w": ln_weight.expand(B, H, d), "ln_b": ln_bias.expand(B, H, d)}
    recipe = ttt_recipe(kind, token_offset, mini_batch_size)
    out, weights, mid_anchor, opt = memory_scan_reference(
        recipe, anchor, anchor, {"pending": pending}, q, k, v, {"lr": lr}, extra, position)
    if mid_anchor is None:
        return out, weights, None
    return out, mid_anchor, opt["pending"]
