"""Miras, "It's All Connected" (Behrouz, Razaviyayn, Zhong, Mirrokni 2025, arXiv 2504.13173): three
memory layers built from the shared parts (inner model, attentional bias, retention, optimizer).

Per head the memory is the Miras MLP with a residual and a per-head LayerNorm (§7.2 of the design
notes; GELU, hidden width E·d):

    M_W(x) = x + LN_{γ,β}(GELU(x W1) W2)                  y_t = M_{W_t}(q_t)  (read after the update)

and each variant trains it online on a different attentional bias ℓ and retention:

    Moneta  ℓ = (1/p) Σ_i (e_i² + ε)^{p/2}   (smooth ℓ_p, p = 3; e = M(k) − v)
            A_t = α_t A_{t−1} − η_t ∇ℓ,     W_t = A_t / ‖A_t‖_q^{q−2}    (ℓ_q retention, q = 4, per matrix)
    Yaad    ℓ = ½‖e‖² if ‖e‖ ≤ δ_t else δ_t ‖e‖₁   (Huber, data-dependent threshold δ_t)
            W_t = (1 − a_t) W_{t−1} − η_t ∇ℓ                              (Titans-style forget gate a_t)
    Memora  ℓ = ½‖e‖²,  W = c·softmax(L) over each column's inputs (W ≥ 0, columns sum to c = √d_in)
            L_t = α_t L_{t−1} − η_t ∇_W ℓ    i.e.  W_t = c·softmax(α_t log W_{t−1} − η_t ∇ℓ)   (KL retention)

Every ℓ is averaged over the d features (ℓ/d, as titans-pytorch's mean-squared error): summed, the
per-token gradient grows with the head width and a 64-wide head's first chunk already moved the
memory several times its own norm.

Chunk rule (frozen gradients, as Titans): for token t of a chunk of b tokens starting at t', every
∇ℓ is taken at the chunk's first weights W_{t'}. Inside a chunk the accumulators (W for Yaad, A
for Moneta, the logits L for Memora) then follow a linear recurrence in the per-token gradients
u_j = X_jᵀ Δ_j (layer input × back-propagated error at W_{t'}), with coefficients from the gates:

    S_t = P_t S_{t'} + Σ_{j≤t} C_tj u_j,     P_t = Π_{i≤t} α_i,   C_tj = −η_j Π_{j<i≤t} α_i

Yaad and Moneta read in the dual form (no per-token weights: z = P_t h S_{t'} + (C ⊙ h Xᵀ) Δ);
Memora materialises L_t per token (the softmax is not linear). Moneta's normaliser ‖A‖_q^{q−2}
is re-evaluated once per chunk, at its last token (the last token reads with the new one; the
others with the chunk start's): b = 1 is the online rule. A call may start or end inside a chunk:
the state carries the chunk's anchor W_{t'} beside the current weights (Moneta: and the
normaliser in ``opt["norm"]``, Memora: the logits L are the state's weights).
Only torch is imported: this file is copied into exported Hugging Face folders.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .modules import CausalConv1d, HeadRMSNorm, memory_prologue, split_heads
from .parts import Recipe, copy_param, gelu_tanh, head_layer_norm
from .reference import memory_scan_reference
from .state import LayerState, Mixer
from .titans import gelu_tanh_grad

VARIANTS = ("moneta", "yaad", "memora")
NAMES = ("W1", "W2")
LN_EPS = 1e-6
LP_EPS = 1e-6  # ε of the smooth |x| = √(x² + ε) in Moneta's ℓ_p


# ------------------------------------------------------------------------------ memory and losses


def miras_memory(theta: dict, x: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor) -> torch.Tensor:
    """M(x) = x + LN_{γ,β}(GELU(x W1) W2)."""
    return x + head_layer_norm(gelu_tanh(x @ theta["W1"]) @ theta["W2"], ln_w, ln_b, LN_EPS)


def lp_loss(e: torch.Tensor, p: float) -> torch.Tensor:
    """(1/p) Σ (e² + ε)^{p/2}: the smooth ℓ_p attentional bias (p = 2: ½‖e‖² up to ε)."""
    return (e * e + LP_EPS).pow(p / 2).sum() / p


def lp_grad(e: torch.Tensor, p: float) -> torch.Tensor:
    """∂/∂e of :func:`lp_loss`: e (e² + ε)^{(p−2)/2} (≈ sign(e)|e|^{p−1})."""
    return e * (e * e + LP_EPS).pow((p - 2) / 2)


def huber_loss(e: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Yaad's bias per token: ½‖e‖² if ‖e‖₂ ≤ δ else δ‖e‖₁ (e: [.., n, d], δ: [.., n, 1])."""
    small = e.norm(dim=-1, keepdim=True) <= delta
    return torch.where(small, 0.5 * e * e, delta * e.abs()).sum()


