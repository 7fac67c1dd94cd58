"""Input files → documents, read through Hugging Face `datasets` (streaming, local files only).

Formats (by file name): ``.txt``/``.text``/``.md`` (and any file named explicitly on the command
line) are plain text; ``.jsonl``/``.json`` hold one JSON object per line with a text field;
``.parquet`` has a text column. ``.gz``/``.zst``/``.bz2``/``.xz`` compression is undone on the fly.

Plain text is read with the ``latin-1`` codec (every byte maps to one character, nothing can
fail) and each line is then decoded as strict UTF-8 here, so a bad line can be skipped and
counted (or rejected with ``strict``) instead of aborting the whole file.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from .errors import InputError

TEXT_SUFFIXES = {".txt", ".text", ".md"}
JSON_SUFFIXES = {".jsonl", ".json", ".ndjson"}
PARQUET_SUFFIXES = {".parquet"}
COMPRESSION_SUFFIXES = {".gz", ".zst", ".bz2", ".xz"}
TXT_UNITS = ("file", "paragraph", "line")
_BATCH = 256
MAX_BAD_FRACTION = 0.5  # of a file's bytes in undecodable lines: above it the file is refused, not skimmed


@dataclass(frozen=True)
class SourceFile:
    """One input file: its path, its name in ``meta.json`` and how to read it."""

    path: Path
    name: str
    kind: str  # "text" | "json" | "parquet"


@dataclass
class ReadStats:
    """Counters of what was skipped while reading (reported and stored in ``meta.json``)."""

    invalid_lines: int = 0
    empty_documents: int = 0
    empty_files: list[str] = field(default_factory=list)
    first_problem: str | None = None


def _kind(path: Path, explicit: bool) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSION_SUFFIXES:
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last in JSON_SUFFIXES:
        return "json"
    if last in PARQUET_SUFFIXES:
        return "parquet"
    if last in TEXT_SUFFIXES or explicit:
        return "text"
    return None


def discover(inputs: Sequence[str | os.PathLike], name_root: str | os.PathLike | None = None) -> list[SourceFile]:
    """Expand files and folders (recursively, sorted) into the ordered list of input files.

    Folders contribute files with a known suffix; files named explicitly are always read (as
    plain text when the suffix is unknown). Names are relative to ``name_root`` or, by default,
    to the parent of the input they came from, so ``meta.json`` does not depend on the cwd.
    """
    if not inputs:
        raise InputError("no input given")
    found: dict[Path, SourceFile] = {}
    for item in inputs:
        root = Path(item)
        if not root.exists():
            raise InputError(f"input not found: {root}")
        base = Path(name_root) if name_root is not None else root.resolve().parent
        if root.is_dir():
            candidates = [(p, False) for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".")]
            kept = [(p, k) for p, e in candidates if (k := _kind(p, e)) is not None]
            if not kept:
                raise InputError(f"input folder {root} holds no .txt/.jsonl/.parquet files")
        else:
            kept = [(root, _kind(root, True))]
        for path, kind in kept:
            resolved = path.resolve()
            try:
                name = resolved.relative_to(base.resolve()).as_posix()
            except ValueError:
                name = resolved.name
            found.setdefault(resolved, SourceFile(resolved, name, kind))
    return sorted(found.values(), key=lambda s: (s.name, str(s.path)))


class DocumentReader:
    """Reads the documents of each input file in order, with UTF-8 checking and counters."""

    def __init__(self, sources: Sequence[SourceFile], text_field: str = "text", txt_unit: str = "file",
                 strict: bool = False):
        if txt_unit not in TXT_UNITS:
            raise InputError(f"txt unit must be one of {TXT_UNITS}, got {txt_unit!r}")
        self.sources = list(sources)
        self.text_field = text_field
        self.txt_unit = txt_unit
        self.strict = strict
        self._bytes = self._bad_bytes = 0  # of the file being read: all, and those in undecodable lines
        self.stats = ReadStats()
        self._streams = self._open_streams()

    def _open_streams(self) -> dict[str, object]:
        """One streaming `datasets.IterableDataset` per format; shard i is file i of that format."""
        import datasets

        streams = {}
        for kind in ("text", "json", "parquet"):
            files = [str(s.path) for s in self.sources if s.kind == kind]
            if not files:
                continue
            if kind == "parquet":
                self._check_parquet_columns([s for s in self.sources if s.kind == kind])
                ds = datasets.load_dataset("parquet", data_files=files, split="train", streaming=True,
                                           columns=[self.text_field])
            else:
                sample_by = {"file": "document", "paragraph": "paragraph", "line": "line"}[self.txt_unit]
                ds = datasets.load_dataset("text", data_files=files, split="train", streaming=True,
                                           encoding="latin-1", sample_by="line" if kind == "json" else sample_by)
            if ds.num_shards != len(files):
                raise InputError(f"internal: datasets split {len(files)} {kind} files into {ds.num_shards} shards")
            streams[kind] = (ds, {path: i for i, path in enumerate(files)})
        return streams

    def _check_parquet_columns(self, sources: Sequence[SourceFile]) -> None:
        import pyarrow.parquet as pq

        for source in sources:
            try:
                names = pq.read_schema(source.path).names
            except Exception as exc:  # pyarrow raises several types for unreadable files
                raise InputError(f"{source.name}: not a readable parquet file ({exc})") from None
            if self.text_field not in names:
                raise InputError(f"{source.name}: no column {self.text_field!r} (columns: {', '.join(names)}); "
                                 f"choose one with --text-field")

    def _problem(self, where: str, what: str) -> None:
        if self.strict:
            raise InputError(f"{where}: {what} (drop --strict to skip such lines with a warning)")
        self.stats.invalid_lines += 1
        if self.stats.first_problem is None:
            self.stats.first_problem = f"{where}: {what}"

    def _decode(self, raw: str, where: str) -> str:
        """Undo the latin-1 reading: strict UTF-8, dropping (and counting) undecodable lines."""
        data = raw.encode("latin-1")
        self._bytes += len(data)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            pass
        kept = []
        for i, line in enumerate(data.split(b"\n")):
            try:
                kept.append(line.decode("utf-8"))
            except UnicodeDecodeError as exc:
                self._bad_bytes += len(line)
                self._problem(f"{where} (line {i + 1} of the document)", f"invalid UTF-8 ({exc.reason})")
        return "\n".join(kept)

    def _whole_files(self) -> Iterator[list]:
        """All plain-text files read whole, in order: one row per file, so no per-file sharding."""
        ds, _ = self._streams["text"]
        for batch in ds.iter(batch_size=1):
            yield batch["text"]

    def _rows(self, source: SourceFile) -> Iterator[list]:
        try:
            if source.kind == "text" and self.txt_unit == "file":
                yield next(self._file_rows)
                return
            ds, shard_of = self._streams[source.kind]
            shard = ds.shard(num_shards=len(shard_of), index=shard_of[str(source.path)], contiguous=True)
            column = self.text_field if source.kind == "parquet" else "text"
            for batch in shard.iter(batch_size=_BATCH):
                yield batch[column]
        except Exception as exc:  # decompressors and pyarrow raise many types for damaged files
            raise InputError(f"{source.name}: cannot read ({type(exc).__name__}: {exc})") from None

    def _texts(self, source: SourceFile) -> Iterator[str]:
        line_no = 0
        for rows in self._rows(source):
            for row in rows:
                line_no += 1
                if source.kind == "parquet":
                    yield row if isinstance(row, str) else ""
                elif source.kind == "text":
                    yield self._decode(row, source.name if self.txt_unit == "file" else f"{source.name}:{line_no}")
                else:
                    yield self._json_text(row, f"{source.name}:{line_no}")

    def _json_text(self, raw: str, where: str) -> str:
        if not raw.strip():
            return ""
        self._bytes += len(raw)
        try:
            record = json.loads(raw.encode("latin-1").decode("utf-8"))
        except UnicodeDecodeError as exc:
            self._bad_bytes += len(raw)
            self._problem(where, f"invalid UTF-8 ({exc.reason})")
            return ""
        except json.JSONDecodeError as exc:
            self._problem(where, f"invalid JSON ({exc.msg})")
            return ""
        if not isinstance(record, dict) or self.text_field not in record:
            fields = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            raise InputError(f"{where}: no field {self.text_field!r} (found: {fields}); choose one with --text-field")
        text = record[self.text_field]
        if text is None:
            return ""
        if not isinstance(text, str):
            raise InputError(f"{where}: field {self.text_field!r} holds {type(text).__name__}, not text")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # a JSON escape such as "\ud800": a lone surrogate is no character
            self._bad_bytes += len(raw)
            self._problem(where, f"field {self.text_field!r} holds a lone surrogate "
                                 f"({text[exc.start:exc.end].encode('unicode_escape').decode()}), not valid Unicode")
            return ""
        return text

    def documents(self, source: SourceFile) -> Iterator[str]:
        """The non-empty documents of one file, in order. A text/JSON file that is mostly not valid
        UTF-8 (more than ``MAX_BAD_FRACTION`` of its bytes, e.g. a binary file) is an InputError."""
        count, self._bytes, self._bad_bytes = 0, 0, 0
        for text in self._texts(source):
            if not text:
                self.stats.empty_documents += 1
                continue
            count += 1
            yield text
        if self._bytes and self._bad_bytes > MAX_BAD_FRACTION * self._bytes:
            raise InputError(f"{source.name}: {self._bad_bytes / self._bytes:.0%} of its bytes are in lines that are "
                             "not valid UTF-8 text (a binary file?); remove it from --input")
        if count == 0:
            self.stats.empty_files.append(source.name)

    def __iter__(self) -> Iterator[tuple[int, str]]:
        """``(file index, document)`` pairs over all files; every pass starts afresh (and so do `stats`)."""
        self.stats = ReadStats()
        self._file_rows = self._whole_files() if "text" in self._streams else iter(())
        for index, source in enumerate(self.sources):
            for text in self.documents(source):
                yield index, text
