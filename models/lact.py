"""LaCT, "Test-Time Training Done Right" (Zhang et al. 2025, arXiv 2505.23884): large-chunk TTT with
SwiGLU fast weights, a Muon update and weight normalisation, beside sliding-window attention in
the same layer (as in the authors' language model, ``lact_llm/lact_model/layer_lact_swiglu.py``).

Per fast-weight head (d = hidden/num_lact_heads, d_h = inter_multi·d) the inner model is

    f_W(x) = (SiLU(x W0) ⊙ x W2) W1          W0, W2: d×d_h, W1: d_h×d (x @ W layout)

and the sequence is cut into chunks of C tokens (C = 2048 in the paper's LM). For chunk c:

    o_i = f_{W^(c)}(q_i)  for every i in c                  apply first (weights of chunks < c)
    G_n = Σ_{i∈c} η_{n,i} ∇_{W_n} ℓ_i(W^(c)),  ℓ_i = −⟨f_W(k_i), v_i⟩    per-matrix token lrs η_{0,1,2}
    Δ   = −G + m̄_c Δ_prev   (momentum, m̄_c the chunk mean of σ(x w_m + b_m));  Δ_prev ← Δ
    Δ   ← NewtonSchulz5(Δ)  (``inner_optimizer="muon"``; ``"sgd"`` skips it)
    W   ← W + Δ,  then every output channel of W is rescaled to its norm in the initial W (retention)

η_{n,i} = softplus(x_i w_n + b_n + softplus⁻¹(base_lr)). Queries/keys: per-channel scale and offset
of the shared q/k projection, SiLU (also on v), L2 normalisation per fast head, RoPE (grouped by
attention heads, as the authors do). Output: per-head RMSNorm × SiLU(x w_s) per head, added to
the sliding-window attention output, one shared output projection.

Within a chunk nothing is causal (the window attention covers local detail), so the gradient sum
of an unfinished chunk is linear in its tokens: the state carries it (``pending``) with the sum
of m, and one call equals any split. Only torch is imported: this file is copied into HF folders.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from .attention import windowed_attention
from .inner_knobs import lr_schedule, next_token_pairs
from .modules import HeadRMSNorm, apply_rotate_half_rope, rope_cos_sin
from .parts import (InnerKnobs, Recipe, clip_factor, column_norms, dot_product_loss, l2_loss, l2_normalize,
                    newton_schulz, swiglu_memory)
from .reference import memory_scan_reference
from .state import LayerState, Mixer
from .triton_memory import triton_lact_chunk, use_triton_lact

NAMES = ("W0", "W1", "W2")


def lact_grads(W: dict, k, v, lr0, lr1, lr2):
    """η-weighted gradient sums of ℓ = −⟨f_W(k), v⟩ over n tokens. k, v: [.., n, d]; lr*: [.., n]."""
    a, z = k @ W["W0"], k @ W["W2"]
    sig = torch.sigmoid(a)
    silu_a = a * sig
    h = silu_a * z
    e = v @ W["W1"].transpose(-1, -2)  # ∂⟨f, v⟩/∂h
    d_silu = sig * (1 + a * (1 - sig))
    return {
        "W0": -(lr0[..., None] * k).transpose(-1, -2) @ (e * z * d_silu),
        "W1": -(lr1[..., None] * h).transpose(-1, -2) @ v,
        "W2": -(lr2[..., None] * k).transpose(-1, -2) @ (e * silu_a),
    }


def lact_commit(W: dict, pending: dict, m_mean, momentum: dict | None, init_norms: dict, muon: bool):
    """The end of a chunk: Δ = −G (+ m̄ Δ_prev), [Newton–Schulz], W + Δ, weight-normalised.
    m_mean: [B, H] or None. Returns (W, momentum)."""
    delta = {n: -pending[n] for n in NAMES}
    if momentum is not None:
        delta = {n: delta[n] + m_mean[..., None, None] * momentum[n] for n in NAMES}
        momentum = delta
    if muon:
        delta = {n: newton_schulz(delta[n]) for n in NAMES}
    new = {n: W[n] + delta[n] for n in NAMES}
    return {n: new[n] / (column_norms(new[n]) + 1e-5) * init_norms[n] for n in NAMES}, momentum


def lact_scan_chunked(weights, pending, m_sum, momentum, q, k, v, lr0, lr1, lr2, m, init_norms, position: int,
                      chunk_size: int, muon: bool):
    """Apply-then-update over T tokens from absolute position ``position``.

    weights/pending/momentum: dicts of [B, H, ...] (pending None at a chunk boundary, momentum None
    without momentum); m_sum: [B, H] or None; q, k, v: [B, H, T, d]; lr*, m: [B, H, T].
    Returns (o, weights, pending-or-None, m_sum-or-None, momentum)."""
    C, T = chunk_size, q.shape[2]
    outs = []
    start = 0
    fused = use_triton_lact(q, weights)  # on CUDA: the fused apply + gradient kernels (models/triton_memory.py)
    while start < T:
        stop = min(T, start + C - (position + start) % C)
        sl = slice(start, stop)
        if fused:
            o, g = triton_lact_chunk(weights, q[:, :, sl], k[:, :, sl], v[:, :, sl], lr0[:, :, sl], lr1[:, :, sl],
                                     lr2[:, :, sl])
            outs.append(o.to(q.dtype))
        else:
            outs.append(swiglu_memory(weights, q[:, :, sl]))
            g = lact_grads(weights, k[:, :, sl], v[:, :, sl], lr0[:, :, sl], lr1[:, :, sl], lr2[:, :, sl])
        pending = g if pending is None else {n: pending[n] + g[n] for n in NAMES}
        ms = m[:, :, sl].sum(-1)
        m_sum = ms if m_sum is None else m_sum + ms
        if (position + stop) % C == 0:
            weights, momentum = lact_commit(weights, pending, m_sum / C, momentum, init_norms, muon)
            pending = m_sum = None
        start = stop
    return torch.cat(outs, 2), weights, pending, m_sum, momentum


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


LACT_SCANS = {"chunk": lact_scan_chunked, "reference": lact_scan_reference}


def _inv_softplus(x: float) -> float:
    return x + math.log(-math.expm1(-x))


class LaCTLayer(Mixer):
    """Sliding-window attention + a large-chunk SwiGLU fast-weight memory sharing one qkv projection."""

    fast_weight_names = NAMES  # θ₀ = (W0, W1, W2): the initial fast weights (no weight decay in pretrain.optim)

    def __init__(self, hidden_size: int, num_attn_heads: int, num_lact_heads: int = 4, chunk_size: int = 2048,
                 window: int | None = 2048, inter_multi: int = 1, base_lr: float = 1e-3, optimizer: str = "muon",
                 momentum: bool = True, rope_theta: float = 1e6, norm_eps: float = 1e-6, scan_impl: str = "chunk",
                 knobs: InnerKnobs | None = None):
        super().__init__()
        if knobs is not None and (knobs.steps != 1 or knobs.loss not in (None, "mse", "next_token")):
            raise ValueError(f"LaCT supports inner_grad_clip, inner_init_pull, inner_lr_schedule and inner_loss "
                             f"mse/next_token, got {knobs}")
        self.knobs = None if knobs == InnerKnobs() else knobs  # inner-loop knobs (models/inner_knobs.py)
        for n, h in (("num_attn_heads", num_attn_heads), ("num_lact_heads", num_lact_heads)):
            if hidden_size % h:
                raise ValueError(f"hidden_size {hidden_size} is not divisible by {n} {h}")
        if optimizer not in ("muon", "sgd"):
            raise ValueError(f"unknown inner_optimizer {optimizer!r} for lact; expected 'muon' or 'sgd'")
        if scan_impl not in LACT_SCANS:
            raise ValueError(f"unknown scan_impl {scan_impl!r}; expected one of {sorted(LACT_SCANS)}")
        if chunk_size < 1 or inter_multi < 1 or base_lr <= 0:
            raise ValueError("chunk_size and inter_multi must be ≥ 1 and base_lr > 0")
        self.hidden_size, self.num_heads, self.num_lact_heads = hidden_size, num_attn_heads, num_lact_heads
        self.head_dim = hidden_size // num_attn_heads
        if self.head_dim % 2:
            raise ValueError(f"attention head_dim {self.head_dim} must be even for RoPE")
        self.fw_dim = d = hidden_size // num_lact_heads
        self.fw_hidden = dh = inter_multi * d
        self.chunk_size, self.window, self.rope_theta = chunk_size, window, rope_theta
        self.base_lr, self.muon, self.use_momentum, self.scan_impl = base_lr, optimizer == "muon", momentum, scan_impl
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.qk_scale = nn.Parameter(torch.ones(2, hidden_size))
        self.qk_offset = nn.Parameter(torch.zeros(2, hidden_size))
        self.lr_proj = nn.Linear(hidden_size, 3 * num_lact_heads, bias=True)
        if momentum:
            self.momentum_proj = nn.Linear(hidden_size, num_lact_heads, bias=True)
        self.scale_proj = nn.Linear(hidden_size, num_lact_heads, bias=True)
        self.ttt_norm = HeadRMSNorm(d, eps=norm_eps)
        self.W0 = nn.Parameter(torch.zeros(num_lact_heads, d, dh))
        self.W2 = nn.Parameter(torch.zeros(num_lact_heads, d, dh))
        self.W1 = nn.Parameter(torch.zeros(num_lact_heads, dh, d))
        self.reset_memory_parameters()

    def reset_memory_parameters(self, init=None) -> None:
        """The authors' fast-weight init: N(0, 1/d_in); per-channel q/k scale 1, offset 0."""
        init = init or nn.init
        for n in NAMES:
            p = getattr(self, n)
            init.normal_(p, mean=0.0, std=p.shape[-2] ** -0.5)
        init.ones_(self.qk_scale)
        init.zeros_(self.qk_offset)

    def init_state(self, batch_size: int) -> LayerState:
        weights = {n: getattr(self, n).float().unsqueeze(0).expand(batch_size, *getattr(self, n).shape) for n in NAMES}
        opt = {"momentum": {n: torch.zeros_like(w) for n, w in weights.items()}} if self.use_momentum else {}
        return LayerState(weights=weights, opt=opt)

    def _rope(self, t, position, dtype):
        """RoPE on [B, T, hidden] grouped by attention heads → [B, nh_attn, T, head_dim]."""
        t = t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        pos = torch.arange(position, position + t.shape[2], device=t.device)
        cos, sin = rope_cos_sin(pos, self.head_dim, self.rope_theta, dtype)
        return apply_rotate_half_rope(t, cos, sin)

    def _fw_heads(self, t):
        return t.unflatten(-1, (self.num_lact_heads, self.fw_dim)).transpose(1, 2)

    def prepare(self, x: torch.Tensor, state: LayerState) -> tuple:
        """The shared qkv projection, the sliding-window attention over it (its cache is the halo) and
        the fast-weight inputs: (fq, fk, fv [B, H, T, d], lr0, lr1, lr2, momentum [B, H, T], the
        initial column norms, attention output [B, T, C], scale gate [B, T, H], halo {"cache"})."""
        T = x.shape[1]
        pos = state.position
        q, k, v = self.qkv(x).chunk(3, dim=-1)

        # sliding-window attention on the shared projections
        qa, ka = self._rope(q, pos, q.dtype), self._rope(k, pos, k.dtype)
        va = v.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        cache = state.cache
        k_all = torch.cat([cache["k"].to(ka.dtype), ka], 2) if cache else ka
        v_all = torch.cat([cache["v"].to(va.dtype), va], 2) if cache else va
        attn = windowed_attention(qa, k_all, v_all, pos, pos + T - k_all.shape[2], self.window)
        keep = k_all.shape[2] if self.window is None else min(k_all.shape[2], self.window - 1)
        new_cache = {"k": k_all[:, :, k_all.shape[2] - keep:], "v": v_all[:, :, v_all.shape[2] - keep:]}
        attn = attn.transpose(1, 2).flatten(2)

        # the fast-weight branch, in (at least) float32
        compute = torch.promote_types(x.dtype, torch.float32)
        fq = F.silu(q * self.qk_scale[0] + self.qk_offset[0]).to(compute)
        fk = F.silu(k * self.qk_scale[1] + self.qk_offset[1]).to(compute)
        fq = l2_normalize(self._fw_heads(fq)).transpose(1, 2).flatten(2)
        fk = l2_normalize(self._fw_heads(fk)).transpose(1, 2).flatten(2)
        fq = self._fw_heads(self._rope(fq, pos, compute).transpose(1, 2).flatten(2))
        fk = self._fw_heads(self._rope(fk, pos, compute).transpose(1, 2).flatten(2))
        fv = self._fw_heads(F.silu(v).to(compute))
        lr = F.softplus(self.lr_proj(x).to(compute) + _inv_softplus(self.base_lr)).transpose(1, 2)  # [B, 3H, T]
        lr0, lr1, lr2 = lr.unflatten(1, (self.num_lact_heads, 3)).unbind(2)
        m = (torch.sigmoid(self.momentum_proj(x).to(compute)).transpose(1, 2) if self.use_momentum
             else torch.zeros_like(lr0))
        init_norms = {n: column_norms(getattr(self, n).to(compute)) for n in NAMES}
        return fq, fk, fv, lr0, lr1, lr2, m, init_norms, attn, {"cache": new_cache}

    def scan(self, inputs: tuple, state: LayerState):
        """The fast-weight scan from ``state``: ((o [B, H, T, d], attention output), state: fast
        weights, pending chunk sums, momentum, KV cache)."""
        fq, fk, fv, lr0, lr1, lr2, m, init_norms, attn, halo = inputs
        compute, pos = fq.dtype, state.position
        cast = (lambda d: None if d is None else {n: t.to(compute) for n, t in d.items()})
        m_sum = state.opt.get("m_sum")
        args = (cast(state.weights), cast(state.opt.get("pending")), None if m_sum is None else m_sum.to(compute),
                cast(state.opt.get("momentum")))
        extra = {}
        if self.knobs is not None:
            o, weights, pending, m_sum, mom, last_key = lact_scan_with_knobs(
                self, args, fq, fk, fv, lr0, lr1, lr2, m, init_norms, pos, state.extra.get("prev_key"))
            extra = {} if last_key is None else {"prev_key": last_key}
        else:
            o, weights, pending, m_sum, mom = LACT_SCANS[self.scan_impl](
                *args, fq, fk, fv, lr0, lr1, lr2, m, init_norms, pos, self.chunk_size, self.muon)
        opt = {}
        if mom is not None:
            opt["momentum"] = mom
        if pending is not None:
            opt["pending"] = pending
            if self.use_momentum:
                opt["m_sum"] = m_sum
        return (o, attn), LayerState(weights=weights, opt=opt, extra=extra, position=pos + fq.shape[2], **halo)

    def output(self, x: torch.Tensor, outputs) -> torch.Tensor:
        """Per-head RMSNorm ⊙ SiLU(scale), plus the attention output, output projection."""
        o, attn = outputs
        o = self.ttt_norm(o.to(x.dtype)) * F.silu(self.scale_proj(x)).transpose(1, 2)[..., None]
        return self.o_proj(attn + o.transpose(1, 2).flatten(2))


