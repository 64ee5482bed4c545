"""Counts per reason with one example each: what every filter, skip and dedup step reports."""
from __future__ import annotations


class Tally:
    """`add(reason, example)` counts an event; the first example of each reason is kept for the manifest."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.examples: dict[str, str] = {}

    def add(self, reason: str, example: str, n: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + n
        self.examples.setdefault(reason, example)

    def __getitem__(self, reason: str) -> int:
        return self.counts.get(reason, 0)

    def total(self) -> int:
        return sum(self.counts.values())

    def to_json(self) -> dict:
        return {r: {"count": self.counts[r], "example": self.examples[r]} for r in sorted(self.counts)}

    @classmethod
    def from_json(cls, obj: dict) -> "Tally":
        t = cls()
        for r, v in obj.items():
            t.add(r, v["example"], v["count"])
        return t
