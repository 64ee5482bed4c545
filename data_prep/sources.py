"""Turn input specs (files, directories, recursive globs) into a deterministic stream of documents.

Formats are chosen by suffix (see formats.py): .jsonl/.ndjson (one document per line), .parquet (one per
row), anything else one document per file; .gz/.zst/.zstd variants are decompressed while streaming.
"""
from __future__ import annotations

import fnmatch
import glob
import gzip
import sysconfig
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from .errors import DataError
from .formats import JSONL_SUFFIXES, read_jsonl, read_parquet, read_text, split_suffix
from .tally import Tally

_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Document:
    text: str
    source: str  # file path, or "path:line" for a JSONL record


@dataclass
class SourceStats:
    """What iter_documents saw; filled in as the iterator is consumed."""
    files: int = 0
    bytes: int = 0  # on-disk (possibly compressed) bytes of the files read
    excluded: int = 0
    skipped: Tally = field(default_factory=Tally)  # unusable files and records, by reason


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


def iter_documents(inputs: Iterable[str], exclude: Iterable[str] = (), text_field: str = "text",
                   stats: SourceStats | None = None, strict: bool = False) -> Iterator[Document]:
    """Yield documents from `inputs` in a deterministic order.

    Each input is a file, a directory (all files, recursively, sorted) or a glob (`**` recurses).
    JSONL and Parquet files give one document per record (field `text_field`); any other file is one
    document, decoded as strict UTF-8 (bytes kept exactly, so "\\r\\n" survives). Unusable files and
    records (binary, invalid UTF-8, bad JSON, missing field, corrupt compression) are skipped and counted
    in `stats.skipped`, or raise DataError when `strict`. A file matched by several inputs is read once.
    """
    stats = stats if stats is not None else SourceStats()
    # Expand every input now (not lazily) so a typo fails at the call, before any work is done.
    return iter_files(list_files(inputs, exclude, stats), text_field, stats, strict)


def list_files(inputs: Iterable[str], exclude: Iterable[str] = (), stats: SourceStats | None = None) -> list[Path]:
    """The files `inputs` name, in order, without excluded ones and without repeats."""
    inputs = [expand_placeholders(s) for s in inputs]
    if not inputs:
        raise DataError("no inputs given")
    patterns = [expand_placeholders(p) for p in exclude]
    files: list[Path] = []
    seen: set[Path] = set()
    for spec in inputs:
        paths = _expand(spec)
        excluded = 0
        for path in paths:
            if _excluded(path, patterns):  # before resolve(): excluded trees can be large
                excluded += 1
                continue
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                files.append(path)
        if stats is not None:
            stats.excluded += excluded
        if excluded == len(paths):
            raise DataError(f"{spec}: all {len(paths)} matching files are excluded by the exclude patterns")
    return files


def iter_files(files: Iterable[Path], text_field: str = "text", stats: SourceStats | None = None,
               strict: bool = False) -> Iterator[Document]:
    """Documents of already listed files (see iter_documents for formats and skipping)."""
    stats = stats if stats is not None else SourceStats()
    for path in files:
        try:
            stats.bytes += path.stat().st_size
            stats.files += 1
            for text, source in _read_file(path, text_field, stats.skipped, strict):
                yield Document(text, source)
        except _corrupt_errors() as e:
            # Corrupt compressed data: what was read before the error stays; strict mode stops.
            if strict:
                raise DataError(f"{path}: corrupt compressed data ({e})") from None
            stats.skipped.add("corrupt_compressed", str(path))
        except OSError as e:
            raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def _read_file(path: Path, text_field: str, skipped: Tally, strict: bool):
    fmt, comp = split_suffix(path)
    if fmt in JSONL_SUFFIXES:
        return read_jsonl(path, comp, text_field, skipped, strict)
    if fmt == ".parquet" and not comp:
        return read_parquet(path, text_field, skipped, strict)
    return read_text(path, comp, skipped)


def _corrupt_errors() -> tuple[type[BaseException], ...]:
    """What a damaged compressed file raises; zstandard's error only when that optional extra is there."""
    errors: tuple[type[BaseException], ...] = (gzip.BadGzipFile, EOFError, zlib.error)
    try:
        import zstandard
    except ImportError:
        return errors
    return errors + (zstandard.ZstdError,)
