"""Peak memory and CPU time of one training step of a small model, one layer type at a time, with and
without scan checkpointing (docs/models.md "Scan checkpointing").

    python -m bench.step_memory --layers attention,yaad,hope --groups 0,16
    python -m bench.step_memory --layers atlas --groups 0,16 --set inner_optimizer='"momentum"'

The model is ``pretrain.sweep.plan.model_config(MODEL, layer)`` (default: ``tiny`` with 2 blocks and
the ``tiny`` family defaults: issue 22's size); a step is forward + backward + AdamW on random tokens
(micro-batch × seq-len), timed on the second step. Each (layer, group) runs in a fresh process, 1
thread: peak resident set (``ru_maxrss``) on CPU, ``torch.cuda.max_memory_allocated`` on CUDA; and on
both the activations the forward keeps for the backward (``saved``: the distinct storages packed by
autograd's saved-tensor hooks, parameters excluded; checkpointed pieces keep only their inputs). On
CPU the resident peak also holds what glibc's allocator retains of freed blocks (docs/models.md
"Scan checkpointing"), so ``saved`` is the allocator-independent measure.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def _pack(t: torch.Tensor, saved: dict, params: set) -> torch.Tensor:
    storage = t.untyped_storage()
    if storage.data_ptr() not in params:
        saved[storage.data_ptr()] = storage.nbytes()
    return t


def measure(layer: str, group: int, args) -> dict:
    from models.hf.modeling_memory import MemoryLMForCausalLM
    from pretrain.sweep.plan import model_config

    torch.set_num_threads(1)
    torch.manual_seed(0)
    device = torch.device(args.device)
    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    if args.num_layers:
        overrides["num_hidden_layers"] = args.num_layers
    cfg = model_config(args.model, layer, vocab_size=args.vocab_size, scan_checkpoint_group_size=group, **overrides)
    model = MemoryLMForCausalLM(cfg).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, cfg.vocab_size, (args.micro_batch, args.seq_len), device=device)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for _ in range(2):
        wall, cpu = time.perf_counter(), time.process_time()
        saved = {}
        with torch.autograd.graph.saved_tensors_hooks(lambda t: _pack(t, saved, params), lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
    span = getattr(model.model.layers[0].mixer, "checkpoint_tokens", 0)
    return dict(layer=layer, group=group, piece_tokens=span, peak_gib=round(peak, 3),
                saved_gib=round(sum(saved.values()) / 2**30, 3), wall_s=round(wall, 2),
                cpu_s=round(cpu, 2), loss=round(loss.item(), 4))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.step_memory", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--layers", default="attention,yaad,moneta,tnt,hope", help="comma-separated layer types")
    p.add_argument("--groups", default="0,16", help="scan_checkpoint_group_size values (0 = off)")
    p.add_argument("--model", default="tiny", help="size preset or WIDTHxDEPTH")
    p.add_argument("--num-layers", type=int, default=2, help="blocks (0 = the preset's)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config field (VALUE as JSON)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", action="store_true", help="print one JSON line per measurement")
    p.add_argument("--_one", nargs=2, metavar=("LAYER", "GROUP"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from models.hf.configuration_memory import ATTENTION_LAYERS

    if args._one:
        print(json.dumps(measure(args._one[0], int(args._one[1]), args)))
        return 0
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--json"]
    if not args.json:
        print(f"{'layer':<16} {'group':>5} {'piece':>6} {'peak GiB':>9} {'saved GiB':>10} {'CPU s':>7} {'wall s':>7} "
              f"{'loss':>8}", flush=True)
    for layer in filter(None, args.layers.split(",")):
        for group in (int(g) for g in args.groups.split(",")):
            if layer in ATTENTION_LAYERS and group:  # nothing to checkpoint: one row
                continue
            res = subprocess.run([sys.executable, "-m", "bench.step_memory", *passthrough, "--_one", layer, str(group)],
                                 capture_output=True, text=True)
            if res.returncode:
                print(f"{layer} group {group} failed: {res.stderr.strip().splitlines()[-1:]}", file=sys.stderr, flush=True)
                return 1
            r = json.loads(res.stdout.strip().splitlines()[-1])
            if args.json:
                print(json.dumps(r), flush=True)
                continue
            print(f"{layer:<16} {group:>5} {r['piece_tokens']:>6} {r['peak_gib']:>9.2f} {r['saved_gib']:>10.3f} {r['cpu_s']:>7.2f} "
                  f"{r['wall_s']:>7.2f} {r['loss']:>8.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