# ------------------------------------------------------------------------------- LaCT: the inner-loop knobs (parts.InnerKnobs; rules in inner_knobs.py)


def lact_clipped_lrs(W: dict, k, v, lrs: list, tau: float | None) -> list:
    """LaCT's per-token gradients are outer products (W0: kᵀ(e ⊙ z ⊙ silu′(a)), W1: hᵀv, W2: kᵀ(e ⊙ silu(a))),
    so clipping each to norm ≤ τ is a per-token factor on its lr: returns the clipped [lr0, lr1, lr2]."""
    if tau is None:
        return lrs
    a, z = k @ W["W0"], k @ W["W2"]
    sig = torch.sigmoid(a)
    h = a * sig * z
    e = v @ W["W1"].transpose(-1, -2)
    kn = k.norm(dim=-1)
    norms = [kn * (e * z * sig * (1 + a * (1 - sig))).norm(dim=-1), h.norm(dim=-1) * v.norm(dim=-1),
             kn * (e * a * sig).norm(dim=-1)]
    return [lr * clip_factor(n, tau) for lr, n in zip(lrs, norms)]


def lact_scan_knobs(weights, pending, m_sum, momentum, q, k, v, lr0, lr1, lr2, m, init_norms, position: int,
                    chunk_size: int, muon: bool, knobs: InnerKnobs, init: dict | None):
    """LaCT's chunk form with clipping and the pull-to-init (``lr*`` and ``k`` already carry the
    schedule and next_token); same contract as ``lact.lact_scan_chunked``. The gradients of a chunk
    are taken at its first weights W, so the pull adds (Σ_i η_{n,i}) λ(W_n − W_n,init) to each sum."""
    C, T = chunk_size, q.shape[2]
    outs, start = [], 0
    while start < T:
        stop = min(T, start + C - (position + start) % C)
        sl = slice(start, stop)
        outs.append(swiglu_memory(weights, q[:, :, sl]))
        vs = v[:, :, sl]
        if knobs.loss == "mse":  # ℓ = ½‖f(k) − v‖² = the dot-product loss's gradients with v → v − f_W(k)
            vs = vs - swiglu_memory(weights, k[:, :, sl])
        lrs = lact_clipped_lrs(weights, k[:, :, sl], vs, [lr0[:, :, sl], lr1[:, :, sl], lr2[:, :, sl]],
                               knobs.grad_clip)
        g = lact_grads(weights, k[:, :, sl], vs, *lrs)
        if knobs.init_pull:
            g = {n: g[n] + lr.sum(-1)[..., None, None] * knobs.init_pull * (weights[n] - init[n])
                 for n, lr in zip(NAMES, [lr0[:, :, sl], lr1[:, :, sl], lr2[:, :, sl]])}
        pending = g if pending is None else {n: pending[n] + g[n] for n in NAMES}
        ms = m[:, :, sl].sum(-1)
        m_sum = ms if m_sum is None else m_sum + ms
        if (position + stop) % C == 0:
            weights, momentum = lact_commit(weights, pending, m_sum / C, momentum, init_norms, muon)
            pending = m_sum = None
        start = stop
    return torch.cat(outs, 2), weights, pending, m_sum, momentum


