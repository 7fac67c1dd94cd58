"""Titans token by token: the recipe for ``memory_scan_reference`` and the decay products by a loop (the
definitions ``ops/titans/chunk.py`` is held to). Only torch is imported.
"""
from __future__ import annotations

import torch

from ...common.backprop import soft_clamp_factor
from ...common.parts import Recipe, deep_mlp_memory, l2_loss, momentum_step
from ...common.reference import memory_scan_reference


def decay_products_reference(gates: torch.Tensor) -> torch.Tensor:
    """:func:`decay_products` from its definition, one product per entry (the reference)."""
    n = gates.shape[-1]
    rows = []
    for t in range(n):
        rows.append(torch.stack([torch.prod(gates[..., j + 1:t + 1], -1) if j <= t else torch.zeros_like(gates[..., 0])
                                 for j in range(n)], -1))
    return torch.stack(rows, -2)


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
