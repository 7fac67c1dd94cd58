"""Validation loss and perplexity over a validation loader (token-weighted, distributed-aware)."""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from .synthetic import IGNORE_INDEX


@torch.no_grad()
def validation_loss(logits_fn: Callable[[dict], torch.Tensor], batches: Iterable[dict],
                    group: "torch.distributed.ProcessGroup | None" = None) -> dict:
    """Mean next-token cross-entropy over every labelled token of ``batches``, and its perplexity.

    ``logits_fn(batch)`` returns logits ``[B, T, V]`` for the batch (move it to the device
    there). Labels equal to -100 are ignored. With ``group`` (the ranks that hold different
    tokens: DP × CP) the sums are all-reduced, so every rank gets the global value.
    """
    total = torch.zeros(2, dtype=torch.float64)
    for batch in batches:
        logits = logits_fn(batch).float()
        labels = batch["labels"].to(logits.device)
        loss_sum = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        total += torch.stack([loss_sum.double().cpu(), (labels != IGNORE_INDEX).sum().double().cpu()])
    if group is not None:
        import torch.distributed as dist

        backend_device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
        total = total.to(backend_device)
        dist.all_reduce(total, group=group)
        total = total.cpu()
    loss_sum, tokens = total.tolist()
    loss = loss_sum / tokens if tokens else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if tokens else float("nan"), "tokens": int(tokens)}
