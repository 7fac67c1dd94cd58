"""Cost of document resets (models/common/varlen.py): forward+backward of one block with packed
documents vs the same rows without resets.

    python -m bench.varlen --layers ttt_linear gated_deltanet titans lact --seq-len 2048 --batch 4

Documents are drawn with lengths uniform in [--doc-min, --doc-max] and packed into rows (the first
document of a row is cut at a random point, as a packed stream gives); the reported overhead is the
median step time with ``doc_ids`` over the median without (same tokens, same block).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def packed_doc_ids(batch: int, seq_len: int, lo: int, hi: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, seq_len, dtype=torch.long)
    for b in range(batch):
        t = -int(torch.randint(0, hi, (), generator=gen))  # the row starts inside a document
        doc = 0
        while t < seq_len:
            t += int(torch.randint(lo, hi + 1, (), generator=gen))
            doc += 1
            if 0 < t < seq_len:
                ids[b, t:] = doc
    return ids


def step_time(block, x, doc_starts) -> float:
    t0 = time.perf_counter()
    y, _ = block(x, None, doc_starts, False)
    y.square().mean().backward()
    return time.perf_counter() - t0


def compare(block, x, starts, steps: int) -> tuple[float, float]:
    """Median step times (plain, packed), measured alternately so that load drifts hit both."""
    step_time(block, x, None), step_time(block, x, starts)  # warm-up
    plain, packed = [], []
    for _ in range(steps):
        plain.append(step_time(block, x, None))
        packed.append(step_time(block, x, starts))
    return statistics.median(plain), statistics.median(packed)


def padding_ratio(starts: torch.Tensor, need_state: bool) -> tuple[float, int]:
    """(tokens the segment batches run / real tokens, number of mixer calls) of the plan."""
    from models.common.varlen import run_segments

    runs = []

    def count(xs, st):
        runs.append(xs.shape[0] * xs.shape[1])
        return xs, xs[:, -1:]

    run_segments(count, torch.zeros(*starts.shape, 1), starts.cpu(), None, need_state)
    return sum(runs) / starts.numel(), len(runs)


def main(argv=None) -> None:
    from models import preset_config
    from models.hf.configuration_memory import MEMORY_LAYERS
    from models.hf.modeling_memory import MemoryBlock
    from models.common.varlen import doc_starts_from_ids

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", nargs="+", default=["ttt_linear", "gated_deltanet", "titans", "lact", "swa"])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--doc-min", type=int, default=300)
    p.add_argument("--doc-max", type=int, default=1000)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    starts = doc_starts_from_ids(packed_doc_ids(args.batch, args.seq_len, args.doc_min, args.doc_max)).to(args.device)
    print(f"{args.batch}×{args.seq_len} tokens, {int(starts.sum())} document starts inside the rows, "
          f"documents {args.doc_min}–{args.doc_max} tokens, {args.device}")
    for need in (False, True):
        ratio, calls = padding_ratio(starts, need)
        print(f"segment plan{' (final states kept)' if need else ''}: {calls} calls per block, "
              f"{ratio:.2f}× the tokens (padding included)")
    print(f"{'layer':<16}{'plain ms':>10}{'packed ms':>11}{'overhead':>10}")
    for layer in args.layers:
        torch.manual_seed(0)
        memory = layer if layer in MEMORY_LAYERS else "ttt_linear"
        cfg = preset_config(args.preset, memory_layer=memory, layer_pattern=[layer], num_hidden_layers=1,
                            lact_chunk_size=512, attention_window=512)
        block = MemoryBlock(cfg, 0).to(args.device)
        x = torch.randn(args.batch, args.seq_len, cfg.hidden_size, device=args.device, requires_grad=True)
        plain, packed = compare(block, x, starts, args.steps)
        print(f"{layer:<16}{plain * 1e3:>10.1f}{packed * 1e3:>11.1f}{packed / plain - 1:>+10.0%}")


if __name__ == "__main__":
    main()
