"""Build a prepared dataset: get the tokenizer, then one streaming pass that plans and encodes (stream.py).

The tokenizer is reused (`tokenizer_dir`) or trained first on a bounded, hash-selected sample of the
cleaned train-side documents, read in a pass of its own. Everything is built in `<out>.tmp-prepare/` (see
workdir.py): an interrupted run resumes from its last complete shard, and only the final rename publishes
the dataset.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from tqdm import tqdm

from .cleaning import CleanConfig, Cleaner
from .dedup import MinHashConfig
from .errors import DataError
from .fileio import atomic_write_json, file_sha256
from .plan import DROP, TRAIN, VAL, Planner, TokenizerSample, val_score
from .publish import MANIFEST_FILE, check_out_dir, manifest_json, meta_json, publish
from .shards import DEFAULT_SHARD_TOKENS, META_FILE, dtype_for_vocab
from .sources import Document, SourceStats, expand_placeholders, iter_files, list_files
from .stream import FAIL_AFTER_ENV, SEGMENT_CHARS, EncodePass, is_single_document, position_cut  # noqa: F401
from .tasks import Task
from .tokenizer import TOKENIZER_KINDS, Tokenizer, load_tokenizer, tokenizer_classes, train_tokenizer
from .workdir import WorkDir, fingerprint

DEFAULT_SAMPLE_BYTES = 200_000_000


def split_documents(docs: Sequence[Document], val_fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """Return (train, val).

    One document: split by position, the last `val_fraction` of its characters is val (nanoGPT's
    shakespeare_char convention). Several: whole documents go to val by a seeded hash, with at least
    one document on each side.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0.0:
        return list(docs), []
    if len(docs) == 1:
        doc = docs[0]
        n = len(doc.text)
        if n < 2:
            raise DataError(f"{doc.source}: a {n}-character corpus cannot be split into train and val")
        cut = min(max(int(n * (1.0 - val_fraction)), 1), n - 1)
        return [Document(doc.text[:cut], doc.source)], [Document(doc.text[cut:], doc.source)]
    scores = [val_score(seed, d) for d in docs]
    is_val = [s < val_fraction for s in scores]
    if not any(is_val):
        is_val[min(range(len(docs)), key=scores.__getitem__)] = True
    if all(is_val):
        is_val[max(range(len(docs)), key=scores.__getitem__)] = False
    train = [d for d, v in zip(docs, is_val) if not v]
    val = [d for d, v in zip(docs, is_val) if v]
    return train, val



def check_settings(vocab_size: int, val_fraction: float, tokenizer_sample_bytes: int | None, shard_tokens: int = 1,
                   workers: int = 1, tasks: int = 1, task: int = 0, wait_s: float = 0.0) -> None:
    """Refuse numbers no run can use, before anything is read or written."""
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise DataError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    if not 0.0 <= val_fraction < 1.0:  # also refuses NaN
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if tokenizer_sample_bytes is not None and tokenizer_sample_bytes <= 0:
        raise DataError(f"tokenizer_sample_bytes must be positive, got {tokenizer_sample_bytes}")
    if shard_tokens < 1:
        raise DataError(f"shard_tokens must be >= 1, got {shard_tokens}")
    if workers < 1:
        raise DataError(f"workers must be >= 1, got {workers}")
    if tasks < 1 or not 0 <= task < tasks:
        raise DataError(f"task {task} is not one of the {tasks} tasks (0..{tasks - 1})")
    if not 0.0 <= wait_s <= float("inf"):
        raise DataError(f"wait must be a number of seconds >= 0, got {wait_s}")


