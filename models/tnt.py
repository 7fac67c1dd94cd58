"""TNT: hierarchical Titans memory (Li, Behrouz et al. 2025, *TNT: Improving Chunkwise Training for
Test-Time Memorization*, arXiv 2511.07343).

One **global** memory V on large chunks (C_G) and N **local** memories W⁽ᵐ⁾ on small chunks
(C_L⁽ᵐ⁾), all of them Titans memories (deep MLP without biases, ½‖M(k) − v‖², momentum "surprise",
forgetting gate, per-token soft-clamped gradients; ``models/titans.py``), sharing q, k, v:

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

from .modules import CausalConv1d, HeadRMSNorm, memory_prologue, split_heads
from .parts import copy_param, deep_mlp_memory, l2_loss, momentum_step
from .scan import linear_scan
from .state import LayerState, Mixer
from .titans import backprop_at, soft_clamp_factor, titans_gate_bias, titans_scan_chunked

# ------------------------------------------------------------------------------ global memory


def _reverse_scan(gates: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """h_j = gates_j h_{j+1} + tokens_j along the last dim (h_n = 0), for any leading dims."""
    lead, n = tokens.shape[:-1], tokens.shape[-1]
    g = gates.expand_as(tokens).flip(-1).reshape(-1, 1, n)
    return linear_scan(g.contiguous(), tokens.flip(-1).reshape(-1, 1, n).contiguous()).reshape(*lead, n).flip(-1)


def chunk_end_coefficients(lr, eta, alpha):
    """Last row of the Titans chunk coefficients in O(n) (inputs [..., n]): after n tokens from (M, S),

        M_n = β M + f S + Σ_j c_j u_j,    S_n = m S + Σ_j s_j u_j,

    with A_j = Π_{i>j}(1 − α_i), E_j = Π_{i>j} η_i, r_j = A_j + η_{j+1} r_{j+1}:
    β = Π(1 − α), c_j = −θ_j r_j, f = η_0 r_0, s_j = −θ_j E_j, m = η_0 E_0.
    (titans_coefficients gives the same numbers as the last row of an n × n table.)"""
    one = torch.ones_like(lr[..., :1])
    keep = 1 - alpha
    A = torch.cat([keep[..., 1:], one], -1).flip(-1).cumprod(-1).flip(-1)
    E = torch.cat([eta[..., 1:], one], -1).flip(-1).cumprod(-1).flip(-1)
    r = _reverse_scan(torch.cat([eta[..., 1:], torch.zeros_like(one)], -1), A)
    beta = keep[..., 0] * A[..., 0]
    return -lr * r, eta[..., 0] * r[..., 0], beta, -lr * E, eta[..., 0] * E[..., 0]


def _advance(cur: list, anchor: list, mom: list | None, k, v, lr, eta, alpha, max_norm, coeffs=None):
    """(M, S) after n tokens whose gradients are taken at ``anchor``; no per-token read.
    ``coeffs``: chunk_end_coefficients(lr, eta, alpha) when the caller already has them."""
    xs, ds = backprop_at(anchor, k, v, max_norm)
    c, f, beta, s, m = chunk_end_coefficients(lr, eta, alpha) if coeffs is None else coeffs
    new_w = [beta[..., None, None] * W + (c[..., None] * X).transpose(-1, -2) @ D for W, X, D in zip(cur, xs, ds)]
    if mom is None:
        return new_w, None
    new_w = [W + f[..., None, None] * S for W, S in zip(new_w, mom)]
    new_m = [m[..., None, None] * S + (s[..., None] * X).transpose(-1, -2) @ D for S, X, D in zip(mom, xs, ds)]
    return new_w, new_m


def global_scan_chunked(weights: dict, anchor: dict | None, momentum: dict | None, q, k, v, lr, eta, alpha,
                        position: int, chunk_size: int, max_grad_norm: float | None = None):
    """The global memory: o_t = V_{ξ(t)}(q_t), V updated by Titans' rule with gradients at V_{ξ(t)}.
    Shapes as titans_scan_chunked; returns (o, weights, anchor-or-None, momentum-or-None)."""
    names = sorted(weights, key=lambda n: int(n[1:]))
    cur = [weights[n] for n in names]
    anc = None if anchor is None else [anchor[n] for n in names]
    mom = None if momentum is None else [momentum[n] for n in names]
    if mom is None:
        eta = torch.zeros_like(eta)
    T, outs, t = q.shape[2], [], 0
    while t < T:
        stop = min(T, t + chunk_size - (position + t) % chunk_size)
        if (position + t) % chunk_size == 0:
            anc = cur
        sl = slice(t, stop)
        outs.append(deep_mlp_memory(dict(zip(names, anc)), q[:, :, sl]))
        cur, mom = _advance(cur, anc, mom, k[:, :, sl], v[:, :, sl], lr[:, :, sl], eta[:, :, sl], alpha[:, :, sl],
                            max_grad_norm)
        t = stop
    at_boundary = (position + T) % chunk_size == 0
    return (torch.cat(outs, 2), dict(zip(names, cur)), None if at_boundary else dict(zip(names, anc)),
            None if mom is None else dict(zip(names, mom)))


# ------------------------------------------------------------------------------ the whole scan


def soft_unit(x: torch.Tensor) -> torch.Tensor:
    """x / √(1 + ‖x‖²): unit length for large x, ≈ x for small x (no amplification near 0)."""
    return x * torch.rsqrt(1 + x.pow(2).sum(-1, keepdim=True))


QK_CHUNK = 64  # the Q-K projection's linear attention runs in chunks of this many tokens


def qk_project(P: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
    """q̃_t = soft_unit(P_t q_t), P_t = P + Σ_{τ≤t} k_τ k_τᵀ/‖k_τ‖² (one reset segment). Returns (q̃, P_T).

    As chunked linear attention: per chunk c, P q = Q_c P_c + tril(Q_c K_cᵀ) K_c with P_c the sum at the
    chunk's start (so the cost is O(T·d²), not O(T²·d))."""
    kn = k * torch.rsqrt(k.pow(2).sum(-1, keepdim=True).clamp_min(1e-12))
    T, c = q.shape[-2], QK_CHUNK
    if T <= c:
        return soft_unit(q @ P + (q @ kn.transpose(-1, -2)).tril() @ kn), P + kn.transpose(-1, -2) @ kn
    pad = (-T) % c  # zero keys add nothing to P

    def chunks(t):
        return F.pad(t, (0, 0, 0, pad)).unflatten(-2, (-1, c))  # [..., n, c, d]

    qc, kc = chunks(q), chunks(kn)
    sums = kc.transpose(-1, -2) @ kc  # [..., n, d, d]
    starts = P.unsqueeze(-3) + sums.cumsum(-3) - sums
    out = qc @ starts + (qc @ kc.transpose(-1, -2)).tril() @ kc
    return soft_unit(out.flatten(-3, -2)[..., :T, :]), P + sums.sum(-3)


