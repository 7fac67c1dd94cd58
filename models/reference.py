"""Token-by-token reference of the TTT memory scan: the executable definition, slow and plain.

One token at a time, per (batch, head), built from :mod:`parts`:

    g_t   = ∇_θ ℓ(f_θ(k_t); v_t − k_t) at θ = θ₀ (the weights at the start of t's mini-batch),
            taken with ``torch.func.grad`` through the LayerNorm (no hand-written backward)
    θ_t   = θ₀ − s_i Σ_{j ≤ t in the mini-batch} η_j g_j           (primal form)
    o_t   = q_t + LN(f_{θ_t}(q_t))
and θ₀ ← θ_t after the last token of each mini-batch.
Only torch is imported: this file is copied into exported Hugging Face folders.
"""
from __future__ import annotations

import torch

from .parts import INNER_MODELS, head_layer_norm, ln_fused_l2_loss, mini_batch_gd_step, token_index_scale


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
    """Runs T tokens from state (anchor, pending) at absolute position ``position``.

    q, k, v: [B, H, T, d]; lr: [B, H, T]; anchor/pending: dicts of [B, H, ...];
    ln_weight/ln_bias: [H, d]. Returns (o [B, H, T, d], anchor, pending-or-None).
    """
    model = INNER_MODELS[kind]
    B, H, T, d = q.shape

    def loss(theta, k_t, v_t, w, b):
        return ln_fused_l2_loss(model(theta, k_t), v_t - k_t, w, b)

    grad_per_head = torch.func.vmap(torch.func.vmap(torch.func.grad(loss)))
    w_bh = ln_weight.expand(B, H, d)
    b_bh = ln_bias.expand(B, H, d)
    w_h, b_h = ln_weight[:, None, :], ln_bias[:, None, :]

    if pending is None:
        pending = {n: torch.zeros_like(t) for n, t in anchor.items()}
    outputs = []
    for t in range(T):
        i = (position + t) % mini_batch_size
        k_t, v_t, q_t = k[:, :, t : t + 1], v[:, :, t : t + 1], q[:, :, t : t + 1]
        grad = grad_per_head(anchor, k_t, v_t, w_bh, b_bh)
        scale = token_index_scale(torch.tensor(i, device=q.device), token_offset)
        theta, pending = mini_batch_gd_step(anchor, pending, grad, lr[:, :, t, None, None], scale)
        outputs.append(q_t + head_layer_norm(model(theta, q_t), w_h, b_h))
        if i == mini_batch_size - 1:
            anchor, pending = theta, {n: torch.zeros_like(p) for n, p in pending.items()}
    at_boundary = (position + T) % mini_batch_size == 0
    return torch.cat(outputs, dim=2), anchor, (None if at_boundary else pending)
