"""The resumable build directory `<out>.tmp-prepare/`: tokenizer, finished shards, pending val, state.

state.json records a fingerprint of the command (inputs with sizes and mtimes, every option that
changes the output), the tokenizer, and the progress of the encoding pass (stream.py): the train shards
completed so far, the first document ordinal not in them, and how much of the pending val file belongs
to them. A rerun with the same fingerprint resumes; any other content is discarded. A lock file keeps
two runs from building in the same directory at once.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
from pathlib import Path

from .errors import DataError
from .fileio import COUNT, atomic_write_json, check_json, read_json

STATE_FILE = "state.json"
_SHARD = {"file": str, "index": str, "tokens": COUNT, "docs": COUNT, "sha256": str, "crc32": str}
_STATE = {"fingerprint": str}
_PROGRESS = {"train": {"shards": [_SHARD], "next": COUNT, "bytes": COUNT}, "pending": {"docs": COUNT, "tokens": COUNT}}
_TOKENIZER = {"file": str, "trained_on": str}


def fingerprint(config: dict, files: list[Path]) -> str:
    stamp = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    blob = json.dumps({"config": config, "files": stamp}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class WorkDir:
    def __init__(self, out: Path, path: Path | None = None):
        self.path = path if path is not None else out.parent / f"{out.name}.tmp-prepare"
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
        try:  # damaged progress is not worth an error: it only costs the work redone
            state = read_json(self.path / STATE_FILE, _STATE)
            for key, spec in (("progress", _PROGRESS), ("tokenizer", _TOKENIZER)):
                if state.get(key):
                    check_json(state[key], spec, self.path / STATE_FILE, key)
        except DataError:
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

    def remove_unlisted(self, split: str, shards: list[dict]) -> None:
        """Delete `split`'s shard files that `shards` (the completed ones) does not list."""
        keep = {name for s in shards for name in (s["file"], s["index"])}
        for p in self.path.glob(f"{split}_*"):
            if p.name not in keep:
                p.unlink()

    def finish(self) -> None:
        """Leave only the dataset: state, pending files and lock go (the caller then publishes)."""
        for p in self.path.iterdir():
            if p.name.startswith(("pending_", STATE_FILE)):
                p.unlink()
        self.close()
        (self.path / "lock").unlink()
