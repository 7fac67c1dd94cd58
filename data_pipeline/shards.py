"""The on-disk format of a prepared data folder: writing shards and reading them back memory-mapped.

    DIR/meta.json                  format, version, dtype, tokenizer, per-split counts, sources
    DIR/tokenizer.model            the SentencePiece model the tokens come from
    DIR/<split>/shard_00000.bin    raw little-endian token ids (uint16, or uint32 for vocab > 65536)
    DIR/<split>/index.json         the shards in order: file, num_tokens, sha256
    DIR/<split>/doc_ends.npy       uint64, exclusive end offset of every document in the split

A split is one token stream: documents one after another, each ending with EOS, cut into
shards of at most ``shard_tokens`` tokens (a document may continue in the next shard).
"""
from __future__ import annotations

import hashlib
import json
import os
from array import array
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import CorruptDataError, DataError, TokenizerError
from .tokenizer import MODEL_FILENAME, Tokenizer, file_sha256

FORMAT_NAME = "memtrain-packed-tokens"
FORMAT_VERSION = 1
META_FILENAME = "meta.json"
INDEX_FILENAME = "index.json"
DOC_ENDS_FILENAME = "doc_ends.npy"
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.bin"


def write_json(path: Path, obj: dict) -> None:
    """Deterministic JSON (sorted keys, fixed indentation, trailing newline)."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


class ShardWriter:
    """Appends documents (token ids incl. EOS) to one split's shards, then writes its index."""

    def __init__(self, split_dir: str | os.PathLike, dtype: np.dtype, shard_tokens: int = 1 << 27):
        if shard_tokens <= 0:
            raise ValueError("shard_tokens must be positive")
        self.dir = Path(split_dir)
        self.dir.mkdir(parents=True, exist_ok=False)
        self.dtype = np.dtype(dtype)
        self.shard_tokens = shard_tokens
        self.shards: list[dict] = []
        self.doc_ends = array("Q")
        self.num_tokens = 0
        self._file = None
        self._hash = None
        self._in_shard = 0

    def _open_next(self) -> None:
        self._close_current()
        name = shard_name(len(self.shards))
        self._file = open(self.dir / name, "wb")
        self._hash = hashlib.sha256()
        self._in_shard = 0
        self.shards.append({"file": name, "num_tokens": 0, "sha256": ""})

    def _close_current(self) -> None:
        if self._file is not None:
            self._file.close()
            self.shards[-1].update(num_tokens=self._in_shard, sha256=self._hash.hexdigest())
            self._file = None

    def add_document(self, ids: Sequence[int] | np.ndarray) -> None:
        tokens = np.asarray(ids, dtype=self.dtype)
        start = 0
        while start < len(tokens):
            if self._file is None or self._in_shard == self.shard_tokens:
                self._open_next()
            piece = tokens[start:start + self.shard_tokens - self._in_shard]
            data = piece.astype(self.dtype.newbyteorder("<"), copy=False).tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._in_shard += len(piece)
            start += len(piece)
        self.num_tokens += len(tokens)
        self.doc_ends.append(self.num_tokens)

    def close(self) -> dict:
        """Finish the last shard, write ``index.json`` and ``doc_ends.npy``; return the split summary."""
        self._close_current()
        np.save(self.dir / DOC_ENDS_FILENAME, np.frombuffer(self.doc_ends, dtype=np.uint64), allow_pickle=False)
        summary = {"num_tokens": self.num_tokens, "num_documents": len(self.doc_ends), "num_shards": len(self.shards)}
        write_json(self.dir / INDEX_FILENAME, {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "dtype": self.dtype.name, **summary,
            "shards": self.shards,
        })
        return summary


def read_meta(path: str | os.PathLike) -> dict:
    meta_path = Path(path) / META_FILENAME
    if not meta_path.is_file():
        raise CorruptDataError(f"{path} is not a prepared data folder (no {META_FILENAME}); "
                               f"create one with `python -m data_pipeline.prepare`")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptDataError(f"{meta_path} is not valid JSON ({exc})") from None
    if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
        raise CorruptDataError(f"{meta_path}: format {meta.get('format')!r} version {meta.get('version')!r} "
                               f"is not {FORMAT_NAME!r} version {FORMAT_VERSION}; re-run prepare")
    return meta


