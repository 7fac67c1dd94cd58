"""The four parts of a memory layer (the Miras view), as plain functions on per-head tensors.

A memory layer keeps, per head, an *inner model* f_θ (fast weights θ). For every token it takes
an *inner optimizer* step on an *inner loss* ℓ(f_θ(k), v) under a *retention* rule:

    θ_t = retain(θ_{t-1}) − η_t · step(∇_θ ℓ(f_θ(k_t); v_t))        o_t = read(f_{θ_t}, q_t)

Everything here works on tensors with any leading batch dims (batch, heads, …); parameters are
dicts of tensors so that ``torch.func.grad`` can differentiate the loss w.r.t. them.
Only torch is imported: this file is copied into exported Hugging Face folders.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------- inner models
# θ is a dict; "W*" are [.., d_in, d_out] matrices, "b*" are [.., 1, d_out] row biases.

GELU_C = 0.79788456  # √(2/π) as the official TTT code writes it


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def gelu_tanh_grad(x: torch.Tensor) -> torch.Tensor:
    """d/dx of the tanh-approximated GELU (the closed form of the official TTT-MLP)."""
    t = torch.tanh(GELU_C * x * (1 + 0.044715 * x * x))
    return 0.5 * x * ((1 - t * t) * (GELU_C + 0.1070322243 * x * x)) + 0.5 * (1 + t)


class _GeluTanhGrad(torch.autograd.Function):
    """gelu'(x) with a closed-form backward: d/dx gelu'(x) = (1 − t²)(u' + ½ x (u'' − 2 t u'²))."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return gelu_tanh_grad(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        x2 = x * x
        t = torch.tanh(GELU_C * x * (1 + 0.044715 * x2))
        du = GELU_C + 0.1070322243 * x2
        return grad * (1 - t * t) * (du + 0.5 * x * (2 * 0.1070322243 * x - 2 * t * du * du))


def gelu_tanh_grad_fused(x: torch.Tensor) -> torch.Tensor:
    """:func:`gelu_tanh_grad` as one autograd node (the chunked scan calls it once per mini-batch)."""
    return _GeluTanhGrad.apply(x)


def linear_memory(theta: dict, x: torch.Tensor) -> torch.Tensor:
    """f_θ(x) = x W + b."""
    return x @ theta["W1"] + theta["b1"]


def mlp_memory(theta: dict, x: torch.Tensor) -> torch.Tensor:
    """f_θ(x) = GELU(x W1 + b1) W2 + b2."""
    return gelu_tanh(x @ theta["W1"] + theta["b1"]) @ theta["W2"] + theta["b2"]


INNER_MODELS = {"linear": linear_memory, "mlp": mlp_memory}


def inner_param_shapes(kind: str, head_dim: int, expansion: int = 4) -> dict[str, tuple[int, ...]]:
    """Per-head shapes of the fast weights of an inner model."""
    if kind == "linear":
        return {"W1": (head_dim, head_dim), "b1": (1, head_dim)}
    if kind == "mlp":
        hidden = expansion * head_dim
        return {"W1": (head_dim, hidden), "b1": (1, hidden), "W2": (hidden, head_dim), "b2": (1, head_dim)}
    raise ValueError(f"unknown inner model {kind!r}; expected one of {sorted(INNER_MODELS)}")


# ---------------------------------------------------------------------------- inner losses


