"""Prepare on many machines: N tasks (a SLURM array, torchrun-style ranks, shell loops) each take a share of
the files and write their own shards; `python -m data_prep merge OUT` then writes the one meta.json.

A file belongs to task blake2b(path) mod N, so adding files moves no other file between tasks. Every task
lists all inputs (cheap) so the document order, `(file number, record number)`, is the same everywhere.
The tokenizer is trained once, before the tasks (`python -m data_prep tokenizer`), and passed to each.
The work happens in `OUT.tmp-tasks/task-KKKKK/`, in three stages with a barrier between them (a stage
waits until every task has finished the one before; `--stage` runs one stage, for schedulers that chain
jobs instead of running all tasks at once):

  sign    read and clean my files; per document: side (the same seeded score as one task), exact key,
          MinHash signature. Exact keys go to task key mod N, LSH band keys to task band-key mod N.
  match   take my share of exact keys and band keys from every task: exact groups, LSH buckets whose
          pairs reach the threshold (signatures read from their tasks' files), and from them the same
          per-document match flags the one-task planner computes (plan.py); flags go to their owners.
  encode  OR the flags sent to me, resolve my documents' fates (plan.resolve), read my files again and
          encode the kept documents into shards named train_tKKKKK_NNNNN.bin; resumable per shard.

Exact dedup is exact: a key's copies all land in one task. Near dedup is as approximate as with one task,
and identical to it: both check the same candidate pairs (those sharing an LSH band), so the kept
documents and token counts equal a one-task run's. Two things one task does that tasks do not: when a
tiny corpus leaves one side empty, one task moves a document across; tasks leave it to merge, which
refuses an empty val split. Manifest examples name a file, not a record.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from array import array
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .cleaning import CleanConfig, Cleaner
from .dedup import BUCKET_CAP, LSHIndex, MinHashConfig, MinHasher, exact_key
from .errors import DataError
from .fileio import COUNT, FRACTION, atomic_write_bytes, atomic_write_json, file_sha256, read_json
from .plan import DROP, EXACT_DUP, NEAR_DUP, TRAIN, TRAIN_EXACT, TRAIN_NEAR, VAL, resolve, val_score
from .publish import MANIFEST_FILE, check_out_dir, manifest_json, meta_json, publish
from .shards import META_FILE, dtype_for_vocab, scan_tokens
from .sources import Document, SourceStats, iter_files
from .stream import EncodePass, is_single_document, position_cut
from .tally import Tally
from .tokenizer import load_tokenizer
from .workdir import WorkDir, fingerprint

STAGES = ("sign", "match", "encode")
POLL_S = 0.5
_DOCS = np.dtype([("order", "<i8"), ("side", "u1"), ("chars", "<i8")])
_EXACT = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("order", "<i8"), ("side", "u1"), ("task", "<i4"), ("index", "<i8")])
_BAND = np.dtype([("band", "<i4"), ("key", "<u8"), ("order", "<i8"), ("side", "u1"), ("task", "<i4"), ("index", "<i8")])
_FLAGS = np.dtype([("index", "<i8"), ("flags", "u1")])
_RECORD_BITS = 40  # order = file number << 40 | record number within the file

# What each file a task writes and another (or merge) reads back must hold: read_json checks it.
_TALLY = {str: {"count": COUNT, "example": str}}
_SHARD = {"file": str, "index": str, "tokens": COUNT, "docs": COUNT, "crc32": str}
_STAGE_DONE = {"fingerprint": str}
_SIGN_DONE = {**_STAGE_DONE, "documents": COUNT, "files": COUNT, "bytes": COUNT, "skipped": _TALLY,
              "dropped": _TALLY, "modified": _TALLY}
_ENCODE_DONE = {**_STAGE_DONE, "task": COUNT, "tasks": COUNT, "documents_read": COUNT, "documents": COUNT,
                "files": COUNT, "bytes": COUNT, "skipped": _TALLY, "removed": _TALLY, "modified": _TALLY,
                "tokenizer_sha256": str,
                "entries": {str: {"tokens": COUNT, "docs": COUNT, "bytes": COUNT, "shards": [_SHARD]}}}
_DONE = {"sign": _SIGN_DONE, "match": _STAGE_DONE, "encode": _ENCODE_DONE}
_CONFIG = {"tasks": COUNT, "files": [str], "inputs": [str], "exclude": [str], "excluded_files": COUNT,
           "text_field": str, "strict": bool, "clean": dict, "dedup": str, "leakage": str, "minhash": dict,
           "val_fraction": FRACTION, "seed": int, "shard_tokens": COUNT, "tokenizer": str, "vocab_size": COUNT,
           "tokenizer_dir": str}


def task_from_environment(tasks: int | None, task: int | None) -> tuple[int, int]:
    """(tasks, task): each from its flag, else from SLURM array variables, else from torchrun-style
    WORLD_SIZE/RANK, else (1, 0). A SLURM array's ids are counted from its first (SLURM_ARRAY_TASK_MIN)."""
    env = os.environ
    for count, index in (("SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_ID"), ("WORLD_SIZE", "RANK")):
        if env.get(count) and env.get(index):
            if tasks is None:
                tasks = int(env[count])
            if task is None:
                task = int(env[index]) - (int(env.get("SLURM_ARRAY_TASK_MIN", 0)) if count.startswith("SLURM") else 0)
            break
    tasks, task = (1 if tasks is None else tasks), (0 if task is None else task)
    if tasks < 1:
        raise DataError(f"--tasks must be >= 1, got {tasks}")
    if not 0 <= task < tasks:
        raise DataError(f"task {task} is not one of the {tasks} tasks (0..{tasks - 1})")
    return tasks, task


