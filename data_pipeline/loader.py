"""Training and validation batches for one (DP rank, CP rank), with background prefetch.

    loader = build_train_loader(DataLoaderConfig(data="default", seq_len=512, global_batch_size=32),
                                dp_rank, dp_size, cp_rank, cp_size)
    batch = next(loader)        # input_ids, labels, doc_ids: int64 [32 / dp_size, 512 / cp_size]
    ckpt["data"] = loader.state_dict()   ...   loader.load_state_dict(ckpt["data"])

How a global batch is divided: the sampler picks ``global_batch_size`` sequences; DP rank r
takes rows ``[r*B, (r+1)*B)`` with ``B = global_batch_size / dp_size``; CP rank c takes the
contiguous columns ``[c*T/cp, (c+1)*T/cp)`` of every row (the order in which the memory
layers pass their state from rank to rank); tensor-parallel ranks call with the same
(dp_rank, cp_rank) and get identical batches. ``doc_ids`` are numbered over the whole row
before the CP split, so a CP slice continues the numbering of the slice before it.
"""
from __future__ import annotations

import dataclasses
import queue
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .blend import BlendedDataset
from .default_corpus import DefaultCorpusConfig, default_corpus_dir
from .errors import DataConfigError, DataError
from .sampler import ResumableSampler
from .sequences import SequenceDataset, document_ids
from .shards import PackedTokens
from .synthetic import SYNTHETIC_TASKS, SyntheticConfig, synthetic_dataset

__all__ = [
    "BlendedDataset", "DataLoaderConfig", "PackedTokens", "ResumableSampler", "SequenceDataset",
    "build_train_loader", "build_val_loader", "cp_shard", "document_ids", "parse_data_spec", "resolve_dataset",
]

BATCH_KEYS = ("input_ids", "labels", "doc_ids")
_VAL_SEED_OFFSET = 1_000_003


