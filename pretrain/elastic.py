"""Elastic resume: a checkpoint written by one layout (TP × CP × DP, ZeRO stage) continued by another.

DeepSpeed reloads its own files only into the layout that wrote them (its ZeRO partitions are
flat slices over the DP × CP group). When the layout differs, :func:`load_engine` reads the
checkpoint here instead, on every rank and without a process group:

1. the fp32 master weights *and* the Adam moments are merged to full single-device tensors —
   the ZeRO-1/2/3 partitions with the merge of ``deepspeed.utils.zero_to_fp32`` (run once per
   state: weights, ``exp_avg``, ``exp_avg_sq``), TP shards with the rules of ``parallel.tensor``
   (:func:`parallel.tensor.tp_layout` / ``unshard``), ZeRO-0 from the torch optimizer's state;
2. each parameter gets this rank's TP shard of them (``shard_of``) and is written into the new
   engine's partitions with DeepSpeed's tensor-fragment API (``safe_set_full_fp32_param`` /
   ``safe_set_full_optimizer_state``), the Adam step count beside them;
3. the LR scheduler, DeepSpeed's step counters and the gradient-clipping state follow.

The global batch stays the run's (``--global-batch-size``; gradient accumulation is derived for
the new DP size by :func:`resolve_batch`) and the data position is stored as global samples
consumed (data_pipeline/sampler.py), so the run continues with exactly the samples an
uninterrupted run would take next. See docs/training.md ("Elastic resume").
"""
from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrain.config import ConfigError, TrainConfig

STATES = ("fp32", "exp_avg", "exp_avg_sq")
_NUMBER = re.compile(r"(\d+)")


@dataclass(frozen=True)
class Layout:
    """How a run was split: sizes and the ZeRO stage."""

    tp: int
    cp: int
    dp: int
    zero_stage: int

    def __str__(self) -> str:
        return f"TP {self.tp} × CP {self.cp} × DP {self.dp}, ZeRO {self.zero_stage}"


