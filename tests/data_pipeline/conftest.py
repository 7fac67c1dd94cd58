"""Fixtures of the data-pipeline tests: a tiny mixed-format corpus and its prepared folder.

Only fixtures live here (no settings, no environment changes).
"""
import gzip
import json
import random

import pytest
import zstandard

from data_pipeline.prepare import PrepareConfig, prepare

WORDS = ("the memory layer learns a small model at test time while reading tokens and "
         "forgets what it no longer needs; état über naïve 記憶 層 🙂").split()


def make_docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) for _ in range(rng.randint(1, 6))]
        indent = " " * rng.choice((0, 4, 8))
        docs.append("\n".join(indent + line for line in lines) + rng.choice(("", "\n", "\t\n")))
    return docs


def write_corpus(root) -> list[str]:
    """Writes txt / jsonl / jsonl.gz / jsonl.zst / parquet files; returns the documents in input order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    docs = {}
    docs["a.txt"] = make_docs(1, 1)
    (root / "a.txt").write_text(docs["a.txt"][0], encoding="utf-8")
    docs["b.jsonl"] = make_docs(30, 2)
    (root / "b.jsonl").write_text("".join(json.dumps({"id": i, "text": d}) + "\n"
                                          for i, d in enumerate(docs["b.jsonl"])))
    docs["c.jsonl.gz"] = make_docs(25, 3)
    (root / "c.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps({"text": d}) + "\n"
                                                           for d in docs["c.jsonl.gz"]).encode(), mtime=0))
    docs["d.jsonl.zst"] = make_docs(25, 4)
    (root / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"text": d}) + "\n" for d in docs["d.jsonl.zst"]).encode()))
    docs["e.parquet"] = make_docs(20, 5)
    pq.write_table(pa.table({"text": docs["e.parquet"], "n": list(range(20))}), root / "e.parquet")
    docs["f.txt"] = make_docs(1, 6)
    (root / "f.txt").write_text(docs["f.txt"][0], encoding="utf-8")
    return [d for name in sorted(docs) for d in docs[name]]


def tiny_config(inputs, out, **overrides) -> PrepareConfig:
    settings = dict(inputs=[str(p) for p in inputs], out=str(out), train_tokenizer=True, vocab_size=400,
                    val_fraction=0.2, shard_tokens=700, workers=2, progress=False)
    settings.update(overrides)
    return PrepareConfig(**settings)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus") / "corpus"
    return root, write_corpus(root)


@pytest.fixture(scope="session")
def prepared(corpus, tmp_path_factory):
    root, _ = corpus
    return prepare(tiny_config([root], tmp_path_factory.mktemp("prepared") / "data"))
