"""The embedded default corpus: the running interpreter's standard-library sources.

Every machine with Python has it, so ``--data default`` and ``make demo`` need no download.
Documents are the ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` in sorted order
(one file = one document), leaving out ``site-packages``/``dist-packages``, test folders
(``test``, ``tests``, ``idle_test``), ``__pycache__`` and empty files. Every ~1/F-th file (F = 5%) is held
out for validation, and a BPE tokenizer (8192 pieces) is trained on the training files.

The prepared folder is cached under ``$MEMTRAIN_CACHE`` (default ``~/.cache/memtrain``) in
``default_corpus-<hash>``, the hash covering the interpreter version and the settings. The
first use prepares it (about half a minute on 2 cores); concurrent first uses (several ranks)
serialise on a file lock, and the folder appears only complete, by an atomic rename.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import sys
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from .errors import DataError
from .prepare import PrepareConfig, prepare
from .shards import FORMAT_VERSION, META_FILENAME

CORPUS_VERSION = 1  # bump when the file selection changes, so caches are rebuilt
EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclass(frozen=True)
class DefaultCorpusConfig:
    vocab_size: int = 8192
    val_fraction: float = 0.05
    max_files: int | None = None        # an evenly spread subset of the files (for quick tests)
    tokenizer_sample_mb: float = 16.0


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(max_files: int | None = None) -> list[Path]:
    """The corpus files in sorted order (an evenly spread subset of ``max_files`` if given)."""
    root = stdlib_root()
    files = sorted(p for p in root.rglob("*.py")
                   if p.is_file() and p.stat().st_size > 0
                   and not EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1]))
    if not files:
        raise DataError(f"no standard-library sources found under {root}; use --data with a prepared folder")
    if max_files is not None and max_files < len(files):
        files = [files[i * len(files) // max_files] for i in range(max_files)]
    return files


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("MEMTRAIN_CACHE") or Path.home() / ".cache" / "memtrain")


def corpus_key(config: DefaultCorpusConfig) -> str:
    identity = {"python": sys.version, "implementation": platform.python_implementation(),
                "format": FORMAT_VERSION, "corpus": CORPUS_VERSION, "settings": asdict(config)}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock across processes (POSIX); elsewhere the atomic rename alone protects."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def default_corpus_dir(cache_dir: str | os.PathLike | None = None, config: DefaultCorpusConfig | None = None,
                       progress: bool = True) -> Path:
    """The prepared default corpus, preparing it on first use."""
    config = config or DefaultCorpusConfig()
    root = cache_root(cache_dir)
    out = root / f"default_corpus-{corpus_key(config)}"
    if (out / META_FILENAME).is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f"{out.name}.lock"):
        if (out / META_FILENAME).is_file():  # another process finished while we waited
            return out
        if progress:
            print(f"preparing the default corpus (standard library of Python {platform.python_version()}) "
                  f"into {out}", file=sys.stderr)
        try:
            prepare(PrepareConfig(
                inputs=[str(p) for p in stdlib_files(config.max_files)], out=str(out), train_tokenizer=True,
                vocab_size=config.vocab_size, tokenizer_sample_mb=config.tokenizer_sample_mb, txt_unit="file",
                val_fraction=config.val_fraction, split_by="file", name_root=str(stdlib_root()),
                workers=min(4, os.cpu_count() or 1), progress=progress, overwrite=out.exists(),
            ))
        except DataError:
            if (out / META_FILENAME).is_file():  # another host (no shared lock) finished first
                return out
            raise
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m data_pipeline.default_corpus",
                                     description="Prepare (once) the default corpus and print its folder.")
    parser.add_argument("--cache-dir", help="default: $MEMTRAIN_CACHE or ~/.cache/memtrain")
    parser.add_argument("--max-files", type=int, help="an evenly spread subset of the files")
    parser.add_argument("--vocab-size", type=int, default=DefaultCorpusConfig.vocab_size)
    args = parser.parse_args(argv)
    config = DefaultCorpusConfig(vocab_size=args.vocab_size, max_files=args.max_files)
    print(default_corpus_dir(args.cache_dir, config))


if __name__ == "__main__":
    from .errors import run_cli

    run_cli(main)
