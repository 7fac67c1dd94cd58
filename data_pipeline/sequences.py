"""Fixed-length training samples cut from a packed token stream."""
from __future__ import annotations

import numpy as np

from .errors import DataError
from .shards import PackedTokens
from .tokenizer import MODEL_FILENAME


def document_ids(input_ids: np.ndarray, eos_id: int) -> np.ndarray:
    """Number the documents inside a sample: 0 until the first EOS, 1 from the token after it, ...

    The EOS itself belongs to the document it ends, so a memory layer resets its state at
    exactly the positions where ``doc_ids`` changes.
    """
    is_eos = np.asarray(input_ids) == eos_id
    ids = np.zeros(len(is_eos), dtype=np.int32)
    np.cumsum(is_eos[:-1], out=ids[1:])
    return ids


class SequenceDataset:
    """Sample ``i`` is tokens ``[i*seq_len, i*seq_len + seq_len + 1)`` of the stream.

    Samples tile the stream without gaps (neighbours share one token: the last label of one is
    the first input of the next); documents run across sample boundaries and are kept apart
    by their EOS and by ``doc_ids``. Items are ``dict(input_ids, labels, doc_ids)`` numpy arrays
    of length ``seq_len`` (int64, int64, int32).
    """

    def __init__(self, tokens: PackedTokens, seq_len: int):
        if seq_len < 1:
            raise DataError(f"seq_len must be positive, got {seq_len}")
        self.tokens = tokens
        self.seq_len = seq_len
        self.eos_id = tokens.eos_id
        self.vocab_size = tokens.vocab_size
        self.tokenizer_sha256 = tokens.tokenizer_sha256
        self.tokenizer_path = tokens.path / MODEL_FILENAME

    def __len__(self) -> int:
        return max(0, (self.tokens.num_tokens - 1) // self.seq_len)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} outside [0, {len(self)})")
        window = self.tokens.read(i * self.seq_len, self.seq_len + 1)
        input_ids = window[:-1]
        return {"input_ids": input_ids, "labels": window[1:], "doc_ids": document_ids(input_ids, self.eos_id)}
