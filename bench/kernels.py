"""The Triton kernels against the PyTorch path inside the same layer: how far apart their outputs and
gradients are, and the forward+backward time of each.

    python -m bench.kernels                                   # CUDA: TTT-Linear/MLP, Titans, LaCT at the bench size
    python -m bench.kernels --layers ttt_linear titans --dtype bfloat16 --seq-len 8192 --json

Each layer is built once (``bench.layer.build``, its defaults: hidden 768, 12 heads, seq 2048) and
run with ``MEMTRAIN_TRITON=0`` (PyTorch) and ``=1`` (kernels) on the same input, alternating. A row
reports whether the kernels actually ran (the Triton entry points are counted: a shape outside a
kernel's range silently takes PyTorch), the largest difference of the output and of every
gradient relative to that tensor's largest value, and the median step times. The kernels need CUDA;
on CPU they run only under ``TRITON_INTERPRET=1`` (the tests use that at toy sizes).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from bench.layer import ALL_LAYERS, build

# where each layer calls its Triton entry point: (module, attribute)
ENTRY_POINTS = {
    "ttt_linear": [("models.ops.ttt.chunk", "triton_linear_scan")],
    "ttt_mlp": [("models.ops.ttt.chunk", "triton_mlp_scan")],
    "titans": [("models.ops.titans.chunk", "triton_titans_scan")],
    "lact": [("models.ops.lact.chunk", "triton_lact_chunk")],
}


def _count_calls(layer: str) -> list:
    """Wraps the layer's Triton entry points with call counters; returns [count]."""
    import importlib

    count = [0]
    for mod_name, attr in ENTRY_POINTS[layer]:
        mod = importlib.import_module(mod_name)
        fn = getattr(mod, attr)

        def counted(*a, _fn=fn, **k):
            count[0] += 1
            return _fn(*a, **k)

        setattr(mod, attr, counted)
    return count


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)


def compare(layer: str, args) -> dict:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    count = _count_calls(layer)
    torch.manual_seed(0)
    module = build("chunked", layer, args).to(device=device, dtype=dtype).train()
    params = [p for p in module.parameters() if p.requires_grad]
    x = torch.randn(args.batch, args.seq_len, args.hidden, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(args.batch, args.seq_len, args.hidden, device=device, dtype=dtype)

    def step():
        y = module(x)
        grads = torch.autograd.grad((y.float() * w.float()).sum(), [x, *params], allow_unused=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return y, grads

    results, times = {}, {"0": [], "1": []}
    for it in range(args.iters + 1):  # the first of each is the warm-up (and the kernels' compilation)
        for flag in ("0", "1"):
            os.environ["MEMTRAIN_TRITON"] = flag
            before = count[0]
            t0 = time.perf_counter()
            out = step()
            if it:
                times[flag].append(time.perf_counter() - t0)
            else:
                results[flag] = (out, count[0] > before)
    os.environ.pop("MEMTRAIN_TRITON")
    (y0, g0), _ = results["0"]
    (y1, g1), used = results["1"]
    grad_errs = [_rel(a, b) for a, b in zip(g1, g0) if a is not None and b is not None]
    t_py, t_tr = statistics.median(times["0"]), statistics.median(times["1"])
    return {"layer": layer, "dtype": args.dtype, "seq_len": args.seq_len, "kernels_ran": used,
            "out_rel_err": _rel(y1, y0), "max_grad_rel_err": max(grad_errs), "pytorch_step_s": t_py,
            "triton_step_s": t_tr, "speedup": t_py / t_tr,
            "tokens_per_s_triton": args.batch * args.seq_len / t_tr}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", nargs="+", default=list(ENTRY_POINTS), choices=list(ENTRY_POINTS))
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--mini-batch", type=int, default=16)
    p.add_argument("--chunk", type=int, default=0, help="Titans/LaCT chunk size (0 = config defaults)")
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--segment", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--scan-checkpoint", type=int, default=0)
    p.add_argument("--json", action="store_true", help="one JSON line per layer")
    args = p.parse_args(argv)
    assert set(ENTRY_POINTS) <= set(ALL_LAYERS)
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("bench.kernels: the Triton kernels need CUDA (or TRITON_INTERPRET=1 on CPU, at toy sizes)",
              file=sys.stderr)
        return 2
    print(f"# {args.device}, {args.dtype}, hidden {args.hidden}, heads {args.heads}, batch {args.batch}, "
          f"seq {args.seq_len}", flush=True)
    for layer in args.layers:
        r = compare(layer, args)
        print(json.dumps(r) if args.json else
              f"{layer:<11} kernels ran: {r['kernels_ran']!s:<5} out {r['out_rel_err']:.1e} grads {r['max_grad_rel_err']:.1e}"
              f"  PyTorch {r['pytorch_step_s'] * 1e3:8.2f} ms  Triton {r['triton_step_s'] * 1e3:8.2f} ms"
              f"  {r['speedup']:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
