"""The inner-loop knobs of the delta rule (DeltaNet / Gated DeltaNet) as per-token inputs of its chunked
form (the rules: ``common/knobs.py``). Only torch is imported.
"""
from __future__ import annotations

import torch

from ...common.knobs import lr_schedule, next_token_pairs
from ...common.parts import InnerKnobs


def delta_knob_inputs(q, k, v, beta, log_alpha, knobs: InnerKnobs, position: int, prev_key):
    """(Gated) DeltaNet with the knobs as a plain gated delta rule on T·K sub-steps.

    q: [B, H, T, d]; k, v: [B, H, T, K, d]; beta: [B, H, T, K]; log_alpha: [B, H, T] or None.
    Returns (q, k, v, β, log α) of length T·K for ``delta_rule_chunked`` (read: every K-th output,
    see :func:`delta_read_last`) and the last key (for next_token)."""
    B, H, T, K, d = k.shape
    beta = lr_schedule(beta, position, knobs)
    last_key = None
    if knobs.next_token:
        k, (beta,), last_key = next_token_pairs(k, [beta], prev_key)
    la = torch.zeros_like(beta)
    if log_alpha is not None:
        la = torch.cat([log_alpha[..., None], la[..., 1:]], -1)  # retention once per token
    if knobs.init_pull:  # S_init = 0: the pull is a decay (module docstring)
        keep = 1 - beta * knobs.init_pull
        la, beta, v = la + torch.log(keep), beta / keep, v * keep[..., None]
    q_sub = torch.zeros(B, H, T, K, q.shape[-1], dtype=q.dtype, device=q.device)
    q_sub[:, :, :, -1] = q
    return (q_sub.flatten(2, 3), k.flatten(2, 3), v.flatten(2, 3), beta.flatten(2, 3), la.flatten(2, 3)), last_key


def delta_read_last(o: torch.Tensor, K: int) -> torch.Tensor:
    """The outputs of each token's last sub-step: [B, H, T·K, d] → [B, H, T, d]."""
    return o.unflatten(2, (o.shape[2] // K, K))[:, :, :, -1]