def huber_grad(e: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """∂/∂e of :func:`huber_loss`: e inside the threshold, δ·sign(e) outside."""
    small = e.norm(dim=-1, keepdim=True) <= delta
    return torch.where(small, e, delta * torch.sign(e))


def softmax_memory(logits: dict) -> dict:
    """Memora's constrained weights W = c·softmax(L) over the input dim, c = √d_in."""
    return {n: math.sqrt(t.shape[-2]) * torch.softmax(t, dim=-2) for n, t in logits.items()}


def lq_normaliser(a: torch.Tensor, q: float) -> torch.Tensor:
    """r(A) = 1/‖A‖_q^{q−2} of each matrix (last two dims), so that W = r·A."""
    return a.abs().pow(q).sum((-2, -1), keepdim=True).pow(-(q - 2) / q)


# ------------------------------------------------------------------------------ the chunked scans


def _backprop_at(w: dict, k, v, ln_w, ln_b, dloss):
    """Per-token layer inputs X and errors Δ of ℓ(M_w(k) − v) (∂ℓ_j/∂W_l = X_{l,j}ᵀ Δ_{l,j}).
    dloss(e) = ∂ℓ/∂e per token."""
    z1 = k @ w["W1"]
    h1 = gelu_tanh(z1)
    z2 = h1 @ w["W2"]
    zc = z2 - z2.mean(-1, keepdim=True)
    rstd = torch.rsqrt(zc.pow(2).mean(-1, keepdim=True) + LN_EPS)  # (native_layer_norm's rstd has no gradient)
    x_hat = zc * rstd
    pred = k + ln_w * x_hat + ln_b
    g_hat = ln_w * dloss(pred - v) / v.shape[-1]  # ℓ is averaged over the features
    d2 = (g_hat - g_hat.mean(-1, keepdim=True) - x_hat * (g_hat * x_hat).mean(-1, keepdim=True)) * rstd
    d1 = (d2 @ w["W2"].transpose(-1, -2)) * gelu_tanh_grad(z1)
    return [k, h1], [d1, d2]


def decay_coefficients(lr: torch.Tensor, keep: torch.Tensor):
    """S_t = keep_t S_{t−1} − lr_t u_t over n tokens ([.., n]) as S_t = P_t S_0 + Σ_j C_tj u_j.
    Returns P [.., n] and C [.., n, n] (row t, column j; zero above the diagonal)."""
    cum = torch.log(keep).cumsum(-1)
    n = lr.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=lr.device).tril()
    gap = torch.where(causal, cum[..., :, None] - cum[..., None, :], float("-inf"))
    return cum.exp(), -lr[..., None, :] * gap.exp()