@dataclass
class DataLoaderConfig:
    """What to load and how to batch it.

    ``data`` is ``default`` (the embedded standard-library corpus), ``synthetic`` / ``mqar`` /
    ``passkey`` (generated, see `synthetic`), a prepared folder, or a weighted blend of those:
    ``"0.7:data/web,0.3:data/code"``.
    """

    data: str = "default"
    seq_len: int = 512
    global_batch_size: int = 8
    seed: int = 0
    shuffle: bool = True
    prefetch: int = 2                  # batches prepared ahead by a background thread; 0 = none
    val_batches: int | None = None     # cap on batches per evaluation (None: the whole val split)
    tokenizer: str | None = None       # if set, prepared data must come from this tokenizer
    cache_dir: str | None = None       # default-corpus cache (default: $MEMTRAIN_CACHE or ~/.cache/memtrain)
    default_corpus: DefaultCorpusConfig = field(default_factory=DefaultCorpusConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    pin_memory: bool = False           # page-lock batches (only when CUDA is available)
    layout: str = "shuffled"           # "streaming": row b of each batch continues row b of the last (sampler.py)
    step_size: int | None = None       # samples per optimizer step (global_batch_size × accumulation; sampler.py)


def parse_data_spec(spec: str) -> list[tuple[str, float]]:
    """``"0.7:a,0.3:b"`` → ``[("a", 0.7), ("b", 0.3)]``; an item without ``W:`` has weight 1."""
    parts = []
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        match = re.fullmatch(r"(\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+):(.+)", item)
        parts.append((match.group(2), float(match.group(1))) if match else (item, 1.0))
    if not parts:
        raise DataConfigError(f"empty data spec {spec!r}")
    return parts


def _one_dataset(name: str, cfg: DataLoaderConfig, split: str):
    if name in SYNTHETIC_TASKS:
        if split == "train":
            return synthetic_dataset(name, cfg.seq_len, cfg.synthetic, cfg.seed)
        val_cfg = dataclasses.replace(cfg.synthetic, num_samples=cfg.synthetic.num_val_samples)
        return synthetic_dataset(name, cfg.seq_len, val_cfg, cfg.seed + _VAL_SEED_OFFSET)
    if name == "default":
        path = default_corpus_dir(cfg.cache_dir, cfg.default_corpus)
    else:
        path = Path(name)
        if not path.exists():
            raise DataError(f"data folder not found: {path} (expected default, synthetic, mqar, passkey "
                            f"or a folder made by `python -m data_pipeline.prepare`)")
    return SequenceDataset(PackedTokens(path, split, tokenizer=cfg.tokenizer), cfg.seq_len)


def resolve_dataset(cfg: DataLoaderConfig, split: str = "train"):
    """The dataset that ``cfg.data`` names, for ``split`` (``train`` or ``val``)."""
    parts = parse_data_spec(cfg.data)
    if len(parts) == 1:
        return _one_dataset(parts[0][0], cfg, split)
    seed = cfg.seed if split == "train" else cfg.seed + _VAL_SEED_OFFSET
    return BlendedDataset([(_one_dataset(name, cfg, split), w) for name, w in parts], seed)


def cp_shard(tensor: torch.Tensor, cp_rank: int, cp_size: int, dim: int = 1) -> torch.Tensor:
    """The contiguous piece of ``tensor`` along ``dim`` that context-parallel rank ``cp_rank`` holds."""
    length = tensor.shape[dim]
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise DataConfigError(f"cp_rank {cp_rank} outside [0, {cp_size})")
    if length % cp_size:
        raise DataConfigError(f"sequence length {length} is not divisible by the context-parallel size {cp_size}")
    piece = length // cp_size
    return tensor.narrow(dim, cp_rank * piece, piece)


def collate(samples: list[dict], cp_rank: int = 0, cp_size: int = 1, pin_memory: bool = False) -> dict:
    """Stack samples into int64 ``[B, T / cp_size]`` tensors holding this CP rank's columns."""
    batch = {}
    for key in BATCH_KEYS:
        full = torch.from_numpy(np.stack([s[key] for s in samples]).astype(np.int64, copy=False))
        piece = cp_shard(full, cp_rank, cp_size, dim=1)
        piece = piece.contiguous() if cp_size > 1 else piece
        batch[key] = piece.pin_memory() if pin_memory else piece
    return batch


class TrainLoader:
    """An endless iterator of training batches whose position can be saved and restored.

    With ``prefetch > 0`` a daemon thread builds the next batches while the model computes;
    the position in `state_dict` is always that of the batches already *returned*.
    """

    def __init__(self, dataset, sampler: ResumableSampler, cp_rank: int = 0, cp_size: int = 1,
                 prefetch: int = 2, pin_memory: bool = False):
        if dataset is not None and getattr(dataset, "seq_len", None) is not None and dataset.seq_len % cp_size:
            raise DataConfigError(f"seq_len {dataset.seq_len} is not divisible by the context-parallel size {cp_size}")
        self.dataset, self.sampler = dataset, sampler
        self.cp_rank, self.cp_size = cp_rank, cp_size
        self.prefetch = prefetch
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self._state = sampler.state_dict()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def vocab_size(self) -> int:
        return self.dataset.vocab_size

    @property
    def eos_id(self) -> int:
        return self.dataset.eos_id

    @property
    def tokenizer_path(self) -> Path | None:
        """The SentencePiece model of the data (for `tokenizer.to_hf_tokenizer`); None for synthetic data."""
        return self.dataset.tokenizer_path

    def _make_batch(self, indices: list[int]) -> dict:
        return collate([self.dataset[i] for i in indices], self.cp_rank, self.cp_size, self.pin_memory)

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                batch = self._make_batch(self.sampler.next_batch())
                item = (batch, self.sampler.state_dict())
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._queue.put((exc, None))

    def _start(self) -> None:
        self._stop.clear()
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(target=self._produce, name="data-prefetch", daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if self.prefetch <= 0:
            batch = self._make_batch(self.sampler.next_batch())
            self._state = self.sampler.state_dict()
            return batch
        if self._thread is None:
            self._start()
        batch, state = self._queue.get()
        if state is None:
            self.close()
            raise batch
        self._state = state
        return batch

    def close(self) -> None:
        """Stop the prefetch thread (the next batch restarts it from the current position)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._queue = None
            self.sampler.load_state_dict(self._state)

    def state_dict(self) -> dict:
        return dict(self._state)

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.sampler.load_state_dict(state)
        self._state = self.sampler.state_dict()

    def __del__(self):
        if getattr(self, "_thread", None) is not None:
            self._stop.set()


class ValLoader:
    """One ordered pass over held-out data per iteration; the same batches every time."""

    def __init__(self, dataset, global_batch_size: int, dp_rank: int, dp_size: int, cp_rank: int, cp_size: int,
                 max_batches: int | None = None):
        if global_batch_size % dp_size:
            raise DataConfigError(f"global batch size {global_batch_size} is not divisible by DP size {dp_size}")
        self.dataset = dataset
        self.global_batch_size, self.dp_rank, self.dp_size = global_batch_size, dp_rank, dp_size
        self.cp_rank, self.cp_size = cp_rank, cp_size
        self.num_batches = len(dataset) // global_batch_size
        if max_batches is not None:
            self.num_batches = min(self.num_batches, max_batches)
        if self.num_batches == 0:
            raise DataError(f"the validation split has {len(dataset)} sequences, fewer than one global batch of "
                            f"{global_batch_size}; prepare with a larger --val-fraction or use a shorter sequence")

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict]:
        local = self.global_batch_size // self.dp_size
        for b in range(self.num_batches):
            first = b * self.global_batch_size + self.dp_rank * local
            yield collate([self.dataset[i] for i in range(first, first + local)], self.cp_rank, self.cp_size)


def build_train_loader(cfg: DataLoaderConfig, dp_rank: int = 0, dp_size: int = 1, cp_rank: int = 0,
                       cp_size: int = 1) -> TrainLoader:
    """This rank's endless, resumable, prefetching iterator of training batches."""
    if cfg.seq_len % cp_size:
        raise DataConfigError(f"seq_len {cfg.seq_len} is not divisible by the context-parallel size {cp_size}")
    dataset = resolve_dataset(cfg, "train")
    sampler = ResumableSampler(len(dataset), cfg.global_batch_size, dp_rank, dp_size, cfg.seed, cfg.shuffle,
                               cfg.layout, cfg.step_size)
    return TrainLoader(dataset, sampler, cp_rank, cp_size, cfg.prefetch, cfg.pin_memory)


def build_val_loader(cfg: DataLoaderConfig, dp_rank: int = 0, dp_size: int = 1, cp_rank: int = 0,
                     cp_size: int = 1) -> ValLoader:
    """This rank's share of the held-out split, in a fixed order (for validation loss / perplexity)."""
    if cfg.seq_len % cp_size:
        raise DataConfigError(f"seq_len {cfg.seq_len} is not divisible by the context-parallel size {cp_size}")
    dataset = resolve_dataset(cfg, "val")
    return ValLoader(dataset, cfg.global_batch_size, dp_rank, dp_size, cp_rank, cp_size, cfg.val_batches)
