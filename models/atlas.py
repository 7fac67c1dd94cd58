"""ATLAS, "Learning to Optimally Memorize the Context at Test Time" (Behrouz et al. 2025, arXiv 2505.23735):
a deep memory trained by the Omega rule on polynomial features of the keys, with Muon.

Per head: keys/queries pass through a polynomial feature map φ of degree p (all monomials of degree
1..p, scaled so that ⟨φ(x), φ(y)⟩ = Σ_i a_i² (x·y)^i, a_i learnable, initialised to √(1/i!): the
Taylor terms of exp(x·y)); the memory M(x) = GELU(x W1) W2 maps φ(k) → v. The Omega rule trains M at
step t on the last c tokens at once, each weighted by an input-dependent gate γ_i ∈ (0, 1):

    ω_t = ∇_M Σ_{i=t−c+1..t} γ_i ½‖M(φ(k_i)) − v_i‖²
    S_t = θ_t S_{t−1} + ω_t                       (momentum; ``sgd``: S_t = ω_t, OmegaNet)
    M_t = α_t M_{t−1} − η_t NS₅(S_t)              (``muon``: Newton–Schulz orthogonalisation, as LaCT's;
                                                   ``momentum``: S_t itself)
    y_t = M_t(φ(q_t))

η_t = base_lr·σ(·), θ_t = σ(·), α_t = σ(·), γ_t = σ(·) per head and token (linear in x_t).
Chunk rule (frozen gradients, as Titans): every ω_t of a chunk of b tokens is taken at the chunk's
first memory M_{t'} (the window may reach into earlier chunks: those tokens' gradients are also
taken at M_{t'}). Then S_t is linear in (S_{t'}, u_j = X_jᵀΔ_j):  S_t = P_t S_{t'} + Σ_j K_tj u_j with
K = (momentum decays) · (band of width c); Muon is applied to every S_t of the chunk at once and
M_t = A_t M_{t'} − Σ_j C_tj NS(S_j); S_t and M_t are materialised per token (NS is not linear).
Without Muon, M_t = A_t M_{t'} + (C P)_t S_{t'} + Σ_j (C K)_tj u_j is read in the dual form.
The state carries M, S, the chunk's anchor when mid-chunk, and the last c − 1 tokens' (φ(k), v, γ)
(``cache``), so one call equals any split. Only torch is imported: copied into HF folders.
"""
from __future__ import annotations

import itertools
import math
from functools import lru_cache

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .miras import coefficient_outer, decay_coefficients
from .modules import CausalConv1d, HeadRMSNorm, memory_prologue, split_heads
from .parts import Recipe, copy_param, gelu_tanh, newton_schulz
from .reference import memory_scan_reference
from .state import LayerState, Mixer
from .titans import gelu_tanh_grad

NAMES = ("W1", "W2")
OPTIMIZERS = ("muon", "momentum", "sgd")

# ------------------------------------------------------------------------------ feature map


@lru_cache(maxsize=None)
def _monomials(dim: int, degree: int):
    """Index tuples of the degree-``degree`` monomials of ``dim`` variables and √(multinomial coefficient)."""
    idx = list(itertools.combinations_with_replacement(range(dim), degree))
    coef = [math.sqrt(math.factorial(degree) / math.prod(math.factorial(c) for c in
                                                         (t.count(j) for j in set(t)))) for t in idx]
    return torch.tensor(idx, dtype=torch.long), torch.tensor(coef, dtype=torch.float64)


def poly_feature_dim(dim: int, degree: int) -> int:
    """Σ_{i=1..p} C(dim + i − 1, i)."""
    return sum(math.comb(dim + i - 1, i) for i in range(1, degree + 1))


