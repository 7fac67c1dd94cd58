"""What `pretrain.evaluate` feeds a model: held-out token windows and synthetic recall tasks.

Token windows (perplexity by position): a window of length L is L + 1 consecutive tokens of a
held-out token stream (inputs = the first L, targets = the last L). ``align="stream"`` cuts the
stream into back-to-back windows from its start (documents packed, as in training);
``align="document"`` starts every window at the first token of a document that has at least
L + 1 tokens (position t is then exactly the t-th token of a document).

Sources (``--data``):

* a folder made by ``python -m data_pipeline.prepare`` (its ``val`` split by default);
* ``default``: the embedded default corpus's held-out split (prepared on first use);
* ``synthetic``: the learnable Markov walk of ``data_pipeline.synthetic`` (its val samples), ids
  mapped into the vocabulary like the recall tasks' (``task_vocab``, ``offset``);
* a text / JSON-lines / parquet file or folder (``data_pipeline.sources``: one document per file,
  JSON line or row), tokenized with the model folder's own tokenizer, EOS after every document.

Recall tasks reuse ``data_pipeline.synthetic`` (`MQARDataset`, `PasskeyDataset`): the task's ids
``0..task_vocab-1`` are shifted by ``offset`` into the model's vocabulary (see `recall_batch`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.synthetic import IGNORE_INDEX, MarkovLMDataset, MQARDataset, PasskeyDataset

VAL_SEED_OFFSET = 1_000_003   # = data_pipeline.loader's: the held-out samples of --data synthetic|mqar|passkey
RECALL_TASKS = ("mqar", "passkey")
ALIGNS = ("stream", "document")


class EvalError(Exception):
    """Bad input to the evaluation; printed as one ``error:`` line."""


# ---------------------------------------------------------------------------------- buckets
def bucket_edges(length: int, spec: str = "log") -> list[int]:
    """Edges ``e_0 = 0 < e_1 < … < e_n = length`` of the position buckets ``[e_i, e_{i+1})``.

    ``log``: ``[0, 16), [16, 32), [32, 64), …`` (powers of two); an integer N: fixed width N.
    """
    if spec == "log":
        edges, e = [0], 16
        while e < length:
            edges.append(e)
            e *= 2
        return edges + [length]
    try:
        width = int(spec)
    except ValueError:
        raise EvalError(f"--buckets must be 'log' or a positive integer width, got {spec!r}") from None
    if width < 1:
        raise EvalError(f"--buckets width must be positive, got {width}")
    return list(range(0, length, width)) + [length]


# ---------------------------------------------------------------------------- token sources
@dataclass
class TokenStream:
    """A held-out token stream: ``read(start, n)`` and the exclusive document end offsets."""

    name: str
    num_tokens: int
    vocab_size: int            # every id is below this
    doc_ends: np.ndarray       # exclusive ends (int64)
    read: object               # (start, n) -> int64 array
    eos_id: int | None = None  # ends every document (None: no documents)
    tokenizer_sha256: str | None = None

    def windows(self, length: int, count: int, align: str = "stream") -> np.ndarray:
        """Up to ``count`` windows ``[n, length + 1]`` (fewer if the data has fewer; at least one)."""
        need = length + 1
        if align == "stream":
            starts = list(range(0, self.num_tokens - need + 1, need))[:count]
            where = f"{self.num_tokens} tokens"
        elif align == "document":
            ends = np.asarray(self.doc_ends, dtype=np.int64)
            begins = np.concatenate([[0], ends[:-1]])
            starts = [int(b) for b, e in zip(begins, ends) if e - b >= need][:count]
            where = f"no document of ≥ {need} tokens (the longest has {int((ends - begins).max(initial=0))})"
        else:
            raise EvalError(f"--align must be one of {ALIGNS}, got {align!r}")
        if not starts:
            raise EvalError(f"{self.name} is too short for a window of {length} + 1 tokens ({where}); "
                            "use shorter --lengths" + (" or --align stream" if align == "document" else ""))
        return np.stack([self.read(s, need) for s in starts])


@dataclass
class MarkovStream:
    """``--data synthetic``: held-out samples of the Markov walk (one per window), ids shifted by ``offset``."""

    task_vocab: int
    offset: int
    seed: int
    name: str = "synthetic"
    tokenizer_sha256 = None

    @property
    def vocab_size(self) -> int:
        return self.offset + self.task_vocab

    @property
    def eos_id(self) -> int:
        return self.offset + MarkovLMDataset.eos_id

    def windows(self, length: int, count: int, align: str = "stream") -> np.ndarray:
        ds = MarkovLMDataset(length, self.task_vocab, count, self.seed + VAL_SEED_OFFSET)
        rows = [np.concatenate([s["input_ids"], s["labels"][-1:]]) for s in (ds[i] for i in range(count))]
        return np.stack(rows) + self.offset


def _packed_stream(path: Path, split: str) -> TokenStream:
    from data_pipeline.shards import PackedTokens

    packed = PackedTokens(path, split)
    if packed.num_tokens == 0:
        raise EvalError(f"the {split!r} split of {path} is empty")
    return TokenStream(f"{path} ({split})", packed.num_tokens, packed.vocab_size,
                       np.asarray(packed.doc_ends, dtype=np.int64), packed.read, packed.eos_id, packed.tokenizer_sha256)


def _text_stream(path: Path, tokenizer, text_field: str) -> TokenStream:
    from data_pipeline.sources import DocumentReader, discover

    reader = DocumentReader(discover([path]), text_field=text_field)
    eos = tokenizer.eos_token_id
    pieces, ends, total = [], [], 0
    for _, text in reader:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        pieces.append(np.asarray(ids, dtype=np.int64))
        total += len(ids)
        ends.append(total)
    if total == 0:
        raise EvalError(f"{path} holds no text (empty files or no documents)")
    tokens = np.concatenate(pieces)
    return TokenStream(str(path), total, int(tokens.max()) + 1, np.asarray(ends, dtype=np.int64),
                       lambda s, n: tokens[s:s + n].copy(), eos)


def open_stream(spec: str, split: str = "val", *, synthetic: "RecallConfig", tokenizer=None,
                text_field: str = "text", cache_dir: str | None = None):
    """The token source ``spec`` names (see the module docstring); ``tokenizer`` is the model's
    (an HF tokenizer, needed only for text files); ``synthetic`` gives the vocabulary, offset and
    seed of ``--data synthetic``."""
    if spec == "synthetic":
        return MarkovStream(synthetic.task_vocab, synthetic.offset, synthetic.seed)
    if spec == "default":
        from data_pipeline.default_corpus import default_corpus_dir

        return _packed_stream(default_corpus_dir(cache_dir), split)
    path = Path(spec)
    if not path.exists():
        raise EvalError(f"--data {spec}: no such file or folder (expected default, synthetic, a folder of "
                        "`python -m data_pipeline.prepare` or a .txt/.jsonl/.parquet file)")
    if path.is_dir() and (path / "meta.json").is_file():
        return _packed_stream(path, split)
    if tokenizer is None:
        raise EvalError(f"--data {spec} is text: it is tokenized with the model folder's tokenizer, and this "
                        "model folder has none (use a prepared folder, `default` or `synthetic`)")
    try:
        return _text_stream(path, tokenizer, text_field)
    except DataError as exc:
        raise EvalError(f"--data {spec}: {exc}") from None


# ------------------------------------------------------------------------------ recall tasks
@dataclass(frozen=True)
class RecallConfig:
    """The synthetic recall tasks' settings; ids ``t`` of a task become ``offset + t``."""

    task_vocab: int = 256
    offset: int = 0
    mqar_pairs: int = 8
    passkey_digits: int = 5
    seed: int = 0

    def chance(self, task: str) -> float:
        """Accuracy of a uniform guess among the task's possible answers (values / digits)."""
        return 1.0 / (self.task_vocab - self.task_vocab // 2) if task == "mqar" else 0.1


def recall_batch(task: str, length: int, count: int, cfg: RecallConfig, depth: float | None = None):
    """``count`` held-out samples of ``task`` at ``length``: (ids, targets) int64 ``[count, length]``.

    ``targets[t]`` is the token the model must predict at position t (the next token) or -100.
    MQAR: ``k1 v1 … kN vN`` then each key again at a random place, its value to be predicted
    (keys from ``[1, V/2)``, values from ``[V/2, V)``, gaps 0). Passkey: a needle token and
    ``passkey_digits`` digits at ``depth`` of a random haystack, then a query token; the digits
    are to be predicted. Samples are those of the ``val`` split of ``--data mqar|passkey``
    (seed + 1_000_003) for the same vocabulary and length.
    """
    seed = cfg.seed + VAL_SEED_OFFSET
    try:
        if task == "mqar":
            ds = MQARDataset(length, cfg.task_vocab, cfg.mqar_pairs, count, seed)
        elif task == "passkey":
            ds = PasskeyDataset(length, cfg.task_vocab, cfg.passkey_digits, count, seed, depth)
        else:
            raise EvalError(f"unknown recall task {task!r} (choose from {', '.join(RECALL_TASKS)})")
    except DataError as exc:
        raise EvalError(f"{task} at length {length}: {exc}") from None
    samples = [ds[i] for i in range(count)]
    ids = np.stack([s["input_ids"] for s in samples]) + cfg.offset
    labels = np.stack([s["labels"] for s in samples])
    targets = np.where(labels != IGNORE_INDEX, labels + cfg.offset, IGNORE_INDEX)
    return ids.astype(np.int64), targets.astype(np.int64)
