"""Context-parallel step time: CP=1 vs CP=2 (the state-passing wavefront), and the model of it.

    python -m bench.cp [--layers 4] [--seq 8192] [--hidden 128] [--heads 4] [--steps 5] [--json out.json]
    python -m bench.cp --layer gated_deltanet --mode prefix     # the all-gather + prefix-combine scheme
    python -m bench.cp --docs 300-1000     # packed documents: every block takes the block-state pass
    python -m bench.cp --trace runs/cp_trace   # per-rank Chrome traces + merged trace.json (parallel/trace.py)
    python -m bench.cp --cp 4 --cp-mode 2d --cp-heads 2 --against-pass    # 2-D CP (2 × 2) and the pass at 4
    python -m bench.cp --cp 4 --cp-interleave 4 --against-pass            # 4 interleaved micro-batches per step

``--cp P`` sets the CP size of the parallel run (default 2); ``--cp-mode 2d --cp-heads N`` runs the
two-dimensional schedule (N × P/N, parallel/context2d.py); ``--cp-interleave M`` makes a step M
micro-batches of one sequence each, run interleaved (parallel/interleave.py) — the CP=1 runs then
accumulate the same M micro-batches; ``--against-pass`` also times the plain pass at the same P in
the same command (same M, not interleaved), so a schedule and the pass are measured under the same load.
Every run reports tokens/s = M·seq / step time.

``--trace DIR`` (or the environment variable MEMTRAIN_CP_TRACE=DIR) records every timed step of
the CP=1 and CP=2 runs: DIR/cp{P}_rank{r}.json per rank and DIR/cp{P}.json merged (open in
chrome://tracing or ui.perfetto.dev). Off by default: nothing is installed then.

A training step is forward + backward of the whole LM (mean cross-entropy) on one sequence of
``--seq`` tokens. CP=1 runs the plain single-device model in one process; CP=2 runs
``parallelize(model, cp_mode="pass")`` on 2 gloo processes holding ``seq/2`` tokens each.
Every process uses torch.set_num_threads(1) (one core per rank, so the comparison is of the same
compute); the CP=1 run with 2 threads is also printed, as the other way to use the 2 cores.

The wavefront model: with L memory layers, P ranks and a fraction f of a block's time spent in
the serial scan, a step takes (L + (P−1)·f)/L of the ideal 1/P, so the efficiency is
L / (L + (P−1)·f) — L/(L+P−1) of the scan time itself (f = 1). f is measured here on one block.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F


LAYERS = ["ttt_linear", "ttt_mlp", "deltanet", "gated_deltanet", "titans", "lact"]


def build(args):
    from models import MemoryLMForCausalLM, preset_config

    cfg = preset_config("test", hidden_size=args.hidden, num_attention_heads=args.heads,
                        intermediate_size=int(args.hidden * 8 / 3) // 8 * 8, num_hidden_layers=args.layers,
                        vocab_size=args.vocab, max_position_embeddings=args.seq,
                        mini_batch_size=args.mini_batch, memory_layer=args.layer, deltanet_chunk_size=64,
                        layer_pattern=getattr(args, "layer_pattern", None))
    torch.manual_seed(0)
    return MemoryLMForCausalLM(cfg)


def _steps(step, n):
    step()  # warm-up
    times = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return times


def setup(args, cp: int, schedule: tuple = ("pass", 1, False)):
    """(model, step) of one rank of the CP=cp run (cp=1: the plain model, no process group);
    ``schedule``: (cp_mode, cp_heads, interleaved); a step is ``args.cp_interleave`` micro-batches.
    With ``args.trace`` a tracer is attached and each step records its forward/backward spans."""
    from parallel import cp_slice, causal_targets, init_parallel, parallel_cross_entropy, parallelize
    from parallel.interleave import global_counts, interleaved_step

    mode, heads, interleave = schedule
    model = build(args).train()
    gen = torch.Generator().manual_seed(1)
    M = getattr(args, "cp_interleave", 1)
    batches = [torch.randint(0, args.vocab, (1, args.seq), generator=gen) for _ in range(M)]
    doc = {}
    if args.docs:  # packed documents (bench/varlen.py): doc_ids numbered over the whole row
        from bench.varlen import packed_doc_ids

        lo, hi = map(int, args.docs.split("-"))
        doc = {"doc_ids": packed_doc_ids(1, args.seq, lo, hi)}
    micro = [(i, causal_targets(i)) for i in batches]
    if cp == 1:
        def fwd(mb):
            logits = model(mb[0], **doc, use_cache=False).logits
            return F.cross_entropy(logits.flatten(0, 1), mb[1].flatten(), ignore_index=-100, reduction="sum") / n
        n = sum((t != -100).sum() for _, t in micro)
        sync = (lambda: None)
    else:
        import torch.distributed as dist

        dims = init_parallel(tp=1, cp=cp, cp_heads=heads)
        parallelize(model, dims, cp_mode=mode)
        micro = [(cp_slice(i, dims), cp_slice(t, dims)) for i, t in micro]
        doc_l = {k: cp_slice(v, dims) for k, v in doc.items()}
        n = global_counts([t for _, t in micro], dims).sum()

        def fwd(mb):
            return parallel_cross_entropy(model(mb[0], **doc_l).logits, mb[1], dims)[0] / n
        sync = dist.barrier  # a step starts together and ends when the slowest rank is done
    tracer = None
    if getattr(args, "trace", None):
        from parallel.trace import attach_tracer

        tracer = attach_tracer(model)

    def step():
        sync()
        model.zero_grad(set_to_none=True)
        if interleave:
            interleaved_step(model, micro, fwd)
        else:
            for mb in micro:
                t0 = time.perf_counter()
                loss = fwd(mb)
                t1 = time.perf_counter()
                loss.backward()
                if tracer is not None:
                    tracer.step_span("forward", t0, t1)
                    tracer.step_span("backward", t1, time.perf_counter())
        sync()

    return model, step


def save_trace(model, args, cp: int) -> None:
    """This rank's trace as DIR/cp{cp}_rank{r}.json (merged by the parent: :func:`merge_run`)."""
    import os

    if getattr(args, "trace", None):
        model._tracer.save(os.path.join(args.trace, f"cp{cp}_rank{model._tracer.rank}.json"))