def _segments(position: int, T: int, period: int):
    """Cuts [0, T) at absolute multiples of ``period``: (head, n_full, tail) lengths."""
    head = min(T, (period - position % period) % period)
    n_full = (T - head) // period
    return head, n_full, T - head - n_full * period


def tnt_scan_chunked(glob: LayerState, locs: list, P, inits: list, q, k, v, gates: list, position: int,
                     global_chunk: int, local_chunks: list, reset_period: int, max_grad_norm=None):
    """Chunked TNT. glob / locs[m]: LayerState(weights, anchor, opt["momentum"]) of the global and
    the local memories (momentum absent = plain GD); P [B, H, d, d]; inits[m]: the locals' initial
    weights [B, H, ...]; q, k, v [B, H, T, d]; gates[0] (global), gates[1 + m]: (lr, eta, alpha)
    [B, H, T]. Returns (o, glob, locs, P) at position + T."""
    B, H, T, d = q.shape
    mom = glob.opt.get("momentum")
    o, gw, ga, gm = global_scan_chunked(glob.weights, glob.anchor, mom, q, k, v, *gates[0], position,
                                        global_chunk, max_grad_norm)
    glob = LayerState(weights=gw, anchor=ga, opt={} if gm is None else {"momentum": gm})
    locs = list(locs)
    head, n_full, tail = _segments(position, T, reset_period)
    use_mom = mom is not None

    def run(sl, states, P0, pos):  # one piece of a reset segment, every local memory
        qt, Pn = qk_project(P0, q[:, :, sl], k[:, :, sl])
        outs, new = 0, []
        for m, st in enumerate(states):
            lr, eta, alpha = (g[:, :, sl] for g in gates[1 + m])
            y, w, a, mo = titans_scan_chunked(st.weights, st.anchor, st.opt.get("momentum"), qt, k[:, :, sl],
                                              v[:, :, sl], lr, eta, alpha, pos, local_chunks[m], max_grad_norm)
            outs = outs + y
            new.append(LayerState(weights=w, anchor=a, opt={} if mo is None else {"momentum": mo}))
        return outs, new, Pn

    def fresh(batch):
        return [LayerState(weights={n: w.expand(batch, *w.shape[1:]) for n, w in init.items()},
                           opt={"momentum": {n: torch.zeros_like(w).expand(batch, *w.shape[1:])
                                             for n, w in init.items()}} if use_mom else {})
                for init in inits]

    pieces = []
    if head:
        y, locs, P = run(slice(0, head), locs, P, position)
        pieces.append(y)
    if n_full:  # complete segments are independent: all at once, segments folded into the batch
        S = reset_period
        sl = slice(head, head + n_full * S)

        def fold(t):  # [B, H, n·S, ...] → [B·n, H, S, ...]
            return t.unflatten(2, (n_full, S)).movedim(2, 1).flatten(0, 1)

        P0 = P.new_zeros(B * n_full, H, d, d)
        qt, Pn = qk_project(P0, fold(q[:, :, sl]), fold(k[:, :, sl]))
        y = 0
        for m, init in enumerate(inits):
            lr, eta, alpha = (fold(g[:, :, sl, None])[..., 0] for g in gates[1 + m])
            init = {n: w.unsqueeze(1).expand(B, n_full, *w.shape[1:]).flatten(0, 1) for n, w in init.items()}
            mom0 = {n: torch.zeros_like(w) for n, w in init.items()} if use_mom else None
            ym, w, a, mo = titans_scan_chunked(init, None, mom0, qt, fold(k[:, :, sl]), fold(v[:, :, sl]), lr, eta,
                                               alpha, 0, local_chunks[m], max_grad_norm)
            y = y + ym

            def last(t):  # the last segment's final state
                return t.unflatten(0, (B, n_full))[:, -1]

            locs[m] = LayerState(weights={n: last(t) for n, t in w.items()},
                                 anchor=None if a is None else {n: last(t) for n, t in a.items()},
                                 opt={} if mo is None else {"momentum": {n: last(t) for n, t in mo.items()}})
        P = Pn.unflatten(0, (B, n_full))[:, -1]
        pieces.append(y.unflatten(0, (B, n_full)).movedim(1, 2).flatten(2, 3))
    if tail:
        y, locs, P = run(slice(T - tail, T), fresh(B), torch.zeros_like(P), 0)
        pieces.append(y)
    if (position + T) % reset_period == 0:  # the state at a reset boundary is the reset state
        locs, P = fresh(B), torch.zeros_like(P)
    return o + torch.cat(pieces, 2), glob, locs, P


