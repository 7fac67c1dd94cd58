"""ViT³ token by token: the recipe for ``memory_scan_reference``, the definition ``ops/vit3/chunk.py`` is
held to. Only torch is imported.
"""
from __future__ import annotations

import torch

from ...common.parts import Recipe, dot_product_loss
from ...common.reference import memory_scan_reference
from .chunk import CONV_TAPS, clip_grad, dwconv_patch_memory, simplified_swiglu_memory, unfold_patches


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
