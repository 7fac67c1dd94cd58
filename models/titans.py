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
Only torch is imported (``accelerated_scan`` optionally): this file is copied into HF folders.
"""
from __future__ import annotations

import functools
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionLayer
from .inner_knobs import clip_outer, lr_schedule, next_token_pairs
from .modules import CausalConv1d, HeadRMSNorm, memory_prologue, split_heads
from .parts import InnerKnobs, Recipe, copy_param, deep_mlp_memory, gelu_tanh, l2_loss, l2_normalize, momentum_step
from .reference import memory_scan_reference
from .scan import linear_scan
from .state import LayerState, Mixer
from .titans_fused import chunk_scan
from .triton_memory import triton_titans_scan, use_triton_titans

# ------------------------------------------------------------------------------ coefficients


def _scan(gates: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """linear_scan over the last dim for [..., ch, n] tensors with any leading dims."""
    lead = tokens.shape[:-2]
    g = gates.expand_as(tokens).reshape(-1, *tokens.shape[-2:])
    return linear_scan(g.contiguous(), tokens.reshape(-1, *tokens.shape[-2:]).contiguous()).reshape(*lead, *tokens.shape[-2:])


class _DecayProducts(torch.autograd.Function):
    """G[t, j] = Π_{j<i≤t} g_i (t ≥ j; 1 on the diagonal), 0 above it: gates [..., n] → [..., n, n], one
    cumulative product down each column. Backward without division (g may be 0): as
    ∂G[t, j]/∂g_i = G[t, i] G[i−1, j] for j < i ≤ t,  ∂L/∂g_i = Σ_t G[t, i] (Ḡ G₋ᵀ)[t, i] with G₋[i] = G[i−1]."""

    @staticmethod
    def forward(ctx, gates):
        n = gates.shape[-1]
        below = torch.ones(n, n, dtype=torch.bool, device=gates.device).tril(-1)
        G = torch.where(below, gates[..., :, None], torch.ones((), dtype=gates.dtype, device=gates.device))
        G = G.cumprod(-2).tril_()
        ctx.save_for_backward(G)
        return G

    @staticmethod
    def backward(ctx, grad):
        (G,) = ctx.saved_tensors
        shifted = F.pad(G[..., :-1, :], (0, 0, 1, 0))  # row i = G[i − 1], row 0 = 0
        return (G * (grad @ shifted.transpose(-1, -2))).sum(-2)


def decay_products(gates: torch.Tensor) -> torch.Tensor:
    """G[t, j] = Π_{j<i≤t} g_i for t ≥ j (1 on the diagonal), 0 above it: gates [..., n] → [..., n, n]."""
    with torch.autocast(gates.device.type, enabled=False):
        return _DecayProducts.apply(gates)


def decay_products_reference(gates: torch.Tensor) -> torch.Tensor:
    """:func:`decay_products` from its definition, one product per entry (the reference)."""
    n = gates.shape[-1]
    rows = []
    for t in range(n):
        rows.append(torch.stack([torch.prod(gates[..., j + 1:t + 1], -1) if j <= t else torch.zeros_like(gates[..., 0])
                                 for j in range(n)], -1))
    return torch.stack(rows, -2)


def titans_coefficients(lr, eta, alpha):
    """Coefficients of one segment of n tokens (all inputs [..., n]); see the module docstring.
    Closed form of the impulse scans (:func:`titans_coefficients_scan`): with E = decay_products(η),
    A = decay_products(1 − α) and s_tj = −θ_j E_tj, m_t = η_0 E_t0,

        c = A s = (A E) diag(−θ),   f = A m = η_0 (A E)_{·0},   β_t = (1 − α_0) A_t0.

    Returns c [..., n, n] (row t, column j), s_last [..., n] (= s_{n−1, j}), beta, f, m [..., n].
    """
    keep = 1 - alpha
    E, A = decay_products(torch.stack([eta, keep])).unbind(0)
    with torch.autocast(lr.device.type, enabled=False):  # in the gates' dtype, as the scans (elementwise) were
        AE = A @ E
    eta0 = eta[..., :1]
    return AE * -lr[..., None, :], E[..., -1, :] * -lr, keep[..., :1] * A[..., 0], eta0 * AE[..., 0], eta0 * E[..., 0]


def titans_coefficients_scan(lr, eta, alpha):
    """:func:`titans_coefficients` as the two first-order scans run on unit impulses (the reference):
    s_·j = scan(η, −θ_j e_j), c_·j = scan(1 − α, s_·j), m = scan(η, η₀e₀), f = scan(1 − α, m),
    β = scan(1 − α, (1 − α₀)e₀)."""
    n = lr.shape[-1]
    eye = torch.eye(n, dtype=lr.dtype, device=lr.device)
    keep = 1 - alpha
    # channels of the momentum scan: u_0..u_{n−1} (impulse −θ_j at t = j), then S_{t'} (η₀ at t = 0)
    s0_tokens = eta[..., :1] * eye[0]
    mom_tokens = torch.cat([-(lr[..., None, :] * eye), s0_tokens[..., None, :]], -2)  # [..., n+1, n]: channel j, time t
    mom = _scan(eta[..., None, :], mom_tokens)
    m0_tokens = (keep[..., :1] * eye[0])[..., None, :]  # (1 − α₀) at t = 0
    dec = _scan(keep[..., None, :], torch.cat([mom, m0_tokens], -2))  # [..., n+2, n]
    c = dec[..., :n, :].transpose(-1, -2)  # [t, j]
    return c, mom[..., :n, -1], dec[..., n + 1, :], dec[..., n, :], mom[..., n, :]


# ------------------------------------------------------------------------------ the chunked scan
_SQRT_2_PI = (2.0 / 3.141592653589793) ** 0.5


def gelu_tanh_grad(x: torch.Tensor) -> torch.Tensor:
    """d/dx of the tanh GELU with the exact √(2/π) (parts.gelu_tanh_grad keeps TTT's rounded one)."""
    u = _SQRT_2_PI * (x + 0.044715 * x**3)
    t = torch.tanh(u)
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _SQRT_2_PI * (1 + 3 * 0.044715 * x * x)



def soft_clamp_factor(norm: torch.Tensor, max_norm: float | None) -> torch.Tensor | float:
    """s(n) = τ·tanh(n/τ)/n: scales a gradient of norm n to norm τ·tanh(n/τ) < τ (1 when τ is None)."""
    if not max_norm:
        return 1.0
    n = norm.clamp_min(1e-12)
    return max_norm * torch.tanh(n / max_norm) / n


def backprop_at(weights: list, k: torch.Tensor, v: torch.Tensor, max_norm: float | None = None):
    """Per-token layer inputs X_l and errors Δ_l of ½‖M(k) − v‖² at the given weights; with
    ``max_norm`` each token's gradient X_lᵀΔ_l (norm ‖X_l‖‖Δ_l‖) is soft-clamped through Δ_l."""
    xs, zs, h = [], [], k
    L = len(weights)
    for i, W in enumerate(weights):
        xs.append(h)
        z = h @ W
        zs.append(z)
        h = gelu_tanh(z) if i < L - 1 else z
    d = h - v
    ds = [None] * L
    for i in range(L - 1, -1, -1):
        ds[i] = d
        if i:
            d = (d @ weights[i].transpose(-1, -2)) * gelu_tanh_grad(zs[i - 1])
    if max_norm:
        ds = [D * soft_clamp_factor(X.norm(dim=-1, keepdim=True) * D.norm(dim=-1, keepdim=True), max_norm)
              for X, D in zip(xs, ds)]
    return xs, ds


def _segment(cur: list, anchor: list, mom: list | None, q, k, v, coeffs, max_norm=None):
    """n tokens inside one chunk, from current weights ``cur`` (and momentum ``mom``) with
    gradients at ``anchor``. Returns (o [.., n, d], weights after, momentum after)."""
    xs, ds = backprop_at(anchor, k, v, max_norm)
    c, s_last, beta, f, m = coeffs
    h, L = q, len(cur)
    for i in range(L):
        z = beta[..., None] * (h @ cur[i]) + (c * (h @ xs[i].transpose(-1, -2))) @ ds[i]
        if mom is not None:
            z = z + f[..., None] * (h @ mom[i])
        h = gelu_tanh(z) if i < L - 1 else z
    c_last = c[..., -1, :, None]
    new_w = [beta[..., -1:, None] * W + (c_last * X).transpose(-1, -2) @ D for W, X, D in zip(cur, xs, ds)]
    new_m = None
    if mom is not None:
        new_w = [W + f[..., -1:, None] * S for W, S in zip(new_w, mom)]
        new_m = [m[..., -1:, None] * S + (s_last[..., :, None] * X).transpose(-1, -2) @ D for S, X, D in zip(mom, xs, ds)]
    return h, new_w, new_m


def _whole_chunks(cur: list, mom: list | None, q, k, v, coeffs, max_norm=None):
    """N whole chunks (q, k, v [N, B, H, b, d], coefficients [N, B, H, ...]), each as :func:`_segment`
    with the anchor at its starting memory, through ``titans_fused.chunk_scan``; layer 0's C ⊙ QKᵀ does
    not depend on the memory and is formed for all chunks at once. Returns (o [B, H, N·b, d], weights,
    momentum)."""
    c, s_last, beta, f, m = coeffs
    N, B, H, b = q.shape[:4]

    def per_head(t):  # [N, B, H, ...] → [N, B·H, ...]
        return None if t is None else t.to(dtype).reshape(N, B * H, *t.shape[3:])

    dtype = functools.reduce(torch.promote_types, [t.dtype for t in (q, k, v, c, *cur)])
    q, k, v = (t.to(dtype) for t in (q, k, v))  # one dtype (autocast may have left q in bf16, as TNT's q̃)
    with torch.autocast(q.device.type, enabled=False):  # the fused scan computes in that dtype
        qk_mix = c * (q @ k.transpose(-1, -2))
    col = (lambda t: None if mom is None else t[..., None])
    last = (lambda t: None if mom is None else t[..., -1:, None])
    o, *states = chunk_scan(max_norm or None, *(per_head(t) for t in (
        q, k, v, qk_mix, c, beta[..., None], col(f), c[..., -1, :, None], col(s_last), beta[..., -1:, None],
        last(f), last(m))), *(w.to(dtype).reshape(B * H, *w.shape[2:]) for w in cur + (mom or [])))
    o = o.view(N, B, H, b, -1).movedim(0, 2).flatten(2, 3)
    states = [w.view(B, H, *w.shape[1:]) for w in states]
    L = len(cur)
    return o, states[:L], (states[L:] if mom is not None else None)


def titans_scan_chunked(weights: dict, anchor: dict | None, momentum: dict | None, q, k, v, lr, eta, alpha,
                        position: int, chunk_size: int, max_grad_norm: float | None = None):
    """Chunked Titans memory. q, k, v: [B, H, T, d]; lr, eta, alpha: [B, H, T]; weights/anchor/
    momentum: {W1..WL}: [B, H, d_in, d_out] (momentum None = plain GD with decay). Returns
    (o [B, H, T, d], weights, anchor-or-None, momentum-or-None)."""
    names = sorted(weights, key=lambda n: int(n[1:]))
    cur = [weights[n] for n in names]
    anc = cur if anchor is None else [anchor[n] for n in names]
    mom = None if momentum is None else [momentum[n] for n in names]
    if mom is None:
        eta = torch.zeros_like(eta)
    b, T = chunk_size, q.shape[2]
    head = min(T, (b - position % b) % b)
    n_full = (T - head) // b
    outs = []

    def piece(start, stop):  # a head that finishes a chunk begun earlier, or a tail that starts one
        nonlocal cur, anc, mom
        sl = slice(start, stop)
        coeffs = titans_coefficients(lr[:, :, sl], eta[:, :, sl], alpha[:, :, sl])
        o, cur, mom = _segment(cur, anc, mom, q[:, :, sl], k[:, :, sl], v[:, :, sl], coeffs, max_grad_norm)
        if (position + stop) % b == 0:
            anc = cur
        outs.append(o)

    if head:
        piece(0, head)
    if n_full:  # what does not depend on the memory is computed for all chunks at once
        sl = slice(head, head + n_full * b)

        def blocks(x):
            return x[:, :, sl].unflatten(2, (n_full, b)).movedim(2, 0)  # [N, B, H, b, ...]

        coeffs = titans_coefficients(blocks(lr), blocks(eta), blocks(alpha))
        if use_triton_titans(q, cur, b):  # on CUDA: the Triton chunk kernels (models/triton_memory.py)
            o, cur, mom = triton_titans_scan(cur, mom, blocks(q), blocks(k), blocks(v), *coeffs, max_grad_norm)
            o = o.movedim(0, 2).flatten(2, 3).to(q.dtype)
        else:
            o, cur, mom = _whole_chunks(cur, mom, blocks(q), blocks(k), blocks(v), coeffs, max_grad_norm)
        outs.append(o)
        anc = cur
    if head + n_full * b < T:
        piece(head + n_full * b, T)
    o = outs[0] if len(outs) == 1 else torch.cat(outs, 2)
    at_boundary = (position + T) % b == 0
    return (o, dict(zip(names, cur)), None if at_boundary else dict(zip(names, anc)),
            None if mom is None else dict(zip(names, mom)))


def titans_recipe(chunk_size: int, use_momentum: bool, max_grad_norm: float | None = None) -> Recipe:
    """Titans in the generic frame: L2 on a deep MLP, momentum + forgetting, frozen-gradient chunks."""

    def inner_loss(theta, k_t, v_t, extra):
        return l2_loss(deep_mlp_memory(theta, k_t), v_t)

    def read(theta, q_t, extra):
        return deep_mlp_memory(theta, q_t)

    def token_step(anchor, theta, opt, grad, g, i):
        grad = {n: t * soft_clamp_factor(t.norm(dim=(-2, -1), keepdim=True), max_grad_norm) for n, t in grad.items()}
        if not use_momentum:
            return {n: (1 - g["alpha"]) * theta[n] - g["lr"] * grad[n] for n in theta}, opt
        theta, mom = momentum_step(theta, opt["momentum"], grad, g["lr"], g["eta"], g["alpha"])
        return theta, {"momentum": mom}

    return Recipe(inner_loss, read, token_step, chunk_size)


def titans_scan_reference(weights, anchor, momentum, q, k, v, lr, eta, alpha, position, chunk_size,
                          max_grad_norm=None):
    """Same contract as :func:`titans_scan_chunked`, token by token through the generic reference."""
    opt = {} if momentum is None else {"momentum": momentum}
    o, w, anc, opt = memory_scan_reference(titans_recipe(chunk_size, momentum is not None, max_grad_norm), weights, anchor, opt,
                                           q, k, v, {"lr": lr, "eta": eta, "alpha": alpha}, {}, position)
    return o, w, anc, opt.get("momentum")


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
        self.knobs = None if knobs == InnerKnobs() else knobs  # inner-loop knobs (models/inner_knobs.py)
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

    def _retrieve(self, x, weights):
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
            r = self._retrieve(xs, seg_w)
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


# ------------------------------------------------------------------------------- Titans: the inner-loop knobs (parts.InnerKnobs; rules in inner_knobs.py)


def titans_scan_knobs(weights, anchor, momentum, q, k, v, lr, eta, alpha, position, chunk_size, max_grad_norm,
                      knobs: InnerKnobs, init: dict | None):
    """Titans' chunk form with clipping (after its soft clamp) and the pull-to-init (``lr`` and ``k``
    already carry the schedule and next_token). Same contract as ``titans.titans_scan_chunked``;
    one chunk (or a part of one) at a time. With u_j = X_jᵀΔ_j + R, R = λ(M_{t'} − M_init):
    M_t = β_t M + f_t S + Σ_j c_tj X_jᵀΔ_j + (Σ_j c_tj) R."""
    names = sorted(weights, key=lambda n: int(n[1:]))
    cur = [weights[n] for n in names]
    anc = cur if anchor is None else [anchor[n] for n in names]
    mom = None if momentum is None else [momentum[n] for n in names]
    ini = None if not knobs.init_pull else [init[n] for n in names]
    if mom is None:
        eta = torch.zeros_like(eta)
    b, T = chunk_size, q.shape[2]
    outs, start = [], 0
    while start < T:
        stop = min(T, start + b - (position + start) % b)
        sl = slice(start, stop)
        c, s_last, beta, f, m = titans_coefficients(lr[:, :, sl], eta[:, :, sl], alpha[:, :, sl])
        xs, ds = backprop_at(anc, k[:, :, sl], v[:, :, sl], max_grad_norm)
        ds = [clip_outer(D, X, knobs.grad_clip) for X, D in zip(xs, ds)]
        Rs = None if ini is None else [knobs.init_pull * (A - I) for A, I in zip(anc, ini)]
        c_sum = c.sum(-1)  # Σ_j c_tj
        h, L = q[:, :, sl], len(cur)
        for i in range(L):
            z = beta[..., None] * (h @ cur[i]) + (c * (h @ xs[i].transpose(-1, -2))) @ ds[i]
            if mom is not None:
                z = z + f[..., None] * (h @ mom[i])
            if Rs is not None:
                z = z + c_sum[..., None] * (h @ Rs[i])
            h = gelu_tanh(z) if i < L - 1 else z
        outs.append(h)
        c_last = c[..., -1, :, None]
        new_w = [beta[..., -1:, None] * W + (c_last * X).transpose(-1, -2) @ D for W, X, D in zip(cur, xs, ds)]
        if Rs is not None:
            new_w = [W + c_sum[..., -1:, None] * R for W, R in zip(new_w, Rs)]
        if mom is not None:
            new_m = [m[..., -1:, None] * S + (s_last[..., :, None] * X).transpose(-1, -2) @ D
                     for S, X, D in zip(mom, xs, ds)]
            if Rs is not None:
                new_m = [S + s_last.sum(-1)[..., None, None] * R for S, R in zip(new_m, Rs)]
            new_w = [W + f[..., -1:, None] * S for W, S in zip(new_w, mom)]
            mom = new_m
        cur = new_w
        if (position + stop) % b == 0:
            anc = cur
        start = stop
    o = torch.cat(outs, 2)
    at_boundary = (position + T) % b == 0
    return (o, dict(zip(names, cur)), None if at_boundary else dict(zip(names, anc)),
            None if mom is None else dict(zip(names, mom)))



def titans_scan_with_knobs(memory, state, q, k, v, lr, eta, alpha):
    """``TitansMemory.scan`` with the knobs, chunked or token by token (``scan_impl``).
    Returns (o, weights, anchor-or-None, momentum-or-None, extra state): extra holds ``prev_key``
    (next_token) and, with ``inner_steps`` K > 1 inside a chunk, the other chains' memories
    ``chains = {"weights@s": …, "momentum@s": …}`` for s < K (chain K is weights/momentum)."""
    knobs, compute, B = memory.knobs, q.dtype, q.shape[0]
    K = knobs.steps
    cast = (lambda d: None if d is None else {n: t.to(compute) for n, t in d.items()})
    weights, anchor, momentum = cast(state.weights), cast(state.anchor), cast(state.opt.get("momentum"))
    init = {n: getattr(memory, n).to(compute).unsqueeze(0).expand(B, *getattr(memory, n).shape)
            for n in memory.fast_weight_names}
    prev_key = state.extra.get("prev_key")
    chains = state.extra.get("chains") or {}
    chain_w = [cast(chains.get(f"weights@{s}", weights)) for s in range(1, K)] + [weights]
    chain_m = None if momentum is None else [cast(chains.get(f"momentum@{s}", momentum)) for s in range(1, K)] + [momentum]

    def pack(o, ws, anc, ms, last_key):
        extra = {} if last_key is None else {"prev_key": last_key}
        if K > 1 and anc is not None:  # mid-chunk: the chains differ
            extra["chains"] = {f"weights@{s}": ws[s - 1] for s in range(1, K)}
            if ms is not None:
                extra["chains"].update({f"momentum@{s}": ms[s - 1] for s in range(1, K)})
        return o, ws[-1], anc, None if ms is None else ms[-1], extra

    if memory.scan_impl == "reference":
        tau = memory.max_grad_norm

        def soft_clamp(grad):  # Titans' own guard, on the loss gradient (before the knobs)
            return {n: t * soft_clamp_factor(t.norm(dim=(-2, -1), keepdim=True), tau) for n, t in grad.items()}

        recipe = replace(titans_recipe(memory.chunk_size, momentum is not None, None), grad_transform=soft_clamp,
                         retention_neutral={"alpha": 0.0})
        opt = [{} if m is None else {"momentum": m} for m in (chain_m or [None] * K)]
        o, w, anc, opt, last_key = memory_scan_reference(recipe, chain_w if K > 1 else weights, anchor,
                                                         opt if K > 1 else opt[0], q, k, v,
                                                         {"lr": lr, "eta": eta, "alpha": alpha}, {}, state.position,
                                                         knobs, init, prev_key)
        ws, ops = (w, opt) if K > 1 else ([w], [opt])
        ms = None if momentum is None else [op["momentum"] for op in ops]
        return pack(o, ws, anc, ms, last_key if knobs.next_token else None)
    lr = lr_schedule(lr, state.position, knobs)
    last_key = None
    if knobs.next_token:
        k, (lr,), last_key = next_token_pairs(k, [lr], prev_key)
    if K > 1:
        names = sorted(weights, key=lambda n: int(n[1:]))
        anc = [(anchor or weights)[n] for n in names]
        o, ws, ms, anc = titans_scan_steps([[w[n] for n in names] for w in chain_w],
                                           None if chain_m is None else [[m_[n] for n in names] for m_ in chain_m],
                                           anc, q, k, v, lr, eta, alpha, state.position, memory.chunk_size,
                                           memory.max_grad_norm, knobs)
        as_dict = (lambda lst: dict(zip(names, lst)))
        return pack(o, [as_dict(w) for w in ws], None if anc is None else as_dict(anc),
                    None if ms is None else [as_dict(m_) for m_ in ms], last_key)
    if knobs.inputs_only:  # schedule / next_token change only the inputs: the plain fast scan
        o, w, anc, mom = titans_scan_chunked(weights, anchor, momentum, q, k, v, lr, eta, alpha, state.position,
                                             memory.chunk_size, memory.max_grad_norm)
        return pack(o, [w], anc, None if mom is None else [mom], last_key)
    o, w, anc, mom = titans_scan_knobs(weights, anchor, momentum, q, k, v, lr, eta, alpha, state.position,
                                       memory.chunk_size, memory.max_grad_norm, knobs, init)
    return pack(o, [w], anc, None if mom is None else [mom], last_key)



# Titans, K steps


def _titans_chain_backprop(W, S, Xs, Ds, k, v, coeffs, max_norm, tau):
    """Per-token inputs and errors of ½‖M_j(k_j) − v_j‖² at each token's own memory in a chain that
    starts from (W, S) and has taken the steps (Xs, Ds) so far (lists over steps of per-layer tensors):
    layer l reads Z = diag(β) H W + diag(f) H S + Σ_k (C ⊙ H X_kᵀ) Δ_k, and the error goes back through
    each token's own W_{l,j}: δ W_{l,j}ᵀ = diag(β) δ Wᵀ + diag(f) δ Sᵀ + Σ_k (C ⊙ δ Δ_kᵀ) X_k."""
    c, _, beta, f, _ = coeffs
    L = len(W)
    xs, zs, h = [], [], k
    for i in range(L):
        xs.append(h)
        z = beta[..., None] * (h @ W[i])
        if S is not None:
            z = z + f[..., None] * (h @ S[i])
        for X, D in zip(Xs, Ds):
            z = z + (c * (h @ X[i].transpose(-1, -2))) @ D[i]
        zs.append(z)
        h = gelu_tanh(z) if i < L - 1 else z
    d, ds = h - v, [None] * L
    for i in range(L - 1, -1, -1):
        ds[i] = d
        if i:
            back = beta[..., None] * (d @ W[i].transpose(-1, -2))
            if S is not None:
                back = back + f[..., None] * (d @ S[i].transpose(-1, -2))
            for X, D in zip(Xs, Ds):
                back = back + (c * (d @ D[i].transpose(-1, -2))) @ X[i]
            d = back * gelu_tanh_grad(zs[i - 1])
    if max_norm:
        ds = [D * soft_clamp_factor(X.norm(dim=-1, keepdim=True) * D.norm(dim=-1, keepdim=True), max_norm)
              for X, D in zip(xs, ds)]
    return xs, [clip_outer(D, X, tau) for X, D in zip(xs, ds)]


def titans_scan_steps(chains_w, chains_m, anchor, q, k, v, lr, eta, alpha, position, chunk_size, max_grad_norm,
                      knobs: InnerKnobs):
    """Titans with K = ``knobs.steps`` chains (reference.memory_scan_reference): chain s runs the momentum
    and decay recurrences on u_j^(≤s) = Σ_{k≤s} ∇ℓ_j(M_j^(k−1)), M_j^(k−1) token j's memory in chain k − 1
    (M^(0) = the chunk's first memory); the output reads chain K; a chunk end resets every chain to K.
    chains_w/chains_m: K lists of per-layer tensors (momentum None for sgd); anchor: per-layer list.
    Returns (o, chains_w, chains_m, anchor-or-None)."""
    K, b, T = knobs.steps, chunk_size, q.shape[2]
    if chains_m is None:
        eta = torch.zeros_like(eta)
    outs, start = [], 0
    while start < T:
        stop = min(T, start + b - (position + start) % b)
        sl = slice(start, stop)
        coeffs = titans_coefficients(lr[:, :, sl], eta[:, :, sl], alpha[:, :, sl])
        c, s_last, beta, f, m = coeffs
        ks, vs = k[:, :, sl], v[:, :, sl]
        xs, ds = backprop_at(anchor, ks, vs, max_grad_norm)
        Xs, Ds = [xs], [[clip_outer(D, X, knobs.grad_clip) for X, D in zip(xs, ds)]]
        for s in range(1, K):
            xs, ds = _titans_chain_backprop(chains_w[s - 1], None if chains_m is None else chains_m[s - 1], Xs, Ds,
                                            ks, vs, coeffs, max_grad_norm, knobs.grad_clip)
            Xs.append(xs)
            Ds.append(ds)
        h, L = q[:, :, sl], len(anchor)
        for i in range(L):
            z = beta[..., None] * (h @ chains_w[-1][i])
            if chains_m is not None:
                z = z + f[..., None] * (h @ chains_m[-1][i])
            for X, D in zip(Xs, Ds):
                z = z + (c * (h @ X[i].transpose(-1, -2))) @ D[i]
            h = gelu_tanh(z) if i < L - 1 else z
        outs.append(h)
        c_last = c[..., -1, :, None]
        new_w, new_m = [], []
        for s in range(K):
            w = [beta[..., -1:, None] * W + sum((c_last * X[i]).transpose(-1, -2) @ D[i] for X, D in zip(Xs[: s + 1], Ds[: s + 1]))
                 for i, W in enumerate(chains_w[s])]
            if chains_m is not None:
                w = [W + f[..., -1:, None] * S for W, S in zip(w, chains_m[s])]
                new_m.append([m[..., -1:, None] * S + sum((s_last[..., :, None] * X[i]).transpose(-1, -2) @ D[i]
                                                          for X, D in zip(Xs[: s + 1], Ds[: s + 1]))
                              for i, S in enumerate(chains_m[s])])
            new_w.append(w)
        chains_w, chains_m = new_w, (new_m if chains_m is not None else None)
        if (position + stop) % b == 0:
            chains_w = [chains_w[-1]] * K
            chains_m = None if chains_m is None else [chains_m[-1]] * K
            anchor = chains_w[-1]
        start = stop
    at_boundary = (position + T) % b == 0
    return torch.cat(outs, 2), chains_w, chains_m, (None if at_boundary else anchor)
