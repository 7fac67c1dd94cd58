"""Titans neural long-term memory (Behrouz, Zhong, Mirrokni 2025, arXiv 2501.00663) and its
MAC / MAG / MAL blocks.

Per head the memory M is an MLP of L layers without biases (GELU between layers; L = 1 is a
matrix), trained online on ℓ_t(M) = ½‖M(k_t) − v_t‖² with momentum on the "surprise" and a
forgetting gate, all three rates data-dependent:

    S_t = η_t S_{t−1} − θ_t ∇ℓ_t(M_{t'})          (momentum; ``inner_optimizer="sgd"``: η ≡ 0)
    M_t = (1 − α_t) M_{t−1} + S_t                   (forgetting)
    y_t = M_t(q_t)                                  (read after the update, no further change)

θ_t = base_lr·σ(x_t w_θ + b_θ), η_t = σ(x_t w_η + b_η), α_t = σ(x_t w_α + b_α) per head and token.
t' is the first token of t's chunk (``chunk_size`` b): inside a chunk every gradient is taken at
the chunk's starting memory ("frozen gradients", the paper's parallel training; b = 1 is the
online rule). Then M_t is linear in (M_{t'}, S_{t'}, the u_j = ∇ℓ_j):

    M_t = β_t M_{t'} + f_t S_{t'} + Σ_{j≤t} c_tj u_j,     S_t = m_t S_{t'} + Σ_{j≤t} s_tj u_j

and the coefficients are the two first-order scans run on unit impulses:
s_·j = scan(η, −θ_j e_j), c_·j = scan(1 − α, s_·j), m = scan(η, η₀e₀), f = scan(1 − α, m),
β = scan(1 − α, (1 − α₀)e₀) (``titans_coefficients_scan``), computed in closed form from products of
the gates (``titans_coefficients``: a cumulative product and one n × n matmul per chunk).
Each u_j of layer l is an outer product X_jᵀ δ_j (layer input × backpropagated error at M_{t'}),
so the read never materialises per-token weights (the TTT "dual form"): for layer l with input H,

    Z = diag(β) H W + diag(f) H S + (C ⊙ H Xᵀ) Δ.

A call may start or end inside a chunk: the state then carries the chunk's anchor M_{t'} (where
the remaining gradients are taken) beside the current M and S, so one call = any split.
The chunked scan is ops/titans/chunk.py, the token-by-token one ops/titans/naive.py. Only torch is
imported: this file is copied into HF folders.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from ..common.attention import AttentionLayer
from ..common.modules import CausalConv1d, HeadRMSNorm, memory_prologue, split_heads
from ..common.parts import InnerKnobs, copy_param, deep_mlp_memory, l2_normalize
from ..common.state import LayerState, Mixer
from ..ops.titans.chunk import titans_scan_chunked
from ..ops.titans.knobs import titans_scan_with_knobs
from ..ops.titans.naive import titans_scan_reference


TITANS_SCANS = {"chunk": titans_scan_chunked, "reference": titans_scan_reference}


# ------------------------------------------------------------------------------ the layer



def titans_gate_bias(num_heads: int, copies: int = 1) -> torch.Tensor:
    """Initial biases of the (θ, η, α) gates, per head, ``copies`` times over: σ(0) = ½ (θ ≈ base_lr/2),
    σ(2.2) ≈ 0.9 (η), σ(−4) ≈ 0.02 (α)."""
    H = num_heads
    return torch.cat([torch.zeros(H), torch.full((H,), 2.2), torch.full((H,), -4.0)]).repeat(copies)


class TitansMemory(Mixer):
    """The neural long-term memory as a sequence mixer (``titans``, the paper's LMM)."""

    def __init__(self, hidden_size: int, num_heads: int, chunk_size: int = 64, depth: int = 2, expansion: int = 2,
                 base_lr: float = 0.01, optimizer: str = "momentum", conv_kernel: int = 4, norm_eps: float = 1e-6,
                 scan_impl: str = "chunk", max_grad_norm: float | None = 1.0, knobs: InnerKnobs | None = None):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if optimizer not in ("momentum", "sgd"):
            raise ValueError(f"unknown inner_optimizer {optimizer!r} for titans; expected 'momentum' or 'sgd'")
        if scan_impl not in TITANS_SCANS:
            raise ValueError(f"unknown scan_impl {scan_impl!r}; expected one of {sorted(TITANS_SCANS)}")
        if chunk_size < 1 or depth < 1 or expansion < 1:
            raise ValueError("chunk_size, depth and expansion must be ≥ 1")
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.head_dim = d = hidden_size // num_heads
        self.chunk_size, self.depth, self.base_lr = chunk_size, depth, base_lr
        self.use_momentum, self.scan_impl = optimizer == "momentum", scan_impl
        self.max_grad_norm = max_grad_norm
        if knobs is not None and knobs.loss == "mse":  # Titans' own loss
            knobs = InnerKnobs(knobs.steps, knobs.grad_clip, knobs.init_pull, knobs.lr_decay, None)
        if knobs is not None and (knobs.loss not in (None, "next_token") or (knobs.steps > 1 and knobs.init_pull)):
            raise ValueError(f"Titans supports inner_loss mse/next_token and inner_steps > 1 without inner_init_pull, "
                             f"got {knobs}")
        self.knobs = None if knobs == InnerKnobs() else knobs  # inner-loop knobs (models/common/knobs.py)
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.conv_q = CausalConv1d(hidden_size, conv_kernel)
        self.conv_k = CausalConv1d(hidden_size, conv_kernel)
        self.conv_v = CausalConv1d(hidden_size, conv_kernel)
        self.gates = nn.Linear(hidden_size, 3 * num_heads, bias=True)  # θ (step), η (momentum), α (forget)
        dims = [d] + [expansion * d] * (depth - 1) + [d]
        for i in range(depth):  # the memory's initial weights: slow, per head
            self.register_parameter(f"W{i + 1}", nn.Parameter(torch.zeros(num_heads, dims[i], dims[i + 1])))
        self.o_norm = HeadRMSNorm(d, eps=norm_eps)
        self.g_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.reset_memory_parameters()

    @property
    def fast_weight_names(self) -> list[str]:
        return [f"W{i + 1}" for i in range(self.depth)]

    def reset_memory_parameters(self, init=None) -> None:
        """Memory weights ~ N(0, 1/d_in); gate biases: θ ≈ base_lr/2, η ≈ 0.9, α ≈ 0.02."""
        init = init or nn.init
        for n in self.fast_weight_names:
            p = getattr(self, n)
            init.normal_(p, mean=0.0, std=p.shape[-2] ** -0.5)
        copy_param(self.gates.bias, titans_gate_bias(self.num_heads), init)

    def init_state(self, batch_size: int) -> LayerState:
        weights = {n: getattr(self, n).float().unsqueeze(0).expand(batch_size, *getattr(self, n).shape)
                   for n in self.fast_weight_names}
        opt = {"momentum": {n: torch.zeros_like(w) for n, w in weights.items()}} if self.use_momentum else {}
        return LayerState(weights=weights, opt=opt)

    def _heads(self, t):
        return split_heads(t, self.num_heads)

    def prepare(self, x: torch.Tensor, state: LayerState):
        """Projections, short convs, L2-normalised q/k, gates: (q, k, v [B, H, T, d], θ, η, α [B, H, T],
        halo {"conv"}), in the compute dtype (≥ float32)."""
        q, k, v, g, halo = memory_prologue(self, x, state.conv)  # g: [B, 3H, T]
        lr = torch.sigmoid(g[:, : self.num_heads]) * self.base_lr
        eta, alpha = torch.sigmoid(g[:, self.num_heads : 2 * self.num_heads]), torch.sigmoid(g[:, 2 * self.num_heads :])
        return q, k, v, lr, eta, alpha, halo

    def scan(self, inputs: tuple, state: LayerState):
        """The memory scan from ``state``: (o per head [B, H, T, d], state); the halo groups of
        ``inputs`` (conv tails, and a composite's attention cache) go into the state as they are."""
        q, k, v, lr, eta, alpha, halo = inputs
        compute, position = q.dtype, state.position + q.shape[2]
        cast = (lambda d: None if d is None else {n: t.to(compute) for n, t in d.items()})
        if self.knobs is not None:
            o, weights, anchor, mom, extra = titans_scan_with_knobs(self, state, q, k, v, lr, eta, alpha)
            return o, LayerState(weights=weights, anchor=anchor, opt={} if mom is None else {"momentum": mom},
                                 extra=extra, position=position, **halo)
        o, weights, anchor, mom = TITANS_SCANS[self.scan_impl](
            cast(state.weights), cast(state.anchor), cast(state.opt.get("momentum")), q, k, v, lr, eta, alpha,
            state.position, self.chunk_size, self.max_grad_norm)
        return o, LayerState(weights=weights, anchor=anchor, opt={} if mom is None else {"momentum": mom},
                             position=position, **halo)

    def read(self, weights: dict, q: torch.Tensor) -> torch.Tensor:
        """M(q) with the given weights and no update (MAC's retrieval). q: [B, H, T, d]."""
        return deep_mlp_memory({n: w.to(q.dtype) for n, w in weights.items()}, q)

    def output(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Per-head RMSNorm, SiLU gate from x, output projection."""
        o = self.o_norm(o.to(x.dtype)).transpose(1, 2)
        return self.o_proj((o * F.silu(self._heads(self.g_proj(x)).transpose(1, 2))).flatten(2))


# ------------------------------------------------------------------------------ the blocks


class _Gate(nn.Module):
    """out = W (RMSNorm(a) ⊙ σ(RMSNorm(m))): the normalised non-linear gating of MAG/MAC."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.norm_a, self.norm_m = HeadRMSNorm(hidden_size, eps), HeadRMSNorm(hidden_size, eps)
        self.proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, a, m):
        return self.proj(self.norm_a(a) * torch.sigmoid(self.norm_m(m)))


def _attention_state(state: LayerState) -> LayerState:
    return LayerState(cache=state.cache, position=state.position)


class TitansMAG(Mixer):
    """Memory as a gate: sliding-window attention (with persistent tokens) and the memory read the
    same input in parallel; o = W (norm(attn) ⊙ σ(norm(memory))). One flat state: the memory's,
    with the attention's key/value cache in ``cache``. The attention needs only earlier inputs, so
    it belongs to ``prepare`` (its cache is a halo); ``scan`` is the memory's."""

    def __init__(self, memory: TitansMemory, attention: AttentionLayer, eps: float = 1e-6):
        super().__init__()
        self.memory, self.attention = memory, attention
        self.gate = _Gate(memory.hidden_size, eps)

    def init_state(self, batch_size: int) -> LayerState:
        return self.memory.init_state(batch_size)

    def prepare(self, x, state: LayerState) -> tuple:
        a, sa = self.attention(x, _attention_state(state))
        *mem, halo = self.memory.prepare(x, state)
        return (*mem, a, {**halo, "cache": sa.cache})

    def scan(self, inputs: tuple, state: LayerState):
        *mem, a, halo = inputs
        o, state = self.memory.scan((*mem, halo), state)
        return (o, a), state

    def output(self, x, outputs):
        o, a = outputs
        return self.gate(a, self.memory.output(x, o))


class TitansMAL(Mixer):
    """Memory as a layer: the memory first, then sliding-window attention (persistent tokens) on its
    normalised output. One flat state: the memory's, with the attention's cache in ``cache``. The
    attention reads the memory's output, so ``scan`` holds memory scan → memory output → attention
    (its cache is carried by the scan, not a halo)."""

    def __init__(self, memory: TitansMemory, attention: AttentionLayer, eps: float = 1e-6):
        super().__init__()
        self.memory, self.attention = memory, attention
        self.norm = HeadRMSNorm(memory.hidden_size, eps)

    def init_state(self, batch_size: int) -> LayerState:
        return self.memory.init_state(batch_size)

    def prepare(self, x, state: LayerState) -> tuple:
        *mem, halo = self.memory.prepare(x, state)
        return (*mem, x, halo)

    def scan(self, inputs: tuple, state: LayerState):
        *mem, x, halo = inputs
        o, new = self.memory.scan((*mem, halo), state)
        a, sa = self.attention(self.norm(self.memory.output(x, o)), _attention_state(state))
        return a, replace(new, cache=sa.cache)

    def output(self, x, a):
        return a


def build_titans_mixer(config, kind: str, rope_theta: float) -> nn.Module:
    """``titans`` (LMM alone), ``titans_mag``, ``titans_mal`` or ``titans_mac`` from a MemoryLMConfig."""
    memory = TitansMemory(config.hidden_size, config.num_attention_heads, chunk_size=config.titans_chunk_size,
                          depth=config.titans_memory_depth, expansion=config.titans_memory_expansion,
                          base_lr=config.titans_base_lr, optimizer=config.inner_optimizer or "momentum",
                          conv_kernel=config.conv_kernel, norm_eps=config.rms_norm_eps, scan_impl=config.scan_impl,
                          max_grad_norm=config.titans_max_grad_norm, knobs=InnerKnobs.from_config(config))
    if kind == "titans":
        return memory
    if kind == "titans_mac":
        return TitansMAC(memory, config.num_attention_heads, config.titans_segment_size, config.num_persistent_tokens,
                         rope_theta, config.rms_norm_eps)
    attention = AttentionLayer(config.hidden_size, config.num_attention_heads, window=config.attention_window,
                               rope_theta=rope_theta, num_persistent=config.num_persistent_tokens)
    return (TitansMAG if kind == "titans_mag" else TitansMAL)(memory, attention, config.rms_norm_eps)


class TitansMAC(Mixer):
    """Memory as context. The sequence is cut into segments of ``segment_size`` tokens; for segment s

        r = M_{s−1}(q̃)                  retrieve with the memory as it was at the segment's start
        y = Attn([persistent ‖ r ‖ x])   causal attention inside the segment over retrieved + input tokens
        m = LMM(RMSNorm(y))               the memory reads y and updates itself on it (per token/chunk)
        o = W (norm(y) ⊙ σ(norm(m)))

    The state keeps the memory's state, the memory weights at the segment start and the segment's
    keys/values so far, so a call may end anywhere inside a segment. Every step of a segment
    needs the memory as the previous segment left it, so all of it is ``scan``.
    """

    def __init__(self, memory: TitansMemory, num_heads: int, segment_size: int, num_persistent: int,
                 rope_theta: float, eps: float = 1e-6):
        super().__init__()
        if segment_size % memory.chunk_size:
            raise ValueError(f"segment_size {segment_size} must be a multiple of the memory chunk_size {memory.chunk_size}")
        C = memory.hidden_size
        self.memory, self.segment_size = memory, segment_size
        self.retrieve_q = nn.Linear(C, C, bias=False)
        self.retrieve_norm = HeadRMSNorm(memory.head_dim, eps)
        self.attention = AttentionLayer(C, num_heads, window=None, rope_theta=rope_theta, num_persistent=num_persistent)
        self.memory_norm = HeadRMSNorm(C, eps)  # y enters the memory at unit scale, as x does in MAG/MAL
        self.gate = _Gate(C, eps)

    def retrieve(self, x, weights):
        """r = RMSNorm(M*(q̃)), q̃ = L2(SiLU(W_q x)) per head, flattened back to [B, T, C]: the retrieved
        tokens the segment's attention reads (tensor parallelism gathers them over heads, parallel/tensor.py)."""
        q = l2_normalize(self.memory._heads(F.silu(self.retrieve_q(x))).to(next(iter(weights.values())).dtype))
        r = self.retrieve_norm(self.memory.read(weights, q).to(x.dtype))
        return r.transpose(1, 2).flatten(2)

    def init_state(self, batch_size: int) -> LayerState:
        return LayerState(extra={"memory": self.memory.init_state(batch_size)})

    def prepare(self, x, state: LayerState) -> tuple:
        return x, {}

    def output(self, x, outputs):
        return outputs

    def scan(self, inputs: tuple, state: LayerState):
        x, _ = inputs
        B, T, _ = x.shape
        position = state.position
        mem = state.extra["memory"]
        seg_w = state.extra.get("segment_weights")
        cache = state.extra.get("cache") or {}
        att = self.attention
        pk, pv = att.prefix(B, x.dtype)
        outs = []
        start = 0
        while start < T:
            pos = position + start
            stop = min(T, start + self.segment_size - pos % self.segment_size)
            if pos % self.segment_size == 0:  # a new segment: retrieve with the memory as it is now
                seg_w, cache = mem.weights, {}
            xs = x[:, start:stop]
            r = self.retrieve(xs, seg_w)
            q, kx, vx = att.project(xs, pos)
            _, kr, vr = att.project(r, pos)
            if cache:
                kr, vr = torch.cat([cache["kr"], kr], 2), torch.cat([cache["vr"], vr], 2)
                kx, vx = torch.cat([cache["kx"], kx], 2), torch.cat([cache["vx"], vx], 2)
            cache = {"kr": kr, "vr": vr, "kx": kx, "vx": vx}
            n_k = kx.shape[2]
            kpos = torch.arange(pos + stop - start - n_k, pos + stop - start, device=x.device)
            qpos = torch.arange(pos, pos + stop - start, device=x.device)
            mask = (kpos[None, :] <= qpos[:, None]).repeat(1, 2)
            k_all, v_all = torch.cat([kr, kx], 2), torch.cat([vr, vx], 2)
            if pk is not None:
                k_all, v_all = torch.cat([pk, k_all], 2), torch.cat([pv, v_all], 2)
                mask = torch.cat([mask.new_ones(stop - start, pk.shape[2]), mask], 1)
            o = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)
            y = att.o_proj(o.transpose(1, 2).flatten(2))
            m, mem = self.memory(self.memory_norm(y), mem)
            outs.append(self.gate(y, m))
            start = stop
        end = position + T
        mid = end % self.segment_size != 0
        new = LayerState(extra={"memory": mem}, position=end)
        if mid:
            new.extra["segment_weights"], new.extra["cache"] = seg_w, cache
        return torch.cat(outs, 1), new
