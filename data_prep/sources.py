"""Turn input specs (files, directories, recursive globs) into a deterministic stream of documents.

Formats are chosen by suffix (see formats.py): .jsonl/.ndjson (one document per line), .parquet and .arrow
(one per row), anything else one document per file; .gz/.zst/.zstd variants are decompressed while
streaming. A directory saved by Hugging Face `datasets` (save_to_disk) is its Arrow files, in its order.
An input may be a URL (remote.py): https://, s3://, gs://, or any fsspec filesystem.
"""
from __future__ import annotations

import fnmatch
import gzip
import os
import re
import sys
import sysconfig
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from .errors import DataError
from .formats import JSONL_SUFFIXES, hf_dataset_files, read_arrow, read_jsonl, read_parquet, read_text, split_suffix
from .remote import is_url, list_url
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


def _expand(spec: str, patterns: list[str]) -> list:
    """The files `spec` names, sorted; directories every file of which `patterns` exclude are not entered."""
    if is_url(spec):
        return list_url(spec)
    if _GLOB_CHARS & set(spec):
        parts = spec.split("/")
        fixed = next(i for i, part in enumerate(parts) if _GLOB_CHARS & set(part))
        root = "/".join(parts[:fixed]) or ("/" if spec.startswith("/") else "")
        matcher = _GlobMatcher(parts[fixed:])
        paths = [p for p in _walk(root or ".", patterns, prefix=root, follow_links=True, max_depth=matcher.max_depth)
                 if matcher.matches(p[len(root):].lstrip("/").split("/"))]
        if not paths:
            raise DataError(f"{spec}: pattern matches no files")
        return _sorted_paths(paths)
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        dataset = hf_dataset_files(path)
        return dataset if dataset is not None else _sorted_paths(_walk(spec, patterns, prefix=spec, follow_links=False))
    raise DataError(f"{spec}: no such file or directory")


def _sorted_paths(paths) -> list[Path]:
    """Sorted as Path objects sort (by components), without building 10^5 Paths to compare."""
    return [Path(p) for p in sorted(paths, key=lambda p: p.split("/"))]


def _walk(top: str, patterns: list[str], prefix: str, follow_links: bool, max_depth: int | None = None) -> Iterator[str]:
    """Paths (as `prefix`/...) of the files under `top`, skipping directories an exclude pattern ending in
    "*" covers whole. Directory links are followed as glob follows them (a directory input is walked as
    Path.rglob walks it: without)."""
    prunable = [p for p in patterns if p.endswith("*")]
    stack = [(top, prefix, 0, _dir_key(top))]
    while stack:
        directory, shown, depth, ancestors = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:  # unreadable directories are skipped, as glob skips them
            continue
        for entry in entries:
            path = f"{shown}/{entry.name}" if shown else entry.name
            try:
                is_dir = entry.is_dir(follow_symlinks=follow_links)
                is_file = not is_dir and entry.is_file()  # not broken links, sockets, ...
            except OSError:  # a link to itself or into a loop of links: it names no file
                continue
            if is_dir:
                key = _dir_key(entry.path) if follow_links else ()
                if key and key[0] in ancestors:  # a link back up the tree: following it never ends
                    print(f"note: {path}: a symbolic link to a directory it is inside; not followed", file=sys.stderr)
                    continue
                if (max_depth is None or depth < max_depth) and not _excluded(Path(path), prunable, directory=True):
                    stack.append((entry.path, path, depth + 1, ancestors + key))
            elif is_file:
                yield path


def _dir_key(path: str) -> tuple:
    """(device, inode) of a directory, links followed, as a 1-tuple; () when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return ()
    return ((st.st_dev, st.st_ino),)


class _GlobMatcher:
    """glob.glob(recursive=True)'s rule for a pattern's components, as one regex over a relative path: `**`
    spans any number of directories, other components match one name (`*` and `?` never cross "/"); names
    starting with "." only match components that do."""

    def __init__(self, parts: list[str]):
        body = []
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if part == "**":
                body.append(r"(?:(?!\.)[^/]+(?:/|\Z))*" if last else r"(?:(?!\.)[^/]+/)*")
            else:
                hidden = "" if part.startswith(".") else r"(?!\.)"
                body.append(hidden + _component_regex(part) + ("" if last else "/"))
        try:
            self._regex = re.compile("".join(body) + r"\Z", re.DOTALL)
        except re.error as e:
            raise DataError(f"{'/'.join(parts)}: not a valid glob pattern ({e})") from None
        # without "**" a match has exactly len(parts) components: no need to walk deeper
        self.max_depth = None if "**" in parts else len(parts) - 1

    def matches(self, names: list[str]) -> bool:
        return self._regex.match("/".join(names)) is not None


def _component_regex(part: str) -> str:
    """fnmatch's translation of one path component, with "*", "?" and "[...]" kept inside it."""
    out, i = [], 0
    while i < len(part):
        c = part[i]
        i += 1
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = i + 1 if i < len(part) and part[i] == "!" else i
            j = part.find("]", j + 1 if j < len(part) and part[j] == "]" else j)
            if j < 0:
                out.append(r"\[")
            else:  # fnmatch's own bracket rules (a leading "^" is literal, empty ranges match nothing)
                cls = fnmatch.translate(part[i - 1:j + 1])
                out.append("(?!/)" + cls[cls.index(":") + 1:cls.rindex(")")])
                i = j + 1
        else:
            out.append(re.escape(c))
    return "".join(out)


def _excluded(path, patterns: list[str], directory: bool = False) -> bool:
    forms = (path.as_posix(), path.absolute().as_posix()) if isinstance(path, Path) else (str(path),)
    if directory:  # Path drops the trailing "/" that lets "*/x/*" cover the directory x
        forms = tuple(f + "/" for f in forms)
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
        paths = _expand(spec, patterns)
        excluded = 0
        for path in paths:
            if _excluded(path, patterns):  # before resolve(): excluded trees can be large
                excluded += 1
                continue
            key = path.resolve() if isinstance(path, Path) else path
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
    if fmt == ".arrow" and not comp:
        return read_arrow(path, text_field, skipped, strict)
    return read_text(path, comp, skipped)


def _corrupt_errors() -> tuple[type[BaseException], ...]:
    """What a damaged compressed file raises; zstandard's error only when that optional extra is there."""
    errors: tuple[type[BaseException], ...] = (gzip.BadGzipFile, EOFError, zlib.error)
    try:
        import zstandard
    except ImportError:
        return errors
    return errors + (zstandard.ZstdError,)
