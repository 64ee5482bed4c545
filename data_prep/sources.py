"""Turn input specs (files, directories, recursive globs) into a deterministic stream of documents."""
from __future__ import annotations

import fnmatch
import glob
import json
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from .errors import DataError

_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Document:
    text: str
    source: str  # file path, or "path:line" for a JSONL record


@dataclass
class SourceStats:
    """What iter_documents saw; filled in as the iterator is consumed."""
    files: int = 0
    bytes: int = 0
    excluded: int = 0
    undecodable: list[str] = field(default_factory=list)


def expand_placeholders(spec: str) -> str:
    # The quickstart trains on the running interpreter's standard library.
    return spec.replace("${stdlib}", sysconfig.get_paths()["stdlib"])


def _expand(spec: str) -> list[Path]:
    if _GLOB_CHARS & set(spec):
        paths = [Path(p) for p in glob.glob(spec, recursive=True)]
        paths = sorted(p for p in paths if p.is_file())
        if not paths:
            raise DataError(f"{spec}: pattern matches no files")
        return paths
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    raise DataError(f"{spec}: no such file or directory")


def _excluded(path: Path, patterns: list[str]) -> bool:
    forms = (path.as_posix(), path.absolute().as_posix())
    return any(fnmatch.fnmatchcase(f, pat) for pat in patterns for f in forms)


def _read_jsonl(path: Path, data: bytes, text_field: str) -> Iterator[Document]:
    for lineno, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:  # covers bad UTF-8 and bad JSON
            raise DataError(f"{path}:{lineno}: invalid JSON ({str(e).splitlines()[0]})") from None
        if not isinstance(record, dict) or text_field not in record:
            raise DataError(f"{path}:{lineno}: record has no field {text_field!r}")
        text = record[text_field]
        if not isinstance(text, str):
            raise DataError(f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, expected a string")
        yield Document(text, f"{path}:{lineno}")


def iter_documents(inputs: Iterable[str], exclude: Iterable[str] = (), text_field: str = "text",
                   stats: SourceStats | None = None) -> Iterator[Document]:
    """Yield documents from `inputs` in a deterministic order.

    Each input is a file, a directory (all files, recursively, sorted) or a glob (`**` recurses).
    `.jsonl` files give one document per line (field `text_field`); any other file is one document,
    decoded as strict UTF-8 (bytes kept exactly, so "\\r\\n" survives). Undecodable files are skipped
    and listed in `stats.undecodable`. A file matched by several inputs is read once.
    """
    inputs = [expand_placeholders(s) for s in inputs]
    if not inputs:
        raise DataError("no inputs given")
    patterns = [expand_placeholders(p) for p in exclude]
    stats = stats if stats is not None else SourceStats()
    # Expand every input now (not lazily) so a typo fails at the call, before any work is done.
    expanded = [_expand(spec) for spec in inputs]
    return _generate(inputs, expanded, patterns, text_field, stats)


def _generate(inputs: list[str], expanded: list[list[Path]], patterns: list[str], text_field: str,
              stats: SourceStats) -> Iterator[Document]:
    seen: set[Path] = set()
    for spec, paths in zip(inputs, expanded):
        excluded = 0
        for path in paths:
            key = path.resolve()
            if key in seen:
                continue
            seen.add(key)
            if _excluded(path, patterns):
                stats.excluded += 1
                excluded += 1
                continue
            try:
                data = path.read_bytes()
            except OSError as e:
                raise DataError(f"{path}: cannot read ({e.strerror})") from None
            stats.files += 1
            stats.bytes += len(data)
            if path.suffix == ".jsonl":
                yield from _read_jsonl(path, data, text_field)
                continue
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                stats.undecodable.append(str(path))
                continue
            yield Document(text, str(path))
        if excluded == len(paths):
            raise DataError(f"{spec}: all {len(paths)} matching files are excluded by the exclude patterns")