def file_task(path, tasks: int) -> int:
    return int.from_bytes(hashlib.blake2b(str(path).encode("utf-8"), digest_size=8).digest(), "big") % tasks


def tasks_root(out: Path) -> Path:
    return out.parent / f"{out.name}.tmp-tasks"


def _task_dir(out: Path, k: int) -> Path:
    return tasks_root(out) / f"task-{k:05d}"


class Task:
    def __init__(self, out: Path, config: dict, files: list, tasks: int, task: int, clean_cfg: CleanConfig,
                 minhash: MinHashConfig, workers: int, show_progress: bool, wait_s: float):
        self.out, self.config, self.tasks, self.task = out, config, tasks, task
        self.clean_cfg, self.minhash, self.workers = clean_cfg, minhash, workers
        self.show_progress, self.wait_s = show_progress, wait_s
        self.all_files = files
        self.mine = [(n, f) for n, f in enumerate(files) if file_task(f, tasks) == task]
        self.single = is_single_document(files)
        tasks_root(out).mkdir(parents=True, exist_ok=True)
        self.work = WorkDir(out, _task_dir(out, task))
        self.fp = fingerprint(dict(config, tasks=tasks), files)
        shared = dict(config, files=[str(f) for f in files], tasks=tasks)
        atomic_write_json(tasks_root(out) / f"config-{task:05d}.json", shared)  # merge reads task 0's

    @property
    def path(self) -> Path:
        return self.work.path

    def run(self, stage: str = "all") -> dict:
        if stage not in (*STAGES, "all"):
            raise DataError(f"unknown stage {stage!r} (expected one of {', '.join(STAGES)} or all)")
        self.work.open(self.fp)
        try:
            for name in STAGES if stage == "all" else (stage,):
                if not (self.path / f"{name}.done").is_file():
                    getattr(self, f"_{name}")()
            last = stage if stage != "all" else "encode"
            return read_json(self.path / f"{last}.done", _DONE[last])
        finally:
            self.work.close()

    # ---- stage 1: sign ---------------------------------------------------------------------------------

    def _documents(self, stats: SourceStats | None = None):
        """(local index, order, document) of my files, in the global order."""
        local = 0
        for number, f in self.mine:
            for record, doc in enumerate(iter_files([f], self.config["text_field"], stats=stats,
                                                    strict=self.config["strict"])):
                yield local, (number << _RECORD_BITS) | record, doc
                local += 1

    def _sign(self) -> None:
        cfg = self.config
        cleaner, stats = Cleaner(self.clean_cfg), SourceStats()
        near = cfg["dedup"] == "near" or (cfg["leakage"] != "off" and cfg["val_fraction"] > 0)
        hasher, bands = (MinHasher(self.minhash), LSHIndex(self.minhash)) if near else (None, None)
        with open(self.path / "sigs.u32", "wb") as sigs:
            docs = self._sign_documents(sigs, cleaner, stats, hasher, bands)
        np.save(self.path / "docs.npy", docs)
        atomic_write_json(self.path / "sign.done", {
            "fingerprint": self.fp, "documents": len(docs), "files": stats.files, "bytes": stats.bytes,
            "skipped": stats.skipped.to_json(), "dropped": cleaner.dropped.to_json(),
            "modified": cleaner.modified.to_json()})

    def _sign_documents(self, sigs, cleaner, stats, hasher, bands) -> np.ndarray:
        """Sign my documents: signatures into `sigs`, exact and band keys straight into the files of the tasks
        that own them (_RowSpill), and per document 17 bytes in typed arrays (the docs.npy rows, returned)."""
        cfg = self.config
        vf, seed = cfg["val_fraction"], cfg["seed"]
        orders, sides, chars = array("q"), bytearray(), array("q")
        n_bands = self.minhash.bands
        exact = _RowSpill(self.path, "exact", _EXACT, self.tasks, lambda rows: rows["hi"] % np.uint64(self.tasks))
        band_rows = _RowSpill(self.path, "bands", _BAND, self.tasks,
                              lambda rows: _mix(rows["key"]) % np.uint64(self.tasks))
        for local, order, doc in tqdm(self._documents(stats), desc=f"sign (task {self.task})", unit="doc",
                                      disable=not self.show_progress):
            text, source = cleaner.clean(doc.text, doc.source), doc.source
            del doc  # a huge document: the cleaned text only
            orders.append(order)
            if text is None:
                sides.append(DROP)
                chars.append(0)
                sigs.write(bytes(4 * self.minhash.num_perm))
                continue
            side = TRAIN if vf == 0 or self.single else (VAL if val_score(seed, Document(text, source)) < vf else TRAIN)
            sides.append(side)
            chars.append(len(text))
            key = exact_key(text)
            exact.add(hi=int.from_bytes(key[:8], "little"), lo=int.from_bytes(key[8:], "little"), order=order,
                      side=side, task=self.task, index=local)
            sig = hasher.signature(text) if hasher is not None and not self.single else None
            sigs.write((sig if sig is not None else np.zeros(self.minhash.num_perm, np.uint32)).tobytes())
            if sig is not None:
                band_rows.add(n_bands, band=np.arange(n_bands), key=bands.band_keys(sig), order=order, side=side,
                              task=self.task, index=local)
        exact.close()
        band_rows.close()
        docs = np.zeros(len(orders), dtype=_DOCS)
        docs["order"], docs["side"] = np.frombuffer(orders, dtype=np.int64), np.frombuffer(sides, dtype=np.uint8)
        docs["chars"] = np.frombuffer(chars, dtype=np.int64)
        return docs

    # ---- stage 2: match --------------------------------------------------------------------------------

    def _match(self) -> None:
        self._wait_for("sign")
        n, k = self.tasks, self.task
        flags = {t: {} for t in range(n)}  # owner task -> {local index: flags}

        def add(task: int, index: int, flag: int) -> None:
            if flag:
                flags[task][index] = flags[task].get(index, 0) | flag

        exact = np.concatenate([_read_rows(_task_dir(self.out, t) / f"exact-to-{k:05d}.bin", _EXACT) for t in range(n)])
        exact.sort(order=["hi", "lo", "order"])
        starts = np.flatnonzero(np.r_[True, (exact["hi"][1:] != exact["hi"][:-1]) | (exact["lo"][1:] != exact["lo"][:-1])])
        for a, b in zip(starts, np.r_[starts[1:], len(exact)]):
            if b - a < 2:
                continue
            group = exact[a:b]
            seen_sides, has_train = set(), bool((group["side"] == TRAIN).any())
            for row in group:
                side = int(row["side"])
                if side in seen_sides:
                    add(int(row["task"]), int(row["index"]), EXACT_DUP)
                seen_sides.add(side)
                if side == VAL and has_train:
                    add(int(row["task"]), int(row["index"]), TRAIN_EXACT)

        bands = np.concatenate([_read_rows(_task_dir(self.out, t) / f"bands-to-{k:05d}.bin", _BAND) for t in range(n)])
        bands.sort(order=["band", "key", "order"])
        width = np.dtype((np.uint32, self.minhash.num_perm))
        sigs = {t: _read_rows(_task_dir(self.out, t) / "sigs.u32", width, mmap=True) for t in range(n)}
        same = np.r_[False, (bands["band"][1:] == bands["band"][:-1]) & (bands["key"][1:] == bands["key"][:-1])]
        starts = np.flatnonzero(~same)
        pairs = 0
        for a, b in zip(starts, np.r_[starts[1:], len(bands)]):
            if b - a < 2:
                continue
            bucket = bands[a:b]
            rows = np.stack([sigs[int(t)][int(i)] for t, i in zip(bucket["task"], bucket["index"])])
            side = bucket["side"]
            found = np.zeros(len(bucket), dtype=np.uint8)
            for i in range(min(len(bucket), BUCKET_CAP)):  # as LSHIndex: a bucket keeps its first BUCKET_CAP
                est = (rows[i + 1:] == rows[i]).mean(axis=1)
                hit = np.flatnonzero(est >= self.minhash.threshold) + i + 1
                pairs += len(bucket) - i - 1
                if hit.size == 0:
                    continue
                later = side[hit]
                found[hit[later == side[i]]] |= NEAR_DUP
                if side[i] == TRAIN:
                    found[hit[later == VAL]] |= TRAIN_NEAR
                elif (later == TRAIN).any():
                    found[i] |= TRAIN_NEAR
            for r in np.flatnonzero(found):
                add(int(bucket["task"][r]), int(bucket["index"][r]), int(found[r]))
        for t in range(n):
            rows = np.array(sorted(flags[t].items()), dtype=_FLAGS) if flags[t] else np.zeros(0, _FLAGS)
            np.save(self.path / f"flags-to-{t:05d}.npy", rows)
        atomic_write_json(self.path / "match.done", {"fingerprint": self.fp, "pairs_checked": pairs})

    # ---- stage 3: encode -------------------------------------------------------------------------------

    def _encode(self) -> None:
        self._wait_for("match")
        cfg = self.config
        docs = _load_npy(self.path / "docs.npy", _DOCS)
        flags = np.zeros(len(docs), dtype=np.uint8)
        for t in range(self.tasks):
            rows = _load_npy(_task_dir(self.out, t) / f"flags-to-{self.task:05d}.npy", _FLAGS)
            np.bitwise_or.at(flags, rows["index"], rows["flags"])
        side, reasons = resolve(docs["side"].copy(), flags, cfg["dedup"], cfg["leakage"])
        tok = load_tokenizer(Path(cfg["tokenizer_dir"]))
        tok_path = Path(cfg["tokenizer_dir"]) / tok.file_name
        vf, cleaner = cfg["val_fraction"], Cleaner(self.clean_cfg)
        position = self.single and vf > 0

        def decide(ordinal: int, doc: Document) -> list[tuple[str, str]]:
            s = int(side[ordinal])
            text = cleaner.clean(doc.text, doc.source) if s != DROP else None
            if text is None:
                return []
            if position:
                cut = position_cut(len(text), vf, doc.source)
                return [("train", text[:cut]), ("val", text[cut:])]
            return [("train" if s == TRAIN else "val", text)]

        encoder = EncodePass(self.work, dict(cfg, files=[f for _, f in self.mine]), tok, tok_path,
                             dtype_for_vocab(tok.vocab_size), self.workers, self.show_progress,
                             stem_tag=f"_t{self.task:05d}")
        try:
            encoder.encode(decide)
            entries = encoder.finish(lambda ordinal: True)  # every pending val document is final here
        except BaseException:
            encoder.abort()
            raise
        sign = read_json(self.path / "sign.done", _SIGN_DONE)
        removed = Tally.from_json(sign["dropped"])
        for reason, mask in reasons.items():
            if mask.any():
                removed.add(reason, str(self.all_files[int(docs["order"][np.argmax(mask)]) >> _RECORD_BITS]),
                            int(mask.sum()))
        atomic_write_json(self.path / "encode.done", {
            "fingerprint": self.fp, "task": self.task, "tasks": self.tasks, "entries": entries,
            "documents_read": len(docs), "documents": int((side != DROP).sum()), "files": sign["files"],
            "bytes": sign["bytes"], "skipped": sign["skipped"], "removed": removed.to_json(),
            "modified": sign["modified"], "tokenizer_sha256": file_sha256(tok_path)})

    # ---- barrier ---------------------------------------------------------------------------------------

    def _wait_for(self, stage: str) -> None:
        deadline, told = time.monotonic() + self.wait_s, False
        while True:
            missing = []
            for t in range(self.tasks):
                done = _task_dir(self.out, t) / f"{stage}.done"
                if not done.is_file():
                    missing.append(t)
                elif read_json(done, _DONE[stage])["fingerprint"] != self.fp:
                    raise DataError(f"{done}: task {t} ran with other inputs or settings than task {self.task}")
            if not missing:
                return
            if time.monotonic() > deadline:
                raise DataError(f"task {self.task}: tasks {_ranges(missing)} did not finish stage {stage} within "
                                f"{self.wait_s:.0f} s (run them, or run each stage for all tasks before the next: --stage)")
            if not told:
                print(f"task {self.task}: waiting for tasks {_ranges(missing)} to finish stage {stage}", file=sys.stderr)
                told = True
            time.sleep(POLL_S)


