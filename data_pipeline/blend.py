"""Weighted blending of several sequence datasets into one, deterministically."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .errors import DataConfigError, TokenizerError


def interleave(weights: Sequence[float], num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Which dataset serves each blended position, and the how-many-th sample of it that is.

    Dataset d's k-th sample sits at the ideal position (k + 1/2) / w_d; sorting all of them
    gives an evenly spread order in which every prefix holds each dataset within one sample
    of its share. Ties go to the lower dataset index.
    """
    owners, ranks, keys = [], [], []
    for d, w in enumerate(weights):
        count = math.ceil(num_samples * w) + 1
        k = np.arange(count, dtype=np.int64)
        owners.append(np.full(count, d, dtype=np.int64))
        ranks.append(k)
        keys.append((k + 0.5) / w)
    owners, ranks, keys = map(np.concatenate, (owners, ranks, keys))
    order = np.lexsort((owners, keys))[:num_samples]
    return owners[order], ranks[order]


class BlendedDataset:
    """Samples from several datasets in proportion to their weights.

    ``BlendedDataset([(ds_a, 0.7), (ds_b, 0.3)], seed)`` has ``num_samples`` items (default:
    the datasets' total length). A dataset asked for more samples than it has is repeated,
    each pass in a fresh order seeded by ``(seed, dataset, pass)``. All parts must yield the
    same sequence length and come from the same tokenizer.
    """

    def __init__(self, datasets_and_weights: Sequence[tuple[object, float]], seed: int = 0,
                 num_samples: int | None = None):
        if not datasets_and_weights:
            raise DataConfigError("a blend needs at least one dataset")
        self.datasets = [d for d, _ in datasets_and_weights]
        raw = np.array([float(w) for _, w in datasets_and_weights])
        if np.any(raw <= 0) or not np.all(np.isfinite(raw)):
            raise DataConfigError(f"blend weights must be positive, got {raw.tolist()}")
        self.weights = raw / raw.sum()
        self._check_compatible()
        self.seed = seed
        self.num_samples = int(num_samples if num_samples is not None else sum(len(d) for d in self.datasets))
        self.dataset_index, rank = interleave(self.weights, self.num_samples)
        self.sample_index = np.empty_like(rank)
        for d, dataset in enumerate(self.datasets):
            mine = self.dataset_index == d
            self.sample_index[mine] = self._reorder(d, len(dataset), rank[mine])

    def _check_compatible(self) -> None:
        first = self.datasets[0]
        for other in self.datasets[1:]:
            for attr in ("vocab_size", "tokenizer_sha256"):
                if getattr(other, attr, None) != getattr(first, attr, None):
                    raise TokenizerError(f"cannot blend datasets made with different tokenizers ({attr}: "
                                         f"{getattr(first, attr, None)} vs {getattr(other, attr, None)})")
            if getattr(other, "seq_len", None) != getattr(first, "seq_len", None):
                raise DataConfigError("cannot blend datasets with different sequence lengths")

    def _reorder(self, d: int, length: int, ranks: np.ndarray) -> np.ndarray:
        """Map the k-th use of dataset d to one of its samples: pass k // length, shuffled per pass."""
        if length == 0:
            raise DataConfigError(f"blended dataset {d} is empty")
        out = np.empty_like(ranks)
        passes = ranks // length
        for p in np.unique(passes):
            order = np.random.default_rng((self.seed, d, int(p))).permutation(length)
            sel = passes == p
            out[sel] = order[ranks[sel] % length]
        return out

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict:
        return self.datasets[int(self.dataset_index[i])][int(self.sample_index[i])]

    def __getattr__(self, name: str):
        # vocab_size, eos_id, seq_len, tokenizer_sha256, ...: the (shared) values of the first part.
        if name.startswith("_") or name in ("datasets",):
            raise AttributeError(name)
        return getattr(self.datasets[0], name)

    def counts(self) -> np.ndarray:
        """How many blended samples each dataset serves."""
        return np.bincount(self.dataset_index, minlength=len(self.datasets))
