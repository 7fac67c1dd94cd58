"""Pretrain a memory-layer language model: build → parallelize → deepspeed.initialize → steps.

    python -m pretrain.train --model tiny --data default --out runs/tiny --steps 200
    torchrun --nproc-per-node 4 -m pretrain.train --tp 2 --cp 2 ...
    deepspeed pretrain/train.py --zero-stage 3 ...

Re-running the same command resumes from ``RUN_DIR/checkpoints/latest``. SIGTERM/SIGUSR1 save
a checkpoint and exit 0 (Slurm's pre-timeout signal). Every step appends one JSON line to
``RUN_DIR/metrics.jsonl``; tensorboard events go to ``RUN_DIR/tensorboard``.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):  # `deepspeed pretrain/train.py`: import the package, not its files as top-level modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
import torch.distributed as dist

from pretrain import checkpoint, elastic, fp8, guard
from pretrain.config import (CONFIG_DIR, ConfigError, TrainConfig, check_resume_settings, parse_config,
                            read_deepspeed_json, reset_policy)
from pretrain.distributed import DeepSpeedMPU, ensure_env
from pretrain.metrics import MetricsLogger, flops_per_token, info, memory_stats, peak_flops
from pretrain.optim import LRSchedule, build_optimizer, build_scheduler, set_schedule


VOCAB_MULTIPLE = 128  # embedding rows are padded to this (vocab-parallel shards stay equal for TP ≤ 128)


# ----------------------------------------------------------------------------------- building
def build_model_config(cfg: TrainConfig):
    """The model's configuration from a preset name or an HF folder (checked before any process starts)."""
    import models  # noqa: F401  (registers the Auto classes)
    from transformers import AutoConfig

    from models import PRESETS, preset_config

    try:
        if cfg.model in PRESETS:
            mcfg = preset_config(cfg.model)
        elif Path(cfg.model).is_dir():
            mcfg = AutoConfig.from_pretrained(cfg.model)
        else:
            raise ConfigError(f"--model {cfg.model!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a folder")
    except (OSError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"cannot read the model configuration of {cfg.model}: {str(exc).splitlines()[0]}") from None
    if mcfg.num_attention_heads % cfg.tp:
        raise ConfigError(f"--tp {cfg.tp} does not divide the model's {mcfg.num_attention_heads} heads")
    if (mcfg.num_attention_heads // cfg.tp) % cfg.cp_heads:
        raise ConfigError(f"--cp-heads {cfg.cp_heads} does not divide the model's {mcfg.num_attention_heads // cfg.tp} "
                          f"heads per TP rank")
    if cfg.cp_heads > 1:
        from parallel.context2d import check_2d_config

        try:  # a layer whose heads interact in its scan, or whose heads cp_heads does not divide
            check_2d_config(mcfg, cfg.tp, cfg.cp_heads)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if cfg.scan_checkpoint_group >= 0:
        mcfg.scan_checkpoint_group_size = cfg.scan_checkpoint_group
    if cfg.tnt_local_chunk_sizes:
        set_tnt_local_chunk_sizes(mcfg, cfg.tnt_local_chunk_sizes)
    mcfg.use_cache = False
    return mcfg


def set_tnt_local_chunk_sizes(mcfg, value: str) -> None:
    """TNT stage 2 (fine-tuning): new chunk sizes of the local memories. Only the frozen-gradient
    scope changes, no parameter, so the number of local memories must stay the model's."""
    from models.hf.configuration_memory import _int_list

    if "tnt" not in mcfg.mixer_types:
        raise ConfigError(f"--tnt-local-chunk-sizes applies to TNT models; this one has {sorted(set(mcfg.mixer_types))}")
    try:
        sizes = _int_list(value)
    except ValueError:
        raise ConfigError(f"--tnt-local-chunk-sizes must be comma-separated integers, got {value!r}") from None
    if len(sizes) != len(mcfg.tnt_local_chunk_sizes):
        raise ConfigError(f"--tnt-local-chunk-sizes gives {len(sizes)} sizes but the model has "
                          f"{len(mcfg.tnt_local_chunk_sizes)} local memories ({mcfg.tnt_local_chunk_sizes})")
    old = mcfg.tnt_local_chunk_sizes
    mcfg.tnt_local_chunk_sizes = sizes
    try:
        mcfg.validate_memory_config()
    except ValueError as exc:
        mcfg.tnt_local_chunk_sizes = old
        raise ConfigError(f"--tnt-local-chunk-sizes {value}: {exc}") from None


def build_model(cfg: TrainConfig, mcfg):
    from models import MemoryLMForCausalLM

    torch.manual_seed(cfg.seed)
    if Path(cfg.model).is_dir():  # continued pretraining / fine-tuning from an exported or converted folder
        model = MemoryLMForCausalLM.from_pretrained(cfg.model, config=mcfg, torch_dtype=torch.float32)
    else:
        model = MemoryLMForCausalLM(mcfg)
    model.model.gradient_checkpointing = cfg.activation_checkpointing
    return model.float().train()


def record_settings(cfg: TrainConfig, step: int, changes: dict | None) -> None:
    """``config.json``: the settings the run trains with now; ``config_history.jsonl``: one line when
    the run starts and one for each resume that changed a setting (old → new, from which step)."""
    checkpoint.write_text_atomic(cfg.run_dir / "config.json", json.dumps(cfg.to_dict(), indent=1))
    if changes is None:
        entry = {"step": step, "event": "start", "config": cfg.to_dict()}
    elif changes:
        entry = {"step": step, "event": "resume", "changes": {k: [old, new] for k, (old, new) in changes.items()}}
    else:
        return
    with open(cfg.run_dir / "config_history.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


def deepspeed_config(cfg: TrainConfig) -> dict:
    path = Path(cfg.deepspeed_config) if cfg.deepspeed_config else \
        CONFIG_DIR / "deepspeed" / f"zero{cfg.zero_stage}{'_offload' if cfg.offload and cfg.zero_stage else ''}.json"
    ds = read_deepspeed_json(path)
    ds.pop("_comment", None)
    ds.pop("train_batch_size", None)  # = micro × accumulation × DP (config.py read it as --global-batch-size)
    ds.update(train_micro_batch_size_per_gpu=cfg.micro_batch, gradient_accumulation_steps=cfg.grad_accum,
              gradient_clipping=cfg.grad_clip)
    # parameters and optimizer stay float32; bf16/fp8 are autocast around the forward pass
    ds["bf16"] = {"enabled": False}
    ds["fp16"] = {"enabled": False}
    return ds


def autocast(cfg: TrainConfig):
    """bf16 autocast for bf16 and fp8 (the FP8 layers inside it run their GEMMs in FP8); nothing for fp32."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = torch.autocast(device, dtype=torch.bfloat16, enabled=cfg.precision != "fp32")
    if cfg.precision != "fp8":
        return bf16
    stack = contextlib.ExitStack()
    stack.enter_context(bf16)
    stack.enter_context(fp8.autocast(cfg.fp8_backend, cfg.fp8_recipe))
    return stack


def check_data(cfg: TrainConfig) -> None:
    """Missing or damaged data fails here, before any process group exists (the default corpus is
    prepared here on first use; every rank opening the memory maps is cheap)."""
    from data_pipeline.loader import resolve_dataset

    resolve_dataset(data_config(cfg, 1), "train")


def data_config(cfg: TrainConfig, dp: int):
    from data_pipeline.loader import DataLoaderConfig

    # one loader step = one micro-batch of every DP rank; grad_accum loader steps per optimizer step
    return DataLoaderConfig(data=cfg.data, seq_len=cfg.seq_len, global_batch_size=cfg.micro_batch * dp,
                            step_size=cfg.micro_batch * dp * cfg.grad_accum, seed=cfg.seed, val_batches=cfg.eval_batches,
                            layout="streaming" if reset_policy(cfg.reset)[0] == "never" else "shuffled")


# ------------------------------------------------------------------------ the memory's resets
def reset_inputs(cfg: TrainConfig, batch: dict, cp_rank: int = 0) -> dict:
    """The model's document arguments under ``cfg.reset``: ``boundary`` → the loader's ``doc_ids``
    (numbered over the whole row, so CP pieces continue them); ``every:N`` → ids that change every
    N tokens of the row (the global column under CP); ``never`` → none (the state is carried)."""
    kind, every = reset_policy(cfg.reset)
    if kind == "boundary":
        return {"doc_ids": batch["doc_ids"]}
    if kind == "every":
        ids = batch["input_ids"]
        T = ids.shape[1]
        cols = torch.arange(cp_rank * T, (cp_rank + 1) * T, device=ids.device)
        return {"doc_ids": (cols // every).expand(ids.shape[0], T)}
    return {}


class CarriedState:
    """``--reset never``: the memory state handed from each micro-batch to the next (detached:
    truncated backprop), dropped when the streaming data order wraps around to its first batch
    (row b then no longer continues row b). Saved in checkpoints, so a resume continues it (a
    resume with another number of processes restarts it)."""

    def __init__(self, batches_per_epoch: int, loader_steps_done: int, state=None):
        self.period, self.count, self.state = batches_per_epoch, loader_steps_done, state

    def inputs(self) -> dict:
        if self.count % self.period == 0:
            self.state = None
        self.count += 1
        return {"memory_state": self.state, "use_cache": True}

    def update(self, out) -> None:
        self.state = out.memory_state.detach()


# ------------------------------------------------------------------------------------ the loss
def gradient_norm(model, dims) -> float:
    """Global L2 norm of the gradients (ZeRO-0 path; ZeRO optimizers report their own): parameters
    sharded by TP add their squares over the TP group, replicas count once."""
    device = next(model.parameters()).device
    sharded = torch.zeros((), dtype=torch.float64, device=device)
    replicated = torch.zeros((), dtype=torch.float64, device=device)
    for p in model.parameters():
        if p.grad is not None:
            sq = p.grad.detach().double().pow(2).sum()
            if getattr(p, "tensor_model_parallel", False):
                sharded += sq
            else:
                replicated += sq
    if dims.tp > 1:
        dist.all_reduce(sharded, group=dims.tp_group)
    return float((sharded + replicated).sqrt())


def touch_all_parameters(loss, model):
    """Adds 0·Σp for every parameter so each one gets a (zero) gradient on every rank: under CP the
    initial fast weights are used only on CP rank 0, and DeepSpeed reduces gradients bucket by bucket."""
    return loss + sum(p.reshape(-1)[:1].sum() * 0.0 for p in model.parameters() if p.requires_grad and p.numel())


# ---------------------------------------------------------------------------------- the program
class StopRequested:
    """SIGTERM / SIGUSR1 → finish the current step, save, exit 0."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def agreed(self, device, group=None) -> bool:
        """Every rank stops at the same step if any rank was signalled."""
        flag = torch.tensor([1.0 if self.signal else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item())


def local_params(engine) -> int:
    """Parameters this rank holds: its TP shards, and under ZeRO-3 its partition of them."""
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in engine.module.parameters())


def train(cfg: TrainConfig) -> int:
    if cfg.precision == "auto":  # what this hardware runs well (bf16 autocast on CPU is slow and inexact)
        cfg.precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    rank, local_rank, world = ensure_env()
    started = time.perf_counter()

    def say(msg: str) -> None:  # start-up progress and events: once, from rank 0
        if rank == 0:
            info(f"{msg} [{time.perf_counter() - started:.0f}s]")

    mcfg = build_model_config(cfg)  # errors before any process group or file exists
    if world % (cfg.tp * cfg.cp):
        raise ConfigError(f"{world} processes cannot be split into --tp {cfg.tp} × --cp {cfg.cp}")
    if cfg.precision == "fp8":
        fp8.check_available(cfg.fp8_backend, cfg.tp)
    say("checking the data")
    check_data(cfg)
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise ConfigError(f"--out {cfg.out} is a file, not a run directory")
    resume = checkpoint.find_resume(cfg.out)

    import deepspeed

    from parallel import init_parallel, parallel_cross_entropy, parallelize
    from parallel.context import scan_checkpointing_ignored
    from parallel.interleave import global_counts, hold_sends, resolve_documents

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    dims = init_parallel(cfg.tp, cfg.cp, cp_heads=cfg.cp_heads)
    stop = StopRequested()
    saved = checkpoint.read_trainer_state(resume[0]) if resume is not None else None
    saved_layout = elastic.saved_layout(saved, resume[1]) if saved is not None else None
    note = elastic.resolve_batch(cfg, dims.dp, saved and saved["config"], saved_layout and saved_layout.dp)
    # after the global batch is settled: the layout (TP, CP, DP, ZeRO, micro-batch × accumulation) may change
    changes = check_resume_settings(saved["config"], cfg) if saved is not None else None
    if note:
        say(note)
    layout = elastic.Layout(cfg.tp, cfg.cp, dims.dp, cfg.zero_stage)
    if saved_layout is not None and saved_layout != layout:
        elastic.check_streaming(cfg, saved["config"], saved_layout, layout)
    loader_cfg = data_config(cfg, dims.dp)
    from data_pipeline.loader import build_train_loader, build_val_loader

    loader = build_train_loader(loader_cfg, dims.dp_rank, dims.dp, dims.cp_rank, dims.cp)
    if not Path(cfg.model).is_dir():  # a new model takes the data's vocabulary, padded so any TP size divides it
        mcfg.vocab_size = -(-loader.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    elif loader.vocab_size > mcfg.vocab_size:
        raise ConfigError(f"the data's vocabulary ({loader.vocab_size}) is larger than the model's ({mcfg.vocab_size})")
    val_loader = build_val_loader(loader_cfg, dims.dp_rank, dims.dp, dims.cp_rank, dims.cp) if cfg.eval_every else None

    say(f"building the model ({cfg.model})")
    model = build_model(cfg, mcfg)
    n_params = sum(p.numel() for p in model.parameters())  # before TP shards it
    if cfg.precision == "fp8":
        fp8.convert(model, cfg.fp8_backend)
    if cfg.tp > 1 or cfg.cp > 1:
        try:
            parallelize(model, dims, cp_mode="2d" if cfg.cp_heads > 1 else "pass")
        except ValueError as exc:  # a layer the CP mode does not support
            raise ConfigError(str(exc)) from None
    bypassed = scan_checkpointing_ignored(model) if cfg.cp > 1 else []
    if bypassed:
        say(f"warning: --scan-checkpoint-group does not apply under CP to {', '.join(bypassed)}:"
            f" each CP rank keeps its {cfg.seq_len // cfg.cp} tokens' scan graph (docs/parallelism.md)")
    if cfg.zero_stage == 3 and cfg.cp > 1:
        # ZeRO-3 all-gathers a module's parameters at each call over DP × CP, so every CP rank must call
        # the same modules in the same order; inside a CP block they do not (packed documents: a rank
        # runs its mixer once per document segment). As leaves, blocks gather their parameters once
        # per call, and every rank calls every block once per forward.
        from deepspeed.utils import set_z3_leaf_modules

        from parallel.context import CPBlock

        set_z3_leaf_modules(model, [CPBlock])
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps)
    schedule = LRSchedule(cfg.schedule, cfg.steps, cfg.warmup, cfg.min_lr_ratio, cfg.decay_fraction)
    scheduler = build_scheduler(optimizer, schedule)
    say(f"initialising DeepSpeed (ZeRO {cfg.zero_stage})")
    with contextlib.redirect_stdout(io.StringIO()) if rank else contextlib.nullcontext():  # its notes once
        engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                               mpu=DeepSpeedMPU(dims), config=deepspeed_config(cfg))
    start_step, tokens_seen, memory_state = 0, 0, None
    if resume is not None:
        reshard = None
        if saved_layout != layout:  # another number of processes or split: re-shard the full state
            say(f"resuming {saved_layout} as {layout}: re-sharding the weights and optimizer states")
            reshard = lambda: elastic.load_engine(engine, resume[0], saved_layout, dims, cfg.zero_stage, mcfg)  # noqa: E731
        state = checkpoint.load(engine, *resume, load_engine=reshard)
        memory_state = checkpoint.load_memory_state(*resume)
        start_step, tokens_seen = state["step"], state["tokens"]
        loader.load_state_dict(state["data"])
        set_schedule(scheduler, schedule, cfg.lr, (cfg.beta1, cfg.beta2), cfg.eps, cfg.weight_decay)
        say(f"resumed from {resume[0]} at step {start_step}")

    tokens_per_step = cfg.micro_batch * cfg.grad_accum * dims.dp * cfg.seq_len
    flops = flops_per_token(mcfg, cfg.seq_len)["total"]
    peak, _ = peak_flops(cfg.precision, cfg.peak_tflops)
    logger = MetricsLogger(cfg.run_dir, rank == 0, cfg.tensorboard, start_step, cfg.steps, cfg.log_every)
    if rank == 0:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        record_settings(cfg, start_step, changes)
        mcfg.to_json_file(cfg.run_dir / "model_config.json")  # what an exporter rebuilds the model from
        if loader.tokenizer_path is not None:
            shutil.copyfile(loader.tokenizer_path, cfg.run_dir / "tokenizer.model")
        info(f"training {cfg.model} ({n_params / 1e6:.3g}M params, {local_params(engine) / 1e6:.3g}M on this rank) on "
             f"{cfg.data} | world {world} = "
             f"TP {dims.tp} × CP {dims.cp} × DP {dims.dp} | ZeRO {cfg.zero_stage} | {cfg.precision} | "
             f"{tokens_per_step:,} tokens/step | steps {start_step + 1}..{cfg.steps}")

    def save(step):
        if not guard.weights_finite(engine):  # skipped steps never update them; a finite step still might
            raise guard.TrainingDiverged(f"the weights are non-finite after step {step}: not saved, the last "
                                         "checkpoint is the last good one (lower --lr)")
        trainer_state = {"step": step, "tokens": tokens_seen, "data": loader.state_dict(), "config": cfg.to_dict(),
                         "spike_losses": spikes.state_dict()}
        folder = checkpoint.save(engine, cfg.out, step, trainer_state, cfg.keep_checkpoints, local_rank,
                                 memory_state=carried.state if carried is not None else None)
        if rank == 0:
            info(f"saved {folder}")

    divergence = guard.DivergenceGuard(cfg.max_bad_steps, announce=rank == 0)
    spikes = guard.SpikeDetector(cfg.spike_k, cfg.spike_window)
    if resume is not None:
        spikes.load_state_dict(state.get("spike_losses", []))
    carried = CarriedState(loader.sampler.batches_per_epoch, start_step * cfg.grad_accum,
                           None if memory_state is None else memory_state.map(lambda t: t.to(engine.device))) \
        if reset_policy(cfg.reset)[0] == "never" else None

    def backward_step(loss):  # one micro-batch's backward; the optimizer step at the boundary
        nonlocal grad_norm, flags
        engine.backward(touch_all_parameters(loss * dims.dp * dims.cp, engine.module))
        if engine.is_gradient_accumulation_boundary():
            if cfg.zero_stage == 0:
                grad_norm = gradient_norm(engine.module, dims)  # DeepSpeed has reduced the gradients here
            code = (guard.LOSS if local_bad else 0) | \
                (guard.GRAD if cfg.zero_stage == 0 and not poisoned and not math.isfinite(grad_norm) else 0)
            flags = guard.agree_on_flags(code, engine.device)  # every rank takes the same decision
            with guard.skip_optimizer_step(engine, any(flags) or poisoned):
                engine.step()
        else:
            engine.step()

    step = start_step
    while step < cfg.steps:
        t0 = time.perf_counter()
        loss_total, local_bad, spike, poisoned, flags = 0.0, False, False, False, ()
        lr = scheduler.get_last_lr()[0]  # the rate this step uses
        if cfg.cp_interleave:  # parallel/interleave.py: M forwards, then M backwards (last first)
            batches = [{k: v.to(engine.device, non_blocking=True) for k, v in next(loader).items()}
                       for _ in range(cfg.grad_accum)]
            # token counts and documents before the forwards: no collective may synchronise the ranks between them
            counts = global_counts([b["labels"] for b in batches], dims).clamp_min(1)
            docs = resolve_documents([reset_inputs(cfg, b, dims.cp_rank).get("doc_ids") for b in batches], dims)
            with hold_sends(engine.module):
                losses = []
                for b, n, doc in zip(batches, counts, docs):
                    with autocast(cfg):
                        out = engine(b["input_ids"], **({} if doc is None else {"cp_documents": doc}))
                    losses.append(parallel_cross_entropy(out.logits, b["labels"], dims)[0] / n)
                reported = torch.stack([loss.detach() for loss in losses])
                local_bad = not bool(torch.isfinite(reported).all())
                dist.all_reduce(reported, group=dims.dp_cp_group)
                loss_total = reported.sum().item() / cfg.grad_accum
                spike = spikes.is_spike(loss_total)
                poisoned = spike and cfg.skip_spikes
                for m in reversed(range(cfg.grad_accum)):
                    backward_step(losses[m] * math.nan if poisoned and m == 0 else losses[m])
        for micro in range(0 if cfg.cp_interleave else cfg.grad_accum):
            batch = {k: v.to(engine.device, non_blocking=True) for k, v in next(loader).items()}
            kwargs = reset_inputs(cfg, batch, dims.cp_rank)
            if carried is not None:
                kwargs.update(carried.inputs())
            with autocast(cfg):
                out = engine(batch["input_ids"], **kwargs)
            if carried is not None:
                carried.update(out)
            logits = out.logits
            loss_sum, count = parallel_cross_entropy(logits, batch["labels"], dims)
            local_bad |= not bool(torch.isfinite(loss_sum.detach()))
            global_count = count.detach().float().clone()
            dist.all_reduce(global_count, group=dims.dp_cp_group)
            # DeepSpeed averages over its data-parallel group (DP × CP): undo it, so gradients are
            # those of the token mean over the whole global batch (and over grad_accum micro-batches).
            loss = loss_sum / global_count.clamp_min(1)
            reported = loss.detach().clone()
            dist.all_reduce(reported, group=dims.dp_cp_group)
            loss_total += reported.item() / cfg.grad_accum
            if micro == cfg.grad_accum - 1:  # the step's loss is known (the same on every rank): a spike?
                spike = spikes.is_spike(loss_total)
                poisoned = spike and cfg.skip_spikes
                if poisoned:  # non-finite gradients: DeepSpeed skips the update as that of any bad step
                    loss = loss * math.nan
            backward_step(loss)
        step += 1
        tokens_seen += tokens_per_step
        dt = time.perf_counter() - t0
        if cfg.zero_stage > 0:
            grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else math.nan
        skipped = not engine.was_step_applied()
        bad = any(flags) or (skipped and not poisoned) or not math.isfinite(loss_total)
        if spike and rank == 0:
            print(f"warning: loss spike at step {step}: {loss_total:.4f} is over mean + {cfg.spike_k:g}·std of the "
                  f"last {cfg.spike_window} steps" + (" (update skipped)" if cfg.skip_spikes else ""), flush=True)
        record = {"step": step, "loss": loss_total, "lr": lr, "grad_norm": grad_norm,
                  "tokens": tokens_seen, "tokens_per_s": tokens_per_step / dt,
                  "mfu": flops * tokens_per_step / dt / (peak * world) if peak else math.nan,
                  "step_time_s": dt, "flops_per_token": flops, **memory_stats()}
        if skipped:
            record["skipped"] = "non-finite" if bad else "spike"
        logger.log(record)
        divergence.update(step, bad, loss_total, grad_norm, guard.describe(flags))  # raises after max_bad_steps
        if bad:
            if carried is not None:
                carried.state = None  # a non-finite memory state is not carried on
        else:
            spikes.add(loss_total)
        if val_loader is not None and step % cfg.eval_every == 0:
            logger.log({"step": step, **evaluate(engine, val_loader, dims, cfg)})
        stopping = stop.agreed(engine.device)
        # no periodic save inside a run of skipped steps (its weights are those of the last good step)
        if (step % cfg.save_every == 0 and not divergence.consecutive) or step == cfg.steps or stopping:
            save(step)
        if stopping:
            say(f"{stop.signal or 'a stop signal'}: saved step {step}, exiting")
            break
    loader.close()
    logger.close()
    return 0


@torch.no_grad()
def evaluate(engine, val_loader, dims, cfg) -> dict:
    """Validation loss and perplexity over the whole val loader (rows start fresh; documents and
    periods reset as in training)."""
    from parallel.loss import validation_loss

    def logits(batch):
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        with autocast(cfg):
            return engine(batch["input_ids"], **reset_inputs(cfg, batch, dims.cp_rank)).logits

    engine.eval()
    result = validation_loss(logits, val_loader, dims)
    engine.train()
    return {"val_loss": result["loss"], "val_ppl": result["perplexity"]}


def main(argv=None) -> int:
    from data_pipeline.errors import DataError

    # DeepSpeed's ZeRO calls these torch.distributed names on every step; keep the console to one line a step
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    # megatron-core (parallel/) says this once per module it imports; its local fallbacks are what we use
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

    try:
        return train(parse_config(argv))
    except (ConfigError, checkpoint.CheckpointError, DataError, fp8.FP8Unavailable) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except guard.TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 3
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
