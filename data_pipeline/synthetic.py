"""Synthetic datasets, generated on the fly and deterministic by ``(seed, index)``.

- `MarkovLMDataset` (``--data synthetic``): random-but-learnable language modelling for smoke
  tests. Each document is a walk on ``1..V-1`` whose step is one of ``len(step_probs)`` fixed
  offsets, so the next token depends on the previous one only and the best achievable loss
  is about the entropy of ``step_probs`` (`entropy_nats`).
- `MQARDataset`: multi-query associative recall (Zoology): key-value pairs, then the keys
  again; only the values after the queried keys are labelled.
- `PasskeyDataset`: a digit string hidden at some depth of a random haystack, asked for at
  the end; only the answer digits are labelled.

Items have the format of `SequenceDataset`: ``dict(input_ids, labels, doc_ids)``; ``labels``
is ``-100`` where nothing is to be predicted.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import DataConfigError
from .sequences import document_ids

IGNORE_INDEX = -100


def _rng(seed: int, index: int, salt: int) -> np.random.Generator:
    return np.random.default_rng((seed, salt, index))


def _check_index(i: int, n: int) -> None:
    if not 0 <= i < n:
        raise IndexError(f"sample {i} outside [0, {n})")


@dataclass(frozen=True)
class SyntheticConfig:
    """Settings of the synthetic datasets as the loader builds them from ``--data synthetic|mqar|passkey``."""

    vocab_size: int = 256
    num_samples: int = 1 << 20        # virtual length of the train split; samples are generated on demand
    num_val_samples: int = 1024       # length of the val split (drawn with another seed)
    mean_doc_len: int = 200           # markov
    num_kv_pairs: int = 8             # mqar
    passkey_len: int = 5              # passkey


class MarkovLMDataset:
    """Learnable random text: token 0 is EOS, documents are walks with a few fixed step sizes."""

    eos_id = 0
    tokenizer_sha256 = None
    tokenizer_path = None  # token ids are the data; there is no text tokenizer

    def __init__(self, seq_len: int, vocab_size: int = 256, num_samples: int = 1 << 20, seed: int = 0,
                 mean_doc_len: int = 200, step_probs: tuple[float, ...] = (0.5, 0.25, 0.125, 0.125)):
        if vocab_size < len(step_probs) + 2:
            raise DataConfigError(f"vocab_size {vocab_size} too small for {len(step_probs)} steps")
        self.seq_len, self.vocab_size, self.num_samples, self.seed = seq_len, vocab_size, num_samples, seed
        self.mean_doc_len = mean_doc_len
        self.step_probs = np.asarray(step_probs) / np.sum(step_probs)
        # The fixed "grammar": the offsets, drawn once from the dataset seed.
        self.steps = np.random.default_rng((seed, 0x5EED)).choice(np.arange(1, vocab_size - 1), len(step_probs),
                                                                  replace=False)

    @property
    def entropy_nats(self) -> float:
        """Per-token entropy of the walk (ignoring EOS and document starts)."""
        return float(-(self.step_probs * np.log(self.step_probs)).sum())

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict:
        _check_index(i, self.num_samples)
        rng = _rng(self.seed, i, 1)
        n = self.seq_len + 1
        span = self.vocab_size - 1
        steps = self.steps[rng.choice(len(self.step_probs), size=n, p=self.step_probs)]
        is_eos = rng.random(n) < 1.0 / self.mean_doc_len
        starts = np.concatenate([[True], is_eos[:-1]])  # a document starts after each EOS
        steps = np.where(starts, rng.integers(0, span, size=n), steps)
        # Restarting at each document start: the walk is a cumulative sum that resets there.
        total = np.cumsum(steps)
        base = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
        walk = total - np.concatenate([[0], total])[base]
        tokens = (walk % span + 1).astype(np.int64)
        tokens[is_eos] = self.eos_id
        input_ids = tokens[:-1]
        return {"input_ids": input_ids, "labels": tokens[1:].copy(), "doc_ids": document_ids(input_ids, self.eos_id)}


class MQARDataset:
    """Multi-query associative recall: ``k1 v1 k2 v2 ... kN vN`` then ``... k_a v_a ... k_b v_b ...``.

    Keys come from ``[1, V/2)``, values from ``[V/2, V)``, token 0 fills the gaps. Every key is
    queried once, in random order, at random places of the query region; the label at each
    queried key is its value, all other labels are ``-100``.
    """

    eos_id = -1  # no documents: a sample is one sequence
    tokenizer_sha256 = None
    tokenizer_path = None  # token ids are the data; there is no text tokenizer

    def __init__(self, seq_len: int, vocab_size: int = 256, num_kv_pairs: int = 8, num_samples: int = 1 << 20,
                 seed: int = 0):
        query_slots = (seq_len + 1 - 2 * num_kv_pairs) // 2
        if query_slots < num_kv_pairs:
            raise DataConfigError(f"seq_len {seq_len} too short for {num_kv_pairs} key-value pairs and their queries")
        if vocab_size // 2 - 1 < num_kv_pairs:
            raise DataConfigError(f"vocab_size {vocab_size} too small for {num_kv_pairs} distinct keys")
        self.seq_len, self.vocab_size, self.num_kv_pairs = seq_len, vocab_size, num_kv_pairs
        self.num_samples, self.seed = num_samples, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict:
        _check_index(i, self.num_samples)
        rng = _rng(self.seed, i, 2)
        n, half, pairs = self.seq_len + 1, self.vocab_size // 2, self.num_kv_pairs
        keys = rng.choice(np.arange(1, half), pairs, replace=False)
        values = rng.integers(half, self.vocab_size, pairs)
        tokens = np.zeros(n, dtype=np.int64)
        tokens[0:2 * pairs:2], tokens[1:2 * pairs:2] = keys, values
        region = 2 * pairs
        slots = np.sort(rng.choice((n - region) // 2, pairs, replace=False))
        asked = rng.permutation(pairs)
        query_pos = region + 2 * slots
        tokens[query_pos], tokens[query_pos + 1] = keys[asked], values[asked]
        labels = np.full(self.seq_len, IGNORE_INDEX, dtype=np.int64)
        labels[query_pos] = values[asked]
        return {"input_ids": tokens[:-1], "labels": labels, "doc_ids": np.zeros(self.seq_len, dtype=np.int32)}


class PasskeyDataset:
    """Needle in a haystack: ``... NEEDLE d1..dk ... QUERY d1..dk`` with only ``d1..dk`` labelled.

    Token ids: 1 = NEEDLE, 2 = QUERY, 3..12 = digits 0..9, ``[13, V)`` = haystack. ``depth`` in
    [0, 1] fixes where the needle sits (fraction of the haystack); ``None`` draws it per sample.
    """

    NEEDLE, QUERY, DIGIT0, FILLER0 = 1, 2, 3, 13
    eos_id = -1
    tokenizer_sha256 = None
    tokenizer_path = None  # token ids are the data; there is no text tokenizer

    def __init__(self, seq_len: int, vocab_size: int = 256, passkey_len: int = 5, num_samples: int = 1 << 20,
                 seed: int = 0, depth: float | None = None):
        if vocab_size <= self.FILLER0 + 1:
            raise DataConfigError(f"vocab_size {vocab_size} too small for the passkey task "
                                  f"(needs > {self.FILLER0 + 1})")
        if seq_len + 1 < 2 * (passkey_len + 1) + 1:
            raise DataConfigError(f"seq_len {seq_len} too short for a passkey of {passkey_len} digits")
        self.seq_len, self.vocab_size, self.passkey_len = seq_len, vocab_size, passkey_len
        self.num_samples, self.seed, self.depth = num_samples, seed, depth

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict:
        _check_index(i, self.num_samples)
        rng = _rng(self.seed, i, 3)
        n, k = self.seq_len + 1, self.passkey_len
        digits = self.DIGIT0 + rng.integers(0, 10, k)
        tokens = rng.integers(self.FILLER0, self.vocab_size, n)
        haystack = n - 2 * (k + 1)          # tokens before the query, minus the needle
        depth = rng.random() if self.depth is None else self.depth
        at = int(round(depth * haystack))
        tokens[at], tokens[at + 1:at + 1 + k] = self.NEEDLE, digits
        query = n - (k + 1)
        tokens[query], tokens[query + 1:] = self.QUERY, digits
        labels = np.full(self.seq_len, IGNORE_INDEX, dtype=np.int64)
        labels[query:query + k] = digits      # predicting d1..dk from QUERY d1..d(k-1)
        return {"input_ids": tokens[:-1].astype(np.int64), "labels": labels,
                "doc_ids": np.zeros(self.seq_len, dtype=np.int32)}


SYNTHETIC_TASKS = ("synthetic", "mqar", "passkey")


def synthetic_dataset(task: str, seq_len: int, cfg: SyntheticConfig, seed: int):
    """The dataset behind ``--data synthetic|mqar|passkey``."""
    if task == "synthetic":
        return MarkovLMDataset(seq_len, cfg.vocab_size, cfg.num_samples, seed, cfg.mean_doc_len)
    if task == "mqar":
        return MQARDataset(seq_len, cfg.vocab_size, cfg.num_kv_pairs, cfg.num_samples, seed)
    if task == "passkey":
        return PasskeyDataset(seq_len, cfg.vocab_size, cfg.passkey_len, cfg.num_samples, seed)
    raise DataConfigError(f"unknown synthetic task {task!r} (choose from {SYNTHETIC_TASKS})")