class _RowSpill:
    """Rows of `dtype` for the tasks that own them (`owner(rows)` -> task numbers), gathered in a small buffer and
    appended to `<kind>-to-KKKKK.bin` when it fills: the sign stage holds no rows per document."""

    def __init__(self, directory: Path, kind: str, dtype: np.dtype, tasks: int, owner, buffer_rows: int = 1 << 16):
        self.paths = [directory / f"{kind}-to-{k:05d}.bin" for k in range(tasks)]
        for path in self.paths:  # a rerun of the stage starts them over
            path.write_bytes(b"")
        self.owner = owner
        self.buffer = np.zeros(buffer_rows, dtype=dtype)
        self.used = 0

    def add(self, count: int = 1, **fields) -> None:
        """`count` rows; each field a scalar (the same in every row) or `count` values."""
        if self.used + count > len(self.buffer):
            self.flush()
        rows = self.buffer[self.used:self.used + count]
        for name, value in fields.items():
            rows[name] = value
        self.used += count

    def flush(self) -> None:
        rows = self.buffer[:self.used]
        owners = self.owner(rows)
        for k in np.unique(owners).tolist():
            with open(self.paths[k], "ab") as f:
                f.write(rows[owners == k].tobytes())
        self.used = 0

    close = flush


def _read_rows(path: Path, dtype: np.dtype, mmap: bool = False) -> np.ndarray:
    """A stage's raw rows (`dtype` records) from another task, checked to be whole."""
    size = path.stat().st_size if path.is_file() else -1
    if size < 0 or size % dtype.itemsize:
        raise DataError(f"{path}: missing or cut short (rerun the stage that wrote it: delete its .done file)")
    if mmap:
        return np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype)
    return np.fromfile(path, dtype=dtype)


