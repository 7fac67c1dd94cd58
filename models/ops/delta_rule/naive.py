"""The delta rule token by token (DeltaNet, Gated DeltaNet): the recipe for ``memory_scan_reference``, the
definition ``ops/delta_rule/chunk.py`` is held to. Only torch is imported.
"""
from __future__ import annotations

import torch

from ...common.parts import Recipe, decay, l2_loss, matrix_memory, sgd_step
from ...common.reference import memory_scan_reference


def delta_rule_recipe() -> Recipe:
    """The delta rule in the generic frame: gradient taken after retention (α S), one GD step of β."""

    def inner_loss(theta, k_t, v_t, extra):
        return l2_loss(matrix_memory(theta, k_t), v_t)

    def read(theta, q_t, extra):
        return matrix_memory(theta, q_t)

    def grad_point(anchor, theta, gates):
        return decay(theta, gates["alpha"])

    def token_step(anchor, theta, opt, grad, gates, i):
        return sgd_step(decay(theta, gates["alpha"]), grad, gates["beta"]), opt

    return Recipe(inner_loss, read, token_step, chunk_size=1, grad_point=grad_point, lr_gates=("beta",),
                  retention_neutral={"alpha": 1.0})


def delta_rule_reference(q, k, v, beta, log_alpha, S):
    """Token-by-token delta rule through :func:`common.reference.memory_scan_reference`."""
    alpha = torch.ones_like(beta) if log_alpha is None else log_alpha.exp()
    o, weights, _, _ = memory_scan_reference(delta_rule_recipe(), {"S": S}, None, {}, q, k, v,
                                             {"alpha": alpha, "beta": beta}, {}, 0)
    return o, weights["S"]
