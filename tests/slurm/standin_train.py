"""A stand-in for ``pretrain.train`` while it is being written (test-only; deleted once it lands).

Same contract where the Slurm scripts care: torchrun-style env (RANK, WORLD_SIZE, MASTER_*), the
same flags (unknown ones ignored), RUN_DIR/metrics.jsonl written by rank 0, checkpoints/ with a
``latest`` pointer, resume from it, and SIGUSR1/SIGTERM → save at the next step boundary, exit 0.
Each step all-reduces a seeded tensor over gloo; the "loss" depends only on (seed, step), so a
resumed run logs the same losses as an uninterrupted one.
"""
import argparse
import json
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

stop = False


def _on_signal(signum, frame):
    global stop
    stop = True


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=1000)
    p.add_argument("--step-time", type=float, default=0.3)
    p.add_argument("--config")
    args, _ = p.parse_known_args()
    if args.config:  # a sweep run's config.json (flags given on the command line win, as in pretrain.train)
        cfg = json.loads(Path(args.config).read_text())
        p.set_defaults(**{k: cfg[k] for k in ("steps", "seed", "save_every") if k in cfg})
        args, _ = p.parse_known_args()
    signal.signal(signal.SIGUSR1, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    run = Path(args.out)
    ckpts = run / "checkpoints"
    start = 0
    if (ckpts / "latest").exists():
        start = int((ckpts / (ckpts / "latest").read_text().strip() / "state.json").read_text().split()[0])
    if rank == 0:
        ckpts.mkdir(parents=True, exist_ok=True)
        if (run / "metrics.jsonl").exists():  # drop lines after the checkpoint
            keep = [l for l in (run / "metrics.jsonl").read_text().splitlines() if json.loads(l)["step"] <= start]
            (run / "metrics.jsonl").write_text("".join(l + "\n" for l in keep))
        log = open(run / "metrics.jsonl", "a")
        print(f"standin: rank 0 of {world}, resuming from step {start}" if start else f"standin: rank 0 of {world}",
              flush=True)

    def save(step):
        dist.barrier()
        if rank == 0:
            d = ckpts / f"step_{step:08d}"
            d.mkdir(exist_ok=True)
            (d / "state.json").write_text(str(step))
            (ckpts / "latest.tmp").write_text(d.name)
            os.replace(ckpts / "latest.tmp", ckpts / "latest")
        dist.barrier()

    for step in range(start + 1, args.steps + 1):
        g = torch.Generator().manual_seed(args.seed * 100003 + step * 31 + rank)
        x = torch.rand(4, generator=g)
        dist.all_reduce(x)
        time.sleep(args.step_time)
        if rank == 0:
            log.write(json.dumps({"step": step, "loss": float(x.sum()), "lr": 1e-3, "grad_norm": 1.0,
                                  "tokens": step * 64 * world, "tokens_per_s": 100.0, "world": world}) + "\n")
            log.flush()
        flag = torch.tensor([1.0 if stop else 0.0])
        dist.all_reduce(flag)  # every rank stops at the same step
        if step % args.save_every == 0 or step == args.steps or flag.item() > 0:
            save(step)
        if flag.item() > 0 and step < args.steps:
            if rank == 0:
                print(f"standin: signal received, saved step {step}, exiting", flush=True)
            break
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
