"""Document cleaning: Unicode normalization, control-character removal, empty/short document filter."""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from .errors import DataError
from .tally import Tally

# Cc characters except \t \n \r: C0 controls, DEL and the C1 block.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")  # in a str every surrogate is lone (pairs decode to one character)
NORMAL_FORMS = ("NFC", "NFKC", "NFD", "NFKD")


@dataclass(frozen=True)
class CleanConfig:
    normalize: str | None = "NFC"  # None keeps the text's own form
    strip_control: bool = True
    min_chars: int = 1  # documents shorter than this (after cleaning) are dropped

    def __post_init__(self):
        if self.normalize is not None and self.normalize not in NORMAL_FORMS:
            raise DataError(f"unknown Unicode normalization {self.normalize!r} (expected one of {NORMAL_FORMS} or none)")
        if self.min_chars < 0:
            raise DataError(f"min_chars must be >= 0, got {self.min_chars}")


class Cleaner:
    """`clean(text, source)` returns the cleaned text, or None when the document is dropped.

    `dropped` counts removed documents by reason; `modified` counts documents changed by each step
    (and `control_chars_removed` the characters), each with an example source for the manifest.
    """

    def __init__(self, config: CleanConfig = CleanConfig()):
        self.config = config
        self.dropped = Tally()
        self.modified = Tally()

    def clean(self, text: str, source: str) -> str | None:
        cfg = self.config
        if not text.isascii() and _SURROGATE.search(text):  # searched, not encoded: no copy of a huge text
            # A lone surrogate (JSON's "\ud800" escape) is no character: it has no UTF-8 bytes and the
            # encoders refuse it. Always replaced, even with cleaning off.
            text = _SURROGATE.sub("\ufffd", text)
            self.modified.add("lone_surrogates_replaced", source)
        if cfg.normalize and not unicodedata.is_normalized(cfg.normalize, text):
            text = unicodedata.normalize(cfg.normalize, text)
            self.modified.add("unicode_normalized", source)
        if cfg.strip_control:
            text, n = _CONTROL.subn("", text)
            if n:
                self.modified.add("control_chars", source)
                self.modified.add("control_chars_removed", source, n)
        if not text:
            self.dropped.add("empty", source)
            return None
        if len(text) < cfg.min_chars:
            self.dropped.add("too_short", source)
            return None
        return text
