"""Data-pipeline throughput: preparation (MB/s, tokens/s) and loading (sequences/s).

    python -m bench.data [--workers 2] [--copies 2] [--seq-len 2048] [--batch 16] [--steps 200]

Input: the standard-library sources of this interpreter (the default corpus), ``--copies``
times over, once as plain-text files and once as a single ``.jsonl.zst``. Preparation uses
the default corpus's tokenizer (its training is timed separately, as part of the first
preparation of the default corpus); loading reads the prepared shards through
`build_train_loader` with and without the prefetch thread.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import zstandard

from data_pipeline.default_corpus import DefaultCorpusConfig, default_corpus_dir, stdlib_files
from data_pipeline.loader import DataLoaderConfig, build_train_loader
from data_pipeline.prepare import PrepareConfig, prepare
from data_pipeline.shards import read_meta


def write_inputs(root: Path, copies: int) -> tuple[Path, Path, int]:
    """The stdlib sources as a folder of .txt files and as one .jsonl.zst; returns both and the text bytes."""
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files()] * copies
    folder = root / "txt"
    folder.mkdir(parents=True)
    for i, text in enumerate(texts):
        (folder / f"{i:06d}.txt").write_text(text, encoding="utf-8")
    jsonl = root / "corpus.jsonl.zst"
    with open(jsonl, "wb") as f, zstandard.ZstdCompressor().stream_writer(f) as z:
        for text in texts:
            z.write((json.dumps({"text": text}) + "\n").encode())
    return folder, jsonl, sum(len(t.encode()) for t in texts)


def bench_prepare(inputs: Path, out: Path, tokenizer: Path, workers: int, text_bytes: int) -> dict:
    start = time.perf_counter()
    prepare(PrepareConfig(inputs=[str(inputs)], out=str(out), tokenizer=str(tokenizer), workers=workers,
                          val_fraction=0.01, progress=False))
    seconds = time.perf_counter() - start
    tokens = sum(s["num_tokens"] for s in read_meta(out)["splits"].values())
    return {"seconds": seconds, "MB/s": text_bytes / seconds / 1e6, "tokens/s": tokens / seconds, "tokens": tokens}


def bench_loader(data: Path, seq_len: int, batch: int, steps: int, prefetch: int) -> dict:
    cfg = DataLoaderConfig(data=str(data), seq_len=seq_len, global_batch_size=batch, prefetch=prefetch)
    loader = build_train_loader(cfg)
    next(loader)  # start-up (and the prefetch thread) not timed
    start = time.perf_counter()
    for _ in range(steps):
        next(loader)
    seconds = time.perf_counter() - start
    loader.close()
    return {"sequences/s": steps * batch / seconds, "ms/batch": 1e3 * seconds / steps}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="tokenizer threads of prepare")
    parser.add_argument("--copies", type=int, default=2, help="how many times the stdlib text is repeated")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    parser.add_argument("--steps", type=int, default=200, help="batches timed per loader setting")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    corpus = default_corpus_dir(config=DefaultCorpusConfig(), progress=False)
    print(f"default corpus ready in {time.perf_counter() - start:.1f}s ({corpus})")
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        root = Path(tmp)
        folder, jsonl, text_bytes = write_inputs(root, args.copies)
        print(f"input: {text_bytes / 1e6:.1f} MB of text ({args.copies}x the stdlib sources)")
        for name, inputs in (("txt files", folder), ("jsonl.zst", jsonl)):
            r = bench_prepare(inputs, root / f"out-{name[:3]}", corpus, args.workers, text_bytes)
            print(f"prepare {name:9s} workers={args.workers}: {r['MB/s']:6.2f} MB/s  {r['tokens/s']:>10,.0f} tokens/s"
                  f"  ({r['tokens']:,} tokens in {r['seconds']:.1f}s)")
        data = root / "out-txt"
        for prefetch in (0, 2):
            r = bench_loader(data, args.seq_len, args.batch, args.steps, prefetch)
            print(f"loader seq_len={args.seq_len} batch={args.batch} prefetch={prefetch}: "
                  f"{r['sequences/s']:>9,.0f} sequences/s  ({r['ms/batch']:.2f} ms per batch)")
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
