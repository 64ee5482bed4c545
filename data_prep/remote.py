"""Inputs named by URL: `https://...`, `s3://...`, `gs://...`, `memory://...` (anything fsspec knows),
listed and streamed through fsspec, with retries.

fsspec is optional (`pip install lmforge[remote]`; s3:// needs s3fs, gs:// gcsfs): it is imported only
when an input is a URL. A URL with glob characters is listed (`**` recurses); a URL naming a directory
(object-store prefix) means every file under it; anything else is one file. https URLs name files (HTTP
cannot list). Reads go through RetryingStream: a failed read reopens the file at the same offset, up to
RETRIES times with growing pauses, then stops with a DataError naming the URL, so a dropped connection
neither loses nor repeats a document.
"""
from __future__ import annotations

import io
import re
import sys
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from types import SimpleNamespace

from .errors import DataError

RETRIES = 4
BACKOFF_S = 0.5  # pause before retry k: BACKOFF_S * 2**k
_SCHEME = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_url(spec: str) -> bool:
    return _SCHEME.match(spec) is not None


def _filesystem(url: str):
    try:
        import fsspec
    except ImportError:
        raise DataError(f"{url}: reading URLs needs fsspec: pip install lmforge[remote]") from None
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:  # an unknown scheme, or its package (s3fs, gcsfs) missing
        raise DataError(f"{url}: cannot open this URL's filesystem ({e})") from None


@dataclass(frozen=True)
class RemoteFile:
    """A file behind a URL; quacks like the Path parts the readers use (name, stat, open)."""
    url: str
    size: int = field(compare=False, default=0)
    version: str = field(compare=False, default="")  # etag or modification time: part of prepare's fingerprint

    @property
    def name(self) -> str:
        """The last path component, without a query or fragment (it decides the format)."""
        path = self.url.split("?", 1)[0].split("#", 1)[0]
        return path.rstrip("/").rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return self.url

    def stat(self):
        return SimpleNamespace(st_size=self.size, st_mtime_ns=self.version)

    def open(self, mode: str = "rb"):
        fs, path = _filesystem(self.url)
        # HTTP: one streaming GET (block_size=0) for the sequential formats; Parquet needs range requests.
        http = self.url.startswith(("http://", "https://")) and not self.name.endswith(".parquet")
        kwargs = {"block_size": 0} if http else {}
        return io.BufferedReader(RetryingStream(self.url, lambda: fs.open(path, "rb", **kwargs), size=self.size),
                                 buffer_size=1 << 20)


def list_url(spec: str) -> list[RemoteFile]:
    """The files a URL names (see the module doc), sorted by URL."""
    fs, path = _filesystem(spec)
    protocol = spec.split("://", 1)[0].lower()
    http = protocol in ("http", "https")
    for k in range(RETRIES + 1):
        try:
            if not http and any(c in path for c in "*?["):  # HTTP cannot list; "?" starts its query
                paths = [p for p in fs.glob(path) if fs.isfile(p)]
            elif not http and fs.isdir(path):
                paths = fs.find(path)
            else:
                paths = [path]
            infos = [(p, fs.info(p)) for p in paths]
            break
        except Exception as e:  # fsspec backends raise their own client errors (aiohttp, botocore)
            _give_up_unless_transient(spec, e, "listing", k, RETRIES)
    if not infos:
        raise DataError(f"{spec}: pattern matches no files")
    files = []
    for p, info in sorted(infos):
        url = p if "://" in p else fs.unstrip_protocol(p)
        if http:
            url = spec  # fsspec's HTTP paths are the URL itself
        version = str(info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
                      or info.get("created") or "")
        files.append(RemoteFile(url, int(info.get("size") or 0), version))
    return files


