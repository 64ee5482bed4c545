"""Decide every document's fate while streaming, holding no text (prepare's encoding pass asks as it reads).

For each document (numbered by its position in the deterministic source stream) the plan records one
byte: dropped, train or val. Cleaning drops empty/short documents; exact and near duplicates within a
split are dropped (per `dedup`); a val document that matches a train document (exact or near) is
leakage and is removed (or only counted, per `leakage`). Every decision is counted in a Tally with an
example source for the manifest. A train document's side is final when add() returns; a val document
can still be removed by a later train copy, and finish() may move one document across in tiny corpora
(then DocumentPlan.adjusted is set). TokenizerSample keeps the bounded, hash-selected text the tokenizer
is trained on.
"""
from __future__ import annotations

import hashlib
import heapq
import os
from array import array
from dataclasses import dataclass, field

import numpy as np

from .cleaning import Cleaner
from .dedup import LSHIndex, MinHashConfig, MinHasher, exact_key, text_pieces
from .errors import DataError
from .keyindex import KeyIndex
from .sources import Document

DROP, TRAIN, VAL = 0, 1, 2
DEDUP_MODES = ("none", "exact", "near")
LEAKAGE_MODES = ("remove", "flag", "off")


def val_score(seed: int, doc: Document) -> float:
    """Uniform [0, 1) value fixed by (seed, source, text): the split does not depend on input order."""
    h = hashlib.sha256()
    for piece in text_pieces(doc.text):  # a huge text is not encoded at once
        h.update(piece.encode("utf-8", "surrogatepass"))
    text_hash = h.hexdigest()
    key = f"{seed}\0{doc.source}\0{text_hash}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64


@dataclass
class DocumentPlan:
    side: np.ndarray  # uint8 per document ordinal: DROP, TRAIN or VAL
    split_mode: str  # "none", "position" (one document cut by characters) or "document"
    cut: int = 0  # position mode: characters of the single document that go to train
    removed: dict = field(default_factory=dict)  # reason -> {"count", "example"}
    modified: dict = field(default_factory=dict)
    documents_seen: int = 0
    adjusted: bool = False  # finish() changed a side that add() had given (or chose position mode)

    @property
    def kept(self) -> int:
        return int(np.count_nonzero(self.side))


class TokenizerSample:
    """The documents with the smallest seeded hashes of their text, up to `budget` characters (None: all):
    a sample that does not depend on input order. Copies of a sampled text are offered once."""

    def __init__(self, budget: int | None, seed: int):
        self.budget, self.seed = budget, seed
        self._heap: list[tuple[int, int, str]] = []  # (-key, ordinal, text): a max-heap on key
        self._held: set[int] = set()
        self.chars = 0

    def offer(self, ordinal: int, text: str) -> None:
        h = hashlib.blake2b(digest_size=8, key=str(self.seed).encode())
        for piece in text_pieces(text):
            h.update(piece.encode("utf-8"))
        k = int.from_bytes(h.digest(), "big")
        if k in self._held:
            return
        if self.budget is not None and len(text) > self.budget:
            text = text[:self.budget]
        heapq.heappush(self._heap, (-k, ordinal, text))
        self._held.add(k)
        self.chars += len(text)
        while self.budget is not None and self.chars > self.budget and len(self._heap) > 1:
            k_out, _, t_out = heapq.heappop(self._heap)
            self._held.discard(-k_out)
            self.chars -= len(t_out)

    def texts(self) -> list[str]:
        """The sampled texts in stream order."""
        return [t for _, o, t in sorted(self._heap, key=lambda e: e[1])]


# Per-document match flags. Every rule looks only at pairs of documents, so the same flags come out of one
# streaming planner (below) and of tasks that each see one partition of the keys (tasks.py).
EXACT_DUP = 1  # an earlier document on the same side has the same exact key
NEAR_DUP = 2  # an earlier document on the same side is a near duplicate (LSH candidate over the threshold)
TRAIN_EXACT = 4  # a val document with an exact copy among train documents (earlier or later)
TRAIN_NEAR = 8  # a val document with a near copy among train documents
_FLAG_REASONS = {TRAIN_EXACT: "val_train_overlap_exact", TRAIN_NEAR: "val_train_overlap_near",
                 EXACT_DUP: "duplicate_exact", NEAR_DUP: "duplicate_near"}


