"""Where one training step's time goes: torch.profiler over forward + backward of a preset model.

    python -m bench.profile_step --model 125m --memory-layer ttt_linear --seq-len 2048 --micro-batch 8 --dtype bfloat16
    python -m bench.profile_step --model tiny --seq-len 256 --micro-batch 2          # CPU, a few seconds
    python -m bench.profile_step --model 125m --docs 200 ...     # packed documents, as pretrain.train sees them

Runs ``--warmup`` untimed steps (allocation, Triton compilation), ``--steps`` timed ones and one
profiled step, and prints the median step time, the tokens/s of forward + backward alone (no
optimizer, no DeepSpeed), the device-busy fraction of the profiled step (CUDA kernel time / wall
time: far below 1 means the step is bound by Python and kernel launches, not by the GPU), its
number of kernel launches, and the operators with the most self time on the device and the CPU. ``--trace FILE`` also writes a
Chrome trace (chrome://tracing, perfetto.dev).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="model preset (default: tiny)")
    p.add_argument("--memory-layer", default=None, help="mixer type (default: the preset's)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="bfloat16: autocast around the forward, as pretrain.train --precision bf16")
    p.add_argument("--docs", type=int, default=0, metavar="MEAN_LEN",
                   help="pack documents of random length (mean MEAN_LEN tokens, as --data synthetic) into each "
                        "row; every memory layer restarts at their starts (models/common/varlen.py). 0: one document a row")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=15, help="operators listed per table")
    p.add_argument("--trace", default=None, metavar="FILE", help="write a Chrome trace of the profiled steps")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.seq_len < 1 or args.micro_batch < 1 or args.docs < 0:
        p.error("--steps, --seq-len and --micro-batch must be ≥ 1, --warmup and --docs ≥ 0")

    from models import MemoryLMForCausalLM, preset_config

    overrides = {"memory_layer": args.memory_layer} if args.memory_layer else {}
    try:
        config = preset_config(args.model, **overrides)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    config.use_cache = False
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = MemoryLMForCausalLM(config).to(device)
    ids = torch.randint(config.vocab_size, (args.micro_batch, args.seq_len), device=device)
    docs = {}
    if args.docs:  # a document starts after each token with probability 1/MEAN_LEN
        starts = torch.rand(args.micro_batch, args.seq_len, device=device) < 1.0 / args.docs
        starts[:, 0] = False
        docs = {"doc_ids": starts.long().cumsum(1)}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def step():
        with autocast:
            loss = model(input_ids=ids, labels=ids, **docs).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    times = []
    for _ in range(args.steps):  # timed without the profiler (its per-op bookkeeping slows a CPU step severalfold)
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        step()
        sync()
        profiled = time.perf_counter() - t0
    events = prof.key_averages()
    print(f"# {device.type}, {args.dtype}, --model {args.model} ({config.memory_layer}), "
          f"batch {args.micro_batch} × seq {args.seq_len}{f', documents of mean length {args.docs}' if args.docs else ''}, "
          f"{sum(x.numel() for x in model.parameters()) / 1e6:.1f}M params")
    print(f"median fwd+bwd step {t:.4f} s | {args.micro_batch * args.seq_len / t:,.0f} tokens/s")
    if device.type == "cuda":
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]  # not the ops above them
        busy = sum(e.self_device_time_total for e in kernels) / 1e6 / profiled
        launches = sum(e.count for e in kernels)
        print(f"device busy {100 * busy:.0f}% of the wall time | {launches:,.0f} kernels per step "
              f"| peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        print(events.table(sort_by="self_cuda_time_total", row_limit=args.top, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=60))
    if args.trace:
        prof.export_chrome_trace(args.trace)
        print(f"trace: {args.trace}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
