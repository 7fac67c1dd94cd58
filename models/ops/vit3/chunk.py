"""ViT³'s inner step over the whole image in closed form: the simplified SwiGLU and depthwise-conv memories,
their hand-derived gradients and the update (the equations: ``layers/vit3.py``). Only torch is imported.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


CONV_TAPS = 9  # 3×3 kernel


# ------------------------------------------------------------------------------ inner models


def simplified_swiglu_memory(theta: dict, x: torch.Tensor) -> torch.Tensor:
    """f(x) = (x W1) ⊙ SiLU(x W2) (a SwiGLU whose output layer is the identity)."""
    return (x @ theta["W1"]) * F.silu(x @ theta["W2"])


def dwconv_patch_memory(theta: dict, patch: torch.Tensor) -> torch.Tensor:
    """The 3×3 depthwise conv at one pixel, from its unfolded neighbourhood patch [.., d·9]:
    f(patch)_c = Σ_δ w[c, δ] patch[9c + δ] (w: [d, 9], taps in row-major (dy, dx) order)."""
    w3 = theta["w3"]
    return (patch.unflatten(-1, w3.shape[-2:]) * w3).sum(-1)


def clip_grad(g: torch.Tensor, dims) -> torch.Tensor:
    """ViT³'s stability clip g / (‖g‖ + 1), the norm over ``dims`` (kept)."""
    return g / (g.norm(dim=dims, keepdim=True) + 1.0)


# ------------------------------------------------------------------------ fast batched form


def swiglu_grads(W1, W2, k, v, scale: float, num_tokens: int):
    """(g1, g2): ∇ of −(s/N) Σ_n ⟨f(k_n), v_n⟩ at (W1, W2), summed over the given tokens.

    k, v: [B, H, n, d]; W1, W2: [B or 1, H, d, d]. ``num_tokens`` is N of the whole image (a piece's
    partial sums then add up to the full gradient)."""
    z1, z2 = k @ W1, k @ W2
    sig = torch.sigmoid(z2)
    e = v * (-scale / num_tokens)
    kt = k.transpose(-1, -2)
    g1 = kt @ (e * z2 * sig)
    g2 = kt @ (e * z1 * (sig * (1.0 + z2 * (1.0 - sig))))
    return g1, g2


def dwconv_grad(k2, v2, scale: float, num_tokens: int):
    """g3[b, c, δ] = Σ_p k2[b, c, p + δ] e[b, c, p], e = −(s/N) v2: the correlation of the keys with
    the errors, as one grouped conv (zero padding as the forward conv). k2, v2: [B, d, h, w] → [B, d, 3, 3]."""
    B, d, h, w = k2.shape
    e = v2 * (-scale / num_tokens)
    g = F.conv2d(k2.reshape(1, B * d, h, w), e.reshape(B * d, 1, h, w), padding=1, groups=B * d)
    return g.reshape(B, d, 3, 3)


def dwconv_apply(q2, w3):
    """Per-image depthwise 3×3 conv (zero padding): q2 [B, d, h, w], w3 [B, d, 3, 3] → [B, d, h, w]."""
    B, d, h, w = q2.shape
    return F.conv2d(q2.reshape(1, B * d, h, w), w3.reshape(B * d, 1, 3, 3), padding=1, groups=B * d).reshape(B, d, h, w)


def vit3_inner_step(weights: dict, grads: dict, lr: float) -> dict:
    """W' = W − lr · clip(g): the SwiGLU matrices clipped per output column, the conv per channel."""
    return {
        "W1": weights["W1"] - lr * clip_grad(grads["W1"], -2),
        "W2": weights["W2"] - lr * clip_grad(grads["W2"], -2),
        "w3": weights["w3"] - lr * clip_grad(grads["w3"], (-2, -1)),
    }


# --------------------------------------------------------------------------------- reference


def unfold_patches(x2: torch.Tensor) -> torch.Tensor:
    """[B, d, h, w] → [B, 1, h·w, d·9]: every pixel's zero-padded 3×3 neighbourhood, flattened."""
    B, d, h, w = x2.shape
    p = F.unfold(x2, 3, padding=1).reshape(B, d, CONV_TAPS, h * w)
    return p.permute(0, 3, 1, 2).reshape(B, 1, h * w, d * CONV_TAPS)