class RetryingStream(io.RawIOBase):
    """A read-only stream over `opener()` that survives failed reads: reopen, seek back, read again. A stream
    that ends before `size` bytes (when known) counts as a failed read."""

    def __init__(self, url: str, opener, retries: int = RETRIES, size: int = 0):
        self.url, self._opener, self._retries, self._size = url, opener, retries, size
        self._pos, self._file = 0, None
        self._file = self._attempt(opener, "open", reopen=False)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        try:
            self._pos = self._file.seek(offset, whence)
        except (ValueError, OSError, NotImplementedError) as e:
            raise DataError(f"{self.url}: cannot seek in this stream ({e})") from None
        return self._pos

    def readinto(self, buffer) -> int:
        data = self._attempt(lambda: self._read(len(buffer)), "read")
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def _read(self, n: int) -> bytes:
        data = self._file.read(n)
        if not data and n and self._size and self._pos < self._size:
            raise OSError(f"the stream ended at byte {self._pos} of {self._size}")
        return data

    def close(self) -> None:
        self._close_file()
        super().close()

    def _attempt(self, action, what: str, reopen: bool = True):
        for k in range(self._retries + 1):
            try:
                return action()
            except DataError:
                raise
            except (ValueError, TypeError) as e:  # a misuse, not a network failure: retrying cannot help
                raise DataError(f"{self.url}: {what} failed ({type(e).__name__}: {e})") from None
            except Exception as e:  # network errors come as OSError, aiohttp's, botocore's ...
                _give_up_unless_transient(self.url, e, what, k, self._retries)
                if reopen:
                    self._reopen()

    def _reopen(self) -> None:
        self._close_file()
        try:
            self._file = self._opener()
        except Exception as e:
            self._file = _Broken(e)  # the next attempt fails with this and counts as a retry
            return
        try:
            if self._pos:
                try:
                    self._file.seek(self._pos)
                except (ValueError, OSError, NotImplementedError):  # a streaming file: read up to the offset
                    left = self._pos
                    while left:
                        got = len(self._file.read(min(left, 1 << 20)) or b"")
                        if not got:
                            raise OSError("the file is shorter than before")
                        left -= got
        except Exception as e:
            self._close_file()  # its connection too: left open, aiohttp complains at exit
            self._file = _Broken(e)

    def _close_file(self) -> None:
        try:
            if self._file is not None:
                self._file.close()
        except Exception:  # closing a broken connection must not hide the real error
            pass
        self._file = None


def _status(e: BaseException) -> int | None:
    """The HTTP status behind an error: fsspec reports any failed HEAD or GET as FileNotFoundError, raised
    from aiohttp's error, which has it."""
    while e is not None:
        if isinstance(getattr(e, "status", None), int):
            return e.status
        e = e.__cause__ or e.__context__
    return None


def _give_up_unless_transient(url: str, e: Exception, what: str, attempt: int, retries: int) -> None:
    """Return after the pause before the next try when `e` may pass (5xx, 408, 429, a network error);
    else, or after the last try, raise one DataError naming the URL and the status."""
    status = _status(e)
    if status is None and isinstance(e, (ValueError, TypeError, PermissionError)):  # retrying cannot help
        raise DataError(f"{url}: {what} failed ({type(e).__name__}: {e})") from None
    if status in (404, 410) or (status is None and isinstance(e, FileNotFoundError) and e.__cause__ is None):
        raise DataError(f"{url}: no such file or directory") from None
    if status is not None:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = ""
        problem = f"HTTP {status} {reason}".strip()
        if status < 500 and status not in (408, 429):
            raise DataError(f"{url}: {what} failed ({problem})") from None
    else:
        cause = e.__cause__ if isinstance(e, FileNotFoundError) and e.__cause__ is not None else e
        problem = f"{type(cause).__name__}: {cause}".strip().rstrip(":")
    if attempt == retries:
        raise DataError(f"{url}: {what} failed after {retries} retries ({problem})") from None
    time.sleep(BACKOFF_S * 2 ** attempt)


def close_sessions() -> None:
    """Close the HTTP sessions fsspec keeps for reuse: left to the interpreter's exit, aiohttp prints
    "Unclosed client session" / "Unclosed connection" after our own last line."""
    if "fsspec" not in sys.modules:
        return
    from fsspec.implementations.http import HTTPFileSystem
    for fs in list(HTTPFileSystem._cache.values()):
        session = getattr(fs, "_session", None)
        if session is not None and not session.closed:
            HTTPFileSystem.close_session(fs.loop, session)
            fs._session = None


class _Broken:
    """Stands for a file that could not be reopened: every use raises why."""

    def __init__(self, error: Exception):
        self.error = error

    def close(self) -> None:
        """Nothing was opened: the stream failed before it started."""

    def __getattr__(self, name):
        raise OSError(f"reopening failed ({type(self.error).__name__}: {self.error})")