class PackedTokens:
    """One split of a prepared folder as a single memory-mapped token stream.

    Opening validates everything that is cheap to check: the meta and index files, every
    shard's size against its token count (truncated or missing shards raise
    `CorruptDataError`), and the tokenizer file against the hash recorded at preparation
    (and against ``tokenizer`` when one is given, raising `TokenizerError` on a mismatch).
    """

    def __init__(self, path: str | os.PathLike, split: str = "train",
                 tokenizer: Tokenizer | str | os.PathLike | None = None):
        self.path = Path(path)
        self.split = split
        self.meta = read_meta(self.path)
        if split not in self.meta["splits"]:
            raise DataError(f"{self.path} has no split {split!r} (splits: {', '.join(self.meta['splits'])})")
        self.tokenizer_info = self.meta["tokenizer"]
        self._check_tokenizer(tokenizer)
        index_path = self.path / split / INDEX_FILENAME
        try:
            self.index = json.loads(index_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CorruptDataError(f"cannot read {index_path} ({exc}); re-run prepare") from None
        self.dtype = np.dtype(self.index["dtype"]).newbyteorder("<")
        self._shards = [self._map(s) for s in self.index["shards"]]
        self._starts = np.cumsum([0] + [len(s) for s in self._shards])
        if int(self._starts[-1]) != self.index["num_tokens"]:
            raise CorruptDataError(f"{index_path}: shards hold {int(self._starts[-1])} tokens, index says "
                                   f"{self.index['num_tokens']}; re-run prepare")

    def _check_tokenizer(self, tokenizer: Tokenizer | str | os.PathLike | None) -> None:
        model = self.path / MODEL_FILENAME
        if not model.is_file():
            raise CorruptDataError(f"{model} is missing; re-run prepare")
        if file_sha256(model) != self.tokenizer_info["sha256"]:
            raise TokenizerError(f"{model} is not the tokenizer these shards were made with "
                                 f"(sha256 differs from {META_FILENAME}); re-run prepare")
        if tokenizer is not None:
            tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.load(tokenizer)
            if tok.sha256 != self.tokenizer_info["sha256"]:
                raise TokenizerError(
                    f"tokenizer {tok.model_path} (vocab {tok.vocab_size}) does not match the one of {self.path} "
                    f"(vocab {self.tokenizer_info['vocab_size']}); use {model} or re-run prepare with yours")

    def _map(self, shard: dict) -> np.ndarray:
        file = self.path / self.split / shard["file"]
        expected = shard["num_tokens"] * self.dtype.itemsize
        size = file.stat().st_size if file.is_file() else None
        if size != expected:
            state = "missing" if size is None else f"{size} bytes on disk"
            raise CorruptDataError(f"shard {file} is truncated or damaged ({state}, index says {expected} bytes); "
                                   f"re-run prepare")
        return np.memmap(file, dtype=self.dtype, mode="r") if expected else np.zeros(0, self.dtype)

    @property
    def num_tokens(self) -> int:
        return int(self._starts[-1])

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer_info["eos_id"])

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer_info["vocab_size"])

    @property
    def tokenizer_sha256(self) -> str:
        return self.tokenizer_info["sha256"]

    @cached_property
    def doc_ends(self) -> np.ndarray:
        return np.load(self.path / self.split / DOC_ENDS_FILENAME, mmap_mode="r")

    @property
    def num_documents(self) -> int:
        return int(self.index["num_documents"])

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.path)

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the split as a fresh int64 array (may span shards)."""
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside a split of {self.num_tokens}")
        out = np.empty(length, dtype=np.int64)
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        filled = 0
        for shard_index in range(first, len(self._shards)):
            if filled == length:
                break
            offset = start + filled - int(self._starts[shard_index])
            piece = self._shards[shard_index][offset:offset + length - filled]
            out[filled:filled + len(piece)] = piece
            filled += len(piece)
        return out

    def document(self, i: int) -> np.ndarray:
        """Tokens of document ``i`` (ending with EOS)."""
        start = int(self.doc_ends[i - 1]) if i > 0 else 0
        return self.read(start, int(self.doc_ends[i]) - start)

    def verify(self) -> None:
        """Full check (reads everything): shard hashes, id range, and EOS at every document end."""
        for shard, data in zip(self.index["shards"], self._shards):
            if hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest() != shard["sha256"]:
                raise CorruptDataError(f"{self.path / self.split / shard['file']}: content does not match its sha256")
            if len(data) and int(data.max()) >= self.vocab_size:
                raise TokenizerError(f"{shard['file']} holds id {int(data.max())} >= vocab size {self.vocab_size}")
        ends = np.asarray(self.doc_ends, dtype=np.int64)
        if len(ends) != self.num_documents or (len(ends) and int(ends[-1]) != self.num_tokens):
            raise CorruptDataError(f"{self.path / self.split / DOC_ENDS_FILENAME} does not match the index")
        last_tokens = ends - 1
        for k, data in enumerate(self._shards):
            lo, hi = int(self._starts[k]), int(self._starts[k + 1])
            inside = last_tokens[(last_tokens >= lo) & (last_tokens < hi)] - lo
            if np.any(data[inside] != self.eos_id):
                raise CorruptDataError(f"{self.index['shards'][k]['file']}: a document does not end with EOS")

    def __repr__(self) -> str:
        return f"PackedTokens({str(self.path)!r}, split={self.split!r}, num_tokens={self.num_tokens})"
