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
from array import array
from dataclasses import dataclass, field

import numpy as np

from .cleaning import Cleaner
from .dedup import LSHIndex, MinHashConfig, MinHasher, exact_key
from .errors import DataError
from .sources import Document

DROP, TRAIN, VAL = 0, 1, 2
DEDUP_MODES = ("none", "exact", "near")
LEAKAGE_MODES = ("remove", "flag", "off")


def val_score(seed: int, doc: Document) -> float:
    """Uniform [0, 1) value fixed by (seed, source, text): the split does not depend on input order."""
    text_hash = hashlib.sha256(doc.text.encode("utf-8", "surrogatepass")).hexdigest()
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
        key = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=str(self.seed).encode()).digest()
        k = int.from_bytes(key, "big")
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


class Planner:
    def __init__(self, cleaner: Cleaner, val_fraction: float, seed: int, dedup: str = "near",
                 leakage: str = "remove", minhash: MinHashConfig = MinHashConfig()):
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if dedup not in DEDUP_MODES:
            raise DataError(f"unknown dedup mode {dedup!r} (expected one of {DEDUP_MODES})")
        if leakage not in LEAKAGE_MODES:
            raise DataError(f"unknown leakage mode {leakage!r} (expected one of {LEAKAGE_MODES})")
        self.cleaner, self.val_fraction, self.seed = cleaner, val_fraction, seed
        self.dedup, self.leakage = dedup, leakage
        self.removed = cleaner.dropped  # one Tally for every reason a document is removed
        self.flagged_only = leakage == "flag"
        self._side = bytearray()
        self._score = array("d")
        self._exact: dict[bytes, int | list[int]] = {}
        self._chars = array("q")  # cleaned length per document (position mode needs the one kept)
        use_near = dedup == "near" or (leakage != "off" and val_fraction > 0)
        self._hasher = MinHasher(minhash) if use_near else None
        self._lsh = LSHIndex(minhash) if use_near else None

    def _alive(self, ordinal: int) -> bool:
        return self._side[ordinal] != DROP

    def side(self, ordinal: int) -> int:
        return self._side[ordinal]

    def add(self, doc: Document) -> str | None:
        """Plan the next document; its cleaned text when it is kept (for now, if val), else None."""
        ordinal = len(self._side)
        text = self.cleaner.clean(doc.text, doc.source)
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
        key = exact_key(text)
        held = self._exact.get(key, ())
        exact = [o for o in ((held,) if isinstance(held, int) else held) if self._alive(o)]
        if exact:
            self._resolve(ordinal, exact, "exact", doc.source)
        sig = None
        if self._side[ordinal] != DROP and self._hasher is not None:
            sig = self._hasher.signature(text)
            if sig is not None:
                near = [o for o in self._lsh.find_all(sig, alive=self._alive) if o not in exact]
                if near:
                    self._resolve(ordinal, near, "near", doc.source)
        if self._side[ordinal] == DROP:
            return None
        # Usually one kept document per text: an int; a list only when copies are kept (dedup off).
        self._exact[key] = ordinal if not held else [*((held,) if isinstance(held, int) else held), ordinal]
        if sig is not None:
            self._lsh.add(ordinal, sig)
        return text

    def _resolve(self, ordinal: int, others: list[int], kind: str, source: str) -> None:
        """Handle the current document matching earlier kept ones (`kind`: "exact" or "near")."""
        mine = self._side[ordinal]
        cross = [o for o in others if self._side[o] != mine]
        if cross and self.leakage != "off":
            # A val document with a train copy: remove (or count) the val side, whichever came first.
            self.removed.add(f"val_train_overlap_{kind}", source, 1 if mine == VAL else len(cross))
            if self.leakage == "remove":
                if mine == VAL:
                    self._side[ordinal] = DROP
                    return
                for o in cross:
                    self._side[o] = DROP
        if len(cross) < len(others) and (self.dedup == "near" or (self.dedup == "exact" and kind == "exact")):
            self.removed.add(f"duplicate_{kind}", source)
            self._side[ordinal] = DROP

    def finish(self) -> DocumentPlan:
        side = np.frombuffer(bytes(self._side), dtype=np.uint8).copy()
        kept = np.flatnonzero(side)
        removed = self.removed.to_json()
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
        adjusted = mode == "position" or not np.array_equal(side, np.frombuffer(bytes(self._side), dtype=np.uint8))
        plan = DocumentPlan(side=side, split_mode=mode, removed=removed, modified=self.cleaner.modified.to_json(),
                            documents_seen=len(side), adjusted=adjusted)
        if mode == "position":
            n = self._chars[int(kept[0])]
            if n < 2:
                raise DataError(f"a {n}-character corpus cannot be split into train and val")
            plan.cut = min(max(int(n * (1.0 - self.val_fraction)), 1), n - 1)
            side[kept[0]] = TRAIN
        return plan
