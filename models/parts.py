"""The four parts of a memory layer (the Miras view), as plain functions on per-head tensors.

A memory layer keeps, per head, an *inner model* f_θ (fast weights θ). For every token it takes
an *inner optimizer* step on an *inner loss* ℓ(f_θ(k), v) under a *retention* rule:

    θ_t = retain(θ_{t-1}) − η_t · step(∇_θ ℓ(f_θ(k_t); v_t))        o_t = read(f_{θ_t}, q_t)

Everything here works on tensors with any leading batch dims (batch, heads, …); parameters are
dicts of tensors so that ``torch.func.grad`` can differentiate the loss w.r.t. them.
Only torch is imported: this file is copied into exported Hugging Face folders.
"""
from __future__ import annotations

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
