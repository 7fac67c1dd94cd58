"""ViT³, "Unlocking Test-Time Training in Vision" (Han et al. 2025, arXiv 2512.01643): the
test-time-training token mixer of a vision transformer (semantics of the authors' ``ttt_block.py``).

Non-causal: the inner model is trained by ONE gradient step on all N tokens' (k, v) pairs of the
image, then read at every query. Two inner modules run side by side:

1. a simplified SwiGLU per head (d = dim/H), f(x) = (x W1) ⊙ SiLU(x W2) (identity output layer);
2. a 3×3 depthwise convolution over one extra d-channel map (q2, k2, v2 on the h×w token grid).

Inner loss (mean over the N tokens, s = 9^{−1/2}, the "equivalent head dim" of a 3×3 kernel):

    ℓ(W) = −(s/N) Σ_n ⟨f_W(k_n), v_n⟩          ℓ₂(w) = −(s/N) Σ_p ⟨(k2 ⋆ w)_p, v2_p⟩

One step from the learned initial weights W⁰ (lr = 1), each gradient column-clipped:

    g = ∇ℓ(W⁰),  g ← g / (‖g‖ + 1)  (norm over the input dim; for the conv over the 3×3 taps)
    W' = W⁰ − lr·g                   (per image: W' is [B, H, d, d], w' is [B, d, 3, 3])

Readout: y = Linear_{dim+d→dim}([ (q W1') ⊙ SiLU(q W2')  ‖  q2 ⋆ w' ]).

With e_n = ∂ℓ/∂f_n = −(s/N) v_n, Z1 = K W1, Z2 = K W2 the gradients are sums over tokens:
g1 = Kᵀ(e ⊙ SiLU(Z2)), g2 = Kᵀ(e ⊙ Z1 ⊙ SiLU'(Z2)), g3 = k2 ⋆ e (correlation of keys and errors),
so distributed over tokens the step is exact with an all-reduce of (g1, g2, g3) before the clip
(:meth:`ViT3Layer.inner_grads` / :meth:`ViT3Layer.commit` are the two halves).

**State.** ``forward(x, state) -> (y, state)`` returns the trained fast weights (per image) as a
``LayerState`` (``weights``: W1, W2 [B, H, d, d], w3 [B, d, 3, 3]; ``position``: tokens trained on
so far). Passing it to the next call makes that call take its one step from those weights instead
of W⁰ (e.g. a second crop of the same image continues the memory of the first). The layer is not
causal, so there is no "one call = any split" identity: one call over N tokens is one step on all
of them; two calls over two halves are two steps. What splits exactly is the gradient (a sum).

The reference (:func:`vit3_reference`) runs the shared token-by-token loop
(``reference.memory_scan_reference``) with the whole image as one chunk: every token's gradient
at W⁰ by ``torch.func.grad``, summed, clipped and applied at the chunk end; every query is then read
with the final weights. Only torch is imported: this file is copied into exported HF folders.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .parts import Recipe, column_norms, copy_param, dot_product_loss
from .reference import memory_scan_reference
from .state import LayerState

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


def vit3_recipe(model_fn, num_tokens: int, scale: float, lr: float, clip_dims) -> Recipe:
    """One branch of ViT³ in the generic frame: the whole image is one chunk; each token adds its
    gradient at W⁰ (the chunk anchor) to a sum, and the chunk end takes the clipped step."""

    def inner_loss(theta, k_t, v_t, extra):
        return (scale / num_tokens) * dot_product_loss(model_fn(theta, k_t), v_t)

    def read(theta, q_t, extra):
        return model_fn(theta, q_t)

    def token_step(anchor, theta, opt, grad, gates, i):
        return theta, {"grad_sum": {n: opt["grad_sum"][n] + grad[n] for n in grad}}

    def chunk_end(anchor, theta, opt, gates):
        new = {n: anchor[n] - lr * clip_grad(opt["grad_sum"][n], clip_dims) for n in anchor}
        return new, {"grad_sum": {n: torch.zeros_like(g) for n, g in opt["grad_sum"].items()}}

    return Recipe(inner_loss, read, token_step, num_tokens, chunk_end)


def vit3_reference(weights: dict, q, k, v, q2, k2, v2, scale: float, lr: float = 1.0):
    """Token by token through ``memory_scan_reference``; returns (x1 [B, N, H·d], x2 [B, N, d], weights').

    weights: W1, W2 [B, H, d, d], w3 [B, d, 3, 3]; q, k, v: [B, H, N, d]; q2, k2, v2: [B, d, h, w]."""
    B, H, N, d = q.shape
    read = torch.func.vmap(torch.func.vmap(simplified_swiglu_memory))

    sw = {"W1": weights["W1"], "W2": weights["W2"]}
    opt = {"grad_sum": {n: torch.zeros_like(t) for n, t in sw.items()}}
    recipe = vit3_recipe(simplified_swiglu_memory, N, scale, lr, -2)
    _, sw, _, _ = memory_scan_reference(recipe, sw, None, opt, q, k, v, {}, {}, 0)
    x1 = read(sw, q).transpose(1, 2).reshape(B, N, H * d)

    cw = {"w3": weights["w3"].reshape(B, 1, d, CONV_TAPS)}
    opt = {"grad_sum": {"w3": torch.zeros_like(cw["w3"])}}
    kp, qp = unfold_patches(k2), unfold_patches(q2)  # [B, 1, N, d·9]: one "head", one patch per token
    vp = v2.flatten(2).transpose(1, 2)[:, None]  # [B, 1, N, d]
    recipe = vit3_recipe(dwconv_patch_memory, N, scale, lr, -1)
    _, cw, _, _ = memory_scan_reference(recipe, cw, None, opt, qp, kp, vp, {}, {}, 0)
    x2 = torch.func.vmap(torch.func.vmap(dwconv_patch_memory))(cw, qp)[:, 0]
    return x1, x2, {**sw, "w3": cw["w3"].reshape(B, d, 3, 3)}


# ------------------------------------------------------------------------------------ layer


def grid_of(num_tokens: int, grid) -> tuple[int, int]:
    """(h, w) of the token grid: ``grid`` if given, else the square root of N."""
    if grid is None:
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(f"{num_tokens} tokens are not a square grid: pass grid=(h, w)")
        return side, side
    h, w = int(grid[0]), int(grid[1])
    if h * w != num_tokens:
        raise ValueError(f"grid {h}x{w} does not hold {num_tokens} tokens")
    return h, w


class ViT3Layer(nn.Module):
    """The ViT³ token mixer: x [B, N, dim] on an h×w grid → (y [B, N, dim], LayerState).

    Slow weights: the qkv projection (dim → 3·dim + 3·d), the initial fast weights W1, W2
    [H, d, d] and w3 [d, 1, 3, 3] (trunc-normal 0.02, as the authors), the output projection.
    ``scan_impl="reference"`` runs :func:`vit3_reference` (slow; for tests)."""

    fast_weight_names = ("w1", "w2", "w3")  # the initial fast weights W⁰ (no weight decay in pretrain.optim)

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, inner_lr: float = 1.0,
                 scale: float | None = None, scan_impl: str = "chunk"):
        super().__init__()
        if num_heads <= 0 or dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if scan_impl not in ("chunk", "reference"):
            raise ValueError(f"unknown scan_impl {scan_impl!r}; expected 'chunk' or 'reference'")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        d = self.head_dim
        self.inner_lr = inner_lr
        self.scale = CONV_TAPS ** -0.5 if scale is None else scale
        self.scan_impl = scan_impl
        self.qkv = nn.Linear(dim, 3 * dim + 3 * d, bias=qkv_bias)
        self.w1 = nn.Parameter(torch.empty(num_heads, d, d))
        self.w2 = nn.Parameter(torch.empty(num_heads, d, d))
        self.w3 = nn.Parameter(torch.empty(d, 1, 3, 3))
        self.proj = nn.Linear(dim + d, dim)
        self.reset_memory_parameters()

    def reset_memory_parameters(self, init=None) -> None:
        """Initial fast weights: trunc-normal(0, 0.02) (through transformers' guarded init if given)."""
        for p in (getattr(self, n) for n in self.fast_weight_names):
            if init is not None and hasattr(init, "trunc_normal_"):
                init.trunc_normal_(p, std=0.02)
            else:
                copy_param(p, nn.init.trunc_normal_(torch.empty_like(p), std=0.02))

    def initial_weights(self, batch: int, dtype) -> dict:
        return {"W1": self.w1.to(dtype).expand(batch, -1, -1, -1), "W2": self.w2.to(dtype).expand(batch, -1, -1, -1),
                "w3": self.w3.to(dtype).reshape(1, self.head_dim, 3, 3).expand(batch, -1, -1, -1)}

    def project(self, x: torch.Tensor, grid):
        """x → (q, k, v [B, H, N, d], q2, k2, v2 [B, d, h, w]) in at least float32."""
        B, N, C = x.shape
        h, w = grid_of(N, grid)
        d, H = self.head_dim, self.num_heads
        dtype = torch.promote_types(x.dtype, torch.float32)
        q, k, v, q2, k2, v2 = self.qkv(x).to(dtype).split([C, C, C, d, d, d], dim=-1)
        heads = [t.reshape(B, N, H, d).transpose(1, 2) for t in (q, k, v)]
        maps = [t.transpose(1, 2).reshape(B, d, h, w) for t in (q2, k2, v2)]
        return (*heads, *maps)

    def inner_grads(self, weights: dict, k, v, k2, v2, num_tokens: int | None = None) -> dict:
        """The unclipped gradient sums (g1, g2, g3) of these tokens (sum them over pieces of an image)."""
        n = k.shape[2] if num_tokens is None else num_tokens
        g1, g2 = swiglu_grads(weights["W1"], weights["W2"], k, v, self.scale, n)
        return {"W1": g1, "W2": g2, "w3": dwconv_grad(k2, v2, self.scale, n)}

    def commit(self, weights: dict, grads: dict) -> dict:
        return vit3_inner_step(weights, grads, self.inner_lr)

    def read(self, weights: dict, q, q2) -> torch.Tensor:
        """[(q W1') ⊙ SiLU(q W2') ‖ q2 ⋆ w'] → [B, N, dim + d] (before the output projection)."""
        B, H, N, d = q.shape
        x1 = simplified_swiglu_memory(weights, q).transpose(1, 2).reshape(B, N, H * d)
        x2 = dwconv_apply(q2, weights["w3"]).flatten(2).transpose(1, 2)
        return torch.cat([x1, x2], dim=-1)

    def forward(self, x: torch.Tensor, state: LayerState | None = None, grid=None):
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"expected x of shape [batch, tokens, {self.dim}], got {tuple(x.shape)}")
        q, k, v, q2, k2, v2 = self.project(x, grid)
        B, N = x.shape[:2]
        if state is None:
            weights, position = self.initial_weights(B, q.dtype), 0
        else:
            weights, position = {n: t.to(q.dtype) for n, t in state.weights.items()}, state.position
        if self.scan_impl == "reference":
            x1, x2, new = vit3_reference(weights, q, k, v, q2, k2, v2, self.scale, self.inner_lr)
            out = torch.cat([x1, x2], dim=-1)
        else:
            new = self.commit(weights, self.inner_grads(weights, k, v, k2, v2))
            out = self.read(new, q, q2)
        y = self.proj(out.to(x.dtype))
        return y, LayerState(weights=new, position=position + N)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, inner_lr={self.inner_lr}, scale={self.scale:.4f}"