def head_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LN over the last dim with per-head affine parameters: γ ⊙ (x − μ)/√(σ² + ε) + β."""
    return weight * F.layer_norm(x, x.shape[-1:], eps=eps) + bias


def ln_fused_l2_loss(z: torch.Tensor, target: torch.Tensor, weight, bias, eps: float = 1e-6) -> torch.Tensor:
    """ℓ = ½ ‖LN_{γ,β}(z) − target‖², summed over features and tokens."""
    return 0.5 * (head_layer_norm(z, weight, bias, eps) - target).pow(2).sum()


def ln_fused_l2_grad(z: torch.Tensor, target: torch.Tensor, weight, bias, eps: float = 1e-6) -> torch.Tensor:
    """∂ℓ/∂z of :func:`ln_fused_l2_loss` per token, written out (LayerNorm backward):

        ĝ = γ ⊙ (LN(z) − target),  ∂ℓ/∂z = (D ĝ − Σĝ − x̂ Σ(ĝ ⊙ x̂)) / (D σ)
    """
    d = z.shape[-1]
    mu = z.mean(-1, keepdim=True)
    var = z.var(-1, keepdim=True, unbiased=False)
    std = torch.sqrt(var + eps)
    x_hat = (z - mu) / std
    g_hat = (weight * x_hat + bias - target) * weight
    return (d * g_hat - g_hat.sum(-1, keepdim=True) - x_hat * (g_hat * x_hat).sum(-1, keepdim=True)) / (d * std)


class _LNFusedL2Grad(torch.autograd.Function):
    """:func:`ln_fused_l2_grad` as one autograd node with a closed-form backward.

    With x̂, σ from the forward, g = P(ĝ)/σ where P(u) = u − mean(u) − x̂ mean(u x̂) is symmetric, so
    for an upstream G:  a = P(G)/σ is ∂/∂ĝ, and the x̂- and σ-paths go through LN's backward.
    """

    @staticmethod
    def forward(ctx, z, target, weight, bias, eps):
        d = z.shape[-1]
        x_hat, _, rstd = torch.native_layer_norm(z, (d,), None, None, eps)  # one fused kernel
        std = rstd.reciprocal()
        resid = weight * x_hat + bias - target
        g_hat = resid * weight
        g = (d * g_hat - g_hat.sum(-1, keepdim=True) - x_hat * (g_hat * x_hat).sum(-1, keepdim=True)) / (d * std)
        ctx.save_for_backward(x_hat, std, resid, g_hat, g, weight)
        return g

    @staticmethod
    def backward(ctx, G):
        x_hat, std, resid, g_hat, g, weight = ctx.saved_tensors
        d = x_hat.shape[-1]
        G_xhat = (G * x_hat).mean(-1, keepdim=True)
        a = (G - G.mean(-1, keepdim=True) - x_hat * G_xhat) / std  # ∂/∂ĝ
        m = (g_hat * x_hat).mean(-1, keepdim=True)
        d_xhat = weight * weight * a - (m * G + G_xhat * g_hat) / std
        d_std = -((G * g).sum(-1, keepdim=True) + (d_xhat * x_hat).sum(-1, keepdim=True)) / std
        d_xc = d_xhat / std + d_std * x_hat / d
        dz = d_xc - d_xc.mean(-1, keepdim=True)
        d_target = -weight * a
        d_weight = (a * (resid + weight * x_hat)).sum_to_size(weight.shape)
        d_bias = (weight * a).sum_to_size(weight.shape)
        return dz, d_target, d_weight, d_bias, None


def ln_fused_l2_grad_fused(z, target, weight, bias, eps: float = 1e-6) -> torch.Tensor:
    """:func:`ln_fused_l2_grad` as one autograd node (the chunked scan's hot path)."""
    return _LNFusedL2Grad.apply(z, target, weight, bias, eps)


# ---------------------------------------------------------------------------- inner optimizer


def token_index_scale(positions_in_mini_batch: torch.Tensor, learnable_offset: torch.Tensor) -> torch.Tensor:
    """The TTT token-index factor s_i = max(1/(i+1) + offset_i, 0) for in-mini-batch index i."""
    base = 1.0 / (positions_in_mini_batch.to(learnable_offset.dtype) + 1.0)
    return torch.clamp_min(base + learnable_offset[positions_in_mini_batch], 0.0)


def mini_batch_gd_step(anchor: dict, pending: dict, grad: dict, lr: torch.Tensor, scale: torch.Tensor):
    """Mini-batch gradient descent, one token at a time (the primal form).

    All gradients of a mini-batch are taken at its starting weights θ₀ (the anchor):
        P_i = P_{i-1} + η_i ∇ℓ_i(θ₀),   θ_i = θ₀ − s_i P_i
    lr/scale broadcast against the parameters (shape [..., 1, 1]).
    """
    pending = {n: pending[n] + lr * grad[n] for n in grad}
    theta = {n: anchor[n] - scale * pending[n] for n in anchor}
    return theta, pending


# ============================================================== the families beyond TTT
# Same conventions: θ is a dict of per-head tensors [..., d_in, d_out] read as x @ W.


def matrix_memory(theta: dict, x: torch.Tensor) -> torch.Tensor:
    """f_S(x) = x S: the matrix memory of the delta rule (S: [d_k, d_v])."""
    return x @ theta["S"]


def deep_mlp_memory(theta: dict, x: torch.Tensor) -> torch.Tensor:
    """f(x) = W_L(GELU(… GELU(x W_1))) without biases (Titans' deep memory; depth 1 = a matrix)."""
    depth = len(theta)
    for i in range(1, depth + 1):
        x = x @ theta[f"W{i}"]
        if i < depth:
            x = gelu_tanh(x)
    return x


def swiglu_memory(theta: dict, x: torch.Tensor) -> torch.Tensor:
    """f(x) = (SiLU(x W0) ⊙ x W2) W1 (LaCT's fast weights; W0, W2: [d, d_h], W1: [d_h, d])."""
    return (F.silu(x @ theta["W0"]) * (x @ theta["W2"])) @ theta["W1"]


def l2_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """ℓ = ½ ‖pred − target‖², summed (so ∂ℓ/∂pred = pred − target)."""
    return 0.5 * (pred - target).pow(2).sum()


def dot_product_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """ℓ = −⟨pred, target⟩, summed (LaCT: its descent direction is the ascent on ⟨f(k), v⟩)."""
    return -(pred * target).sum()


def decay(theta: dict, alpha: torch.Tensor) -> dict:
    """Retention by a scalar gate: θ ← α θ (α broadcasts as [..., 1, 1])."""
    return {n: alpha * t for n, t in theta.items()}


def sgd_step(theta: dict, grad: dict, lr: torch.Tensor) -> dict:
    """θ ← θ − η g."""
    return {n: theta[n] - lr * grad[n] for n in theta}


def momentum_step(theta: dict, momentum: dict, grad: dict, lr, eta, alpha):
    """Titans: S ← η S − lr·g ("surprise" with momentum), θ ← (1 − α) θ + S (forgetting gate α)."""
    momentum = {n: eta * momentum[n] - lr * grad[n] for n in grad}
    theta = {n: (1 - alpha) * theta[n] + momentum[n] for n in theta}
    return theta, momentum


NS_COEFFICIENTS = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)


