"""Chunked (mini-batch dual form) TTT scan: the fast training form of TTT-Linear and TTT-MLP.

Inside a mini-batch of b tokens all inner gradients are taken at the mini-batch's starting
weights θ₀, so the b per-token weights θ_i = θ₀ − s_i Σ_{j≤i} η_j ∇ℓ_j never need to be
materialised (Sun et al. 2024, §2.5). For TTT-Linear with a bias folded into W (x̃ = [x, 1]):

    Z    = K̃ W̃₀                              (inner forward at θ₀)
    G    = ∂ℓ/∂Z  (LayerNorm-fused L2, closed form)
    Z̄    = Q̃ W̃₀ − tril(s ηᵀ ⊙ (Q Kᵀ + 1)) G − s ⊙ (Q̃ P)          (read at θ_i, dual form)
    W̃_b  = W̃₀ − s_b (P + (η ⊙ K̃)ᵀ G)                              (weights after the mini-batch)

P is the pending η-weighted gradient sum of a mini-batch that an earlier call started (zero at
a mini-batch boundary); it is what lets a sequence be cut anywhere and continued exactly. TTT-MLP
applies the same identity to each of its two layers. Everything that does not depend on θ₀
(Q Kᵀ, the η/s masks) is computed for all mini-batches at once; the loop over mini-batches holds
only the θ-dependent matmuls. Only torch is imported: this file is copied into HF folders.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ...common.parts import gelu_tanh, head_layer_norm
from ...common.parts import gelu_tanh_grad_fused as gelu_tanh_grad
from ...common.parts import ln_fused_l2_grad_fused as ln_fused_l2_grad
from .fused import linear_scan, mlp_scan
from .triton import triton_linear_scan, triton_mlp_scan, use_triton


def _with_ones(x: torch.Tensor) -> torch.Tensor:
    """x̃ = [x, 1]: folds a row bias into the following matrix."""
    return F.pad(x, (0, 1), value=1.0)


def fold_bias(theta: dict) -> list[torch.Tensor]:
    """{W1, b1, W2, b2} → [W̃1, W̃2] with W̃ = [W; b]."""
    return [torch.cat([theta[f"W{i}"], theta[f"b{i}"]], dim=-2) for i in (1, 2) if f"W{i}" in theta]


def unfold_bias(folded: list[torch.Tensor]) -> dict:
    out = {}
    for i, w in enumerate(folded, start=1):
        out[f"W{i}"], out[f"b{i}"] = w[..., :-1, :], w[..., -1:, :]
    return out


def _causal_eta(scale: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """E_ij = s_i η_j for j ≤ i, else 0. scale: [..., n], lr: [..., n] → [..., n, n]."""
    return torch.tril(scale[..., :, None] * lr[..., None, :])


# ------------------------------------------------------------------ one segment (any length ≤ b)


def _segment_linear(W, P, q, k, tgt, lr, scale, ln_w, ln_b, completes):
    """Dual form over n ≤ b tokens of one mini-batch. W, P: [B,H,d+1,d] folded."""
    ka, qa = _with_ones(k), _with_ones(q)
    grad = ln_fused_l2_grad(ka @ W, tgt, ln_w, ln_b)
    mix = _causal_eta(scale, lr) * (q @ k.transpose(-1, -2) + 1.0)
    z_bar = qa @ W - mix @ grad
    update = (lr[..., None] * ka).transpose(-1, -2) @ grad
    if P is not None:
        z_bar = z_bar - scale[..., None] * (qa @ P)
        update = update + P
    if completes:
        return z_bar, W - scale[..., -1:, None] * update, None
    return z_bar, W, update


def _segment_mlp(W1, W2, P1, P2, q, k, tgt, lr, scale, ln_w, ln_b, completes):
    """Dual form of the two-layer MLP over n ≤ b tokens of one mini-batch."""
    ka, qa = _with_ones(k), _with_ones(q)
    z1 = ka @ W1
    x2a = _with_ones(gelu_tanh(z1))
    g2 = ln_fused_l2_grad(x2a @ W2, tgt, ln_w, ln_b)
    g1 = (g2 @ W2[..., :-1, :].transpose(-1, -2)) * gelu_tanh_grad(z1)
    eta = _causal_eta(scale, lr)
    z1_bar = qa @ W1 - (eta * (q @ k.transpose(-1, -2) + 1.0)) @ g1
    if P1 is not None:
        z1_bar = z1_bar - scale[..., None] * (qa @ P1)
    x2_bar_a = _with_ones(gelu_tanh(z1_bar))
    z2_bar = x2_bar_a @ W2 - (eta * (x2_bar_a @ x2a.transpose(-1, -2))) @ g2
    update1 = (lr[..., None] * ka).transpose(-1, -2) @ g1
    update2 = (lr[..., None] * x2a).transpose(-1, -2) @ g2
    if P1 is not None:
        z2_bar = z2_bar - scale[..., None] * (x2_bar_a @ P2)
        update1, update2 = update1 + P1, update2 + P2
    if completes:
        s_last = scale[..., -1:, None]
        return z2_bar, W1 - s_last * update1, W2 - s_last * update2, None, None
    return z2_bar, W1, W2, update1, update2


# ------------------------------------------------------------- all full mini-batches of a call


def _read_out(q, z_bar, ln_w, ln_b):
    """The layer's read of the inner model: o = q + LN_{γ,β}(z̄)."""
    return q + head_layer_norm(z_bar, ln_w, ln_b)


def _tokens(x):
    """[N, B, H, b, d] mini-batch blocks → [B, H, N·b, d] in token order."""
    return x.movedim(0, 2).flatten(2, 3)


