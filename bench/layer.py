"""Forward+backward throughput and peak memory of each memory layer.

    python -m bench.layer                         # every layer, chunked form, default size
    python -m bench.layer --layers gated_deltanet titans lact swa --seq-len 4096
    python -m bench.layer --layers ttt_linear --seq-len 4096 --reference
    python -m bench.layer --official /path/to/ttt-lm-pytorch/ttt.py   # side by side with the official code
    python -m bench.layer --layers deltanet gated_deltanet ttt_linear titans --impls chunked fla --dtype bfloat16

Each measurement runs in a fresh subprocess so that peak memory is its own: on CPU the peak
resident-set growth over the inputs (ru_maxrss − RSS before the first step), on CUDA
``torch.cuda.max_memory_allocated``. tokens/s = batch·seq / median step time (fwd+bwd).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from models.layers.registry import LAYERS as REGISTERED

LAYERS = {"ttt_linear": "linear", "ttt_mlp": "mlp"}  # TTT layer name → inner model
# every registered mixer type (models/layers/registry.py; chunk sizes etc. from MemoryLMConfig defaults) and ViT³
# (non-causal, vision: seq-len tokens on the most square h×w grid)
ALL_LAYERS = [*REGISTERED, "vit3"]
FLA_LAYERS = ("deltanet", "gated_deltanet", "ttt_linear", "titans")  # bench/fla_ops.LAYERS (fla imported lazily)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def build(impl: str, layer: str, args):
    """A module mapping x [B, T, C] → y [B, T, C] for one implementation of one layer."""
    if impl == "official":
        spec = importlib.util.spec_from_file_location("official_ttt", args.official)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        cfg = mod.TTTConfig(hidden_size=args.hidden, num_attention_heads=args.heads, mini_batch_size=args.mini_batch,
                            ttt_layer_type=LAYERS[layer], scan_checkpoint_group_size=args.scan_checkpoint)
        official = (mod.TTTLinear if layer == "ttt_linear" else mod.TTTMLP)(cfg, layer_idx=0)
        pos = torch.arange(args.seq_len)[None]

        class Official(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = official

            def forward(self, x):
                return self.inner(x, position_ids=pos)

        return Official()
    if impl == "titans_pytorch":
        return _titans_pytorch(layer, args)
    if impl == "fla":  # flash-linear-attention's op (bench/fla_ops.py; benchmark-only install)
        from bench import fla_ops

        return fla_ops.build(layer, args.hidden, args.heads, torch.device(args.device))
    if layer not in LAYERS:
        return _generic(impl, layer, args)
    from models.layers.ttt import TTTLayer

    ttt = TTTLayer(args.hidden, args.heads, inner=LAYERS[layer], mini_batch_size=args.mini_batch,
                   scan_checkpoint_group_size=args.scan_checkpoint, scan_impl="reference" if impl == "reference" else "chunk")

    class Ours(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = ttt

        def forward(self, x):
            return self.inner(x)[0]

    module = Ours()
    return torch.compile(module) if impl == "compiled" else module


def _titans_pytorch(layer: str, args):
    """lucidrains' titans-pytorch NeuralMemory (not a dependency: importable when on PYTHONPATH) at the
    config of this project's Titans LMM: heads, head dim, chunk, a depth-2 MLP memory of expansion 2,
    momentum and the forgetting gate (its defaults otherwise: pre-RMSNorm, LayerNorm + residual around
    the memory model, per-head learned rates)."""
    if layer != "titans":
        raise ValueError("titans_pytorch is compared with --layers titans only")
    from titans_pytorch import MemoryMLP, NeuralMemory

    d = args.hidden // args.heads
    mem = NeuralMemory(args.hidden, chunk_size=args.chunk or 64, heads=args.heads, dim_head=d, momentum=True,
                       model=MemoryMLP(d, depth=2, expansion_factor=2.0))

    class TitansPytorch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = mem

        def forward(self, x):
            return self.inner(x)[0]

    return TitansPytorch()


def _generic(impl: str, layer: str, args):
    """Any other mixer, built by the model's own factory from a config with this size."""
    if layer == "vit3":
        return _vit3(impl, args)
    from models.hf.configuration_memory import MemoryLMConfig
    from models.hf.modeling_memory import build_mixer

    kind = "ttt_linear" if REGISTERED[layer].kind == "attention" else layer
    cfg = dict(hidden_size=args.hidden, num_attention_heads=args.heads, num_hidden_layers=1, memory_layer=kind,
               layer_pattern=[layer], scan_impl="reference" if impl == "reference" else "chunk",
               attention_window=args.window)
    if args.chunk:  # every layer type's registered chunk fields (TNT: its local chunk, a list)
        cfg.update({name: [args.chunk] if name.endswith("_sizes") else args.chunk
                    for spec in REGISTERED.values() for name in spec.chunk_options})
    if layer == "titans_mac":
        cfg["titans_segment_size"] = max(cfg.get("titans_chunk_size", 64), args.segment)
    mixer = build_mixer(MemoryLMConfig(**cfg), 0)

    class Mixer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = mixer

        def forward(self, x):
            return self.inner(x)[0]

    module = Mixer()
    return torch.compile(module) if impl == "compiled" else module


