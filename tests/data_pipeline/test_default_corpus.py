"""The embedded default corpus: file selection, caching, held-out files, concurrent first use, `--data default`."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_pipeline.default_corpus import DefaultCorpusConfig, default_corpus_dir, stdlib_files, stdlib_root
from data_pipeline.loader import DataLoaderConfig, build_train_loader, build_val_loader
from data_pipeline.shards import PackedTokens
from data_pipeline.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[2]
SMALL = DefaultCorpusConfig(max_files=40, vocab_size=600, val_fraction=0.1)


def test_stdlib_file_selection():
    files = stdlib_files()
    root = stdlib_root()
    assert files == sorted(files) and len(files) > 300
    parts = {part for f in files for part in f.relative_to(root).parts[:-1]}
    assert not parts & {"site-packages", "test", "tests", "__pycache__"}
    assert root / "os.py" in files and all(f.suffix == ".py" and f.stat().st_size > 0 for f in files)
    subset = stdlib_files(10)
    assert len(subset) == 10 and subset == sorted(subset) and set(subset) <= set(files)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return cache, default_corpus_dir(cache, SMALL, progress=False)


def test_prepared_once_and_cached(small_corpus):
    cache, path = small_corpus
    assert path.parent == cache and path.name.startswith("default_corpus-")
    stamp = (path / "meta.json").stat().st_mtime_ns
    assert default_corpus_dir(cache, SMALL, progress=False) == path
    assert (path / "meta.json").stat().st_mtime_ns == stamp
    assert default_corpus_dir(cache, DefaultCorpusConfig(max_files=40, vocab_size=601)) != path  # settings → key


def test_validation_split_is_whole_files(small_corpus):
    _, path = small_corpus
    meta = json.loads((path / "meta.json").read_text())
    assert meta["tokenizer"]["vocab_size"] == 600 and meta["settings"]["split_by"] == "file"
    names = [s["name"] for s in meta["sources"]]
    assert len(names) == 40 and names == sorted(names)
    held_out = [names[k] for k in range(40) if (k + 1) // 10 > k // 10]  # every 10th file
    val = PackedTokens(path, "val")
    assert val.num_documents == len(held_out) == 4
    tok = Tokenizer.load(path)
    for i, name in enumerate(held_out):
        source = (stdlib_root() / name).read_text(encoding="utf-8").replace("\r\n", "\n")
        assert tok.decode(val.document(i)[:-1]) == source


def test_data_default_end_to_end(small_corpus):
    cache, _ = small_corpus
    cfg = DataLoaderConfig(data="default", cache_dir=str(cache), default_corpus=SMALL, seq_len=64,
                           global_batch_size=4, val_batches=3)
    train = build_train_loader(cfg, 0, 2, 0, 2)
    batch = next(train)
    assert batch["input_ids"].shape == (2, 32) and batch["input_ids"].max() < train.vocab_size == 600
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    assert len(list(build_val_loader(cfg))) == 3


def test_concurrent_first_use(tmp_path):
    """Several ranks starting at once: one prepares, the others wait and see only the finished folder."""
    code = ("import sys; from data_pipeline.default_corpus import *; "
            "p = default_corpus_dir(sys.argv[1], DefaultCorpusConfig(max_files=8, vocab_size=400), progress=False); "
            "from data_pipeline.shards import PackedTokens; PackedTokens(p).verify(); print(p)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(3)]
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    assert len({out.strip() for out, _ in results}) == 1
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [Path(results[0][0].strip()).name]


def test_cache_location_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMTRAIN_CACHE", str(tmp_path))
    path = default_corpus_dir(config=DefaultCorpusConfig(max_files=5, vocab_size=500), progress=False)
    assert path.parent == tmp_path and (path / "meta.json").is_file()


@pytest.mark.slow
def test_full_default_corpus(tmp_path):
    """The real `--data default` settings (about 10 s on 2 cores)."""
    cfg = DataLoaderConfig(data="default", cache_dir=str(tmp_path), seq_len=512, global_batch_size=8)
    train = build_train_loader(cfg)
    meta = json.loads((Path(train.dataset.tokens.path) / "meta.json").read_text())
    assert train.vocab_size == 8192 and meta["skipped"]["invalid_lines"] == 0
    assert meta["splits"]["train"]["num_tokens"] > 2_000_000 and meta["splits"]["val"]["num_documents"] >= 20
    tok = Tokenizer.load(train.dataset.tokens.path)
    os_py = (stdlib_root() / "os.py").read_text(encoding="utf-8")
    assert len(os_py.encode()) / len(tok.encode(os_py)) > 3.0  # a real code tokenizer, not bytes
    assert next(train)["input_ids"].shape == (8, 512) and len(build_val_loader(cfg)) > 10


def test_cli_prints_the_folder(tmp_path, capsys):
    from data_pipeline.default_corpus import main

    main(["--cache-dir", str(tmp_path), "--max-files", "5", "--vocab-size", "500"])
    path = Path(capsys.readouterr().out.strip())
    assert path.parent == tmp_path and PackedTokens(path).num_tokens > 0
