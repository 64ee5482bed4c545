"""The interface every tokenizer implements (tokenizer.py: char and byte-level BPE; spm.py: SentencePiece)
and the special tokens they share. Its own module so that spm.py and tokenizer.py both build on it while
only tokenizer.py, which knows every kind, imports spm.py.
"""
from __future__ import annotations

import abc
import os
import re
from pathlib import Path
from typing import Iterable

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


class Tokenizer(abc.ABC):
    kind: str
    file_name: str
    # True when encoding runs outside the GIL (Rust, C++), so threads of one process encode in parallel.
    releases_gil: bool = False
    # Where a text can be cut so that encoding the pieces gives the ids of encoding it whole (a regex whose
    # matches end at such places), so huge documents are encoded in pieces (in parallel, bounded memory).
    # None: encoded whole.
    cut_at: re.Pattern | None = None

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abc.abstractmethod
    def eos_id(self) -> int: ...

    @property
    def pad_id(self) -> int | None:
        return None

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abc.abstractmethod
    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def fast_encode(self):
        """A faster function text -> ids with encode's results, for bulk encoding (prepare), or None."""
        return None

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids to text, special tokens included (EOS shows up as <|endoftext|>)."""

    @abc.abstractmethod
    def save(self, directory: str | os.PathLike) -> Path:
        """Write the tokenizer's one file into `directory` and return its path."""
