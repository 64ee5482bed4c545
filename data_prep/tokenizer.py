"""Tokenizers: a character-level one (tiny corpora, nanoGPT's shakespeare_char), byte-level BPE (HF
`tokenizers`) and SentencePiece BPE/unigram (spm.py).

All expose the same small interface (tokenizer_base.py) and persist to a single standard file, so a prepared
dataset carries the exact tokenizer its shards were encoded with; meta.json records the file's sha256 and
loading refuses a file that disagrees.
"""
from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from .errors import DataError
from .fileio import atomic_write_bytes, atomic_write_json, read_json
from .shards import META_FILE, check_tokenizer_hash, read_meta
from .spm import SentencePieceTokenizer
from .tokenizer_base import EOS_TOKEN, PAD_TOKEN, Tokenizer

_BUILD_FAST = threading.Lock()  # encoder threads that start together build the engine once

TOKENIZER_KINDS = ("bpe", "char", "sp-bpe", "sp-unigram")
FAST_ENCODER_ENV = "LMFORGE_ENCODER"  # "hf": prepare encodes byte-level BPE with HF tokenizers, not tiktoken


class CharTokenizer(Tokenizer):
    kind = "char"
    file_name = "chars.json"
    cut_at = re.compile(r"(?s).")  # anywhere

    def __init__(self, chars: Sequence[str]):
        self.chars = list(chars)
        self._stoi: dict[str, int] = {}
        for i, c in enumerate(self.chars):
            if not (isinstance(c, str) and len(c) == 1):
                raise DataError(f"char tokenizer: entry {i} is {c!r}, not a single character")
            if self._stoi.setdefault(c, i) != i:
                raise DataError(f"char tokenizer: entry {i} {c!r} repeats entry {self._stoi[c]}")

    @classmethod
    def train(cls, texts: Iterable[str]) -> "CharTokenizer":
        seen: set[str] = set()
        for t in texts:
            seen.update(t)
        return cls(sorted(seen))

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1  # + EOS

    @property
    def eos_id(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        stoi = self._stoi
        try:
            return [stoi[c] for c in text]
        except KeyError:
            pos = next(i for i, c in enumerate(text) if c not in stoi)
            raise DataError(
                f"character {text[pos]!r} at position {pos} is not in the char tokenizer's "
                f"vocabulary ({len(self.chars)} characters)") from None

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        out = []
        for i, t in enumerate(texts):
            try:
                out.append(self.encode(t))
            except DataError as e:
                raise DataError(f"text {i} of batch: {e}") from None
        return out

    def decode(self, ids: Iterable[int]) -> str:
        parts = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                parts.append(EOS_TOKEN)
            elif 0 <= i < len(self.chars):
                parts.append(self.chars[i])
            else:
                raise DataError(f"token id {i} is outside the char vocabulary (size {self.vocab_size})")
        return "".join(parts)

    def save(self, directory: str | os.PathLike) -> Path:
        return atomic_write_json(Path(directory) / self.file_name, {"kind": "char", "chars": self.chars})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CharTokenizer":
        obj = read_json(path, {"kind": str, "chars": list})
        if obj["kind"] != "char":
            raise DataError(f'{path}: not a char tokenizer file (expected {{"kind": "char", "chars": [...]}})')
        try:
            return cls(obj["chars"])
        except DataError as e:
            raise DataError(f"{path}: {e}") from None


class BPETokenizer(Tokenizer):
    """Byte-level BPE (HF `tokenizers`): every byte is in the alphabet, so any text round-trips exactly."""

    kind = "bpe"
    file_name = "tokenizer.json"
    # After a "\n" between non-space characters, or before a single space between them: the GPT-2
    # pre-tokenizer (fast_bpe.GPT2_PATTERN) ends a pre-token there whatever follows, and merges stay inside
    # pre-tokens. Python's \S is narrower than the pattern's (it calls \x1c-\x1f space too): never wrong.
    cut_at = re.compile(r"(?<=\S)\n(?=\S)|(?<=\S)(?= \S)")
    releases_gil = True

    def __init__(self, hf_tokenizer):
        self._tok = hf_tokenizer
        self._fast = None  # the tiktoken engine, built on first use (fast_bpe.py)
        # A literal "<|endoftext|>" inside a document must stay text, not fake a document boundary.
        self._tok.encode_special_tokens = True
        eos = self._tok.token_to_id(EOS_TOKEN)
        if eos is None:
            raise DataError(f"BPE tokenizer has no {EOS_TOKEN} token")
        self._eos = eos
        self._pad = self._tok.token_to_id(PAD_TOKEN)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, show_progress: bool = False,
              special_tokens: Sequence[str] = ()) -> "BPETokenizer":
        """Train on `texts`; EOS is id 0, then `special_tokens` (reserved ids, never produced by encode)."""
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

        specials = [EOS_TOKEN, *special_tokens]
        min_size = 256 + len(specials)  # every byte + the special tokens
        if vocab_size < min_size:
            more = f" + {len(special_tokens)} special tokens" if special_tokens else ""
            raise DataError(f"BPE vocab_size {vocab_size} is too small: need at least {min_size} (256 bytes + EOS{more})")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise DataError(f"{path}: cannot load BPE tokenizer ({str(e).splitlines()[0] if str(e) else e!r})") from None
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def pad_id(self) -> int | None:
        return self._pad

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # Parallel across documents in Rust; much faster than one huge string (see GUIDE "Data").
        return [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]

    def fast_encode(self):
        """encode run by tiktoken (single-threaded, outside the GIL), or None when tiktoken is missing, cannot
        reproduce this tokenizer (fast_bpe.py) or LMFORGE_ENCODER=hf asks for HF's encoder."""
        if os.environ.get(FAST_ENCODER_ENV) == "hf":
            return None
        with _BUILD_FAST:
            if self._fast is None:
                from .fast_bpe import convert
                enc = convert(self._tok.to_str())
                # encode_to_numpy (tiktoken >= 0.8) skips building a list of Python ints; our Encoding has no
                # special tokens, so it encodes every text as ordinary text, as encode_ordinary does.
                self._fast = (False if enc is None else getattr(enc, "encode_to_numpy", None) or enc.encode_ordinary)
        return self._fast or None

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, directory: str | os.PathLike) -> Path:
        return atomic_write_bytes(Path(directory) / self.file_name, self._tok.to_str().encode("utf-8"))


