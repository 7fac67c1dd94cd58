"""The inner loop's knobs in the chunked forms (``common.parts.InnerKnobs``; the token-by-token definition is
``common.reference.memory_scan_reference``, which the tests hold these to).

    inner_steps K        DeltaNet/GDN: DeltaProduct, K (k, v, β) per token, retention once per token;
                         TTT, Titans: K chains, step s's gradient at each token's own chain-(s−1) weights
    inner_grad_clip τ    g_t ← g_t·min(1, τ/‖g_t‖) per token and layer (a weight matrix with its bias)
    inner_init_pull λ    g_t ← g_t + λ(θ' − θ_init), θ' where the gradient is taken
    inner_lr_schedule    η_t ← η_t/(1 + t·decay), t the position in the document
    inner_loss           TTT: "ln_recon" | "mse"; "next_token": token t trains on (k_{t−1}, v_t)

How each fits a chunk rule without giving up exactness:
- the schedule and next_token only change the per-token inputs (lr gates, keys): any chunk form
  takes them as they are (a document's first token has no pair: its lr is 0);
- for an outer-product gradient X_tᵀΔ_t (TTT, Titans) the norm is ‖X_t‖‖Δ_t‖, so clipping is a
  per-token scalar folded into Δ_t;
- with frozen gradients the pull λ(θ₀ − θ_init) is the same for every token of a chunk: the read
  gets −s_i λ(Σ_{j≤i} η_j) q̃(θ₀ − θ_init) (TTT) or (Σ_j c_tj) h(θ₀ − θ_init) (Titans);
- for the delta rule (θ_init = 0, the initial state) the pull is a decay: with ε = βλ,
  S_t = α(1 − ε)(I − β/(1 − ε) kᵀk) S + β kᵀv, a gated delta rule with α' = α(1 − ε),
  β' = β/(1 − ε), v' = (1 − ε) v (needs λ < 1 since β < 1);
- DeltaProduct runs the WY chunk code on the interleaved length-T·K sequence and keeps only each
  token's last sub-step output;
- TTT/Titans K steps: every token's own weights in chain s − 1 are a dual-form expression in the
  chunk start and the per-token errors of steps < s, so the keys are read (and, for MLPs, the error is
  backpropagated) at them by the same dual form: K passes per chunk;
- LaCT: its per-token gradients are outer products too (clip = a factor on each matrix's lr) and its
  chunk sums are taken at the chunk's first weights (the pull adds (Σ_i η_i) λ(W − W_init)).
The shared rules are here; each family's chunked form with the knobs lives in its ops folder
(ops/ttt/knobs.py, ops/delta_rule/knobs.py, ops/titans/knobs.py, ops/lact/knobs.py). Only torch is
imported: this file is copied into exported Hugging Face folders.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .parts import InnerKnobs, clip_factor


def lr_schedule(lr: torch.Tensor, position: int, knobs: InnerKnobs, time_dim: int = 2) -> torch.Tensor:
    """η_t/(1 + t·decay) for the tokens at positions position, position + 1, … along ``time_dim``."""
    if not knobs.lr_decay:
        return lr
    T = lr.shape[time_dim]
    t = torch.arange(position, position + T, device=lr.device, dtype=lr.dtype)
    shape = [1] * lr.dim()
    shape[time_dim] = T
    return lr / (1.0 + t.reshape(shape) * knobs.lr_decay)


def next_token_pairs(k: torch.Tensor, lrs: list, prev_key: torch.Tensor | None):
    """next_token: keys shifted by one token (k_{t−1} for token t); without ``prev_key`` (a document
    start) the first token's lr gates are zeroed. k: [B, H, T, ...]; lrs: [B, H, T, ...] tensors.
    Returns (keys, lrs, the last key for the next call)."""
    first = torch.zeros_like(k[:, :, :1]) if prev_key is None else prev_key.reshape(k[:, :, :1].shape).to(k.dtype)
    if prev_key is None:
        lrs = [torch.cat([torch.zeros_like(lr[:, :, :1]), lr[:, :, 1:]], 2) for lr in lrs]
    return torch.cat([first, k[:, :, :-1]], 2), lrs, k[:, :, -1]


# ------------------------------------------------------------------------------- TTT


def _with_ones(x):
    return F.pad(x, (0, 1), value=1.0)


def clip_outer(G, X, tau):
    """Per-token clip of the outer-product gradient X̃ᵀG: its norm is ‖X̃‖‖G‖."""
    if tau is None:
        return G
    return G * clip_factor(X.norm(dim=-1, keepdim=True) * G.norm(dim=-1, keepdim=True), tau)
