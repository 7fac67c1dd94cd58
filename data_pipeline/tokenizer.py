"""SentencePiece tokenizer: a thin wrapper, deterministic training, and export to Hugging Face.

Trained models are lossless on any text: identity normalisation, no whitespace collapsing, no
dummy prefix, byte fallback for characters outside the vocabulary, and runs of spaces kept as
whole pieces (good for source code). Special ids are fixed: unk=0, bos=1, eos=2, pad=3.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm

from .errors import TokenizerError

MODEL_FILENAME = "tokenizer.model"
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


class Tokenizer:
    """A SentencePiece model with the ids the data pipeline needs."""

    def __init__(self, model_path: str | os.PathLike):
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise TokenizerError(f"tokenizer model not found: {self.model_path}")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.model_path))
        except (OSError, RuntimeError) as exc:
            raise TokenizerError(f"cannot load tokenizer model {self.model_path}: {exc}") from None
        if self.sp.eos_id() < 0:
            raise TokenizerError(f"tokenizer {self.model_path} defines no EOS piece; documents cannot be separated")
        self._sha256: str | None = None

    @classmethod
    def load(cls, dir_or_model_file: str | os.PathLike) -> "Tokenizer":
        """Load ``tokenizer.model`` from a prepared data folder, or a ``.model`` file directly."""
        path = Path(dir_or_model_file)
        return cls(path / MODEL_FILENAME if path.is_dir() else path)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def pad_id(self) -> int:
        """The pad id; models that define none fall back to EOS."""
        return self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id

    @property
    def model_type(self) -> str:
        """``"bpe"``, ``"unigram"``, ``"word"`` or ``"char"``, read from the model file."""
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self.sp.serialized_model_proto())
        return sentencepiece_model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type).lower()

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = file_sha256(self.model_path)
        return self._sha256

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        """Encode many texts with SentencePiece's own C++ threads (order is kept)."""
        return self.sp.encode(list(texts), num_threads=num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def info(self) -> dict:
        """What ``meta.json`` records about this tokenizer."""
        return {
            "file": MODEL_FILENAME,
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "bos_id": self.bos_id,
            "pad_id": self.pad_id,
            "model_type": self.model_type,
        }

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.model_path)!r}, vocab_size={self.vocab_size})"


def _training_sentences(texts: Iterable[str], max_bytes: int | None, max_chars: int) -> Iterator[str]:
    """Cut documents into line groups of at most ``max_chars`` characters (SentencePiece's unit)."""
    seen = 0
    for text in texts:
        group: list[str] = []
        size = 0
        for line in text.split("\n"):
            line = line[:max_chars]
            if group and size + len(line) + 1 > max_chars:
                yield "\n".join(group)
                group, size = [], 0
            group.append(line)
            size += len(line) + 1
        if group and size > 1:
            yield "\n".join(group)
        seen += len(text.encode("utf-8"))
        if max_bytes is not None and seen >= max_bytes:
            return


def _iter_texts(text_iter_or_files: Iterable[str] | Sequence[os.PathLike]) -> Iterator[str]:
    for item in text_iter_or_files:
        if isinstance(item, Path):
            yield item.read_text(encoding="utf-8")
        else:
            yield item


def train_tokenizer(
    text_iter_or_files: Iterable[str] | Sequence[os.PathLike],
    out_prefix: str | os.PathLike,
    vocab_size: int,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    *,
    max_bytes: int | None = 64 << 20,
    character_coverage: float = 0.9995,
    num_threads: int = 1,
    seed: int = 0,
) -> Path:
    """Train a SentencePiece model on documents; writes and returns ``<out_prefix>.model``.

    ``text_iter_or_files`` yields document strings (or `pathlib.Path` objects, read as UTF-8).
    At most ``max_bytes`` of text are used. The result is byte-identical for the same input,
    settings and ``num_threads`` (the BPE trainer's output depends on the thread count, so it
    is fixed rather than taken from the machine).
    """
    if model_type not in ("bpe", "unigram"):
        raise TokenizerError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    max_chars = 4096
    source_errors: list[BaseException] = []

    def sentences():  # SentencePiece wraps an exception raised by its iterator: keep the original
        try:
            yield from _training_sentences(_iter_texts(text_iter_or_files), max_bytes, max_chars)
        except Exception as exc:
            source_errors.append(exc)
            raise

    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=byte_fallback,
            character_coverage=character_coverage,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentence_length=4 * max_chars,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as exc:
        if source_errors:  # e.g. invalid UTF-8 under --strict: that error, not SentencePiece's wrapper
            raise source_errors[0] from None
        reason = re.sub(r"^.*?\] ?", "", str(exc).strip(), count=1) or str(exc)  # drop "INTERNAL: file.cc(123) [check]"
        raise TokenizerError(f"tokenizer training failed: {reason}") from None
    if not model.getvalue():
        raise TokenizerError("tokenizer training failed: no text to train on")
    out = Path(f"{os.fspath(out_prefix)}.model")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.getvalue())
    return out


def to_hf_tokenizer(model_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` so ``AutoTokenizer.from_pretrained(out_dir)`` works.

    Built with transformers' own SentencePiece converter, which follows the model's normaliser
    settings; for BPE models it encodes exactly like `Tokenizer.encode` (no BOS/EOS added). A stock
    fast tokenizer (no remote code), padding on the left. The SentencePiece file is copied beside
    them as ``tokenizer.model``.
    """
    from sentencepiece import sentencepiece_model_pb2
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter

    model_path = Tokenizer.load(model_path).model_path
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_path.read_bytes())
    if proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE:
        vocab: dict | list = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    else:
        vocab = [(piece.piece, piece.score) for piece in proto.pieces]
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=False)
    if backend is None:
        raise TokenizerError(f"cannot convert {model_path} to a Hugging Face tokenizer (model type unsupported)")
    spec = proto.trainer_spec
    special = {"unk_token": spec.unk_piece, "bos_token": spec.bos_piece, "eos_token": spec.eos_piece}
    if spec.pad_id >= 0:
        special["pad_token"] = spec.pad_piece
    # left padding: a padded batch then runs each row exactly as alone (models/common/varlen.py), in generate and training
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, padding_side="left",
                                 **special)
    out = Path(out_dir)
    hf.save_pretrained(out)
    (out / MODEL_FILENAME).write_bytes(model_path.read_bytes())
    return out
