"""prepare: round trip, determinism, the folder format, and every kind of bad input."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.errors import CorruptDataError, DataError, TokenizerError, run_cli
from data_pipeline.loader import DataLoaderConfig, SequenceDataset, build_train_loader
from data_pipeline.prepare import is_val, main, prepare
from data_pipeline.shards import PackedTokens, token_dtype
from data_pipeline.tokenizer import Tokenizer

from .conftest import make_docs, tiny_config

REPO = Path(__file__).resolve().parents[2]


def tree_digest(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def split_docs(docs, fraction):
    train = [d for k, d in enumerate(docs) if not is_val(k, fraction)]
    val = [d for k, d in enumerate(docs) if is_val(k, fraction)]
    return train, val


def test_round_trip_every_document(corpus, prepared):
    _, docs = corpus
    tok = Tokenizer.load(prepared)
    for split, expected in zip(("train", "val"), split_docs(docs, 0.2)):
        tokens = PackedTokens(prepared, split)
        assert tokens.num_documents == len(expected) > 0
        for i, doc in enumerate(expected):
            ids = tokens.document(i)
            assert ids[-1] == tok.eos_id
            assert tok.decode(ids[:-1]) == doc


def test_round_trip_through_the_loader(corpus, prepared):
    """text → shards → SequenceDataset samples → detokenised text, document boundaries intact."""
    _, docs = corpus
    train_docs, _ = split_docs(docs, 0.2)
    tokens = PackedTokens(prepared, "train")
    seq_len = 16
    dataset = SequenceDataset(tokens, seq_len)
    stream = np.concatenate([dataset[i]["input_ids"] for i in range(len(dataset))])
    assert len(stream) == len(dataset) * seq_len and len(dataset) == (tokens.num_tokens - 1) // seq_len
    ends = np.flatnonzero(stream == tokens.eos_id)
    tok = Tokenizer.load(prepared)
    pieces = np.split(stream, ends + 1)[:-1]
    assert [tok.decode(p[:-1]) for p in pieces] == train_docs[:len(pieces)]
    assert len(pieces) >= len(train_docs) - 1  # the tail may be cut by the last whole sample


def test_meta_and_index(corpus, prepared):
    root, _ = corpus
    meta = json.loads((prepared / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["tokenizer"]["vocab_size"] == 400
    assert meta["tokenizer"]["sha256"] == hashlib.sha256((prepared / "tokenizer.model").read_bytes()).hexdigest()
    names = [s["name"] for s in meta["sources"]]
    assert names == sorted(names) and names[0] == "corpus/a.txt"
    for source in meta["sources"]:
        path = root.parent / source["name"]
        assert source["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    for split in ("train", "val"):
        tokens = PackedTokens(prepared, split)
        assert meta["splits"][split]["num_tokens"] == tokens.num_tokens
        tokens.verify()
    assert meta["splits"]["train"]["num_shards"] > 1  # 700-token shards: documents cross shard boundaries
    assert sum(s["documents"] for s in meta["sources"]) == sum(s["num_documents"] for s in meta["splits"].values())
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_rerun_is_byte_identical(corpus, prepared, tmp_path):
    root, _ = corpus
    again = prepare(tiny_config([root], tmp_path / "again", workers=1))
    assert tree_digest(again) == tree_digest(prepared)


def test_existing_tokenizer_and_split_by_file(corpus, prepared, tmp_path):
    root, docs = corpus
    out = prepare(tiny_config([root / "a.txt", root / "f.txt", root / "b.jsonl"], tmp_path / "byfile",
                              train_tokenizer=False, tokenizer=str(prepared), split_by="file", val_fraction=0.34))
    assert Tokenizer.load(out).sha256 == Tokenizer.load(prepared).sha256
    meta = json.loads((out / "meta.json").read_text())
    # files in name order: a.txt (0), b.jsonl (1), f.txt (2); with F = 0.34 only file 2 is held out
    assert [s["name"] for s in meta["sources"]] == ["a.txt", "b.jsonl", "f.txt"]  # relative to their folder
    assert meta["splits"]["val"]["num_documents"] == 1
    tok = Tokenizer.load(out)
    assert tok.decode(PackedTokens(out, "val").document(0)[:-1]) == (root / "f.txt").read_text()


def cli(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    return exit_info.value.code, capsys.readouterr().err


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


BAD_INPUTS = {
    "missing": (lambda d: d / "does_not_exist.txt", [], "input not found"),
    "empty_file": (lambda d: write(d / "empty.txt", b""), [], "no documents"),
    "empty_folder": (lambda d: (d / "folder").mkdir(parents=True) or d / "folder", [], "holds no .txt"),
    "invalid_utf8_strict": (lambda d: write(d / "bad.txt", b"fine\n\xff\xfe broken\n"), ["--strict"], "invalid UTF-8"),
    "invalid_json_strict": (lambda d: write(d / "bad.jsonl", b'{"text": "ok"}\n{"text": \n'), ["--strict"],
                            "invalid JSON"),
    "missing_json_field": (lambda d: write(d / "x.jsonl", b'{"body": "hello"}\n'), [], "no field 'text'"),
    "lone_surrogate_strict": (lambda d: write(d / "s.jsonl", b'{"text": "ok"}\n{"text": "a\\ud800b"}\n'), ["--strict"],
                              "s.jsonl:2: field 'text' holds a lone surrogate (\\ud800)"),
    "random_bytes": (lambda d: write(d / "noise.txt", np.random.default_rng(0).bytes(200_000)), [],
                     "noise.txt: 9"),  # "9x% of its bytes are in lines that are not valid UTF-8"
    "missing_parquet_column": (lambda d: _parquet(d / "x.parquet", {"body": ["hello"]}), [], "no column 'text'"),
    "corrupt_zst": (lambda d: write(d / "x.jsonl.zst", bytes(range(256)) * 4), [], "x.jsonl.zst: cannot read"),
    "bad_tokenizer": (lambda d: write(d / "ok.txt", b"hello"), ["--tokenizer", "/nonexistent/tok.model"],
                      "tokenizer model not found"),
}


def _parquet(path, columns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_clear_error_and_existing_dir_untouched(case, prepared, tmp_path, capsys):
    make_input, extra, message = BAD_INPUTS[case]
    existing = tmp_path / "out"
    shutil.copytree(prepared, existing)
    before = tree_digest(existing)
    tokenizer_args = [] if "--tokenizer" in extra else ["--train-tokenizer", "--vocab-size", "300"]
    code, err = cli(["--input", str(make_input(tmp_path / "in")), "--out", str(existing), "--overwrite", "--quiet",
                     *tokenizer_args, *extra], capsys)
    assert code == 2
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err  # one clear line, no wrapped traceback
    assert tree_digest(existing) == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


@pytest.mark.parametrize("tokenizer", ["train", "existing"])
def test_lone_surrogate_is_a_counted_invalid_line(corpus, prepared, tmp_path, capsys, tokenizer):
    """A JSON "\\ud800" escape (no character, cannot be encoded): skipped and counted with its file and
    line, with a trained or an existing tokenizer (before: an abort naming nothing, or a traceback)."""
    write(tmp_path / "in" / "s.jsonl", b'{"text": "one"}\n{"text": "a\\ud800b"}\n{"text": "three"}\n')
    extra = dict(train_tokenizer=False, tokenizer=str(prepared / "tokenizer.model")) if tokenizer == "existing" else {}
    out = prepare(tiny_config([corpus[0], tmp_path / "in"], tmp_path / "out", **extra))
    assert json.loads((out / "meta.json").read_text())["skipped"]["invalid_lines"] == 1
    assert "s.jsonl:2: field 'text' holds a lone surrogate (\\ud800)" in capsys.readouterr().err


def test_stale_temporary_folder_of_an_interrupted_prepare_is_removed(corpus, tmp_path):
    """A prepare killed on this host leaves .OUT.tmp-*; the next prepare of OUT removes it (not one of a live process)."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale, live = tmp_path / ".out.tmp-dead", tmp_path / ".out.tmp-live"
    for folder, pid in ((stale, int(dead.stdout)), (live, os.getpid())):
        folder.mkdir()
        (folder / ".owner.json").write_text(json.dumps({"host": os.uname().nodename, "pid": pid}))
    prepare(tiny_config([corpus[0]], tmp_path / "out"))
    assert not stale.exists() and live.exists()
    assert not (tmp_path / "out" / ".owner.json").exists()