def lact_scan_with_knobs(layer, state_args, q, k, v, lr0, lr1, lr2, m, init_norms, position: int, prev_key):
    """``LaCTLayer``'s fast-weight scan with the knobs, chunked or token by token (``scan_impl``).
    state_args: (weights, pending, m_sum, momentum). Returns (o, weights, pending, m_sum, momentum, last key)."""
    knobs, B, compute = layer.knobs, q.shape[0], q.dtype
    weights, pending, m_sum, momentum = state_args
    init = {n: getattr(layer, n).to(compute).unsqueeze(0).expand(B, *getattr(layer, n).shape) for n in NAMES}
    if layer.scan_impl == "reference":
        H = q.shape[1]
        opt = {"pending": pending if pending is not None else {n: torch.zeros_like(w) for n, w in weights.items()},
               "m_sum": m_sum if m_sum is not None else q.new_zeros(B, H)}
        if momentum is not None:
            opt["momentum"] = momentum
        recipe = lact_recipe(layer.chunk_size, init_norms, layer.muon, momentum is not None)
        if knobs.loss == "mse":
            recipe = replace(recipe, inner_loss=lambda theta, k_t, v_t, extra: l2_loss(swiglu_memory(theta, k_t), v_t))
        o, weights, anchor, opt, last_key = memory_scan_reference(
            recipe, weights, None, opt, q, k, v, {"lr0": lr0, "lr1": lr1, "lr2": lr2, "m": m}, {}, position, knobs,
            init, prev_key)
        mid = anchor is not None
        return (o, weights, opt["pending"] if mid else None, opt["m_sum"] if mid else None, opt.get("momentum"),
                last_key if knobs.next_token else None)
    lr0, lr1, lr2 = (lr_schedule(lr, position, knobs) for lr in (lr0, lr1, lr2))
    last_key = None
    if knobs.next_token:
        k, (lr0, lr1, lr2), last_key = next_token_pairs(k, [lr0, lr1, lr2], prev_key)
    return (*lact_scan_knobs(weights, pending, m_sum, momentum, q, k, v, lr0, lr1, lr2, m, init_norms, position,
                             layer.chunk_size, layer.muon, knobs, init), last_key)