def split_for_encoding(text: str, max_chars: int, cut_at: re.Pattern) -> Iterator[str]:
    """`text` in pieces of about max_chars, each ending where a match of `cut_at` ends (see Tokenizer.cut_at);
    a stretch without such a place stays whole. A generator: a huge text is not copied at once."""
    start = 0
    while len(text) - start > max_chars:
        m = cut_at.search(text, start + max_chars)
        if m is None:
            break
        yield text[start:m.end()]
        start = m.end()
    yield text[start:]


def tokenizer_classes() -> dict[str, type[Tokenizer]]:
    """File name -> class."""
    return {cls.file_name: cls for cls in (BPETokenizer, CharTokenizer, SentencePieceTokenizer)}


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = (),
                    show_progress: bool = False) -> Tokenizer:
    """Train a tokenizer of `kind` (one of TOKENIZER_KINDS) on `texts`; subword kinds get EOS, PAD and
    `special_tokens` (the char tokenizer only EOS)."""
    if kind == "bpe":
        return BPETokenizer.train(texts, vocab_size, show_progress=show_progress,
                                  special_tokens=[PAD_TOKEN, *special_tokens])
    if kind == "char":
        return CharTokenizer.train(texts)
    if kind in ("sp-bpe", "sp-unigram"):
        return SentencePieceTokenizer.train(texts, vocab_size, model_type=kind[3:], special_tokens=special_tokens,
                                            show_progress=show_progress)
    raise DataError(f"unknown tokenizer kind {kind!r} (expected one of {', '.join(TOKENIZER_KINDS)})")


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Load the tokenizer saved in `directory` (a prepared dataset, a checkpoint or a tokenizer-only directory).

    In a prepared dataset, meta.json names the file and its sha256; a file that disagrees is refused.
    """
    kinds = tokenizer_classes()
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: tokenizer directory does not exist")
    meta_path = directory / META_FILE
    meta = None
    if meta_path.is_file():  # a prepared dataset names its tokenizer file
        meta = read_meta(directory)
        name = meta["tokenizer"]["file"]
        if name not in kinds:
            raise DataError(f"{meta_path}: unknown tokenizer file {name!r}")
        candidates = [name]
    else:
        candidates = [n for n in kinds if (directory / n).is_file()]
    if not candidates:
        raise DataError(f"{directory}: no tokenizer.json or chars.json or tokenizer.model found")
    if len(candidates) > 1:
        raise DataError(f"{directory}: several tokenizer files present ({', '.join(candidates)}); cannot tell which to use")
    path = directory / candidates[0]
    if not path.is_file():
        raise DataError(f"{path}: tokenizer file named in meta.json is missing")
    if meta is None:
        return kinds[candidates[0]].load(path)
    check_tokenizer_hash(directory, meta)
    tok = kinds[candidates[0]].load(path)
    # The shards' id range is checked against meta.json's vocab_size: it must be the tokenizer's.
    if (tok.vocab_size, tok.eos_id) != (meta["vocab_size"], meta["eos_id"]):
        raise DataError(f"{meta_path}: vocab_size {meta['vocab_size']} and eos_id {meta['eos_id']} disagree with "
                        f"{path} (vocab_size {tok.vocab_size}, eos_id {tok.eos_id})")
    return tok