def saved_layout(trainer_state: dict, manifest: dict) -> Layout:
    cfg = trainer_state.get("config", {})
    tp, cp = int(cfg.get("tp", 1)), int(cfg.get("cp", 1))
    world = int(manifest.get("world_size", tp * cp))
    return Layout(tp, cp, world // (tp * cp), int(cfg.get("zero_stage", 1)))


# ------------------------------------------------------------------------------- the global batch
def resolve_batch(cfg: TrainConfig, dp: int, saved: dict | None, saved_dp: int | None = None) -> str | None:
    """Sets ``cfg.global_batch_size`` and ``cfg.grad_accum`` for ``dp`` data-parallel ranks.

    The global batch is the run's: the one given, else the one recorded by the checkpoint being
    resumed, else ``micro_batch × grad_accum × dp`` (recorded at the first start). Returns a
    line to print when a resume changes the accumulation, else None."""
    recorded = int((saved or {}).get("global_batch_size") or 0)
    if saved and not recorded and saved_dp:  # a checkpoint from before --global-batch-size: its batch was this
        recorded = int(saved["micro_batch"]) * int(saved["grad_accum"]) * saved_dp
    if cfg.global_batch_size and recorded and cfg.global_batch_size != recorded:
        raise ConfigError(f"--global-batch-size {cfg.global_batch_size} differs from the run's {recorded} "
                          "(recorded in its checkpoint; the global batch stays fixed across resumes)")
    gbs = cfg.global_batch_size or recorded or cfg.micro_batch * cfg.grad_accum * dp
    per_pass = cfg.micro_batch * dp
    if gbs % per_pass:
        raise ConfigError(f"global batch {gbs} is not divisible by micro-batch {cfg.micro_batch} × DP {dp} = "
                          f"{per_pass}: choose a --micro-batch (or number of processes) that divides it")
    accum = gbs // per_pass
    note = None
    if saved and int(saved.get("grad_accum", accum)) != accum:
        note = (f"global batch {gbs} kept: gradient accumulation {saved.get('grad_accum')} → {accum} "
                f"(micro-batch {cfg.micro_batch} × DP {dp})")
    cfg.global_batch_size, cfg.grad_accum = gbs, accum
    return note


def check_streaming(cfg: TrainConfig, saved: dict, old: Layout, new: Layout) -> None:
    """``--reset never`` streams micro_batch × DP rows, each continuing its own text: another
    layout must keep that number (e.g. DP 4 → 2 with twice the micro-batch)."""
    from pretrain.config import reset_policy

    rows = int(saved["micro_batch"]) * old.dp
    if reset_policy(cfg.reset)[0] == "never" and rows != cfg.micro_batch * new.dp:
        hint = f"use --micro-batch {rows // new.dp}" if rows % new.dp == 0 else "use a DP size that divides it"
        raise ConfigError(f"--reset never streams {rows} rows (micro-batch × DP) each continuing its own text; this "
                          f"layout would stream {cfg.micro_batch * new.dp}: {hint}")


# ---------------------------------------------------------------------------- reading full states
def _load(path: Path) -> dict:
    """A DeepSpeed file, memory-mapped, through the checkpoint allow-list (no arbitrary pickle)."""
    from pretrain.checkpoint import CheckpointError
    from pretrain.safe_files import UnsafeFileError, torch_load

    try:
        return torch_load(path, mmap=True)
    except UnsafeFileError as exc:
        raise CheckpointError(str(exc)) from None


def _natural(path: Path):
    return [int(t) if t.isdigit() else t for t in _NUMBER.split(path.name)]


def _zero_full(folder: Path, tp_rank: int, stage: int) -> tuple[dict, float]:
    """{state: {name: full tensor of this TP rank}} and the Adam step, from ZeRO-1/2/3 partitions."""
    from deepspeed.utils import zero_to_fp32 as z

    mp = f"mp_rank_{tp_rank:02d}"
    model_files = sorted(folder.glob(f"*{mp}_model_states.pt"), key=_natural)
    optim_files = sorted(folder.glob(f"*{mp}_optim_states.pt"), key=_natural)
    models = [_model_state(_load(f)) for f in model_files]
    optims = [_load(f)["optimizer_state_dict"] for f in optim_files]
    if stage <= 2:
        flat_key, inner = "single_partition_of_fp32_groups", "base_optimizer_state"
    else:
        flat_key, inner = "fp32_flat_groups", "optimizer_state_dict"
    world = len(optims)
    out = {}
    for key in STATES:
        groups = [o[flat_key] if key == "fp32" else [o[inner]["state"][i][key] for i in range(len(o[flat_key]))]
                  for o in optims]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its progress
            if stage <= 2:
                sd = z._get_fp32_state_dict_from_zero2_checkpoint(world, groups, models, False,
                                                                  optims[0].get("param_alignment_paddings"))
            else:
                sd = z.to_torch_tensor(z._get_fp32_state_dict_from_zero3_checkpoint(world, groups, models, False))
        out[key] = {n: t.clone() for n, t in sd.items()}
    step = float(optims[0][inner]["state"][0]["step"])
    return out, step


def _model_state(sd: dict):
    """zero_to_fp32's summary of a module-states file (what its ``parse_model_states`` builds
    from a file it loads with ``weights_only=False``)."""
    from deepspeed.utils.zero_to_fp32 import zero_model_state

    names = set(sd.get("buffer_names") or ())
    return zero_model_state(buffers={k: v.float() if v.is_floating_point() else v
                                     for k, v in sd["module"].items() if k in names},
                            param_shapes=sd["param_shapes"], shared_params=list(sd["shared_params"].items()),
                            ds_version=sd.get("ds_version"), frozen_param_shapes=sd.get("frozen_param_shapes"),
                            frozen_param_fragments=sd.get("frozen_param_fragments"))


def _zero0_full(folder: Path, tp_rank: int, names: list[str]) -> tuple[dict, float]:
    """The same from a ZeRO-0 checkpoint: the module and the torch optimizer's state (its
    parameter indices follow ``names``, the optimizer's parameter order)."""
    sd = _load(folder / f"mp_rank_{tp_rank:02d}_model_states.pt")
    state = sd["optimizer"]["state"]
    order = [i for g in sd["optimizer"]["param_groups"] for i in g["params"]]
    out = {"fp32": dict(sd["module"]), "exp_avg": {}, "exp_avg_sq": {}}
    step = 0.0
    for i, name in zip(order, names):
        if i in state:
            out["exp_avg"][name], out["exp_avg_sq"][name] = state[i]["exp_avg"], state[i]["exp_avg_sq"]
            step = float(state[i]["step"])
    return out, step


def full_state(folder: Path, layout: Layout, mcfg) -> tuple[dict, float, dict]:
    """({state: {single-device name: full tensor}}, Adam step, the first module-states file)."""
    from models import MemoryLMForCausalLM
    from parallel.tensor import tp_layout, unshard
    from pretrain.optim import param_groups

    with torch.device("meta"):
        ref = MemoryLMForCausalLM(mcfg)
    names_of = {id(p): n for n, p in ref.named_parameters()}  # a tied weight under its first name
    order = [names_of[id(p)] for g in param_groups(ref, 0.1) for p in g["params"]]
    every = {n: names_of[id(p)] for n, p in ref.named_parameters(remove_duplicate=False)}  # name → first name
    per_rank = [_zero0_full(folder, t, order) if layout.zero_stage == 0 else _zero_full(folder, t, layout.zero_stage)
                for t in range(layout.tp)]
    step = per_rank[0][1]
    shards = {}
    if layout.tp > 1:
        with torch.device("meta"):
            shards = tp_layout(MemoryLMForCausalLM(mcfg), layout.tp)

    def merged(key: str, name: str) -> torch.Tensor:
        parts = [states[key].get(name, states[key].get(every[name])) for states, _ in per_rank]
        if any(t is None for t in parts):
            from pretrain.checkpoint import CheckpointError

            raise CheckpointError(f"cannot load checkpoint {folder}: it has no {key} of {name}")
        return unshard(parts, *shards[name]) if name in shards else parts[0]

    full = {key: {name: merged(key, name) for name in every} for key in STATES}
    first = sorted(folder.glob("*mp_rank_00_model_states.pt"), key=_natural)[0]
    return full, step, _load(first)


# ---------------------------------------------------------------------------- writing into an engine
def _init_adam_state(engine, step: float) -> None:
    """Zero Adam moments (filled in below) on the engine's own flat partitions, at ``step``."""
    opt = engine.optimizer
    flats = getattr(opt, "single_partition_of_fp32_groups", None) or getattr(opt, "fp32_partitioned_groups_flat", None)
    if flats is None:
        return
    for flat in flats:
        opt.optimizer.state[flat] = {"step": torch.tensor(step, dtype=torch.float32),
                                     "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2: link each parameter's fragment
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def load_engine(engine, folder: Path, saved: Layout, dims, zero_stage: int, mcfg) -> Path:
    """Writes the checkpoint's weights, Adam state and schedule into ``engine`` (any layout)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    from models import MemoryLMForCausalLM
    from parallel.tensor import shard_of, tp_layout
    from pretrain.checkpoint import CheckpointError

    full, step, first = full_state(folder, saved, mcfg)
    shards = {}
    if dims.tp > 1:
        with torch.device("meta"):
            shards = tp_layout(MemoryLMForCausalLM(mcfg), dims.tp)
    opt = engine.optimizer
    if hasattr(opt, "checkpoint_event_prologue"):  # ZeRO-3: every parameter back to its partition
        opt.checkpoint_event_prologue()
    _init_adam_state(engine, step)
    adam = opt if isinstance(opt, torch.optim.Optimizer) else getattr(opt, "optimizer", opt)  # ZeRO-0
    for name, p in engine.module.named_parameters():
        if name not in full["fp32"]:
            raise CheckpointError(f"cannot load checkpoint {folder}: it has no parameter {name}")
        values = {}
        for key in STATES:
            t = full[key][name]
            if name in shards:
                t = shard_of(t, dims.tp, dims.tp_rank, *shards[name])
            values[key] = t.to(p.device, torch.float32).contiguous()
        if zero_stage == 0:
            p.data.copy_(values["fp32"].view_as(p))
            adam.state[p] = {"step": torch.tensor(step, dtype=torch.float32),
                             "exp_avg": values["exp_avg"].view_as(p).clone(),
                             "exp_avg_sq": values["exp_avg_sq"].view_as(p).clone()}
            continue
        safe_set_full_fp32_param(p, values["fp32"])
        safe_set_full_optimizer_state(p, values["exp_avg"], "exp_avg")
        safe_set_full_optimizer_state(p, values["exp_avg_sq"], "exp_avg_sq")
    if hasattr(opt, "update_lp_params"):  # ZeRO-1/2: the module's weights from the fp32 partitions
        opt.update_lp_params()
    elif hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3: the same, then re-gather the persistent ones
        for i in range(len(opt.fp32_partitioned_groups_flat)):
            opt._reassign_or_swap_out_partitioned_parameters(i)
        opt.checkpoint_event_epilogue()
    sched = engine.lr_scheduler
    if sched is not None and first.get("lr_scheduler") is not None:
        sched.load_state_dict(first["lr_scheduler"])
        lrs = [peak * f(sched.last_epoch) for peak, f in zip(sched.base_lrs, sched.lr_lambdas)]
        for group, lr in zip(sched.optimizer.param_groups, lrs):  # what DeepSpeed's optimizer state would restore
            group["lr"] = lr
        sched._last_lr = lrs
    engine.global_steps = int(first.get("global_steps", step))
    engine.skipped_steps = int(first.get("skipped_steps", 0))
    engine.global_samples = engine.global_steps * engine.train_batch_size()
    return folder