def tnt_scan_reference(glob: LayerState, locs: list, P, inits: list, q, k, v, gates: list, position: int,
                       global_chunk: int, local_chunks: list, reset_period: int, max_grad_norm=None):
    """Same contract as :func:`tnt_scan_chunked`, one token at a time, gradients by torch.func.grad."""
    grad_fn = torch.func.vmap(torch.func.vmap(torch.func.grad(lambda th, k_t, v_t: l2_loss(deep_mlp_memory(th, k_t), v_t))))
    read_fn = torch.func.vmap(torch.func.vmap(deep_mlp_memory))
    use_mom = "momentum" in glob.opt
    B = q.shape[0]

    def fresh():
        return [{"w": {n: w.expand(B, *w.shape[1:]) for n, w in init.items()}, "a": None,
                 "m": {n: torch.zeros_like(w).expand(B, *w.shape[1:]) for n, w in init.items()} if use_mom else None}
                for init in inits]

    def step(mem, point, t, g):
        lr, eta, alpha = (x[:, :, t, None, None] for x in g)
        u = grad_fn(point, k[:, :, t : t + 1], v[:, :, t : t + 1])
        u = {n: x * soft_clamp_factor(x.norm(dim=(-2, -1), keepdim=True), max_grad_norm) for n, x in u.items()}
        if mem["m"] is None:
            mem["w"] = {n: (1 - alpha) * mem["w"][n] - lr * u[n] for n in u}
        else:
            mem["w"], mem["m"] = momentum_step(mem["w"], mem["m"], u, lr, eta, alpha)

    g_mem = {"w": glob.weights, "a": glob.anchor or glob.weights, "m": glob.opt.get("momentum")}
    l_mem = [{"w": s.weights, "a": s.anchor or s.weights, "m": s.opt.get("momentum")} for s in locs]
    outs = []
    for t in range(q.shape[2]):
        p = position + t
        if p % reset_period == 0:
            l_mem, P = fresh(), torch.zeros_like(P)
        if p % global_chunk == 0:
            g_mem["a"] = g_mem["w"]
        o = read_fn(g_mem["a"], q[:, :, t : t + 1])  # read before update, at the chunk's start
        step(g_mem, g_mem["a"], t, gates[0])
        k_t = k[:, :, t : t + 1]
        P = P + (k_t / k_t.norm(dim=-1, keepdim=True)).transpose(-1, -2) @ (k_t / k_t.norm(dim=-1, keepdim=True))
        q_t = soft_unit(q[:, :, t : t + 1] @ P)
        for m, mem in enumerate(l_mem):
            if p % local_chunks[m] == 0:
                mem["a"] = mem["w"]
            step(mem, mem["a"], t, gates[1 + m])
            o = o + read_fn(mem["w"], q_t)  # read after update
        outs.append(o)
    end = position + q.shape[2]
    if end % reset_period == 0:
        l_mem, P = fresh(), torch.zeros_like(P)

    def pack(mem, chunk):
        return LayerState(weights=mem["w"], anchor=None if end % chunk == 0 else mem["a"],
                          opt={} if mem["m"] is None else {"momentum": mem["m"]})

    return (torch.cat(outs, 2), pack(g_mem, global_chunk), [pack(mm, c) for mm, c in zip(l_mem, local_chunks)], P)


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
