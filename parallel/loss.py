"""Loss on this rank's piece: vocab-parallel under TP, summed (not averaged) for DP × CP reduction.

Labels are *targets aligned with the logits* (position t holds the token to predict at t), so
the shift happens on the full sequence before slicing: :func:`causal_targets` then
:func:`cp_slice`. The model's own ``labels=`` path shifts inside the local piece, which is wrong
under CP (and the logits are vocab-sharded under TP), so ``parallelize`` rejects it.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .groups import ParallelDims


def causal_targets(input_ids: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """targets[:, t] = input_ids[:, t+1]; the last position is ignored."""
    return F.pad(input_ids[:, 1:], (0, 1), value=ignore_index)


def cp_slice(t: torch.Tensor, dims: ParallelDims, dim: int = 1) -> torch.Tensor:
    """This CP rank's contiguous piece of a full-sequence tensor."""
    n = t.shape[dim]
    if n % dims.cp:
        raise ValueError(f"sequence length {n} is not divisible by context parallel size cp={dims.cp}")
    return t.narrow(dim, dims.cp_rank * (n // dims.cp), n // dims.cp)


def token_losses(logits: torch.Tensor, labels: torch.Tensor, dims: ParallelDims, ignore_index: int = -100,
                 inplace: bool = False) -> torch.Tensor:
    """Per-token cross-entropy [B, T] (float32; 0 where the label is ``ignore_index``).

    logits: [B, T, V/tp] (vocab-sharded when tp > 1); labels: [B, T] targets. Under TP, megatron's
    ``vocab_parallel_cross_entropy`` is used; it overwrites its input to save memory, so the logits
    are cloned unless ``inplace=True``.
    """
    mask = labels != ignore_index
    target = labels.masked_fill(~mask, 0)
    if dims.tp > 1:
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        x = logits.float()
        if not inplace and x.data_ptr() == logits.data_ptr():
            x = x.clone()
        per_token = vocab_parallel_cross_entropy(x, target)
    else:
        per_token = F.cross_entropy(logits.flatten(0, -2).float(), target.flatten(), reduction="none")
        per_token = per_token.view_as(target)
    return per_token * mask


def parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, dims: ParallelDims,
                           ignore_index: int = -100, inplace: bool = False):
    """(Σ token losses, number of counted tokens) over this rank's piece (:func:`token_losses`).
    The trainer all-reduces both numbers over ``dims.dp_cp_group`` and divides."""
    return (token_losses(logits, labels, dims, ignore_index, inplace).sum(),
            (labels != ignore_index).sum())


def global_mean_loss(loss_sum: torch.Tensor, count: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """loss_sum / (token count over DP × CP): its gradient, summed over DP × CP, is the full
    batch's mean-loss gradient. (The count is all-reduced; the loss is not — each rank keeps
    the gradient of its own tokens.)"""
    count = count.detach().clone().to(torch.float64)
    if dims.dp_cp_group is not None and dims.dp * dims.cp > 1:
        dist.all_reduce(count, group=dims.dp_cp_group)
    return loss_sum / count.clamp_min(1).to(loss_sum.dtype)


@torch.no_grad()
def validation_loss(logits_fn: Callable[[dict], torch.Tensor], batches: Iterable[dict], dims: ParallelDims) -> dict:
    """Mean next-token loss over every labelled token of ``batches`` (labels −100 ignored) and its
    perplexity: :func:`parallel_cross_entropy`'s sums (vocab-parallel under TP), all-reduced over
    DP × CP so every rank gets the global value. ``logits_fn(batch)`` returns this rank's logits."""
    total = None
    for batch in batches:
        logits = logits_fn(batch)
        loss_sum, count = parallel_cross_entropy(logits, batch["labels"].to(logits.device), dims, inplace=True)
        sums = torch.stack([loss_sum.double(), count.double()])
        total = sums if total is None else total + sums
    if total is None:
        total = torch.zeros(2, dtype=torch.float64)
    if dims.dp_cp_group is not None and dims.dp * dims.cp > 1:
        dist.all_reduce(total, group=dims.dp_cp_group)
    loss_sum, tokens = total.tolist()
    loss = loss_sum / tokens if tokens else float("nan")
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)) if tokens else float("nan"), "tokens": int(tokens)}