def merge_run(args, cp: int) -> str | None:
    import os

    from parallel.trace import merge_traces

    if not getattr(args, "trace", None):
        return None
    return merge_traces([os.path.join(args.trace, f"cp{cp}_rank{r}.json") for r in range(cp)],
                        os.path.join(args.trace, f"cp{cp}.json"))


def worker(args, cp: int, schedule: tuple = ("pass", 1, False)):
    """One rank of the CP=cp run: its step times."""
    model, step = setup(args, cp, schedule)
    times = _steps(step, args.steps)
    save_trace(model, args, cp)
    return times


def scan_fraction(args) -> float:
    """f: share of one block's forward+backward spent in the serial part (1 thread, full
    sequence): the mixer's ``scan`` (models/common/state.py), from its prepared inputs."""
    block = build(args).model.layers[0]
    layer = block.mixer
    x = torch.randn(1, args.seq, args.hidden, requires_grad=True)

    def whole():
        y, _ = block(x)
        y.sum().backward()

    state = layer.init_state(1)
    inputs = layer.prepare(x.detach(), state)

    def leaf(t):  # every prepared tensor, nested ones too (LaCT's halo holds its window's keys/values)
        if torch.is_tensor(t):
            return t.detach().requires_grad_() if t.is_floating_point() else t
        if isinstance(t, (tuple, list)):
            return type(t)(leaf(u) for u in t)
        return {k: leaf(u) for k, u in t.items()} if isinstance(t, dict) else t

    leaves = [leaf(t) for t in inputs]

    def scan():
        out, _ = layer.scan(tuple(leaves), state)
        outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    return min(_steps(scan, args.steps)) / min(_steps(whole, args.steps))