def prepare(inputs: Iterable[str], out_dir: str | os.PathLike, *, tokenizer: str = "bpe", vocab_size: int = 8192,
            val_fraction: float = 0.1, exclude: Iterable[str] = (), text_field: str = "text", seed: int = 1337,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, tokenizer_dir: str | os.PathLike | None = None,
            show_progress: bool = True, overwrite: bool = False, workers: int = 1,
            clean: CleanConfig | None = CleanConfig(), dedup: str = "near", leakage: str = "remove",
            minhash: MinHashConfig = MinHashConfig(), special_tokens: Sequence[str] = (),
            tokenizer_sample_bytes: int | None = DEFAULT_SAMPLE_BYTES, strict: bool = False,
            tasks: int = 1, task: int = 0, stage: str = "all", wait_s: float = 7 * 86400) -> dict:
    """Prepare `inputs` into `out_dir` and return its meta.json contents.

    With `tasks` > 1 this call is task `task` of that many (tasks.py): it writes its share and returns
    its own summary; `merge(out_dir)` then publishes the dataset. The tokenizer must be given then.

    `clean=None` keeps documents byte-exact (only empty ones are dropped). `dedup`: "near" (exact +
    MinHash-LSH), "exact" or "none"; `leakage`: val documents matching train ones are "remove"d,
    "flag"ged (counted) or not checked ("off"). `workers` encoder threads work beside the reading
    thread (processes for tokenizers that hold the GIL); the output is identical for any value. Counts of everything removed go to manifest.json.
    """
    t0 = time.time()
    inputs, exclude, special_tokens = list(inputs), list(exclude), list(special_tokens)
    out = Path(out_dir)
    check_out_dir(out, overwrite)
    if tokenizer_dir is None and tokenizer not in TOKENIZER_KINDS:
        raise DataError(f"unknown tokenizer kind {tokenizer!r} (expected one of {', '.join(TOKENIZER_KINDS)})")
    check_settings(vocab_size, val_fraction, tokenizer_sample_bytes, shard_tokens, workers, tasks, task, wait_s)
    if not inputs:
        raise DataError("no inputs given")
    clean_cfg = clean if clean is not None else CleanConfig(normalize=None, strip_control=False, min_chars=1)
    listing = SourceStats()
    files = list_files(inputs, exclude, listing)  # expanded once: globs over big trees are slow
    reused = Path(tokenizer_dir) if tokenizer_dir is not None else None
    reused_tok = load_tokenizer(reused) if reused is not None else None  # loaded once: loading is not free
    config = {
        "inputs": [expand_placeholders(s) for s in inputs], "exclude": exclude, "text_field": text_field,
        "strict": strict, "clean": vars(clean_cfg), "dedup": dedup, "leakage": leakage, "minhash": vars(minhash),
        "val_fraction": val_fraction, "seed": seed, "shard_tokens": shard_tokens, "tokenizer": tokenizer,
        "vocab_size": vocab_size, "special_tokens": special_tokens, "sample_bytes": tokenizer_sample_bytes,
        "tokenizer_dir": str(reused) if reused else None,
        "tokenizer_sha": file_sha256(reused / reused_tok.file_name) if reused else None,
    }
    if tasks > 1:
        if reused is None:
            raise DataError("several tasks share one tokenizer: train it first (python -m data_prep tokenizer "
                            "INPUT... --out TOKDIR) and pass --tokenizer-from TOKDIR")
        config["excluded_files"], config["tokenizer_dir"] = listing.excluded, str(reused.resolve())
        return Task(out, config, files, tasks, task, clean_cfg, minhash, workers, show_progress, wait_s).run(stage)
    work = WorkDir(out)
    resumed = work.open(fingerprint(config, files))
    config["files"], config["excluded_files"] = files, listing.excluded
    try:
        tok, tok_path, trained_on = _tokenizer(work, config, clean_cfg, reused, reused_tok, show_progress)
        meta, info = _encode(work, config, clean_cfg, minhash, tok, tok_path, trained_on, workers, show_progress)
        meta["source"].update(seconds=round(time.time() - t0, 2), resumed=resumed, workers=workers)
        atomic_write_json(work.path / MANIFEST_FILE, manifest_json(config, info, meta))
        atomic_write_json(work.path / META_FILE, meta)  # last: its presence means "prepared"
        work.finish()
        publish(work.path, out, overwrite)
    except DataError:
        # Bad input or settings fail the same way on a rerun: nothing worth keeping.
        work.close()
        shutil.rmtree(work.path, ignore_errors=True)
        raise
    finally:
        work.close()  # any other failure (interrupt, kill, disk) keeps the progress for a rerun
    return meta