def test_invalid_lines_skipped_and_counted_without_strict(tmp_path, capsys):
    write(tmp_path / "in" / "mixed.txt", b"good line\n\xff bad line\nlast line\n")
    write(tmp_path / "in" / "mixed.jsonl", b'{"text": "one"}\nnot json\n{"text": "t\xc3wo"}\n{"text": "three"}\n')
    out = prepare(tiny_config([tmp_path / "in"], tmp_path / "out", vocab_size=300, val_fraction=0.0))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["skipped"]["invalid_lines"] == 3
    assert "skipped 3 invalid line(s)" in capsys.readouterr().err
    tok = Tokenizer.load(out)
    tokens = PackedTokens(out, "train")
    assert [tok.decode(tokens.document(i)[:-1]) for i in range(tokens.num_documents)] == [
        "one", "three", "good line\nlast line\n"]


def test_refuses_to_replace_without_overwrite(corpus, prepared, tmp_path):
    existing = tmp_path / "out"
    shutil.copytree(prepared, existing)
    before = tree_digest(existing)
    with pytest.raises(DataError, match="already exists"):
        prepare(tiny_config([corpus[0]], existing))
    assert tree_digest(existing) == before


def test_overwrite_replaces_only_when_complete(corpus, prepared, tmp_path):
    existing = tmp_path / "out"
    shutil.copytree(prepared, existing)
    (existing / "stale.txt").write_text("old")
    prepare(tiny_config([corpus[0]], existing, overwrite=True))
    assert tree_digest(existing) == tree_digest(prepared)


