"""Softmax attention mixers: full causal and sliding-window, with RoPE and a KV cache in the state.

    q, k, v = x W_q, x W_k, x W_v (per head, RoPE on q, k at absolute positions)
    o_i = Σ_{j ≤ i, i − j < w} softmax_j(q_i·k_j/√d) v_j      (w = window; None = full)
    y = W_o [o_1 … o_H]

Optionally ``num_persistent`` learnable key/value tokens (Titans' persistent memory) are visible
to every query, whatever the window. Attention runs in blocks of queries through
``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels where the
backend has them), so a sliding window costs O(T·w), not O(T²). The state keeps the last w − 1
keys/values (all of them for full attention), so one call equals any split into pieces and
generation feeds one token at a time. Only torch is imported: this file is copied into HF folders.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .modules import RMSNorm, apply_rotate_half_rope, rope_cos_sin
from .state import LayerState


def windowed_attention(q, k, v, q_start: int, k_start: int, window: int | None, prefix_k=None, prefix_v=None,
                       block: int = 512) -> torch.Tensor:
    """Causal (sliding-window) attention of queries at absolute positions q_start.. over keys at k_start...

    q: [B, H, Tq, d]; k, v: [B, H, Tk, d] with k_start + Tk = q_start + Tq (keys end with the queries);
    prefix_k/v: [B, H, P, d] always visible. Query i sees key j iff j ≤ i and i − j < window.
    """
    Tq, Tk = q.shape[2], k.shape[2]
    P = 0 if prefix_k is None else prefix_k.shape[2]
    if P == 0 and window is None and Tq == Tk:  # plain causal: the fused path
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    outs = []
    for s in range(0, Tq, block):
        e = min(Tq, s + block)
        qi_abs = q_start + s
        lo = 0 if window is None else max(0, qi_abs - window + 1 - k_start)
        hi = q_start + e - k_start
        kb, vb = k[:, :, lo:hi], v[:, :, lo:hi]
        qpos = torch.arange(qi_abs, q_start + e, device=q.device)[:, None]
        kpos = torch.arange(k_start + lo, k_start + hi, device=q.device)[None, :]
        mask = kpos <= qpos
        if window is not None:
            mask = mask & (qpos - kpos < window)
        if P:
            kb, vb = torch.cat([prefix_k, kb], 2), torch.cat([prefix_v, vb], 2)
            mask = torch.cat([mask.new_ones(e - s, P), mask], 1)
        outs.append(F.scaled_dot_product_attention(q[:, :, s:e], kb, vb, attn_mask=mask))
    return torch.cat(outs, 2)


class AttentionLayer(nn.Module):
    """Multi-head softmax attention (``window=None``: full causal; else sliding window of w tokens)."""

    def __init__(self, hidden_size: int, num_heads: int, window: int | None = None, rope_theta: float = 10000.0,
                 num_persistent: int = 0, qk_norm: bool = False, block_size: int = 512):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if window is not None and window < 1:
            raise ValueError(f"attention window must be ≥ 1 or None, got {window}")
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.head_dim = hidden_size // num_heads
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        self.window, self.rope_theta, self.block_size = window, rope_theta, block_size
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm, self.k_norm = RMSNorm(self.head_dim), RMSNorm(self.head_dim)
        self.num_persistent = num_persistent
        if num_persistent:  # learnable tokens, projected like the sequence (no position)
            self.persistent = nn.Parameter(torch.randn(num_persistent, hidden_size) * 0.02)

    def reset_memory_parameters(self, init=None) -> None:
        if self.num_persistent:
            (init or nn.init).normal_(self.persistent, mean=0.0, std=0.02)

    def _split(self, t):
        return t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def project(self, x: torch.Tensor, position: int):
        """q, k, v [B, H, T, d] with RoPE at absolute positions position.."""
        q, k, v = (self._split(p(x)) for p in (self.q_proj, self.k_proj, self.v_proj))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        pos = torch.arange(position, position + x.shape[1], device=x.device)
        cos, sin = rope_cos_sin(pos, self.head_dim, self.rope_theta, q.dtype)
        return apply_rotate_half_rope(q, cos, sin), apply_rotate_half_rope(k, cos, sin), v

    def prefix(self, batch: int, dtype):
        if not self.num_persistent:
            return None, None
        p = self.persistent.to(dtype)
        k, v = self._split(self.k_proj(p)[None]), self._split(self.v_proj(p)[None])
        if self.qk_norm:
            k = self.k_norm(k)
        return k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)

    def attend(self, q, k, v, cache: dict, position: int):
        """Attention of new q over [cached k, v ; new k, v]; returns (o [B, H, T, d], new cache)."""
        if cache:
            k_all, v_all = torch.cat([cache["k"].to(k.dtype), k], 2), torch.cat([cache["v"].to(v.dtype), v], 2)
        else:
            k_all, v_all = k, v
        k_start = position + k.shape[2] - k_all.shape[2]
        pk, pv = self.prefix(q.shape[0], q.dtype)
        o = windowed_attention(q, k_all, v_all, position, k_start, self.window, pk, pv, self.block_size)
        keep = k_all.shape[2] if self.window is None else min(k_all.shape[2], self.window - 1)
        new_cache = {"k": k_all[:, :, k_all.shape[2] - keep:], "v": v_all[:, :, v_all.shape[2] - keep:]}
        return o, new_cache

    def init_state(self, batch_size: int) -> LayerState:
        return LayerState()

    def forward(self, x: torch.Tensor, state: LayerState | None = None):
        """x: [B, T, C] → (y [B, T, C], state with the KV cache)."""
        state = state if state is not None else LayerState()
        q, k, v = self.project(x, state.position)
        o, cache = self.attend(q, k, v, state.cache, state.position)
        y = self.o_proj(o.transpose(1, 2).flatten(2))
        return y, LayerState(cache=cache, position=state.position + x.shape[1])
