"""TNT: hierarchical Titans memory (Li, Behrouz et al. 2025, *TNT: Improving Chunkwise Training for
Test-Time Memorization*, arXiv 2511.07343).

One **global** memory V on large chunks (C_G) and N **local** memories W⁽ᵐ⁾ on small chunks
(C_L⁽ᵐ⁾), all of them Titans memories (deep MLP without biases, ½‖M(k) − v‖², momentum "surprise",
forgetting gate, per-token soft-clamped gradients; ``models/layers/titans.py``), sharing q, k, v:

    global  V_t = Titans step of V_{t−1} with ∇ℓ_t(V_{ξ(t,C_G)})       o^G_t = V_{ξ(t,C_G)}(q_t)
    local   W⁽ᵐ⁾_t = W⁽ᵐ⁾_init                      if t ≡ 0 (mod S_L)   (reset; momentum ← 0)
            W⁽ᵐ⁾_t = Titans step with ∇ℓ_t(W⁽ᵐ⁾_{ξ(t,C_L⁽ᵐ⁾)})  otherwise,  o⁽ᵐ⁾_t = W⁽ᵐ⁾_t(q̃_t)
    Q-K projection  P_t = Σ_{τ=ξ(t,S_L)}^{t} k_τ k_τᵀ/‖k_τ‖²,   q̃_t = P_t q_t / √(1 + ‖P_t q_t‖²)
    output  o_t = o^G_t + Σ_m o⁽ᵐ⁾_t

ξ(t, C) = t − (t mod C). The global memory is read with its weights at the start of the current
global chunk (read before update: the chunk's own tokens reach it only at the chunk end); the
local memories are read after the update like Titans. Local memories restart from their learnable
initial weights every S_L = ``reset_period`` tokens (default C_G), so reset segments are
independent: the chunked form runs all complete segments of a call at once (in the batch dim).
Only the global memory carries information across segments, with a serial loop of T/C_G steps.

Two-stage training (the paper's): pre-train with large local chunks (fast), then fine-tune with
small ones; ``local_chunk_sizes`` only changes the frozen-gradient scope, not any parameter, so a
checkpoint loads with any local chunk sizes that divide the reset period.
Only torch is imported: this file is copied into exported Hugging Face folders.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..common.modules import CausalConv1d, HeadRMSNorm, memory_prologue, split_heads
from ..common.parts import copy_param
from ..common.state import LayerState, Mixer
from ..ops.tnt.chunk import tnt_scan_chunked
from ..ops.tnt.naive import tnt_scan_reference
from .titans import titans_gate_bias


TNT_SCANS = {"chunk": tnt_scan_chunked, "reference": tnt_scan_reference}


# ------------------------------------------------------------------------------ the layer


class TNTLayer(Mixer):
    """TNT as a sequence mixer: shared q/k/v (projection, causal conv, SiLU, q/k L2-normalised as in
    Titans), one global + N local Titans memories, output o = W_o(RMSNorm_h(o^G + Σ o⁽ᵐ⁾) ⊙ SiLU(x W_g))."""

    def __init__(self, hidden_size: int, num_heads: int, global_chunk_size: int = 2048,
                 local_chunk_sizes=(64,), reset_period: int | None = None, depth: int = 2, expansion: int = 2,
                 base_lr: float = 0.01, optimizer: str = "momentum", conv_kernel: int = 4, norm_eps: float = 1e-6,
                 scan_impl: str = "chunk", max_grad_norm: float | None = 1.0):
        super().__init__()
        local_chunk_sizes = [int(c) for c in local_chunk_sizes]
        reset_period = global_chunk_size if reset_period is None else reset_period
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if optimizer not in ("momentum", "sgd"):
            raise ValueError(f"unknown inner_optimizer {optimizer!r} for tnt; expected 'momentum' or 'sgd'")
        if scan_impl not in TNT_SCANS:
            raise ValueError(f"unknown scan_impl {scan_impl!r}; expected one of {sorted(TNT_SCANS)}")
        check_tnt_sizes(global_chunk_size, local_chunk_sizes, reset_period)
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.head_dim = d = hidden_size // num_heads
        self.global_chunk_size, self.reset_period = global_chunk_size, reset_period
        self.local_chunk_sizes = local_chunk_sizes
        self.depth, self.base_lr, self.scan_impl = depth, base_lr, scan_impl
        self.use_momentum, self.max_grad_norm = optimizer == "momentum", max_grad_norm
        self.num_memories = 1 + len(local_chunk_sizes)
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.conv_q = CausalConv1d(hidden_size, conv_kernel)
        self.conv_k = CausalConv1d(hidden_size, conv_kernel)
        self.conv_v = CausalConv1d(hidden_size, conv_kernel)
        # [θ | η | α] × heads for the global memory, then for each local memory
        self.gates = nn.Linear(hidden_size, 3 * self.num_memories * num_heads, bias=True)
        dims = [d] + [expansion * d] * (depth - 1) + [d]
        for prefix in self.memory_prefixes:  # initial weights of every memory: slow, per head
            for i in range(depth):
                self.register_parameter(f"{prefix}_W{i + 1}", nn.Parameter(torch.zeros(num_heads, dims[i], dims[i + 1])))
        self.o_norm = HeadRMSNorm(d, eps=norm_eps)
        self.g_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.reset_memory_parameters()

    @property
    def memory_prefixes(self) -> list[str]:
        return ["global"] + [f"local{m}" for m in range(self.num_memories - 1)]

    @property
    def fast_weight_names(self) -> list[str]:
        return [f"{p}_W{i + 1}" for p in self.memory_prefixes for i in range(self.depth)]

    def _init_weights_of(self, prefix: str) -> dict:
        return {f"W{i + 1}": getattr(self, f"{prefix}_W{i + 1}") for i in range(self.depth)}

    def reset_memory_parameters(self, init=None) -> None:
        """Memory weights ~ N(0, 1/d_in); gate biases of every memory: θ ≈ base_lr/2, η ≈ 0.9, α ≈ 0.02."""
        init = init or nn.init
        for n in self.fast_weight_names:
            p = getattr(self, n)
            init.normal_(p, mean=0.0, std=p.shape[-2] ** -0.5)
        copy_param(self.gates.bias, titans_gate_bias(self.num_heads, self.num_memories), init)

    def _fresh(self, prefix: str, batch: int) -> LayerState:
        w = {n: t.float().unsqueeze(0).expand(batch, *t.shape) for n, t in self._init_weights_of(prefix).items()}
        return LayerState(weights=w, opt={"momentum": {n: torch.zeros_like(t) for n, t in w.items()}}
                          if self.use_momentum else {})

    def init_state(self, batch_size: int) -> LayerState:
        d = self.head_dim
        extra = {p: self._fresh(p, batch_size) for p in self.memory_prefixes[1:]}
        extra["qk"] = torch.zeros(batch_size, self.num_heads, d, d)
        g = self._fresh("global", batch_size)
        return LayerState(weights=g.weights, opt=g.opt, extra=extra)

    def _heads(self, t):
        return split_heads(t, self.num_heads)

    def prepare(self, x: torch.Tensor, state: LayerState) -> tuple:
        """Projections, short convs, L2-normalised q/k and every memory's (θ, η, α) gates:
        (q, k, v, gates, halo {"conv"})."""
        q, k, v, g, halo = memory_prologue(self, x, state.conv)
        g = g.unflatten(1, (self.num_memories, 3, self.num_heads))
        gates = [(torch.sigmoid(g[:, m, 0]) * self.base_lr, torch.sigmoid(g[:, m, 1]), torch.sigmoid(g[:, m, 2]))
                 for m in range(self.num_memories)]
        return q, k, v, gates, halo

    def scan(self, inputs: tuple, state: LayerState):
        """The global and local memories from ``state``: (o [B, H, T, d], state)."""
        q, k, v, gates, halo = inputs
        compute, B = q.dtype, q.shape[0]

        def cast(st: LayerState) -> LayerState:
            return st.map(lambda t: t.to(compute))

        glob = cast(LayerState(weights=state.weights, anchor=state.anchor, opt=state.opt))
        locs = [cast(state.extra[p]) for p in self.memory_prefixes[1:]]
        inits = [{n: w.to(compute).unsqueeze(0).expand(B, *w.shape) for n, w in self._init_weights_of(p).items()}
                 for p in self.memory_prefixes[1:]]
        o, glob, locs, P = TNT_SCANS[self.scan_impl](
            glob, locs, state.extra["qk"].to(compute), inits, q, k, v, gates, state.position, self.global_chunk_size,
            self.local_chunk_sizes, self.reset_period, self.max_grad_norm)
        extra = dict(zip(self.memory_prefixes[1:], locs))
        extra["qk"] = P
        return o, LayerState(weights=glob.weights, anchor=glob.anchor, opt=glob.opt, extra=extra,
                             position=state.position + q.shape[2], **halo)

    def output(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Per-head RMSNorm ⊙ SiLU(gate), output projection."""
        o = self.o_norm(o.to(x.dtype)).transpose(1, 2)
        return self.o_proj((o * F.silu(self._heads(self.g_proj(x)).transpose(1, 2))).flatten(2))