def newton_schulz(g: torch.Tensor, coefficients=NS_COEFFICIENTS, eps: float = 1e-7) -> torch.Tensor:
    """Muon's orthogonalisation of the last two dims: X ← a X + (b A + c A²) X with A = X Xᵀ, after
    scaling X to unit Frobenius norm, on the wide orientation (the schedule LaCT uses)."""
    tall = g.shape[-2] > g.shape[-1]
    x = g.transpose(-1, -2) if tall else g
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for a, b, c in coefficients:
        A = x @ x.transpose(-1, -2)
        x = a * x + (b * A + c * A @ A) @ x
    return x.transpose(-1, -2) if tall else x


def column_norms(w: torch.Tensor) -> torch.Tensor:
    """Norm over the input dim of x @ W (= LaCT's per-output-channel row norm of W in its layout)."""
    return w.norm(dim=-2, keepdim=True)


def weight_norm(theta: dict, target_norms: dict, eps: float = 1e-5) -> dict:
    """Retention by renormalisation: every output channel of W keeps the norm it had initially."""
    return {n: t / (column_norms(t) + eps) * target_norms[n] for n, t in theta.items()}


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / ‖x‖ over the last dim (q/k normalisation of the delta rule, Titans and LaCT)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def copy_param(param: torch.Tensor, value: torch.Tensor, init=None) -> None:
    """param ← value; through ``init.copy_`` (transformers' guarded initialisers) when given, so
    that weights loaded from a checkpoint are left alone."""
    if init is not None and hasattr(init, "copy_"):
        init.copy_(param, value.to(param.dtype))
    else:
        with torch.no_grad():
            param.copy_(value)


# ------------------------------------------------------------------------ a layer's recipe


def _keep_anchor(anchor, theta, gates):
    return anchor


def _no_chunk_end(anchor, theta, opt, gates):
    return theta, opt


@dataclass
class Recipe:
    """A memory layer as its four parts, for the generic token-by-token reference.

    inner_loss(θ, k_t, v_t, extra) → scalar   inner model + attentional bias of one token
    read(θ, q_t, extra) → o_t                   the output at the query
    token_step(anchor, θ, opt, grad, gates_t, i) → (θ, opt)   inner optimizer + retention
    chunk_end(anchor, θ, opt, gates_t) → (θ, opt)             what happens when a chunk completes
    grad_point(anchor, θ, gates_t) → θ'         where the gradient is taken (the chunk's anchor by
                                                default: "frozen gradients"; chunk 1 = online rule)
    ``extra`` holds per-head slow tensors ([B, H, ...]); gates_t are [B, H, 1, 1] per token.
    """

    inner_loss: Callable
    read: Callable
    token_step: Callable
    chunk_size: int = 1
    chunk_end: Callable = _no_chunk_end
    grad_point: Callable = _keep_anchor
    # for the inner-loop knobs (InnerKnobs): the gates that are learning rates (scaled by the
    # lr schedule, zeroed for a token without a training pair) and the retention gates with their
    # neutral value (applied once per token: sub-steps 2..K of ``inner_steps`` use the neutral value)
    lr_gates: tuple = ("lr",)
    retention_neutral: dict = field(default_factory=dict)
    # applied to each token's raw inner gradient before the knobs (e.g. Titans' soft norm clamp)
    grad_transform: Callable | None = None


