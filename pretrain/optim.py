"""AdamW parameter groups (which parameters get weight decay) and the learning-rate schedules.

Weight decay goes to the *matrices of the dense maps* only: q/k/v/o/gate projections, the
memory layer's lr gate, the MLP, and the causal convolutions (every parameter with ≥ 2 dims that is
not one of the exceptions below). No decay for
- biases and every norm's scale/shift (RMSNorm, LayerNorm, the per-head ``ttt_norm_*``);
- the embedding (and so the tied LM head): decay would shrink rare tokens' rows toward zero;
- a memory layer's own parameters — every direct parameter of a module that declares
  ``fast_weight_names`` (the memory layers): the initial fast weights θ₀ and the per-head
  gates, scales, norms and offsets beside them (TTT's ``token_idx_offset``/``ttt_norm_*``, LaCT's
  ``qk_scale``/``qk_offset``, Miras' ``ln_*``, ATLAS' ``poly_coef``). θ₀ is the inner learner's starting
  point, not a projection: the inner loop moves away from it on every sequence, and pulling it to
  zero would only make every sequence start from a worse inner model (the same choice as for
  Mamba's ``A_log``/``D``). Their projections are ``nn.Linear`` submodules and are decayed.
See docs/training.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

def _is_embedding(module: nn.Module) -> bool:
    return "Embedding" in type(module).__name__


def _is_norm(module: nn.Module) -> bool:
    return "Norm" in type(module).__name__


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """[{params: decayed, weight_decay}, {params: the rest, weight_decay: 0}] — each parameter once."""
    no_decay: set[int] = set()
    for module in model.modules():
        direct = dict(module.named_parameters(recurse=False))
        if _is_embedding(module) or _is_norm(module) or hasattr(module, "fast_weight_names"):
            no_decay.update(id(p) for p in direct.values())  # a memory layer's θ₀ and per-head parameters
            continue
        for name, p in direct.items():
            if p.ndim < 2 or name.endswith("bias"):
                no_decay.add(id(p))
    decay, rest, seen = [], [], set()
    for p in model.parameters():  # deduplicated: a tied weight appears once (as the embedding)
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (rest if id(p) in no_decay else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": rest, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def decay_parameter_names(model: nn.Module, weight_decay: float = 0.1) -> tuple[list[str], list[str]]:
    """(decayed names, not decayed names) — for tests and the docs."""
    groups = param_groups(model, weight_decay)
    ids = {id(p): g["name"] for g in groups for p in g["params"]}
    names = {"decay": [], "no_decay": []}
    seen = set()
    for n, p in model.named_parameters():
        if id(p) in ids and id(p) not in seen:
            seen.add(id(p))
            names[ids[id(p)]].append(n)
    return names["decay"], names["no_decay"]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float):
    """torch AdamW over the two groups (``foreach`` kernels; DeepSpeed wraps it for ZeRO)."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps)


@dataclass
class LRSchedule:
    """Multiplier of the peak learning rate at optimizer step ``s`` (0-based: before the first step, s = 0).

    - warmup: linear from 1/(warmup+1) to 1 over ``warmup`` steps (never exactly 0, so step 1 moves);
    - ``cosine``: then half a cosine from 1 down to ``min_ratio`` at ``total`` steps;
    - ``wsd`` (warmup-stable-decay): then flat at 1, and a linear decay to ``min_ratio`` over the
      last ``decay_fraction`` of the steps.
    The schedule is rebuilt from the configuration on resume (so ``--steps`` can be extended);
    the checkpoint restores only the scheduler's step count.
    """

    kind: str
    total: int
    warmup: int
    min_ratio: float = 0.1
    decay_fraction: float = 0.2

    def __call__(self, s: int) -> float:
        if s < self.warmup:
            return (s + 1) / (self.warmup + 1)
        if self.kind == "cosine":
            span = max(1, self.total - self.warmup)
            t = min(1.0, (s - self.warmup) / span)
            return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
        if self.kind == "wsd":
            decay_steps = max(1, round(self.decay_fraction * self.total))
            start = max(self.warmup, self.total - decay_steps)
            if s < start:
                return 1.0
            t = min(1.0, (s - start) / max(1, self.total - start))
            return 1.0 - (1 - self.min_ratio) * t
        raise ValueError(f"unknown schedule {self.kind!r}; expected cosine or wsd")


def build_scheduler(optimizer, schedule: LRSchedule):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def set_schedule(scheduler, schedule: LRSchedule, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float) -> None:
    """After a checkpoint restored the optimizer and scheduler: this configuration's schedule, peak
    rate and AdamW hyperparameters (so ``--steps`` can be extended and ``--allow-change lr`` takes
    effect), the current rate recomputed as LambdaLR computes it (bitwise the same when nothing changed)."""
    groups = scheduler.optimizer.param_groups
    scheduler.lr_lambdas = [schedule] * len(groups)
    scheduler.base_lrs = [lr] * len(groups)
    for g in groups:
        g.update(initial_lr=lr, betas=betas, eps=eps)
        if g.get("name") == "decay":
            g["weight_decay"] = weight_decay
    rates = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for g, rate in zip(groups, rates):
        g["lr"] = rate
    scheduler._last_lr = rates