def check_tnt_sizes(global_chunk: int, local_chunks, reset_period: int) -> None:
    """One clear error for chunk sizes TNT cannot use."""
    if global_chunk < 1 or reset_period < 1 or not local_chunks or min(local_chunks) < 1:
        raise ValueError(f"tnt chunk sizes must be ≥ 1 and at least one local memory: global {global_chunk}, "
                         f"local {list(local_chunks)}, reset period {reset_period}")
    bad = [c for c in local_chunks if reset_period % c]
    if bad:
        raise ValueError(f"tnt_reset_period {reset_period} must be a multiple of every tnt_local_chunk_sizes entry "
                         f"(not of {bad}): a local memory resets at one of its chunk boundaries")


def build_tnt_mixer(config) -> TNTLayer:
    return TNTLayer(config.hidden_size, config.num_attention_heads, global_chunk_size=config.tnt_global_chunk_size,
                    local_chunk_sizes=config.tnt_local_chunk_sizes, reset_period=config.tnt_reset_period,
                    depth=config.titans_memory_depth, expansion=config.titans_memory_expansion,
                    base_lr=config.titans_base_lr, optimizer=config.inner_optimizer or "momentum",
                    conv_kernel=config.conv_kernel, norm_eps=config.rms_norm_eps, scan_impl=config.scan_impl,
                    max_grad_norm=config.titans_max_grad_norm)
