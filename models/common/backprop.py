"""The deep MLP memory's per-token backward (Titans, TNT, Hope, Miras, ATLAS): layer inputs X_l and errors
Δ_l of ½‖M(k) − v‖², so that each token's gradient is the outer product X_lᵀΔ_l. Only torch is imported.
"""
from __future__ import annotations

import torch

from .parts import gelu_tanh


_SQRT_2_PI = (2.0 / 3.141592653589793) ** 0.5


def gelu_tanh_grad(x: torch.Tensor) -> torch.Tensor:
    """d/dx of the tanh GELU with the exact √(2/π) (common.parts.gelu_tanh_grad keeps TTT's rounded one)."""
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
