"""SentencePiece tokenizers (BPE or unigram) behind the project's Tokenizer interface.

SentencePiece normally rewrites text (NFKC, collapsed spaces, a dummy leading space) and silently skips
training lines longer than `max_sentence_length`. Here training uses the identity normalizer, keeps every
space, raises the line limit, and turns on byte fallback, so any text is encodable and
decode(encode(x)) == x exactly. The one symbol SentencePiece cannot carry is its own space marker U+2581,
which would decode as a space: it is escaped before encoding and restored after decoding.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from .errors import DataError
from .fileio import atomic_write_bytes
from .tokenizer_base import EOS_TOKEN, PAD_TOKEN, Tokenizer

SP_MODEL_TYPES = ("bpe", "unigram")
_SPACE_MARK = "\u2581"
_ESC = "\ue000"  # private-use escape: _ESC+"e" is a literal _ESC, _ESC+"s" a literal U+2581
_UNESCAPE = re.compile(_ESC + "([es])")
_TRAIN_CHUNK_CHARS = 1 << 14  # training "sentences" are cut at line ends near this size


def _escape(text: str) -> str:
    if _SPACE_MARK in text or _ESC in text:
        return text.replace(_ESC, _ESC + "e").replace(_SPACE_MARK, _ESC + "s")
    return text


def _unescape(text: str) -> str:
    if _ESC in text:
        return _UNESCAPE.sub(lambda m: _ESC if m.group(1) == "e" else _SPACE_MARK, text)
    return text


def _training_sentences(texts: Iterable[str]) -> Iterator[str]:
    """Cut documents into line-aligned chunks: SentencePiece trains on sentences, and keeping newlines
    inside them lets "\\n" (and runs of it) become pieces."""
    for text in texts:
        text = _escape(text)
        start = 0
        while start < len(text):
            end = start + _TRAIN_CHUNK_CHARS
            if end < len(text):
                nl = text.rfind("\n", start, end)
                end = nl + 1 if nl > start else end
            yield text[start:end]
            start = end


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"
    file_name = "tokenizer.model"

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self._eos = self._sp.piece_to_id(EOS_TOKEN)
        if self._sp.id_to_piece(self._eos) != EOS_TOKEN:
            raise DataError(f"SentencePiece model has no {EOS_TOKEN} piece")
        pad = self._sp.piece_to_id(PAD_TOKEN)
        self._pad = pad if self._sp.id_to_piece(pad) == PAD_TOKEN else None
        # Control and unknown pieces never come out of encode; decode renders them as their text.
        self._special = {i: self._sp.id_to_piece(i) for i in range(self._sp.get_piece_size())
                         if self._sp.is_control(i) or self._sp.is_unknown(i)}

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, model_type: str = "bpe",
              special_tokens: Sequence[str] = (), split_digits: bool = True, num_threads: int = 1,
              show_progress: bool = False) -> "SentencePieceTokenizer":
        import io

        import sentencepiece as spm

        if model_type not in SP_MODEL_TYPES:
            raise DataError(f"unknown SentencePiece model type {model_type!r} (expected one of {SP_MODEL_TYPES})")
        reserved = 3 + len(special_tokens) + 256  # unk, eos, pad, user specials, byte pieces
        if vocab_size <= reserved:
            raise DataError(f"SentencePiece vocab_size {vocab_size} is too small: need more than {reserved} "
                            f"(256 byte pieces + unk, EOS, PAD and {len(special_tokens)} special tokens)")
        buf = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_training_sentences(texts), model_writer=buf, model_type=model_type,
                vocab_size=vocab_size, hard_vocab_limit=False,  # a small corpus may not fill the vocabulary
                byte_fallback=True, character_coverage=1.0,
                normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True, split_digits=split_digits,
                max_sentence_length=1 << 30, input_sentence_size=0,
                unk_id=0, eos_id=1, pad_id=2, bos_id=-1, eos_piece=EOS_TOKEN, pad_piece=PAD_TOKEN,
                control_symbols=list(special_tokens), num_threads=num_threads,
                minloglevel=0 if show_progress else 2,
            )
        except RuntimeError as e:
            raise DataError(f"SentencePiece training failed: {str(e).splitlines()[0]}") from None
        return cls(buf.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SentencePieceTokenizer":
        try:
            proto = Path(path).read_bytes()
            return cls(proto)
        except (OSError, RuntimeError) as e:
            raise DataError(f"{path}: cannot load SentencePiece model ({str(e).splitlines()[0] if str(e) else e!r})") from None

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def pad_id(self) -> int | None:
        return self._pad

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(_escape(text))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode([_escape(t) for t in texts], num_threads=self.num_threads)

    num_threads = -1  # SentencePiece's own batch threads; parallel workers set 1

    def decode(self, ids: Iterable[int]) -> str:
        parts, run = [], []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise DataError(f"token id {i} is outside the SentencePiece vocabulary (size {self.vocab_size})")
            if i in self._special:
                parts.append(self._sp.decode(run))
                parts.append(self._special[i])
                run = []
            else:
                run.append(i)
        parts.append(self._sp.decode(run))
        return _unescape("".join(parts))

    def save(self, directory: str | os.PathLike) -> Path:
        return atomic_write_bytes(Path(directory) / self.file_name, self._proto)