def test_truncated_or_missing_shard(prepared, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(prepared, broken)
    shard = broken / "train" / "shard_00001.bin"
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(CorruptDataError, match="shard_00001.bin is truncated"):
        PackedTokens(broken, "train")
    with pytest.raises(CorruptDataError, match="truncated"):
        build_train_loader(DataLoaderConfig(data=str(broken), seq_len=8, global_batch_size=2))
    shard.unlink()
    with pytest.raises(CorruptDataError, match="missing"):
        PackedTokens(broken, "train")
    with pytest.raises(CorruptDataError, match="not a prepared data folder"):
        PackedTokens(tmp_path, "train")


def test_tokenizer_that_does_not_match_the_shards(corpus, prepared, tmp_path):
    other = prepare(tiny_config([corpus[0]], tmp_path / "other", vocab_size=350))
    with pytest.raises(TokenizerError, match="does not match"):
        PackedTokens(prepared, "train", tokenizer=Tokenizer.load(other))
    with pytest.raises(TokenizerError, match="does not match"):
        build_train_loader(DataLoaderConfig(data=str(prepared), tokenizer=str(other), seq_len=8, global_batch_size=2))
    swapped = tmp_path / "swapped"
    shutil.copytree(prepared, swapped)
    shutil.copyfile(other / "tokenizer.model", swapped / "tokenizer.model")
    with pytest.raises(TokenizerError, match="not the tokenizer these shards were made with"):
        PackedTokens(swapped, "train")
    with pytest.raises(TokenizerError, match="different tokenizers"):
        build_train_loader(DataLoaderConfig(data=f"0.5:{prepared},0.5:{other}", seq_len=8, global_batch_size=2))


def test_cli_subprocess_help_and_error(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "data_pipeline.prepare", "--help"], capture_output=True, text=True,
                         env=env, cwd=tmp_path)
    assert run.returncode == 0 and "--train-tokenizer" in run.stdout and "--val-fraction" in run.stdout
    run = subprocess.run([sys.executable, "-m", "data_pipeline.prepare", "--input", "nope.txt", "--out", "x",
                          "--train-tokenizer"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 2 and run.stderr.strip() == "error: input not found: nope.txt"
    assert not (tmp_path / "x").exists()


def test_tokenizer_training_needs_text(tmp_path):
    write(tmp_path / "tiny.txt", "".join(make_docs(1, 0)).encode())
    with pytest.raises(TokenizerError, match="tokenizer training failed"):
        prepare(tiny_config([tmp_path / "tiny.txt"], tmp_path / "out", vocab_size=5000))
    assert not (tmp_path / "out").exists()


def test_config_errors(corpus, tmp_path):
    for bad in (dict(val_fraction=1.0), dict(train_tokenizer=False), dict(split_by="page")):
        with pytest.raises(DataError):
            prepare(tiny_config([corpus[0]], tmp_path / "out", **bad))
    with pytest.raises(DataError, match="no --input"):
        prepare(tiny_config([], tmp_path / "out"))


@pytest.mark.parametrize("unit, expected", [
    ("file", ["one\ntwo\n\nthree\n"]), ("paragraph", ["one\ntwo", "three\n"]), ("line", ["one", "two", "three"])])
def test_plain_text_document_units(unit, expected, prepared, tmp_path):
    write(tmp_path / "p.txt", b"one\ntwo\n\nthree\n")
    out = prepare(tiny_config([tmp_path / "p.txt"], tmp_path / "out", train_tokenizer=False, tokenizer=str(prepared),
                              val_fraction=0.0, txt_unit=unit))
    tokens, tok = PackedTokens(out), Tokenizer.load(out)
    assert [tok.decode(tokens.document(i)[:-1]) for i in range(tokens.num_documents)] == expected