def _empty_corpus(config: dict, stats: SourceStats, documents_read: int) -> DataError:
    return DataError(f"empty corpus: {' '.join(config['inputs'])} ({stats.files} files, {documents_read} documents "
                     f"read, none left after cleaning; {stats.skipped.total()} files/records skipped)")


def prepare_tokenizer(inputs: Iterable[str], out_dir: str | os.PathLike, *, tokenizer: str = "bpe",
                      vocab_size: int = 8192, val_fraction: float = 0.1, exclude: Iterable[str] = (),
                      text_field: str = "text", seed: int = 1337, clean: CleanConfig | None = CleanConfig(),
                      special_tokens: Sequence[str] = (), tokenizer_sample_bytes: int | None = DEFAULT_SAMPLE_BYTES,
                      strict: bool = False, show_progress: bool = True, overwrite: bool = False) -> Path:
    """Train the tokenizer `prepare` would train on these inputs and settings, into `out_dir` (for
    `prepare --tokenizer-from`: the one tokenizer many tasks share). Returns the tokenizer file. A tokenizer
    file already in `out_dir` is replaced only with `overwrite`."""
    if tokenizer not in TOKENIZER_KINDS:
        raise DataError(f"unknown tokenizer kind {tokenizer!r} (expected one of {', '.join(TOKENIZER_KINDS)})")
    check_settings(vocab_size, val_fraction, tokenizer_sample_bytes)
    out = Path(out_dir)
    existing = [out / name for name in tokenizer_classes() if (out / name).exists()]
    if existing and not overwrite:  # checked before training: it can take long
        raise DataError(f"{existing[0]}: already exists (pass --overwrite to replace it)")
    clean_cfg = clean if clean is not None else CleanConfig(normalize=None, strip_control=False, min_chars=1)
    config = {"inputs": list(inputs), "files": list_files(inputs, exclude), "text_field": text_field, "strict": strict,
              "sample_bytes": tokenizer_sample_bytes, "seed": seed, "val_fraction": val_fraction,
              "tokenizer": tokenizer, "vocab_size": vocab_size, "special_tokens": list(special_tokens)}
    texts, _ = _sample(config, clean_cfg, show_progress, alphabet=tokenizer == "char")
    tok = train_tokenizer(tokenizer, _drain(texts), vocab_size, list(special_tokens), show_progress)
    out.mkdir(parents=True, exist_ok=True)
    return tok.save(out)


def _tokenizer(work: WorkDir, config: dict, clean_cfg: CleanConfig, reused: Path | None,
               reused_tok: Tokenizer | None, show_progress: bool) -> tuple[Tokenizer, Path, str]:
    """The run's tokenizer, saved in the work dir (a resumed run loads it from there)."""
    saved = work.state.get("tokenizer")
    if saved and (work.path / saved["file"]).is_file():
        path = work.path / saved["file"]
        return tokenizer_classes()[path.name].load(path), path, saved["trained_on"]
    kind = config["tokenizer"]
    if reused is not None:
        tok, trained_on = reused_tok, f"reused from {reused}"
    elif kind == "char":
        # The alphabet comes from every document: an unseen character in val would otherwise make
        # preparation fail outright, and a character set leaks nothing about val's content.
        texts, chars = _sample(config, clean_cfg, show_progress, alphabet=True)
        tok, trained_on = train_tokenizer("char", texts, 0), "all documents (alphabet)"
    else:
        texts, chars = _sample(config, clean_cfg, show_progress)
        trained_on = f"train split sample ({chars} characters, {len(texts)} documents)"
        tok = train_tokenizer(kind, _drain(texts), config["vocab_size"], config["special_tokens"], show_progress)
    tok_path = tok.save(work.path)
    work.state["tokenizer"] = {"file": tok_path.name, "trained_on": trained_on}
    work.save()
    return tok, tok_path, trained_on


def _drain(texts: list[str]) -> Iterator[str]:
    """The texts in order, each dropped from the list once the trainer has it: trainers keep their own
    counts, so the sample is not held beside them for the whole training."""
    for i in range(len(texts)):
        text, texts[i] = texts[i], None
        yield text