def _vit3(impl: str, args):
    """ViT³'s mixer: one inner step on all seq_len tokens, laid out on the most square h×w grid."""
    from models.layers.vit3 import ViT3Layer

    h = max(i for i in range(1, int(args.seq_len**0.5) + 1) if args.seq_len % i == 0)
    layer = ViT3Layer(args.hidden, args.heads, scan_impl="reference" if impl == "reference" else "chunk")

    class Mixer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = layer

        def forward(self, x):
            return self.inner(x, grid=(h, x.shape[1] // h))[0]

    module = Mixer()
    return torch.compile(module) if impl == "compiled" else module


def measure(impl: str, layer: str, args) -> dict:
    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    seq = args.reference_seq_len if impl == "reference" else args.seq_len
    args.seq_len = seq
    module = build(impl, layer, args).to(device=device, dtype=dtype).train()
    x = torch.randn(args.batch, seq, args.hidden, device=device, dtype=dtype, requires_grad=True)

    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).float().square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    base = _rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step()  # warm-up (and compilation)
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    t = statistics.median(times)
    return {"impl": impl, "layer": layer, "seq_len": seq, "step_s": t, "tokens_per_s": args.batch * seq / t,
            "peak_mem_mb": peak}


def interleaved(layer: str, impls: list[str], args) -> list[dict]:
    """Every implementation built in one process and timed in turn, step by step (A B A B ...): on a
    shared machine each sees the same load, so their ratio is fair even when absolute times move."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    steps = {}
    for impl in impls:
        torch.manual_seed(0)
        module = build(impl, layer, args).to(device=device, dtype=dtype).train()
        x = torch.randn(args.batch, args.seq_len, args.hidden, device=device, dtype=dtype, requires_grad=True)

        def step(module=module, x=x):
            module.zero_grad(set_to_none=True)
            x.grad = None
            module(x).float().square().mean().backward()
            if device.type == "cuda":
                torch.cuda.synchronize()

        step()  # warm-up (and compilation)
        steps[impl] = step
    times = {impl: [] for impl in impls}
    for _ in range(args.iters):
        for impl, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[impl].append(time.perf_counter() - t0)
    load = open("/proc/loadavg").read().split()[0] if sys.platform.startswith("linux") else "n/a"
    return [{"impl": impl, "layer": layer, "seq_len": args.seq_len, "step_s": statistics.median(times[impl]),
             "tokens_per_s": args.batch * args.seq_len / statistics.median(times[impl]), "peak_mem_mb": float("nan"),
             "load_avg_1m": load} for impl in impls]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.layer", description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", nargs="+", default=ALL_LAYERS, choices=ALL_LAYERS)
    p.add_argument("--impls", nargs="+", default=["chunked"],
                   choices=["chunked", "compiled", "reference", "titans_pytorch", "fla"],
                   help="implementations to time (reference = token-by-token; titans_pytorch = lucidrains' "
                        "NeuralMemory for --layers titans, when titans-pytorch is importable; fla = "
                        "flash-linear-attention's op for deltanet, gated_deltanet, ttt_linear, titans "
                        "(bench/fla_ops.py), when fla is importable)")
    p.add_argument("--reference", action="store_true", help="also time the token-by-token reference")
    p.add_argument("--official", metavar="TTT_PY", help="path to the official ttt-lm-pytorch ttt.py to time side by side")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--mini-batch", type=int, default=16)
    p.add_argument("--chunk", type=int, default=0, help="chunk size of every layer type (its registered chunk fields; 0 = the config defaults)")
    p.add_argument("--window", type=int, default=2048, help="sliding-window size (swa, Titans MAG/MAL, LaCT)")
    p.add_argument("--segment", type=int, default=512, help="Titans MAC segment size")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--reference-seq-len", type=int, default=256, help="sequence length for the (slow) reference")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--scan-checkpoint", type=int, default=0, help="scan_checkpoint_group_size (0 = off)")
    p.add_argument("--json", action="store_true", help="print one JSON line per measurement")
    p.add_argument("--interleave", action="store_true",
                   help="time the implementations of a layer in one process, alternating steps (fair ratios on a "
                        "loaded machine; no peak memory)")
    p.add_argument("--_one", nargs=2, metavar=("IMPL", "LAYER"), help=argparse.SUPPRESS)
    p.add_argument("--_inter", nargs="+", metavar="LAYER IMPL", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._one:
        print(json.dumps(measure(args._one[0], args._one[1], args)))
        return 0
    if args._inter:
        print(json.dumps(interleaved(args._inter[0], args._inter[1:], args)))
        return 0

    impls = list(args.impls) + (["reference"] if args.reference and "reference" not in args.impls else [])
    if args.official:
        impls = ["official"] + impls
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--json"]
    print(f"# {args.device}, {args.dtype}, hidden {args.hidden}, heads {args.heads}, mini-batch {args.mini_batch}, "
          f"batch {args.batch}, seq {args.seq_len} (reference: {args.reference_seq_len}), "
          f"torch threads {torch.get_num_threads()}", flush=True)
    print(f"{'layer':<14} {'impl':<10} {'seq':>6} {'step s':>9} {'tokens/s':>10} {'peak MB':>9}", flush=True)
    rows = []
    for layer in args.layers:
        layer_impls = [i for i in impls if not (i == "official" and layer not in LAYERS)
                       and not (i == "titans_pytorch" and layer != "titans")
                       and not (i == "fla" and layer not in FLA_LAYERS)]
        if args.interleave:
            layer_impls = [i for i in layer_impls if i != "reference"]  # other sequence length
            jobs = [["--_inter", layer, *layer_impls]] + ([["--_one", "reference", layer]] if "reference" in impls else [])
        else:
            jobs = [["--_one", impl, layer] for impl in layer_impls]
        for job in jobs:
            res = subprocess.run([sys.executable, "-m", "bench.layer", *passthrough, *job], capture_output=True, text=True)
            if res.returncode != 0:
                print(f"{layer:<14} {' '.join(job[1:]):<10} failed: {res.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            out = json.loads(res.stdout.strip().splitlines()[-1])
            for r in out if isinstance(out, list) else [out]:
                rows.append(r)
                print(json.dumps(r) if args.json else
                      f"{layer:<14} {r['impl']:<10} {r['seq_len']:>6} {r['step_s']:>9.3f} {r['tokens_per_s']:>10.0f} "
                      f"{r['peak_mem_mb']:>9.0f}" + (f"   load {r['load_avg_1m']}" if "load_avg_1m" in r else ""),
                      flush=True)
    for other, name in (("titans_pytorch", "titans-pytorch"), ("fla", "fla")):
        for layer in args.layers if other in impls else []:
            theirs = [r for r in rows if r["layer"] == layer and r["impl"] == other]
            for r in rows:
                if theirs and r["layer"] == layer and r["impl"] in ("chunked", "compiled"):
                    print(f"# {layer}: {r['impl']} is {r['tokens_per_s'] / theirs[0]['tokens_per_s']:.2f}x {name}'s "
                          f"tokens/s", flush=True)
    if args.official:
        for layer in args.layers:
            off = [r for r in rows if r["layer"] == layer and r["impl"] == "official"]
            for r in rows:
                if off and r["layer"] == layer and r["impl"] not in ("official", "reference"):
                    print(f"# {layer}: {r['impl']} is {r['tokens_per_s'] / off[0]['tokens_per_s']:.2f}x the official "
                          f"tokens/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
