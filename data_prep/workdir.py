"""The resumable build directory `<out>.tmp-prepare/`: pass-1 plan, tokenizer, finished shards, state.

state.json records a fingerprint of the command (inputs with sizes and mtimes, every option that
changes the output) and, per split, the shards completed so far and the first document ordinal not in
them. A rerun with the same fingerprint resumes; any other content is discarded. A lock file keeps two
runs from building in the same directory at once.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from .errors import DataError
from .fileio import atomic_write_bytes, atomic_write_json

STATE_FILE = "state.json"
PLAN_FILE = "plan.npy"


def fingerprint(config: dict, files: list[Path]) -> str:
    stamp = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    blob = json.dumps({"config": config, "files": stamp}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class WorkDir:
    def __init__(self, out: Path):
        self.path = out.parent / f"{out.name}.tmp-prepare"
        self._lock = None
        self.state: dict = {}

    def open(self, fp: str) -> bool:
        """Create or reuse the directory; True when it holds progress from the same command."""
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.path / "lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(f"{self.path}: another prepare run is building here") from None
        try:
            state = json.loads((self.path / STATE_FILE).read_text())
        except (OSError, ValueError):
            state = {}
        if state.get("fingerprint") == fp:
            self.state = state
            return True
        for p in self.path.iterdir():  # stale or foreign progress: start over
            if p.name != "lock":
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        self.state = {"fingerprint": fp}
        self.save()
        return False

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def save(self) -> None:
        atomic_write_json(self.path / STATE_FILE, self.state)

    def save_plan(self, side: np.ndarray, info: dict) -> None:
        with open(self.path / (PLAN_FILE + ".tmp"), "wb") as f:
            np.save(f, side)
        (self.path / (PLAN_FILE + ".tmp")).replace(self.path / PLAN_FILE)
        self.state["plan"] = dict(info)
        self.save()

    def load_plan(self) -> tuple[np.ndarray, dict] | None:
        if "plan" not in self.state or not (self.path / PLAN_FILE).is_file():
            return None
        return np.load(self.path / PLAN_FILE), dict(self.state["plan"])

    def split_progress(self, split: str) -> dict:
        """{"shards": [...], "next": ordinal, "bytes": n}; files of unfinished shards are deleted."""
        prog = self.state.setdefault("progress", {}).setdefault(split, {"shards": [], "next": 0, "bytes": 0})
        keep = {name for s in prog["shards"] for name in (s["file"], s["index"])}
        for p in self.path.glob(f"{split}_*"):
            if p.name not in keep:
                p.unlink()
        return prog

    def write_bytes(self, name: str, data: bytes) -> Path:
        return atomic_write_bytes(self.path / name, data)