def pair_flags(earlier_side: int, later_side: int, kind_flag_same: int, kind_flag_cross: int) -> tuple[int, int]:
    """(flags for the earlier document, flags for the later one) when two documents match."""
    if earlier_side == later_side:
        return 0, kind_flag_same
    return (kind_flag_cross, 0) if earlier_side == VAL else (0, kind_flag_cross)


def resolve(side: np.ndarray, flags: np.ndarray, dedup: str, leakage: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Final sides from the score sides and match flags, and a mask of the documents counted per reason.

    A document with a same-side duplicate before it is dropped (exact only for dedup="exact", neither for
    "none"); a val document with a train copy is leakage: removed ("remove"), only counted ("flag") or
    not looked at ("off"). A removed leak is counted as leakage, not also as a duplicate."""
    dup_mask = {"near": EXACT_DUP | NEAR_DUP, "exact": EXACT_DUP, "none": 0}[dedup]
    live = side != DROP
    leak = live & (side == VAL) & ((flags & (TRAIN_EXACT | TRAIN_NEAR)) != 0) if leakage != "off" else np.zeros_like(live)
    dup = live & ((flags & dup_mask) != 0)
    removed_leak = leak if leakage == "remove" else np.zeros_like(leak)
    final = side.copy()
    final[dup | removed_leak] = DROP
    counted_dup = dup & ~removed_leak
    reasons = {
        "val_train_overlap_exact": leak & ((flags & TRAIN_EXACT) != 0),
        "val_train_overlap_near": leak & ((flags & TRAIN_EXACT) == 0),
        "duplicate_exact": counted_dup & ((flags & EXACT_DUP & dup_mask) != 0),
        "duplicate_near": counted_dup & ((flags & EXACT_DUP & dup_mask) == 0),
    }
    return final, reasons


class Planner:
    """Streams documents in order: cleans each, gives it a side by its seeded score and records its match
    flags against every document before it (see the flags above). add() says whether the document is kept
    as far as is known then: a train document's answer is final; a val one may still be removed by a later
    train copy, which finish() applies."""

    def __init__(self, cleaner: Cleaner, val_fraction: float, seed: int, dedup: str = "near",
                 leakage: str = "remove", minhash: MinHashConfig = MinHashConfig(),
                 spill_dir: str | os.PathLike | None = None):
        """`spill_dir`: where the MinHash signatures' temporary file goes (None: the system's temp dir)."""
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if dedup not in DEDUP_MODES:
            raise DataError(f"unknown dedup mode {dedup!r} (expected one of {DEDUP_MODES})")
        if leakage not in LEAKAGE_MODES:
            raise DataError(f"unknown leakage mode {leakage!r} (expected one of {LEAKAGE_MODES})")
        self.cleaner, self.val_fraction, self.seed = cleaner, val_fraction, seed
        self.dedup, self.leakage = dedup, leakage
        self.removed = cleaner.dropped  # one Tally for every reason a document is removed
        self._side = bytearray()  # by score (DROP only for documents cleaning removed)
        self._flags = bytearray()
        self._score = array("d")
        self._chars = array("q")  # cleaned length per document (position mode needs the one kept)
        self._train_keys = KeyIndex()  # 64 bits of each train document's exact key: ~16 bytes, not a set's ~110
        self._val_keys_seen: set[bytes] = set()
        self._val_waiting: dict[bytes, list[int]] = {}  # val documents by exact key, until a train copy shows up
        use_near = dedup == "near" or (leakage != "off" and val_fraction > 0)
        self._exact = dedup != "none" or (leakage != "off" and val_fraction > 0)
        self._hasher = MinHasher(minhash) if use_near else None
        self._lsh = LSHIndex(minhash, spill_dir) if use_near else None
        self._examples: dict[int, str] = {}  # flag -> source of the first document it was set on
        self._dup_mask = {"near": EXACT_DUP | NEAR_DUP, "exact": EXACT_DUP, "none": 0}[dedup]

    def side(self, ordinal: int) -> int:
        return self._side[ordinal]

    def _flag(self, ordinal: int, flag: int, source: str) -> None:
        self._flags[ordinal] |= flag
        self._examples.setdefault(flag, source)

    def add(self, doc: Document) -> str | None:
        """Plan the next document; its cleaned text when it is kept as far as is known now, else None."""
        ordinal = len(self._side)
        text = self.cleaner.clean(doc.text, doc.source)
        self._flags.append(0)
        if text is None:
            self._side.append(DROP)
            self._score.append(0.0)
            self._chars.append(0)
            return None
        score = val_score(self.seed, Document(text, doc.source)) if self.val_fraction > 0 else 1.0
        side = VAL if score < self.val_fraction else TRAIN
        self._side.append(side)
        self._score.append(score)
        self._chars.append(len(text))
        if self._exact:  # else neither duplicates nor leakage are looked for (one document): skip the key
            self._match_exact(ordinal, side, exact_key(text), doc.source)
        if self._hasher is not None:
            sig = self._hasher.signature(text)
            if sig is not None:
                for other in self._lsh.find_all_then_add(ordinal, sig):
                    mine_other, mine = pair_flags(self._side[other], side, NEAR_DUP, TRAIN_NEAR)
                    if mine_other:
                        self._flag(other, mine_other, doc.source)
                    if mine:
                        self._flag(ordinal, mine, doc.source)
        flags = self._flags[ordinal]
        if flags & self._dup_mask or (self.leakage == "remove" and flags & (TRAIN_EXACT | TRAIN_NEAR)):
            return None
        return text

    def _match_exact(self, ordinal: int, side: int, key: bytes, source: str) -> None:
        short = int.from_bytes(key[:8], "little")
        in_train = bool(self._train_keys.lookup([short])[0])
        if side == TRAIN:
            if in_train:
                self._flag(ordinal, EXACT_DUP, source)
            else:
                self._train_keys.add(short, ordinal)
            for v in self._val_waiting.pop(key, ()):
                self._flag(v, TRAIN_EXACT, source)
        else:
            if key in self._val_keys_seen:
                self._flag(ordinal, EXACT_DUP, source)
            self._val_keys_seen.add(key)
            if in_train:
                self._flag(ordinal, TRAIN_EXACT, source)
            else:
                self._val_waiting.setdefault(key, []).append(ordinal)

    def finish(self) -> DocumentPlan:
        score_side = np.frombuffer(bytes(self._side), dtype=np.uint8).copy()
        flags = np.frombuffer(bytes(self._flags), dtype=np.uint8)
        side, reasons = resolve(score_side, flags, self.dedup, self.leakage)
        for reason, mask in reasons.items():
            count = int(mask.sum())
            if count:
                flag = next(f for f, r in _FLAG_REASONS.items() if r == reason)
                self.removed.add(reason, self._examples.get(flag, ""), count)
        kept = np.flatnonzero(side)
        streamed = side.copy()
        if self.val_fraction == 0 or kept.size == 0:
            mode = "none"
        elif kept.size == 1:
            mode = "position"
        else:
            mode = "document"
            scores = np.frombuffer(self._score, dtype=np.float64)
            # At least one document on each side, as split_documents guarantees.
            if not np.any(side[kept] == VAL):
                side[kept[np.argmin(scores[kept])]] = VAL
            if not np.any(side[kept] == TRAIN):
                side[kept[np.argmax(scores[kept])]] = TRAIN
        plan = DocumentPlan(side=side, split_mode=mode, removed=self.removed.to_json(),
                            modified=self.cleaner.modified.to_json(), documents_seen=len(side),
                            adjusted=mode == "position" or not np.array_equal(side, streamed))
        if mode == "position":
            n = self._chars[int(kept[0])]
            if n < 2:
                raise DataError(f"a {n}-character corpus cannot be split into train and val")
            plan.cut = min(max(int(n * (1.0 - self.val_fraction)), 1), n - 1)
            side[kept[0]] = TRAIN
        return plan