def poly_features(x: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """φ(x) = [a_1 m_1(x), …, a_p m_p(x)]: x [B, H, T, d], coef a: [H, p] → [B, H, T, D] with
    ⟨m_i(x), m_i(y)⟩ = (x·y)^i (the monomials of degree i weighted by √(multinomial))."""
    feats = []
    for i in range(1, coef.shape[-1] + 1):
        idx, mult = _monomials(x.shape[-1], i)
        idx, mult = idx.to(x.device), mult.to(device=x.device, dtype=x.dtype)
        feats.append(coef[:, i - 1, None, None] * mult * x[..., idx].prod(-1))
    return torch.cat(feats, -1)


# ------------------------------------------------------------------------------ the chunked scan


def _backprop_at(w: dict, k, v, gamma):
    """Per-token layer inputs X and γ-weighted errors Δ of ½γ‖M(k) − v‖² at the weights w."""
    z1 = k @ w["W1"]
    h = gelu_tanh(z1)
    d2 = gamma[..., None] * (h @ w["W2"] - v)
    d1 = (d2 @ w["W2"].transpose(-1, -2)) * gelu_tanh_grad(z1)
    return [k, h], [d1, d2]


def _segment(cur, anc, mom, window, q, k, v, g, c: int, optimizer: str):
    """n tokens of one chunk from memory ``cur`` (momentum ``mom``), gradients at ``anc``; ``window``:
    the c − 1 tokens before the segment (φk, v, γ) or None for c = 1. Returns (o, cur, mom, window)."""
    n = q.shape[2]
    if window is not None:
        k_ext, v_ext = torch.cat([window["k"], k], 2), torch.cat([window["v"], v], 2)
        g_ext = torch.cat([window["gamma"], g["gamma"]], 2)
    else:
        k_ext, v_ext, g_ext = k, v, g["gamma"]
    xs, ds = _backprop_at(anc, k_ext, v_ext, g_ext)
    # ω_t = Σ_{j ∈ [t, t + c)} u_j over the extended tokens (token t of the segment is extended index t + c − 1)
    t_idx = torch.arange(n, device=q.device)[:, None]
    j_idx = torch.arange(n + c - 1, device=q.device)[None, :]
    band = ((j_idx >= t_idx) & (j_idx < t_idx + c)).to(q.dtype)
    if optimizer == "sgd":
        K, P_mom = band.expand(*q.shape[:2], *band.shape), None
    else:
        P_mom, C_mom = decay_coefficients(-torch.ones_like(g["theta"]), g["theta"])  # C_tj = Π_{j<i≤t} θ_i
        K = C_mom @ band
    P, C = decay_coefficients(g["lr"], g["alpha"])
    h = q
    new_w, new_m = {}, {}
    if optimizer != "muon":  # M_t is linear in (M, S, u_j): dual form, no per-token weights
        CK, CP = C @ K, (C @ P_mom[..., None])[..., 0] if P_mom is not None else None
        for i, name in enumerate(NAMES):
            X, D = xs[i], ds[i]
            z = P[..., None] * (h @ cur[name]) + (CK * (h @ X.transpose(-1, -2))) @ D
            new_w[name] = P[..., -1:, None] * cur[name] + (CK[..., -1, :, None] * X).transpose(-1, -2) @ D
            if CP is not None:
                z = z + CP[..., None] * (h @ mom[name])
                new_w[name] = new_w[name] + CP[..., -1:, None] * mom[name]
                new_m[name] = P_mom[..., -1:, None] * mom[name] + (K[..., -1, :, None] * X).transpose(-1, -2) @ D
            h = gelu_tanh(z) if i == 0 else z
    for i, name in enumerate(NAMES if optimizer == "muon" else ()):
        S = coefficient_outer(K, xs[i], ds[i])  # [B, H, n, d_in, d_out]
        if P_mom is not None:
            S = S + P_mom[..., None, None] * mom[name][:, :, None]
            new_m[name] = S[:, :, -1].clone()  # a copy: a view would keep every token's S alive past the checkpoint
        N = newton_schulz(S) if optimizer == "muon" else S
        M = P[..., None, None] * cur[name][:, :, None] + torch.einsum("bhtj,bhjio->bhtio", C, N)  # M_t per token
        z = (h[..., None, :] @ M)[..., 0, :]
        new_w[name] = M[:, :, -1].clone()
        h = gelu_tanh(z) if i == 0 else z
    if window is not None:
        keep = c - 1
        window = {"k": k_ext[:, :, -keep:], "v": v_ext[:, :, -keep:], "gamma": g_ext[:, :, -keep:]}
    return h, new_w, (new_m if P_mom is not None else None), window


def atlas_scan_chunked(weights: dict, anchor: dict | None, momentum: dict | None, window: dict | None, q, k, v,
                       gates: dict, position: int, chunk_size: int, c: int, optimizer: str):
    """Chunked ATLAS memory. q, k: features [B, H, T, D]; v: [B, H, T, d]; gates "lr", "theta", "alpha",
    "gamma": [B, H, T]; weights/anchor/momentum: {W1 [B, H, D, E], W2 [B, H, E, d]} (momentum None
    for ``sgd``); window: {"k", "v", "gamma"} of the c − 1 previous tokens (None when c = 1).
    Returns (o [B, H, T, d], weights, anchor-or-None, momentum, window)."""
    b, T = chunk_size, q.shape[2]
    cur, anc = weights, (weights if anchor is None else anchor)
    outs, start = [], 0
    while start < T:
        stop = min(T, start + b - (position + start) % b)
        sl = slice(start, stop)
        gs = {n: t[:, :, sl] for n, t in gates.items()}
        seg = (cur, anc, momentum, window, q[:, :, sl], k[:, :, sl], v[:, :, sl], gs, c, optimizer)
        # Muon: S_t, NS(S_t), M_t of every token are recomputed in the backward instead of kept
        o, cur, momentum, window = (checkpoint(_segment, *seg, use_reentrant=False)
                                    if optimizer == "muon" and torch.is_grad_enabled() else _segment(*seg))
        if (position + stop) % b == 0:
            anc = cur
        outs.append(o)
        start = stop
    return torch.cat(outs, 2), cur, None if (position + T) % b == 0 else anc, momentum, window


# ------------------------------------------------------------------------------ the reference


def atlas_memory(theta: dict, x: torch.Tensor) -> torch.Tensor:
    """M(x) = GELU(x W1) W2."""
    return gelu_tanh(x @ theta["W1"]) @ theta["W2"]


def atlas_recipe(chunk_size: int, optimizer: str) -> Recipe:
    """ATLAS in the generic frame: k_t holds the window's c feature vectors flattened [1, c·D], v_t the
    window's values with γ as the last channel [1, c·(d + 1)]; the loss is the γ-weighted window sum."""

    def inner_loss(theta, k_t, v_t, extra):
        k_w = k_t.reshape(-1, theta["W1"].shape[-2])
        v_w = v_t.reshape(k_w.shape[0], -1)
        return 0.5 * (v_w[:, -1:] * (atlas_memory(theta, k_w) - v_w[:, :-1]).pow(2)).sum()

    def read(theta, q_t, extra):
        return atlas_memory(theta, q_t)

    def token_step(anchor, theta, opt, grad, g, i):
        if optimizer == "sgd":
            return {n: g["alpha"] * theta[n] - g["lr"] * grad[n] for n in theta}, opt
        mom = {n: g["theta"] * opt["momentum"][n] + grad[n] for n in theta}
        step = {n: newton_schulz(s) for n, s in mom.items()} if optimizer == "muon" else mom
        return {n: g["alpha"] * theta[n] - g["lr"] * step[n] for n in theta}, {"momentum": mom}

    return Recipe(inner_loss, read, token_step, chunk_size)


def atlas_scan_reference(weights, anchor, momentum, window, q, k, v, gates, position: int, chunk_size: int, c: int,
                         optimizer: str):
    """Same contract as :func:`atlas_scan_chunked`, token by token through the generic reference."""
    T = q.shape[2]
    gv = torch.cat([v, gates["gamma"][..., None]], -1)
    if window is not None:
        k_ext = torch.cat([window["k"], k], 2)
        gv_ext = torch.cat([torch.cat([window["v"], window["gamma"][..., None]], -1), gv], 2)
    else:
        k_ext, gv_ext = k, gv
    k_win = k_ext.unfold(2, c, 1).movedim(-1, -2).flatten(-2)  # [B, H, T, c·D]: token t's window
    v_win = gv_ext.unfold(2, c, 1).movedim(-1, -2).flatten(-2)
    opt = {} if momentum is None else {"momentum": momentum}
    g = {n: gates[n] for n in ("lr", "theta", "alpha")}
    o, w, anc, opt = memory_scan_reference(atlas_recipe(chunk_size, optimizer), weights, anchor, opt, q, k_win,
                                           v_win, g, {}, position)
    if window is not None:
        keep = c - 1
        window = {"k": k_ext[:, :, -keep:], "v": gv_ext[:, :, -keep:, :-1], "gamma": gv_ext[:, :, -keep:, -1]}
    return o, w, anc, opt.get("momentum"), window


ATLAS_SCANS = {"chunk": atlas_scan_chunked, "reference": atlas_scan_reference}


# ------------------------------------------------------------------------------ the layer


class AtlasLayer(Mixer):
    """ATLAS as a sequence mixer: q/k/v projections → causal conv → SiLU → L2-normalised q, k →
    polynomial features → the Omega-rule memory → per-head RMSNorm ⊙ σ(gate) → output projection."""

    fast_weight_names = ("W1", "W2")  # θ₀, the initial memory (no weight decay in pretrain.optim)

    def __init__(self, hidden_size: int, num_heads: int, chunk_size: int = 16, window: int = 8, poly_degree: int = 2,
                 expansion: int = 2, base_lr: float = 0.1, optimizer: str = "muon", conv_kernel: int = 4,
                 norm_eps: float = 1e-6, scan_impl: str = "chunk"):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown inner_optimizer {optimizer!r} for atlas; expected one of {OPTIMIZERS}")
        if scan_impl not in ATLAS_SCANS:
            raise ValueError(f"unknown scan_impl {scan_impl!r}; expected one of {sorted(ATLAS_SCANS)}")
        if min(chunk_size, window, poly_degree, expansion) < 1:
            raise ValueError("chunk_size, window, poly_degree and expansion must be ≥ 1")
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.head_dim = d = hidden_size // num_heads
        self.feature_dim = D = poly_feature_dim(d, poly_degree)
        self.chunk_size, self.window, self.base_lr = chunk_size, window, base_lr
        self.optimizer, self.scan_impl = optimizer, scan_impl
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.conv_q = CausalConv1d(hidden_size, conv_kernel)
        self.conv_k = CausalConv1d(hidden_size, conv_kernel)
        self.conv_v = CausalConv1d(hidden_size, conv_kernel)
        self.gates = nn.Linear(hidden_size, 4 * num_heads, bias=True)  # [η | θ | α | γ] × heads
        self.poly_coef = nn.Parameter(torch.zeros(num_heads, poly_degree))
        self.W1 = nn.Parameter(torch.zeros(num_heads, D, expansion * d))
        self.W2 = nn.Parameter(torch.zeros(num_heads, expansion * d, d))
        self.o_norm = HeadRMSNorm(d, eps=norm_eps)
        self.g_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.reset_memory_parameters()

    def reset_memory_parameters(self, init=None) -> None:
        """Memory ~ N(0, 1/d_in); a_i = √(1/i!); gate biases: η ≈ base_lr/2, θ ≈ 0.9, α ≈ 0.98, γ ≈ 0.73."""
        init = init or nn.init
        for n in NAMES:
            p = getattr(self, n)
            init.normal_(p, mean=0.0, std=p.shape[-2] ** -0.5)
        H, degree = self.num_heads, self.poly_coef.shape[-1]
        coef = torch.tensor([math.sqrt(1 / math.factorial(i)) for i in range(1, degree + 1)]).expand(H, degree)
        bias = torch.cat([torch.zeros(H), torch.full((H,), 2.2), torch.full((H,), 4.0), torch.full((H,), 1.0)])
        copy_param(self.poly_coef, coef, init)
        copy_param(self.gates.bias, bias, init)

    def init_state(self, batch_size: int) -> LayerState:
        dtype = torch.promote_types(self.W1.dtype, torch.float32)
        w = {n: getattr(self, n).to(dtype).unsqueeze(0).expand(batch_size, *getattr(self, n).shape) for n in NAMES}
        opt = {} if self.optimizer == "sgd" else {"momentum": {n: torch.zeros_like(t) for n, t in w.items()}}
        cache = {}
        if self.window > 1:
            H, c = self.num_heads, self.window - 1
            z = self.W1.new_zeros((), dtype=dtype)
            cache = {"k": z.expand(batch_size, H, c, self.feature_dim), "v": z.expand(batch_size, H, c, self.head_dim),
                     "gamma": z.expand(batch_size, H, c)}
        return LayerState(weights=w, opt=opt, cache=cache)

    def _heads(self, t):
        return split_heads(t, self.num_heads)

    def prepare(self, x: torch.Tensor, state: LayerState) -> tuple:
        """Projections, short convs, polynomial features of L2-normalised q/k, gates:
        (q, k, v, gates, halo {"conv"})."""
        q, k, v, g, halo = memory_prologue(self, x, state.conv)
        coef = self.poly_coef.to(q.dtype)
        q, k = poly_features(q, coef), poly_features(k, coef)
        g = torch.sigmoid(g).unflatten(1, (4, self.num_heads))  # [B, 4, H, T]
        gates = {"lr": self.base_lr * g[:, 0], "theta": g[:, 1], "alpha": g[:, 2], "gamma": g[:, 3]}
        return q, k, v, gates, halo

    def scan(self, inputs: tuple, state: LayerState):
        """The memory from ``state`` (the Omega window of earlier keys travels in ``cache``): (o, state)."""
        q, k, v, gates, halo = inputs
        compute = q.dtype
        cast = (lambda d: None if not d else {n: t.to(compute) for n, t in d.items()})
        o, weights, anchor, mom, window = ATLAS_SCANS[self.scan_impl](
            cast(state.weights), cast(state.anchor), cast(state.opt.get("momentum")), cast(state.cache), q, k, v, gates,
            state.position, self.chunk_size, self.window, self.optimizer)
        return o, LayerState(weights=weights, anchor=anchor, opt={} if mom is None else {"momentum": mom},
                             cache=window or {}, position=state.position + q.shape[2], **halo)

    def output(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Per-head RMSNorm ⊙ σ(gate), output projection."""
        o = self.o_norm(o.to(x.dtype)).transpose(1, 2) * torch.sigmoid(self._heads(self.g_proj(x)).transpose(1, 2))
        return self.o_proj(o.flatten(2))


def build_atlas_mixer(config) -> AtlasLayer:
    """``atlas`` from a MemoryLMConfig."""
    return AtlasLayer(config.hidden_size, config.num_attention_heads, chunk_size=config.atlas_chunk_size,
                      window=config.atlas_window, poly_degree=config.atlas_poly_degree,
                      expansion=config.atlas_memory_expansion, base_lr=config.atlas_base_lr,
                      optimizer=config.inner_optimizer or "muon", conv_kernel=config.conv_kernel,
                      norm_eps=config.rms_norm_eps, scan_impl=config.scan_impl)