@dataclass(frozen=True)
class InnerKnobs:
    """The inner loop's knobs (config fields ``inner_steps``, ``inner_grad_clip``, ``inner_init_pull``,
    ``inner_lr_schedule``, ``inner_loss``); the defaults leave a layer exactly as it is.

    steps:      K steps per token: online rules (delta rule) take K sub-steps with their own (k, v, β),
                each with the gradient at the weights after the previous one, retention once per token
                (DeltaProduct); frozen-gradient chunks (TTT, Titans) run K chains, step s's gradient at
                each token's own weights in chain s − 1 (common.reference.memory_scan_reference)
    grad_clip:  τ: each token's inner gradient, per layer (weight matrix with its bias), clipped to
                Frobenius norm ≤ τ: g ← g·min(1, τ/‖g‖)
    init_pull:  λ: the gradient gets λ(θ' − θ_init) (θ' where the gradient is taken, θ_init the
                layer's initial fast weights), i.e. the loss gets ½λ‖θ − θ_init‖²
    lr_decay:   η_t ← η_t/(1 + t·decay), t the token's position in its document
    loss:       None (the layer's own) | "ln_recon" | "mse" | "next_token" (token t trains on the
                pair (k_{t−1}, v_t): the target v_{t+1} of key k_t is used only from token t + 1 on)
    """

    steps: int = 1
    grad_clip: float | None = None
    init_pull: float = 0.0
    lr_decay: float = 0.0
    loss: str | None = None

    @property
    def next_token(self) -> bool:
        return self.loss == "next_token"

    @property
    def inputs_only(self) -> bool:
        """Only the schedule and next_token are on: they change the per-token inputs (lr gates, keys),
        so a layer's plain chunked scan runs unchanged on the changed inputs."""
        return self.steps == 1 and self.grad_clip is None and not self.init_pull and self.loss in (None, "next_token")

    @classmethod
    def from_config(cls, config) -> "InnerKnobs":
        return cls(steps=int(getattr(config, "inner_steps", 1) or 1), grad_clip=getattr(config, "inner_grad_clip", None),
                   init_pull=float(getattr(config, "inner_init_pull", 0.0) or 0.0),
                   lr_decay=float(getattr(config, "inner_lr_decay", 0.0) or 0.0), loss=getattr(config, "inner_loss", None))


# ------------------------------------------------------------------------ inner-loop knobs


def layer_groups(names) -> dict:
    """Fast weights grouped per layer for gradient clipping: "W{i}" with its bias "b{i}"; any other
    tensor (e.g. "S") is its own group."""
    groups: dict = {}
    for n in names:
        key = n[1:] if n[:1] in ("W", "b") and n[1:].isdigit() else n
        groups.setdefault(key, []).append(n)
    return groups


def clip_factor(norm: torch.Tensor, max_norm: float | None) -> torch.Tensor | float:
    """c = min(1, τ/‖g‖): scales a gradient of norm ‖g‖ to norm ≤ τ (1 when τ is None)."""
    if max_norm is None:
        return 1.0
    return torch.clamp(max_norm / norm.clamp_min(1e-12), max=1.0)


def clip_grad_per_layer(grad: dict, max_norm: float | None) -> dict:
    """Each layer's gradient (weight matrix and bias together) clipped to Frobenius norm ≤ τ."""
    if max_norm is None:
        return grad
    out = {}
    for names in layer_groups(grad).values():
        # (clamped: a zero gradient, e.g. next_token's first token, must not give sqrt′(0) = ∞ in backward)
        norm = torch.sqrt(sum(grad[n].pow(2).sum(dim=(-2, -1), keepdim=True) for n in names).clamp_min(1e-24))
        c = clip_factor(norm, max_norm)
        out.update({n: grad[n] * c for n in names})
    return out

