"""Peak memory of one TTT layer's forward + backward against sequence length, with and without
scan checkpointing.

    python -m bench.memory                                   # TTT-Linear and TTT-MLP, 1K..32K tokens
    python -m bench.memory --layers ttt_linear --seq-lens 1024 4096 --group 16 --plot docs/x.png

Each point runs in a fresh process: peak resident-set growth over the model and its input
(ru_maxrss − RSS before the step) on CPU, ``torch.cuda.max_memory_allocated`` on CUDA. For scale,
every row also prints what one (B, H, T, d, d) tensor of per-token fast weights would take: the
chunked scan keeps the fast weights every 16 mini-batches (T/(16b) · d²; the backward recovers the
others, ``ops.ttt.fused._Anchors``), and with checkpointing only once per group of mini-batches.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch

from bench.layer import LAYERS, _rss_mb


def measure(layer: str, seq: int, group: int, args) -> dict:
    from models.layers.ttt import TTTLayer

    torch.manual_seed(0)
    device = torch.device(args.device)
    module = TTTLayer(args.hidden, args.heads, inner=LAYERS[layer], mini_batch_size=args.mini_batch,
                      scan_checkpoint_group_size=group).to(device).train()
    x = torch.randn(args.batch, seq, args.hidden, device=device, requires_grad=True)
    base = _rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    module(x)[0].square().mean().backward()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20 - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    d = args.hidden // args.heads
    per_token_weights = args.batch * args.heads * seq * d * d * 4 / 2**20
    return {"layer": layer, "seq_len": seq, "group": group, "peak_mb": round(peak, 1),
            "btdd_tensor_mb": round(per_token_weights, 1)}


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for (layer, group) in sorted({(r["layer"], r["group"]) for r in rows}):
        pts = sorted((r["seq_len"], r["peak_mb"]) for r in rows if r["layer"] == layer and r["group"] == group)
        label = f"{layer}, " + ("no checkpointing" if group == 0 else f"scan checkpoint group {group}")
        ax.plot(*zip(*pts), marker="o", label=label)
    pts = sorted({(r["seq_len"], r["btdd_tensor_mb"]) for r in rows})
    ax.plot(*zip(*pts), linestyle="--", color="gray", label="one (B,H,T,d,d) fp32 tensor")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("peak memory of fwd+bwd (MiB)")
    ax.set_title("One TTT layer, peak memory vs sequence length")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    p.add_argument("--seq-lens", nargs="+", type=int, default=[1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--group", type=int, default=16, help="scan_checkpoint_group_size of the checkpointed runs")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--mini-batch", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--plot", metavar="PNG", help="write a plot of peak memory against sequence length")
    p.add_argument("--json", action="store_true", help="print one JSON line per measurement")
    p.add_argument("--_one", nargs=3, metavar=("LAYER", "SEQ", "GROUP"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._one:
        layer, seq, group = args._one
        print(json.dumps(measure(layer, int(seq), int(group), args)))
        return 0

    passthrough = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--json"]
    if "--plot" in passthrough:  # only the parent plots
        i = passthrough.index("--plot")
        del passthrough[i:i + 2]
    d = args.hidden // args.heads
    print(f"# {args.device}, float32, hidden {args.hidden}, heads {args.heads} (d {d}), mini-batch {args.mini_batch}, "
          f"batch {args.batch}, checkpoint group {args.group}", flush=True)
    print(f"{'layer':<11} {'seq':>6} {'group':>5} {'peak MB':>9} {'(B,H,T,d,d) MB':>16}", flush=True)
    rows = []
    for layer in args.layers:
        for group in (0, args.group):
            for seq in args.seq_lens:
                res = subprocess.run([sys.executable, "-m", "bench.memory", *passthrough, "--_one", layer, str(seq),
                                      str(group)], capture_output=True, text=True)
                if res.returncode != 0:
                    print(f"{layer:<11} {seq:>6} {group:>5} failed: {res.stderr.strip().splitlines()[-1:]}", flush=True)
                    continue
                r = json.loads(res.stdout.strip().splitlines()[-1])
                rows.append(r)
                print(json.dumps(r) if args.json else f"{layer:<11} {seq:>6} {group:>5} {r['peak_mb']:>9.1f} "
                      f"{r['btdd_tensor_mb']:>16.1f}", flush=True)
    if args.plot and rows:
        plot(rows, args.plot)
        print(f"# plot: {args.plot}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
