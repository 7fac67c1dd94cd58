"""Training throughput and MFU of a configuration: runs ``pretrain.train`` for a few steps.

    python -m bench.train --model tiny --seq-len 512 --micro-batch 8 [--nproc 2 --tp 2] [--steps 12]

Any other flag is passed to ``pretrain.train`` (``--precision bf16``, ``--zero-stage 3``, …). The
first ``--warmup-steps`` steps (allocation, DeepSpeed's first-step work) are left out; the rest
give the median step time, tokens/s and MFU from the run's metrics.jsonl.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=1, help="processes (torchrun) on this machine")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup-steps", type=int, default=2)
    args, rest = p.parse_known_args(argv)
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "pretrain.train"]
        if args.nproc > 1:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
                   "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "pretrain.train"]
        cmd += ["--data", "synthetic", "--precision", "fp32", *rest, "--out", out, "--steps", str(args.steps),
                "--save-every", str(10**9), "--no-tensorboard", "--log-every", str(10**9)]
        env = dict(os.environ)
        env.setdefault("DS_ACCELERATOR", "cpu")
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            print(res.stderr[-3000:], file=sys.stderr)
            return res.returncode
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r][args.warmup_steps:]
    if not rows:
        print("error: no steps left after warm-up; raise --steps", file=sys.stderr)
        return 2
    t = statistics.median(r["step_time_s"] for r in rows)
    tps = statistics.median(r["tokens_per_s"] for r in rows)
    mfu = statistics.median(math.nan if r["mfu"] is None else r["mfu"] for r in rows)  # null: unknown peak
    print(f"config: {' '.join(rest) or '(defaults)'} | processes {args.nproc}")
    print(f"median over {len(rows)} steps: step {t:.3f} s | {tps:,.0f} tokens/s | MFU {100 * mfu:.1f}% "
          f"| {rows[-1]['flops_per_token'] / 1e6:.1f} MFLOP/token | peak mem {rows[-1]['mem_gib']:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