def _load_npy(path: Path, dtype: np.dtype) -> np.ndarray:
    """A stage's .npy file, never unpickled, with the record type it must have."""
    try:
        rows = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: missing or damaged ({str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                        f"rerun the stage that wrote it: delete its .done file)") from None
    if rows.dtype != dtype or rows.ndim != 1:
        raise DataError(f"{path}: holds {rows.dtype} rows of shape {rows.shape}, expected {dtype}")
    return rows


def _mix(keys: np.ndarray) -> np.ndarray:
    from .hashing import mix64
    return mix64(keys)


def _ranges(numbers: list[int]) -> str:
    return ", ".join(map(str, numbers[:8])) + (f" and {len(numbers) - 8} more" if len(numbers) > 8 else "")


def merge(out: Path, overwrite: bool = False) -> dict:
    """Check every task's result and publish the dataset: shards moved in, one meta.json and manifest.json."""
    out = Path(out)
    root = tasks_root(out)
    if not (root / "config-00000.json").exists():
        raise DataError(f"{root}: no task has started here (run python -m data_prep prepare ... --tasks N first)")
    config = read_json(root / "config-00000.json", _CONFIG)
    tasks = config["tasks"]
    if tasks < 1:
        raise DataError(f"{root / 'config-00000.json'}: tasks must be >= 1, got {tasks}")
    missing = [k for k in range(tasks) if not (_task_dir(out, k) / "encode.done").is_file()]
    if missing:
        raise DataError(f"{root}: tasks {_ranges(missing)} of {tasks} have not finished")
    results = [_task_result(_task_dir(out, k) / "encode.done", k, tasks) for k in range(tasks)]
    for k, r in enumerate(results):
        if r["fingerprint"] != results[0]["fingerprint"] or r["tokenizer_sha256"] != results[0]["tokenizer_sha256"]:
            raise DataError(f"{_task_dir(out, k)}: task {k} ran with other inputs, settings or tokenizer than task 0")
    check_out_dir(out, overwrite)
    tok = load_tokenizer(Path(config["tokenizer_dir"]))
    dtype = dtype_for_vocab(tok.vocab_size)
    staging = root / "merged"
    staging.mkdir(exist_ok=True)
    entries = {s: {"tokens": 0, "docs": 0, "shards": [], "bytes": 0} for s in ("train", "val")}
    for k, r in enumerate(results):
        for split, entry in r["entries"].items():
            for shard in entry["shards"]:  # an interrupted merge may have moved some already
                where = staging if (staging / shard["file"]).is_file() else _task_dir(out, k)
                _check_shard(where, shard, dtype, tok.vocab_size)
            for key in ("tokens", "docs", "bytes"):
                entries[split][key] += entry[key]
            entries[split]["shards"] += entry["shards"]
    if config["val_fraction"] > 0 and entries["val"]["docs"] == 0:
        raise DataError(f"{root}: no val documents are left across the {tasks} tasks (raise val_fraction)")
    if config["val_fraction"] == 0:
        del entries["val"]
    for k, r in enumerate(results):
        for entry in r["entries"].values():
            for shard in entry["shards"]:
                for name in (shard["file"], shard["index"]):
                    if (_task_dir(out, k) / name).is_file():
                        os.replace(_task_dir(out, k) / name, staging / name)
    tok_path = Path(config["tokenizer_dir"]) / tok.file_name
    atomic_write_bytes(staging / tok.file_name, tok_path.read_bytes())
    removed, modified, skipped = Tally(), Tally(), Tally()
    for r in results:
        for total, part in ((removed, r["removed"]), (modified, r["modified"]), (skipped, r["skipped"])):
            for reason, v in part.items():
                total.add(reason, v["example"], v["count"])
    info = {"trained_on": f"reused from {config['tokenizer_dir']}", "split_mode": "position" if is_single_document(
                [Path(f) for f in config["files"]]) and config["val_fraction"] > 0 else
            ("document" if config["val_fraction"] > 0 else "none"),
            "removed": removed.to_json(), "modified": modified.to_json(), "skipped": skipped.to_json(),
            "documents_seen": sum(r["documents_read"] for r in results), "files": sum(r["files"] for r in results),
            "bytes": sum(r["bytes"] for r in results), "excluded_files": config["excluded_files"],
            "documents": sum(r["documents"] for r in results)}
    meta = meta_json(config, tok, staging / tok.file_name, info, entries, dtype)
    meta["source"]["tasks"] = tasks
    manifest = manifest_json(config, info, meta)
    atomic_write_json(staging / MANIFEST_FILE, manifest)
    atomic_write_json(staging / META_FILE, meta)
    publish(staging, out, overwrite)
    shutil.rmtree(root, ignore_errors=True)
    return meta


def _task_result(path: Path, k: int, tasks: int) -> dict:
    """Task k's encode.done, checked: its fields, its own task number, and shard names that stay in its directory."""
    result = read_json(path, _ENCODE_DONE)
    if (result["task"], result["tasks"]) != (k, tasks):
        raise DataError(f"{path}: task {k}'s result says it is task {result['task']} of {result['tasks']}, "
                        f"not {k} of {tasks}")
    for split, entry in result["entries"].items():
        if split not in ("train", "val"):
            raise DataError(f"{path}: entries.{split} is not a split (expected train or val)")
        for i, shard in enumerate(entry["shards"]):
            for key in ("file", "index"):
                name = shard[key]
                if not name or name != Path(name).name or name in (".", ".."):
                    raise DataError(f"{path}: entries.{split}.shards[{i}].{key} {name!r} is not a plain file name")
    return result


def _check_shard(directory: Path, shard: dict, dtype: str, vocab_size: int) -> None:
    path = directory / shard["file"]
    if not path.is_file():
        raise DataError(f"{path}: shard named in the task's manifest is missing")
    width = np.dtype(dtype).newbyteorder("<")
    if path.stat().st_size % width.itemsize:
        raise DataError(f"{path}: {path.stat().st_size} bytes, not whole {dtype} tokens (a partial shard)")
    tokens = np.memmap(path, dtype=width, mode="r") if path.stat().st_size else np.zeros(0)
    if tokens.size != shard["tokens"]:
        raise DataError(f"{path}: {tokens.size} tokens, the task's manifest says {shard['tokens']}")
    digest, bad = scan_tokens(tokens, "crc32", vocab_size)
    if digest != shard["crc32"] or bad is not None:
        raise DataError(f"{path}: checksum or token ids disagree with the task's manifest")