def coefficient_outer(K: torch.Tensor, X: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """Σ_j K_tj X_jᵀ D_j for every t: K [.., n, m], X [.., m, i], D [.., m, o] → [.., n, i, o] (the
    per-token outer products u_j = X_jᵀ D_j are never formed)."""
    return (K[..., :, :, None] * X[..., None, :, :]).transpose(-1, -2) @ D[..., None, :, :]


def _dual_layer(h, w, P, C, X, D):
    """h [.., n, d_in] read through W_t = P_t W + Σ_{j≤t} C_tj X_jᵀ D_j without forming W_t."""
    return P[..., None] * (h @ w) + (C * (h @ X.transpose(-1, -2))) @ D


def _dual_update(w, P, C, X, D):
    """W_n (the last token's weights) of :func:`_dual_layer`."""
    return P[..., -1:, None] * w + (C[..., -1, :, None] * X).transpose(-1, -2) @ D


def _linear_segment(variant, cur, anc, opt, q, k, v, g, ln_w, ln_b, ends: bool, p: float, qn: float):
    """Yaad / Moneta on n tokens of one chunk (dual form). Returns (o, weights, opt)."""
    if variant == "yaad":
        dloss = lambda e: huber_grad(e, g["delta"][..., None])  # noqa: E731
        scales = {n: 1.0 for n in NAMES}
    else:
        dloss = lambda e: lp_grad(e, p)  # noqa: E731
        scales = {n: opt["norm"][n][..., 0] for n in NAMES}  # [B, H, 1]: W = r A, r frozen in the chunk
    xs, ds = _backprop_at(anc, k, v, ln_w, ln_b, dloss)
    h = q
    new, new_norm = {}, {}
    for i, n in enumerate(NAMES):
        P, C = decay_coefficients(g["lr"] * scales[n], g["keep"])
        z = _dual_layer(h, cur[n], P, C, xs[i], ds[i])
        new[n] = _dual_update(cur[n], P, C, xs[i], ds[i])
        if variant == "moneta" and ends:  # renormalise: W = r(A) A with A = W̃ / r_old
            r_old = opt["norm"][n]
            new_norm[n] = lq_normaliser(new[n] / r_old, qn)
            ratio = new_norm[n] / r_old
            new[n] = new[n] * ratio
            z = torch.cat([z[..., :-1, :], z[..., -1:, :] * ratio], -2)
        h = gelu_tanh(z) if i == 0 else z
    o = q + head_layer_norm(h, ln_w, ln_b, LN_EPS)
    if variant == "moneta" and ends:
        opt = {"norm": new_norm}
    return o, new, opt


def _memora_segment(cur, anc, q, k, v, g, ln_w, ln_b):
    """Memora on n tokens of one chunk: the logits L_t are materialised per token."""
    xs, ds = _backprop_at(softmax_memory(anc), k, v, ln_w, ln_b, lambda e: e)
    P, C = decay_coefficients(g["lr"], g["keep"])
    h = q
    new = {}
    for i, n in enumerate(NAMES):
        L = P[..., None, None] * cur[n][:, :, None] + coefficient_outer(C, xs[i], ds[i])  # [B, H, n, d_in, d_out]
        W = math.sqrt(L.shape[-2]) * torch.softmax(L, dim=-2)
        z = (h[..., None, :] @ W)[..., 0, :]
        new[n] = L[:, :, -1].clone()  # a copy: a view would keep every token's L alive past the checkpoint
        h = gelu_tanh(z) if i == 0 else z
    return q + head_layer_norm(h, ln_w, ln_b, LN_EPS), new


def miras_scan_chunked(variant: str, weights: dict, anchor: dict | None, opt: dict, q, k, v, gates: dict, ln_w, ln_b,
                       position: int, chunk_size: int, p: float = 3.0, qn: float = 4.0):
    """Chunked Miras memory. q, k, v: [B, H, T, d]; gates: "lr", "keep" (+ Yaad's "delta") [B, H, T];
    weights/anchor: {W1, W2} [B, H, d_in, d_out] (Memora: the logits); opt: Moneta {"norm": {W1, W2}}
    [B, H, 1, 1], else {}; ln_w/ln_b: [B, H, d]. Returns (o [B, H, T, d], weights, anchor-or-None, opt)."""
    b, T = chunk_size, q.shape[2]
    cur, anc = weights, (weights if anchor is None else anchor)
    lw, lb = ln_w[:, :, None], ln_b[:, :, None]
    outs, start = [], 0
    while start < T:
        stop = min(T, start + b - (position + start) % b)
        sl = slice(start, stop)
        ends = (position + stop) % b == 0
        gs = {n: t[:, :, sl] for n, t in gates.items()}
        if variant == "memora":  # per-token weights: recomputed in the backward instead of kept
            seg = (cur, anc, q[:, :, sl], k[:, :, sl], v[:, :, sl], gs, lw, lb)
            o, cur = checkpoint(_memora_segment, *seg, use_reentrant=False) if torch.is_grad_enabled() else \
                _memora_segment(*seg)
        else:
            o, cur, opt = _linear_segment(variant, cur, anc, opt, q[:, :, sl], k[:, :, sl], v[:, :, sl], gs, lw, lb,
                                          ends, p, qn)
        if ends:
            anc = cur
        outs.append(o)
        start = stop
    return torch.cat(outs, 2), cur, None if (position + T) % b == 0 else anc, opt


# ------------------------------------------------------------------------------ the reference


def miras_recipe(variant: str, chunk_size: int, p: float = 3.0, qn: float = 4.0) -> Recipe:
    """A Miras variant in the generic frame. Yaad's δ_t travels as the last channel of v."""

    def inner_loss(theta, k_t, v_t, extra):  # averaged over the features
        if variant == "yaad":
            e = miras_memory(theta, k_t, extra["ln_w"], extra["ln_b"]) - v_t[..., :-1]
            return huber_loss(e, v_t[..., -1:]) / e.shape[-1]
        e = miras_memory(theta, k_t, extra["ln_w"], extra["ln_b"]) - v_t
        return (lp_loss(e, p) if variant == "moneta" else 0.5 * e.pow(2).sum()) / e.shape[-1]

    def read(theta, q_t, extra):
        w = softmax_memory(theta) if variant == "memora" else theta
        return miras_memory(w, q_t, extra["ln_w"], extra["ln_b"])

    def token_step(anchor, theta, opt, grad, g, i):
        if variant != "moneta":  # Yaad: W, Memora: the logits L
            return {n: g["keep"] * theta[n] - g["lr"] * grad[n] for n in theta}, opt
        r = opt["norm"]
        theta = {n: g["keep"] * theta[n] - g["lr"] * r[n] * grad[n] for n in theta}  # W = r A, A linear
        if i == chunk_size - 1:
            r_new = {n: lq_normaliser(theta[n] / r[n], qn) for n in theta}
            theta, opt = {n: theta[n] / r[n] * r_new[n] for n in theta}, {"norm": r_new}
        return theta, opt

    def grad_point(anchor, theta, g):
        return softmax_memory(anchor) if variant == "memora" else anchor

    return Recipe(inner_loss, read, token_step, chunk_size, grad_point=grad_point)


def miras_scan_reference(variant: str, weights, anchor, opt, q, k, v, gates, ln_w, ln_b, position: int,
                         chunk_size: int, p: float = 3.0, qn: float = 4.0):
    """Same contract as :func:`miras_scan_chunked`, token by token through the generic reference."""
    if variant == "yaad":
        v = torch.cat([v, gates["delta"][..., None]], -1)
    g = {n: gates[n] for n in ("lr", "keep")}
    o, w, anc, opt = memory_scan_reference(miras_recipe(variant, chunk_size, p, qn), weights, anchor, opt, q, k, v, g,
                                           {"ln_w": ln_w, "ln_b": ln_b}, position)
    return o, w, anc, opt


MIRAS_SCANS = {"chunk": miras_scan_chunked, "reference": miras_scan_reference}


# ------------------------------------------------------------------------------ the layer


def _inv_softplus(x: float) -> float:
    return x + math.log(-math.expm1(-x))


class MirasLayer(Mixer):
    """Moneta, Yaad or Memora as a sequence mixer: q/k/v projections → causal conv → SiLU →
    L2-normalised q, k → the memory → per-head RMSNorm ⊙ σ(gate) → output projection.
    Per-token, per-head gates: η_t = base_lr·σ(·), retention α_t = σ(·) (Yaad: 1 − a_t, a_t = σ(·)),
    Yaad's δ_t = softplus(·)."""

    fast_weight_names = ("W1", "W2")  # θ₀, the initial memory (no weight decay in pretrain.optim)

    def __init__(self, hidden_size: int, num_heads: int, variant: str = "moneta", chunk_size: int = 16,
                 expansion: int = 4, base_lr: float = 0.1, p: float = 3.0, q: float = 4.0, conv_kernel: int = 4,
                 norm_eps: float = 1e-6, scan_impl: str = "chunk"):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown Miras variant {variant!r}; expected one of {VARIANTS}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if scan_impl not in MIRAS_SCANS:
            raise ValueError(f"unknown scan_impl {scan_impl!r}; expected one of {sorted(MIRAS_SCANS)}")
        if chunk_size < 1 or expansion < 1:
            raise ValueError("chunk_size and expansion must be ≥ 1")
        if p < 1 or q < 2:
            raise ValueError(f"Moneta needs p ≥ 1 and q ≥ 2, got p={p}, q={q}")
        self.variant, self.hidden_size, self.num_heads = variant, hidden_size, num_heads
        self.head_dim = d = hidden_size // num_heads
        self.chunk_size, self.base_lr, self.p, self.q, self.scan_impl = chunk_size, base_lr, p, q, scan_impl
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.conv_q = CausalConv1d(hidden_size, conv_kernel)
        self.conv_k = CausalConv1d(hidden_size, conv_kernel)
        self.conv_v = CausalConv1d(hidden_size, conv_kernel)
        self.num_gates = 3 if variant == "yaad" else 2
        self.gates = nn.Linear(hidden_size, self.num_gates * num_heads, bias=True)  # [η | retention | (δ)]
        self.W1 = nn.Parameter(torch.zeros(num_heads, d, expansion * d))
        self.W2 = nn.Parameter(torch.zeros(num_heads, expansion * d, d))
        self.ln_weight = nn.Parameter(torch.ones(num_heads, d))
        self.ln_bias = nn.Parameter(torch.zeros(num_heads, d))
        self.o_norm = HeadRMSNorm(d, eps=norm_eps)
        self.g_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.reset_memory_parameters()

    def reset_memory_parameters(self, init=None) -> None:
        """Memory ~ N(0, 1/d_in) (Memora: logits ~ N(0, 1)); LN γ = 1, β = 0; gate biases: η ≈ base_lr/2,
        retention ≈ 0.999, δ ≈ √d (the typical ‖M(k) − v‖ at init: the LN output has unit RMS, so
        both branches of the Huber bias occur). The memory's output goes through a LayerNorm, so its
        step relative to ‖W‖ grows as 1/‖W‖²: a retention of 0.98 per token shrank W ~10⁴× over 512
        tokens and the steps exploded (step-1 gradient norm 10⁶ for Yaad at hidden 256)."""
        init = init or nn.init
        for n in NAMES:
            p = getattr(self, n)
            init.normal_(p, mean=0.0, std=1.0 if self.variant == "memora" else p.shape[-2] ** -0.5)
        init.ones_(self.ln_weight)
        init.zeros_(self.ln_bias)
        H = self.num_heads
        parts = [torch.zeros(H), torch.full((H,), -7.0 if self.variant == "yaad" else 7.0)]
        if self.variant == "yaad":
            parts.append(torch.full((H,), _inv_softplus(self.head_dim ** 0.5)))
        copy_param(self.gates.bias, torch.cat(parts), init)

    def init_state(self, batch_size: int) -> LayerState:
        dtype = torch.promote_types(self.W1.dtype, torch.float32)
        a = {n: getattr(self, n).to(dtype).unsqueeze(0).expand(batch_size, *getattr(self, n).shape) for n in NAMES}
        if self.variant != "moneta":
            return LayerState(weights=a)
        r = {n: lq_normaliser(t, self.q) for n, t in a.items()}  # the parameters are A₀; W₀ = r(A₀) A₀
        return LayerState(weights={n: a[n] * r[n] for n in NAMES}, opt={"norm": r})

    def _heads(self, t):
        return split_heads(t, self.num_heads)

    def prepare(self, x: torch.Tensor, state: LayerState) -> tuple:
        """Projections, short convs, L2-normalised q/k, gates (η, retention[, δ]) and the memory's
        LayerNorm over the batch: (q, k, v, gates, ln_w, ln_b, halo {"conv"})."""
        B = x.shape[0]
        q, k, v, g, halo = memory_prologue(self, x, state.conv)
        compute = q.dtype
        g = g.unflatten(1, (self.num_gates, self.num_heads))  # [B, G, H, T]
        gates = {"lr": self.base_lr * torch.sigmoid(g[:, 0]),
                 "keep": torch.sigmoid(-g[:, 1]) if self.variant == "yaad" else torch.sigmoid(g[:, 1])}
        if self.variant == "yaad":
            gates["delta"] = F.softplus(g[:, 2])
        ln_w = self.ln_weight.to(compute).expand(B, *self.ln_weight.shape)
        ln_b = self.ln_bias.to(compute).expand(B, *self.ln_bias.shape)
        return q, k, v, gates, ln_w, ln_b, halo

    def scan(self, inputs: tuple, state: LayerState):
        """The memory from ``state``: (o [B, H, T, d], state)."""
        q, k, v, gates, ln_w, ln_b, halo = inputs
        compute = q.dtype
        cast = (lambda d: None if d is None else {n: t.to(compute) for n, t in d.items()})
        opt = {"norm": cast(state.opt["norm"])} if self.variant == "moneta" else {}
        o, weights, anchor, opt = MIRAS_SCANS[self.scan_impl](
            self.variant, cast(state.weights), cast(state.anchor), opt, q, k, v, gates, ln_w, ln_b, state.position,
            self.chunk_size, self.p, self.q)
        return o, LayerState(weights=weights, anchor=anchor, opt=opt, position=state.position + q.shape[2], **halo)

    def output(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Per-head RMSNorm ⊙ σ(gate), output projection."""
        o = self.o_norm(o.to(x.dtype)).transpose(1, 2) * torch.sigmoid(self._heads(self.g_proj(x)).transpose(1, 2))
        return self.o_proj(o.flatten(2))


def build_miras_mixer(config, kind: str) -> MirasLayer:
    """``moneta``, ``yaad`` or ``memora`` from a MemoryLMConfig."""
    return MirasLayer(config.hidden_size, config.num_attention_heads, kind, chunk_size=config.miras_chunk_size,
                      expansion=config.miras_memory_expansion, base_lr=config.miras_base_lr, p=config.miras_p,
                      q=config.miras_q, conv_kernel=config.conv_kernel, norm_eps=config.rms_norm_eps,
                      scan_impl=config.scan_impl)