def _sample(config: dict, clean_cfg: CleanConfig, show_progress: bool, alphabet: bool = False) -> tuple[list[str], int]:
    """(texts, characters) to train the tokenizer on: cleaned train-side documents (the train part of a
    single document), sampled by hash up to sample_bytes; with `alphabet`, one text of every character."""
    cleaner, stats = Cleaner(clean_cfg), SourceStats()
    sample = TokenizerSample(None if alphabet else config["sample_bytes"], config["seed"])
    single, vf, seen = is_single_document(config["files"]), config["val_fraction"], 0
    chars: set[str] = set()
    kept = 0
    documents = iter_files(config["files"], config["text_field"], stats=stats, strict=config["strict"])
    for ordinal, doc in enumerate(tqdm(documents, desc="sample", unit="doc", disable=not show_progress)):
        seen += 1
        text = cleaner.clean(doc.text, doc.source)
        if text is None:
            continue
        kept += 1
        if alphabet:
            chars.update(text)
        elif single:
            sample.offer(ordinal, text[:position_cut(len(text), vf, doc.source)] if vf > 0 else text)
        elif vf == 0 or val_score(config["seed"], Document(text, doc.source)) >= vf:
            sample.offer(ordinal, text)
    if kept == 0:
        raise _empty_corpus(config, stats, seen)
    if alphabet:
        return ["".join(sorted(chars))], len(chars)
    return sample.texts(), sample.chars


def _encode(work: WorkDir, config: dict, clean_cfg: CleanConfig, minhash: MinHashConfig, tok: Tokenizer,
            tok_path: Path, trained_on: str, workers: int, show_progress: bool) -> tuple[dict, dict]:
    """Plan and encode every document into shards; (meta.json, what the manifest needs)."""
    single, vf = is_single_document(config["files"]), config["val_fraction"]

    def parts(text: str, side: int, source: str, position: bool) -> list[tuple[str, str]]:
        if position and vf > 0:
            cut = position_cut(len(text), vf, source)
            return [("train", text[:cut]), ("val", text[cut:])]
        return [("train" if side == TRAIN or position else "val", text)]

    # One document has nothing to deduplicate against: the planner only cleans and counts it.
    planner = Planner(Cleaner(clean_cfg), vf, config["seed"], "none" if single else config["dedup"],
                      "off" if single else config["leakage"], minhash, spill_dir=work.path)

    def decide(ordinal: int, doc: Document) -> list[tuple[str, str]]:
        text = planner.add(doc)
        return [] if text is None else parts(text, planner.side(ordinal), doc.source, single)

    dtype = dtype_for_vocab(tok.vocab_size)
    encoder = EncodePass(work, config, tok, tok_path, dtype, workers, show_progress)
    try:
        stats = encoder.encode(decide)
        plan = planner.finish()
        if plan.kept == 0:
            raise _empty_corpus(config, stats, plan.documents_seen)
        if plan.adjusted and not single:
            # A tiny corpus whose final plan moved a document across: rebuild from that plan.
            encoder.reset()
            cleaner = Cleaner(clean_cfg)

            def decide_again(ordinal: int, doc: Document) -> list[tuple[str, str]]:
                side = int(plan.side[ordinal])
                text = cleaner.clean(doc.text, doc.source) if side != DROP else None
                return [] if text is None else parts(text, side, doc.source, plan.split_mode == "position")

            encoder.encode(decide_again)
        position = single or plan.split_mode == "position"
        entries = encoder.finish(lambda ordinal: position or plan.side[ordinal] == VAL)
    except BaseException:
        encoder.abort()
        raise
    if plan.split_mode == "none":
        del entries["val"]
    info = {
        "trained_on": trained_on, "split_mode": plan.split_mode, "removed": plan.removed, "modified": plan.modified,
        "skipped": stats.skipped.to_json(), "documents_seen": plan.documents_seen, "files": stats.files,
        "bytes": stats.bytes, "excluded_files": config["excluded_files"], "documents": plan.kept,
    }
    return meta_json(config, tok, tok_path, info, entries, dtype), info