def efficiency(L: int, P: int, f: float = 1.0) -> float:
    return L / (L + (P - 1) * f)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--mini-batch", type=int, default=16)
    p.add_argument("--layer", default="ttt_linear", choices=LAYERS)
    p.add_argument("--cp", type=int, default=2, help="CP size of the parallel run")
    p.add_argument("--mode", "--cp-mode", dest="mode", default="pass", choices=["pass", "prefix", "2d"],
                   help="CP scheme (prefix: DeltaNet family; 2d: with --cp-heads)")
    p.add_argument("--cp-heads", type=int, default=1, help="2d: head ranks P_h (P = P_h × P_s)")
    p.add_argument("--cp-interleave", type=int, default=1, metavar="M",
                   help="M micro-batches per step, interleaved under CP (accumulated at CP=1)")
    p.add_argument("--against-pass", action="store_true", help="also time the plain pass at the same --cp")
    p.add_argument("--no-cp1", action="store_true", help="skip the CP=1 runs")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--docs", default="", metavar="MIN-MAX", help="pack documents of MIN–MAX tokens (doc_ids)")
    p.add_argument("--json", default=None)
    p.add_argument("--trace", default=os.environ.get("MEMTRAIN_CP_TRACE") or None, metavar="DIR",
                   help="write per-rank Chrome traces of the timed steps to DIR (default: $MEMTRAIN_CP_TRACE)")
    args = p.parse_args(argv)
    if (args.mode == "2d") != (args.cp_heads > 1) or args.cp % args.cp_heads:
        p.error("--cp-mode 2d takes --cp-heads N > 1 dividing --cp (and --cp-heads needs --cp-mode 2d)")

    from parallel.launch import run_distributed

    P, M = args.cp, args.cp_interleave
    schedule = (args.mode, args.cp_heads, M > 1)
    name = (f"{args.mode}" + (f" {args.cp_heads}x{P // args.cp_heads}" if args.mode == "2d" else "")
            + (f" interleaved M={M}" if M > 1 else ""))
    print(f"model: {args.layer}, {args.layers} layers, hidden {args.hidden}, {args.heads} heads, mini-batch "
          f"{args.mini_batch}, vocab {args.vocab}; a step: {M} sequence(s) of {args.seq} tokens; float32"
          + (f"; documents of {args.docs} tokens" if args.docs else ""))
    print(f"CP={P}: {name}; torch threads: 1 per rank (plus CP=1 with 2 threads for reference)")
    # best of --steps (the machine is shared: the minimum is the least disturbed measurement)
    runs = {}
    if not args.no_cp1:
        runs["CP=1, 1 process x 1 thread"] = run_distributed(worker, 1, args=(args, 1), timeout=1200, threads=1)[0]
        runs["CP=1, 1 process x 2 threads"] = run_distributed(
            worker, 1, args=(argparse.Namespace(**{**vars(args), "trace": None}), 1), timeout=1200, threads=2)[0]
    runs[f"CP={P}, {name}"] = [max(ts) for ts in zip(*run_distributed(worker, P, args=(args, P, schedule),
                                                                    timeout=1200, threads=1))]
    if args.against_pass and schedule != ("pass", 1, False):
        plain = argparse.Namespace(**{**vars(args), "trace": None})
        runs[f"CP={P}, pass"] = [max(ts) for ts in zip(*run_distributed(worker, P, args=(plain, P), timeout=1200,
                                                                        threads=1))]
    for cp in (1, P):
        merged = merge_run(args, cp)
        if merged:
            print(f"trace: {merged}")
    tokens = M * args.seq
    for label, ts in runs.items():
        print(f"{label:34s}: {min(ts):7.3f} s/step {tokens / min(ts):9.0f} tokens/s   (steps: "
              + " ".join(f"{t:.3f}" for t in ts) + ")")
    out = dict(args=vars(args), steps=runs, best={k: min(v) for k, v in runs.items()})
    if not args.no_cp1 and P == 2 and schedule == ("pass", 1, False):
        t1, t1_2, t2 = (min(v) for v in runs.values())
        f = run_distributed(scan_fraction, 1, args=(args,), timeout=1200, threads=1)[0]
        modelled = 2 * efficiency(args.layers, 2, f)
        print(f"speed-up CP=2 vs CP=1 (1 thread/rank): {t1 / t2:.2f}x   (target >= 1.6x; modelled {modelled:.2f}x)")
        print(f"speed-up CP=2 vs CP=1 with 2 threads : {t1_2 / t2:.2f}x")
        print(f"scan share of a block's fwd+bwd (f): {f:.2f}")
        rows = []
        L = 24
        print(f"modelled wavefront efficiency, L = {L} layers (of the scan: L/(L+P-1); of a step: L/(L+(P-1)f)):")
        for Pm in (8, 32, 128):
            e_scan, e_step = efficiency(L, Pm), efficiency(L, Pm, f)
            rows.append(dict(P=Pm, L=L, scan=e_scan, step=e_step))
            print(f"  P={Pm:4d}: scan {e_scan:6.1%}   step (f={f:.2f}) {e_step:6.1%}   speed-up {Pm * e_step:6.1f}x")
        out.update(speedup=t1 / t2, speedup_vs_2threads=t1_2 / t2, scan_fraction=f, modelled=rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
