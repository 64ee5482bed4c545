"""Per-format document readers: plain text, JSONL and Parquet, optionally gzip- or zstd-compressed.

Each reader streams: a JSONL or Parquet file is never loaded whole; a text file is one document, so it
is read at once. Records that cannot be used are counted in a Tally (reason -> count, example) and
skipped, or raise DataError in strict mode.
"""
from __future__ import annotations

import codecs
import gzip
import io
import json
from pathlib import Path
from typing import BinaryIO, Iterator

from .errors import DataError
from .fileio import check_json, read_json
from .tally import Tally

COMPRESSIONS = (".gz", ".zst", ".zstd")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
_SNIFF_BYTES = 8192
_READ_BYTES = 1 << 20


def split_suffix(path: Path) -> tuple[str, str]:
    """(format suffix, compression suffix) of `path`, e.g. data.jsonl.zst -> (".jsonl", ".zst")."""
    name = path.name.lower()
    comp = next((c for c in COMPRESSIONS if name.endswith(c)), "")
    return Path(name[:len(name) - len(comp)]).suffix, comp


def open_stream(path, comp: str) -> BinaryIO:
    """The decompressed bytes of a local Path or a RemoteFile (remote.py)."""
    if comp in (".zst", ".zstd"):
        try:
            import zstandard
        except ImportError:
            raise DataError(f"{path}: reading .zst needs zstandard: pip install lmforge[zstd]") from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(path.open("rb"), closefd=True))
    raw = path.open("rb")
    if comp == ".gz":
        stream = gzip.GzipFile(fileobj=raw, mode="rb")
        stream.myfileobj = raw  # GzipFile closes its myfileobj: what gzip.open(filename) sets
        return stream
    return raw


def read_text(path: Path, comp: str, skipped: Tally) -> Iterator[tuple[str, str]]:
    """The file as one document, decoded as it is read: a binary file (a 1 GB shared library under a
    directory input) is given up at its first undecodable byte, not read whole first."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    parts: list[str] = []
    head = b""
    with open_stream(path, comp) as f:
        while True:
            chunk = f.read(_READ_BYTES)
            if len(head) < _SNIFF_BYTES:
                head += chunk[:_SNIFF_BYTES - len(head)]
            try:
                parts.append(decoder.decode(chunk, final=not chunk))
            except UnicodeDecodeError:
                # NUL bytes are legal UTF-8 text; only NULs *and* undecodable bytes mean "binary".
                skipped.add("binary_file" if b"\x00" in head else "invalid_utf8", str(path))
                return
            if not chunk:
                break
    text = "".join(parts)
    del parts  # not held while the text is used: a huge file would count twice
    yield text, str(path)


def read_jsonl(path: Path, comp: str, text_field: str, skipped: Tally, strict: bool) -> Iterator[tuple[str, str]]:
    def bad(reason: str, where: str, msg: str) -> None:
        if strict:
            raise DataError(f"{where}: {msg}")
        skipped.add(reason, where)

    with open_stream(path, comp) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except ValueError as e:  # covers bad UTF-8 and bad JSON
                bad("jsonl_invalid_json", where, f"invalid JSON ({str(e).splitlines()[0]})")
                continue
            if not isinstance(record, dict) or text_field not in record:
                bad("jsonl_missing_field", where, f"record has no field {text_field!r}")
                continue
            text = record[text_field]
            if not isinstance(text, str):
                bad("jsonl_field_not_string", where,
                    f"field {text_field!r} is {type(text).__name__}, expected a string")
                continue
            yield text, where


def read_parquet(path: Path, text_field: str, skipped: Tally, strict: bool,
                 batch_rows: int = 1024) -> Iterator[tuple[str, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow: pip install lmforge[parquet]") from None
    try:
        pf = pq.ParquetFile(path if isinstance(path, Path) else path.open("rb"))
    except DataError:
        raise
    except Exception as e:  # pyarrow raises several types for a corrupt file
        if strict:
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
        skipped.add("parquet_unreadable", str(path))
        return
    if text_field not in pf.schema_arrow.names:
        if strict:
            raise DataError(f"{path}: Parquet file has no column {text_field!r}")
        skipped.add("parquet_missing_column", str(path))
        return
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=batch_rows):
        for value in batch.column(0).to_pylist():
            if not isinstance(value, str):
                if strict:
                    raise DataError(f"{path}:row {row}: column {text_field!r} is not a string ({value!r:.40})")
                skipped.add("parquet_not_string", f"{path}:row {row}")
            else:
                yield value, f"{path}:row {row}"
            row += 1


def read_arrow(path, text_field: str, skipped: Tally, strict: bool) -> Iterator[tuple[str, str]]:
    """Rows of an Arrow IPC stream file (what Hugging Face `datasets` writes as data-*.arrow)."""
    try:
        import pyarrow as pa
    except ImportError:
        raise DataError(f"{path}: reading Arrow files needs pyarrow: pip install lmforge[parquet]") from None
    with path.open("rb") as f:
        try:
            reader = pa.ipc.open_stream(f)
        except pa.ArrowInvalid:
            try:
                f.seek(0)
                reader = pa.ipc.open_file(f)  # the random-access variant
            except Exception as e:
                if strict:
                    raise DataError(f"{path}: not a readable Arrow file ({e})") from None
                skipped.add("arrow_unreadable", str(path))
                return
        if text_field not in reader.schema.names:
            if strict:
                raise DataError(f"{path}: Arrow file has no column {text_field!r}")
            skipped.add("arrow_missing_column", str(path))
            return
        batches = ((reader.get_batch(i) for i in range(reader.num_record_batches))
                   if hasattr(reader, "num_record_batches") else reader)
        row = 0
        for batch in batches:
            for value in batch.column(batch.schema.get_field_index(text_field)).to_pylist():
                if not isinstance(value, str):
                    if strict:
                        raise DataError(f"{path}:row {row}: column {text_field!r} is not a string ({value!r:.40})")
                    skipped.add("arrow_not_string", f"{path}:row {row}")
                else:
                    yield value, f"{path}:row {row}"
                row += 1


def hf_dataset_files(directory: Path) -> list[Path] | None:
    """The Arrow files of a directory written by `datasets` save_to_disk, in the dataset's row order (a
    DatasetDict: each split's, in dataset_dict.json's order); None for any other directory."""
    state, splits = directory / "state.json", directory / "dataset_dict.json"
    if splits.is_file():
        names = read_json(splits, {"splits": [str]})["splits"]
        files = [hf_dataset_files(directory / n) for n in names]
        if any(f is None for f in files):
            raise DataError(f"{splits}: a split it names is not a saved dataset")
        return [p for f in files for p in f]
    if not state.is_file():
        return None
    entries = read_json(state, {}).get("_data_files")
    if entries is None:
        return None
    check_json(entries, [{"filename": str}], state, "_data_files")
    files = [directory / e["filename"] for e in entries]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise DataError(f"{state}: names data files that are missing ({', '.join(missing[:3])})")
    return files


def jsonl_objects(path: Path, what: str = "") -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file of objects (task data, fine-tuning
    examples); a DataError naming the file and line for an unreadable file, invalid JSON or a non-object.
    `what` says in the error whose file it is (e.g. "task 'mc:x.jsonl'")."""
    path = Path(path)
    about = f" ({what})" if what else ""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file{about}") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a JSONL file{about}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {number}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {number}: expected a JSON object, got {type(record).__name__}")
        yield number, record