def _scan_linear(W, q, k, tgt, lr, scale, ln_w, ln_b, group):
    """q,k,tgt: [N,B,H,b,d]; lr: [N,B,H,b]; scale: [b]. Returns the read-out o = q + LN(z̄) [B,H,N·b,d]
    and W after."""
    mix = _causal_eta(scale, lr) * (q @ k.transpose(-1, -2) + 1.0)
    slr = scale[-1] * lr
    fused = use_triton(q, q.shape[-2], q.shape[-1])  # on CUDA: the Triton kernels

    def run(W, start, stop):  # the weight recursion with a hand-written backward (ops/ttt/fused.py)
        sl = slice(start, stop)
        if fused:
            z_bar, W = triton_linear_scan(W, q[sl], k[sl], tgt[sl], mix[sl], slr[sl], ln_w, ln_b)
            return W, _tokens(_read_out(q[sl], z_bar, ln_w, ln_b))
        out, W = linear_scan(W, k[sl], q[sl], tgt[sl], mix[sl], slr[sl], ln_w, ln_b)  # reads out inside
        return W, out

    return _grouped(run, [W], q.shape[0], group)


def _scan_mlp(W1, W2, q, k, tgt, lr, scale, ln_w, ln_b, group):
    eta = _causal_eta(scale, lr)
    mix1 = eta * (q @ k.transpose(-1, -2) + 1.0)
    slr = scale[-1] * lr
    fused = use_triton(q, q.shape[-2], q.shape[-1], W1.shape[-1])  # the Triton kernels (see use_triton)

    def run(W1, W2, start, stop):  # the weight recursion with a hand-written backward (ops/ttt/fused.py)
        sl = slice(start, stop)
        if fused:
            z_bar, W1, W2 = triton_mlp_scan(W1, W2, q[sl], k[sl], tgt[sl], eta[sl], mix1[sl], slr[sl], ln_w, ln_b)
            return W1, W2, _tokens(_read_out(q[sl], z_bar, ln_w, ln_b))
        out, W1, W2 = mlp_scan(W1, W2, k[sl], q[sl], tgt[sl], eta[sl], mix1[sl], slr[sl], ln_w, ln_b)
        return W1, W2, out

    return _grouped(run, [W1, W2], q.shape[0], group)


def _grouped(run, weights, n, group):
    """Runs mini-batches [0, n) in groups; with group > 0 each group is recomputed in backward
    (only the weights at group boundaries are kept: the scan checkpointing of the official code)."""
    if group <= 0 or not torch.is_grad_enabled():
        *weights, out = run(*weights, 0, n)
        return out, weights
    outs = []
    for start in range(0, n, group):
        *weights, out = checkpoint(run, *weights, start, min(start + group, n), use_reentrant=False)
        outs.append(out)
    return torch.cat(outs, dim=2), weights


# --------------------------------------------------------------------------------- entry point


def ttt_scan_chunked(
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
    """Same contract as :func:`ops.ttt.naive.ttt_scan_reference`, computed in the dual form.

    The T tokens split into a head that finishes a mini-batch begun by an earlier call, full
    mini-batches, and a tail that starts one; head and tail use the same dual form with the
    pending gradient sum P.
    """
    B, H, T, d = q.shape
    b = mini_batch_size
    in_batch = (position + torch.arange(T, device=q.device)) % b
    scale = torch.clamp_min(1.0 / (in_batch.to(token_offset.dtype) + 1.0) + token_offset[in_batch], 0.0)
    tgt = v - k
    ln_w, ln_b = ln_weight[:, None, :], ln_bias[:, None, :]
    folded = fold_bias(anchor)
    pend = fold_bias(pending) if pending is not None and position % b != 0 else None
    mlp = kind == "mlp"

    head = min(T, (b - position % b) % b)
    n_full = (T - head) // b
    pieces = [(0, head), (head + n_full * b, T)]
    outputs = {}

    def segment(start, stop):
        nonlocal folded, pend
        sl = slice(start, stop)
        completes = (position + stop) % b == 0
        args = (q[:, :, sl], k[:, :, sl], tgt[:, :, sl], lr[:, :, sl], scale[sl], ln_w, ln_b, completes)
        if mlp:
            p1, p2 = pend if pend is not None else (None, None)
            z, w1, w2, u1, u2 = _segment_mlp(*folded, p1, p2, *args)
            folded, pend = [w1, w2], (None if u1 is None else [u1, u2])
        else:
            z, w, u = _segment_linear(folded[0], None if pend is None else pend[0], *args)
            folded, pend = [w], (None if u is None else [u])
        outputs[start] = _read_out(q[:, :, sl], z, ln_w, ln_b)

    if head:
        segment(*pieces[0])
    if n_full:
        sl = slice(head, head + n_full * b)

        def blocks(x):  # [B,H,N*b,...] → [N,B,H,b,...] (a view; no slice when the blocks are all of x)
            x = x if n_full * b == T else x[:, :, sl]
            return x.unflatten(2, (n_full, b)).movedim(2, 0)

        scan = _scan_mlp if mlp else _scan_linear
        outputs[head], folded = scan(*folded, blocks(q), blocks(k), blocks(tgt), blocks(lr), scale[head : head + b],
                                     ln_w, ln_b, checkpoint_group)
    if pieces[1][1] > pieces[1][0]:
        segment(*pieces[1])

    out = outputs[0] if len(outputs) == 1 else torch.cat([outputs[s] for s in sorted(outputs)], dim=2)
    return out, unfold_bias(folded), (None if pend is None else unfold_bias(pend))
