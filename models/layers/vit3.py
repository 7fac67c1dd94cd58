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
(``common.reference.memory_scan_reference``) with the whole image as one chunk: every token's gradient
at W⁰ by ``torch.func.grad``, summed, clipped and applied at the chunk end; every query is then read
with the final weights. Only torch is imported: this file is copied into exported HF folders.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..common.parts import copy_param
from ..common.state import LayerState
from ..ops.vit3.chunk import (CONV_TAPS, dwconv_apply, dwconv_grad, simplified_swiglu_memory, swiglu_grads,
                              vit3_inner_step)
from ..ops.vit3.naive import vit3_reference


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
