"""Test helper (launched with torch.distributed.run): the *training* model's logits from a checkpoint.

    python -m torch.distributed.run --nproc-per-node N tests/pretrain/_training_logits.py RUN_DIR OUT.pt

Rebuilds the model exactly as pretrain.train does (same config, parallelize, deepspeed.initialize
under the run's ZeRO stage), restores the latest checkpoint through pretrain.checkpoint.load (the
trainer's resume path), runs the fixed inputs of :func:`fixed_inputs` through the engine and
gathers the logits over TP (vocabulary shards) and CP (sequence pieces); rank 0 saves them.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def fixed_inputs(vocab: int, batch: int = 2, seq: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def main(run_dir: str, out: str) -> None:
    import deepspeed

    from parallel import cp_slice, init_parallel, parallelize
    from parallel.tensor import gather_from_tp
    from pretrain import checkpoint
    from pretrain.config import parse_config
    from pretrain.distributed import DeepSpeedMPU, ensure_env
    from pretrain.optim import LRSchedule, build_optimizer, build_scheduler
    from pretrain.train import build_model, build_model_config, deepspeed_config

    run = Path(run_dir)
    cfg = parse_config(["--config", str(run / "config.json")])
    rank, _, _ = ensure_env()
    mcfg = build_model_config(cfg)
    mcfg.vocab_size = json.loads((run / "model_config.json").read_text())["vocab_size"]
    dims = init_parallel(cfg.tp, cfg.cp)
    model = build_model(cfg, mcfg)
    if cfg.tp > 1 or cfg.cp > 1:
        parallelize(model, dims, cp_mode="pass")
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps)
    scheduler = build_scheduler(optimizer, LRSchedule(cfg.schedule, cfg.steps, cfg.warmup, cfg.min_lr_ratio,
                                                      cfg.decay_fraction))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                      mpu=DeepSpeedMPU(dims), config=deepspeed_config(cfg))
    checkpoint.load(engine, *checkpoint.find_resume(run))
    engine.eval()
    ids = fixed_inputs(mcfg.vocab_size)
    with torch.no_grad():
        logits = engine(cp_slice(ids, dims)).logits.float()
        if dims.tp > 1:
            logits = gather_from_tp(logits, dims.tp_group)
        if dims.cp > 1:
            parts = [torch.empty_like(logits) for _ in range(dims.cp)]
            dist.all_gather(parts, logits.contiguous(), group=dims.cp_group)
            logits = torch.cat(parts, dim=1)
    if rank == 0:
        torch.save(logits, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
