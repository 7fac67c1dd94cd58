"""Text files → tokenizer + packed token shards (``python -m data_pipeline.prepare --help``).

    python -m data_pipeline.prepare --input corpus/ extra.jsonl.zst --out data/mine \\
        --train-tokenizer --vocab-size 32000 --val-fraction 0.01 --workers 8

The output folder is built under a unique temporary name beside ``--out`` and renamed into place
only when complete; an existing folder is never touched unless ``--overwrite`` is given, and
then only replaced after the new one is finished. Re-running on the same inputs and settings
gives byte-identical files (the worker count does not change the result).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from .errors import DataConfigError, DataError, InputError, run_cli
from .shards import FORMAT_NAME, FORMAT_VERSION, META_FILENAME, SPLITS, ShardWriter, token_dtype, write_json
from .sources import TXT_UNITS, DocumentReader, discover
from .tokenizer import MODEL_FILENAME, Tokenizer, file_sha256, train_tokenizer

SPLIT_UNITS = ("document", "file")


@dataclass
class PrepareConfig:
    """Settings of one preparation; every field has a ``--flag`` of the same name."""

    inputs: list[str]
    out: str
    tokenizer: str | None = None              # an existing .model file or prepared folder
    train_tokenizer: bool = False             # train a new one on the training split instead
    vocab_size: int = 32000
    model_type: str = "bpe"                   # "bpe" or "unigram"
    tokenizer_sample_mb: float = 64.0         # text used to train the tokenizer, at most
    text_field: str = "text"                  # JSON key / parquet column holding the text
    txt_unit: str = "file"                    # a plain-text document is a whole "file", "paragraph" or "line"
    val_fraction: float = 0.01
    split_by: str = "document"                # held-out unit: every ~1/F-th "document" or "file"
    workers: int = field(default_factory=lambda: min(8, os.cpu_count() or 1))
    strict: bool = False                      # fail on invalid lines instead of skipping them
    shard_tokens: int = 1 << 27
    overwrite: bool = False
    name_root: str | None = None              # source names in meta.json are relative to this
    progress: bool = True

    def validate(self) -> None:
        if not self.inputs:
            raise DataConfigError("no --input given")
        if bool(self.tokenizer) == bool(self.train_tokenizer):
            raise DataConfigError("give exactly one of --tokenizer PATH or --train-tokenizer")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataConfigError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.split_by not in SPLIT_UNITS:
            raise DataConfigError(f"--split-by must be one of {SPLIT_UNITS}, got {self.split_by!r}")
        if self.txt_unit not in TXT_UNITS:
            raise DataConfigError(f"--txt-unit must be one of {TXT_UNITS}, got {self.txt_unit!r}")
        if self.workers < 1 or self.shard_tokens < 1 or self.vocab_size < 1:
            raise DataConfigError("--workers, --shard-tokens and --vocab-size must be positive")


def is_val(unit_index: int, val_fraction: float) -> bool:
    """Exact, evenly spread hold-out: unit k is held out when floor((k+1)F) > floor(kF)."""
    return math.floor((unit_index + 1) * val_fraction) > math.floor(unit_index * val_fraction)


def _split_documents(reader: DocumentReader, cfg: PrepareConfig) -> Iterator[tuple[str, int, str]]:
    """``(split, file index, text)`` for every document, in input order."""
    for doc_index, (file_index, text) in enumerate(reader):
        unit = doc_index if cfg.split_by == "document" else file_index
        yield ("val" if is_val(unit, cfg.val_fraction) else "train"), file_index, text


def _build_tokenizer(reader: DocumentReader, cfg: PrepareConfig, workdir: Path) -> Tokenizer:
    target = workdir / MODEL_FILENAME
    if not cfg.train_tokenizer:
        source = Tokenizer.load(cfg.tokenizer)  # validates the file
        shutil.copyfile(source.model_path, target)
        return Tokenizer(target)
    train_texts = (text for split, _, text in _split_documents(reader, cfg) if split == "train")
    first = next(train_texts, None)
    if first is None:
        raise InputError("the inputs hold no documents for the train split (all files are empty, "
                         "every line was invalid, or everything went to the val split)")
    _log(cfg, f"training a {cfg.model_type} tokenizer (vocab {cfg.vocab_size}) on up to {cfg.tokenizer_sample_mb:g} MB")
    train_tokenizer(itertools.chain([first], train_texts), workdir / "tokenizer", cfg.vocab_size, cfg.model_type,
                    max_bytes=int(cfg.tokenizer_sample_mb * (1 << 20)))
    return Tokenizer(target)


def _batches(docs: Iterator[tuple[str, int, str]], max_chars: int = 1 << 20, max_docs: int = 1024):
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc[2])
        if chars >= max_chars or len(batch) >= max_docs:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _tokenize_to_shards(reader: DocumentReader, cfg: PrepareConfig, tok: Tokenizer, workdir: Path) -> dict:
    from tqdm import tqdm

    dtype = token_dtype(tok.vocab_size)
    writers = {split: ShardWriter(workdir / split, dtype, cfg.shard_tokens) for split in SPLITS}
    docs_per_file = [0] * len(reader.sources)
    tokens, text_bytes, start = 0, 0, time.perf_counter()
    bar = tqdm(unit=" docs", desc="tokenizing", disable=not cfg.progress, file=sys.stderr, dynamic_ncols=True)
    for batch in _batches(_split_documents(reader, cfg)):
        encoded = tok.encode_batch([text for _, _, text in batch], num_threads=cfg.workers)
        for (split, file_index, text), ids in zip(batch, encoded):
            ids.append(tok.eos_id)
            writers[split].add_document(ids)
            docs_per_file[file_index] += 1
            tokens += len(ids)
            text_bytes += len(text.encode("utf-8"))
        elapsed = max(time.perf_counter() - start, 1e-9)
        bar.update(len(batch))
        bar.set_postfix_str(f"{tokens / elapsed:,.0f} tok/s, {text_bytes / elapsed / 1e6:.1f} MB/s", refresh=False)
    bar.close()
    splits = {split: writer.close() for split, writer in writers.items()}
    if sum(s["num_documents"] for s in splits.values()) == 0:
        raise InputError("the inputs hold no documents (all files are empty or every line was invalid)")
    return {"splits": splits, "docs_per_file": docs_per_file, "stats": reader.stats}


def _recorded_settings(cfg: PrepareConfig) -> dict:
    """The settings that shape the output (not paths, workers or verbosity)."""
    keys = ["text_field", "txt_unit", "val_fraction", "split_by", "shard_tokens", "strict"]
    if cfg.train_tokenizer:
        keys += ["vocab_size", "model_type", "tokenizer_sample_mb"]
    return {k: v for k, v in asdict(cfg).items() if k in keys}


def _publish(workdir: Path, out: Path, overwrite: bool) -> None:
    """Move the finished folder into place; an existing one is replaced only after that succeeded."""
    if out.exists() and not overwrite:
        raise DataError(f"{out} already exists; pass --overwrite to replace it")
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:12]}"
        os.replace(out, old)
    try:
        os.replace(workdir, out)
    except OSError as exc:
        if old is not None:
            os.replace(old, out)
        raise DataError(f"cannot move the prepared data to {out} ({exc.strerror}); it was created meanwhile?") from None
    if old is not None:
        shutil.rmtree(old)


def _log(cfg: PrepareConfig, message: str) -> None:
    if cfg.progress:
        print(message, file=sys.stderr)


_OWNER = ".owner.json"  # host and pid of the prepare that writes a temporary folder


def _remove_stale_workdirs(out: Path) -> None:
    """Temporary folders of ``out`` left by an interrupted prepare on this host (its process is gone)."""
    for workdir in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            owner = json.loads((workdir / _OWNER).read_text(encoding="utf-8"))
            if owner["host"] != socket.gethostname():
                continue
            os.kill(int(owner["pid"]), 0)
        except ProcessLookupError:
            shutil.rmtree(workdir, ignore_errors=True)
        except (OSError, ValueError, KeyError, TypeError):  # no owner file, another user's process, …: keep it
            continue


def prepare(cfg: PrepareConfig) -> Path:
    """Run the whole preparation and return the finished folder (see the module docstring)."""
    cfg.validate()
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise DataError(f"{out} already exists; pass --overwrite to replace it")
    sources = discover(cfg.inputs, cfg.name_root)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_workdirs(out)
    workdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))  # unique, even across hosts
    os.chmod(workdir, 0o755)
    write_json(workdir / _OWNER, {"host": socket.gethostname(), "pid": os.getpid()})
    start = time.perf_counter()
    try:
        reader = DocumentReader(sources, text_field=cfg.text_field, txt_unit=cfg.txt_unit, strict=cfg.strict)
        tok = _build_tokenizer(reader, cfg, workdir)
        result = _tokenize_to_shards(reader, cfg, tok, workdir)
        stats = result["stats"]
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "dtype": token_dtype(tok.vocab_size).name,
            "tokenizer": {**tok.info(), "trained": cfg.train_tokenizer},
            "splits": result["splits"],
            "sources": [{"name": s.name, "sha256": file_sha256(s.path), "bytes": s.path.stat().st_size,
                         "documents": n} for s, n in zip(sources, result["docs_per_file"])],
            "settings": _recorded_settings(cfg),
            "skipped": {"invalid_lines": stats.invalid_lines, "empty_documents": stats.empty_documents,
                        "empty_files": stats.empty_files},
        }
        write_json(workdir / META_FILENAME, meta)
        (workdir / _OWNER).unlink()
        _publish(workdir, out, cfg.overwrite)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    if stats.invalid_lines:
        print(f"warning: skipped {stats.invalid_lines} invalid line(s); first: {stats.first_problem} "
              f"(use --strict to fail instead)", file=sys.stderr)
    if stats.empty_files:
        print(f"warning: {len(stats.empty_files)} input file(s) held no text: {', '.join(stats.empty_files[:5])}",
              file=sys.stderr)
    splits = result["splits"]
    _log(cfg, f"wrote {out}: " + ", ".join(
        f"{name} {s['num_tokens']:,} tokens / {s['num_documents']:,} docs / {s['num_shards']} shard(s)"
        for name, s in splits.items()) + f" in {time.perf_counter() - start:.1f}s")
    return out


def build_parser() -> argparse.ArgumentParser:
    d = PrepareConfig(inputs=[], out="")
    p = argparse.ArgumentParser(prog="python -m data_pipeline.prepare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help=".txt/.jsonl(.gz/.zst)/.parquet files or folders of them (folders are read recursively)")
    p.add_argument("--out", required=True, metavar="DIR", help="prepared folder to create")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", metavar="PATH", help="existing SentencePiece .model or prepared folder")
    tok.add_argument("--train-tokenizer", action="store_true",
                     help="train a SentencePiece tokenizer on the train split")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size)
    p.add_argument("--model-type", choices=("bpe", "unigram"), default=d.model_type)
    p.add_argument("--tokenizer-sample-mb", type=float, default=d.tokenizer_sample_mb,
                   help="train the tokenizer on at most this much text")
    p.add_argument("--text-field", default=d.text_field, help="JSON key / parquet column with the text")
    p.add_argument("--txt-unit", choices=TXT_UNITS, default=d.txt_unit,
                   help="what one document of a plain-text file is")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction, help="held-out fraction")
    p.add_argument("--split-by", choices=SPLIT_UNITS, default=d.split_by, help="unit of the held-out split")
    p.add_argument("--workers", type=int, default=d.workers, help="tokenizer threads")
    p.add_argument("--strict", action="store_true", help="fail on invalid UTF-8 / JSON lines instead of skipping them")
    p.add_argument("--shard-tokens", type=int, default=d.shard_tokens, help="tokens per shard file")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists (after the new one is complete)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    cfg = PrepareConfig(
        inputs=args.input, out=args.out, tokenizer=args.tokenizer, train_tokenizer=args.train_tokenizer,
        vocab_size=args.vocab_size, model_type=args.model_type, tokenizer_sample_mb=args.tokenizer_sample_mb,
        text_field=args.text_field, txt_unit=args.txt_unit, val_fraction=args.val_fraction, split_by=args.split_by,
        workers=args.workers, strict=args.strict, shard_tokens=args.shard_tokens, overwrite=args.overwrite,
        progress=not args.quiet,
    )
    return prepare(cfg)


if __name__ == "__main__":
    run_cli(main)
