"""The divergence guard: non-finite steps are skipped and counted, loss spikes are flagged.

Every step all ranks agree (one all-reduce over the whole world) on whether any rank saw a
non-finite loss or gradient norm. Such a step is skipped: DeepSpeed's ZeRO 1–3 optimizers drop
an update whose gradients are non-finite (their own global check), zero the gradients and leave
the LR schedule where it was; under ZeRO 0, which has no such check, :func:`skip_optimizer_step`
makes ``engine.step()`` take the same path. The data of a skipped step is consumed (as in
Megatron-LM), so a resume continues exactly. After ``max_bad_steps`` consecutive skipped steps
the run stops with :class:`TrainingDiverged` and saves nothing: the last checkpoint stays the
last good one.
"""
from __future__ import annotations

import contextlib
import math
from collections import deque

import torch
import torch.distributed as dist

LOSS, GRAD = 1, 2  # what a rank saw: bits of its entry in the all-reduced flags


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps; printed as one error line."""


def agree_on_flags(code: int, device) -> list[int]:
    """Every rank's ``code`` (0 = fine), on every rank: one all-reduce of a world-sized vector."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    flags = torch.zeros(world, dtype=torch.int32, device=device)
    flags[rank] = code
    if world > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags.tolist()


def describe(flags: list[int]) -> str:
    """'non-finite loss on rank 0, 1; non-finite gradient norm on rank 0' from agreed flags."""
    parts = []
    for bit, what in ((LOSS, "loss"), (GRAD, "gradient norm")):
        ranks = [str(r) for r, f in enumerate(flags) if f & bit]
        if ranks:
            parts.append(f"non-finite {what} on rank {', '.join(ranks)}")
    return "; ".join(parts) or "non-finite gradients (DeepSpeed skipped the update)"


@contextlib.contextmanager
def skip_optimizer_step(engine, skip: bool):
    """ZeRO 0: make the next boundary ``engine.step()`` skip the update the way DeepSpeed skips an
    overflow (gradients zeroed, LR schedule not advanced, ``was_step_applied()`` false). ZeRO 1–3
    optimizers see the non-finite gradients themselves."""
    opt = engine.optimizer
    if not skip or hasattr(opt, "overflow"):
        yield
        return
    opt.step = lambda *args, **kwargs: None
    opt.overflow = True
    try:
        yield
    finally:
        del opt.step, opt.overflow


class DivergenceGuard:
    """Counts consecutive bad (skipped) steps; raises :class:`TrainingDiverged` at ``max_bad``."""

    def __init__(self, max_bad: int, announce: bool = True):
        self.max_bad, self.announce, self.consecutive, self.total = max_bad, announce, 0, 0

    def update(self, step: int, bad: bool, loss: float, grad_norm: float, why: str) -> None:
        if not bad:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        if self.announce:
            print(f"warning: step {step} skipped ({why}; loss {loss}, grad norm {grad_norm}); "
                  f"{self.consecutive}/{self.max_bad} in a row", flush=True)
        if self.consecutive >= self.max_bad:
            raise TrainingDiverged(
                f"training diverged: {self.consecutive} consecutive non-finite steps, the last at step {step} "
                f"({why}; loss {loss}, grad norm {grad_norm}); nothing was saved, the last checkpoint is the last "
                "good one (lower --lr, or raise --max-bad-steps)")


class SpikeDetector:
    """OLMo-style: a loss above mean + k·std of the last ``window`` good losses is a spike (checked
    once the window is full)."""

    def __init__(self, k: float, window: int):
        self.k, self.losses = k, deque(maxlen=window)

    def is_spike(self, loss: float) -> bool:
        if not math.isfinite(loss) or len(self.losses) < self.losses.maxlen:
            return False
        t = torch.tensor(list(self.losses), dtype=torch.float64)
        return loss > float(t.mean() + self.k * t.std())

    def add(self, loss: float) -> None:
        if math.isfinite(loss):
            self.losses.append(loss)

    def state_dict(self) -> list[float]:
        return list(self.losses)

    def load_state_dict(self, losses: list[float]) -> None:
        self.losses.extend(losses)


def weights_finite(engine) -> bool:
    """Whether every parameter is finite on every rank (this rank's ZeRO-3 partition, or the full tensor)."""
    ok = torch.ones((), dtype=torch.int32, device=engine.device)
    for p in engine.module.parameters():
        t = p.ds_tensor if hasattr(p, "ds_tensor") else p
        if t.numel() and not torch.isfinite(t.detach()).all():
            ok.zero_()
            break
    if dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())
