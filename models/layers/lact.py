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

import torch
import torch.nn.functional as F
from torch import nn

from ..common.attention import windowed_attention
from ..common.modules import HeadRMSNorm, apply_rotate_half_rope, rope_cos_sin
from ..common.parts import InnerKnobs, column_norms, l2_normalize
from ..common.state import LayerState, Mixer
from ..ops.lact.chunk import NAMES, lact_scan_chunked
from ..ops.lact.knobs import lact_scan_with_knobs
from ..ops.lact.naive import lact_scan_reference


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
        self.knobs = None if knobs == InnerKnobs() else knobs  # inner-loop knobs (models/common/knobs.py)
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
