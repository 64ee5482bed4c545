"""What a prepared dataset's directory gets, whoever built it (one process: prepare.py; many tasks: tasks.merge):
meta.json and manifest.json contents, the check that the output directory may be written, and the rename that
publishes the finished dataset. Both builders import it, so neither imports the other for these.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import DataError
from .fileio import file_sha256
from .remote import is_url
from .shards import FORMAT_VERSION, META_FILE
from .tokenizer_base import Tokenizer

MANIFEST_FILE = "manifest.json"


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse an `out` that is a file, a prepared dataset (unless `overwrite`) or a non-empty directory."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory")
    if (out / META_FILE).is_file():
        if not overwrite:
            raise DataError(f"{out}: already holds a prepared dataset (pass overwrite=True / --overwrite to replace it)")
    elif out.is_dir() and any(out.iterdir()):
        # Never delete a directory we did not create: it might be the user's source tree.
        raise DataError(f"{out}: exists, is not empty and is not a prepared dataset; refusing to write into it")


def meta_json(config: dict, tok: Tokenizer, tok_path: Path, info: dict, entries: dict, dtype: str) -> dict:
    """meta.json: format, tokenizer, splits and where the documents came from."""
    reused = config["tokenizer_dir"] is not None
    return {
        "format_version": FORMAT_VERSION,
        "dtype": dtype,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "pad_id": tok.pad_id,
        "tokenizer": {"kind": tok.kind, "file": tok_path.name, "sha256": file_sha256(tok_path),
                      "trained_on": info["trained_on"],
                      "requested_kind": None if reused else config["tokenizer"],
                      "requested_vocab_size": None if reused or tok.kind == "char" else config["vocab_size"]},
        "splits": entries,
        "source": {
            "inputs": config["inputs"],
            "resolved_inputs": [s if is_url(s) else os.path.abspath(s) for s in config["inputs"]],  # from any cwd
            "exclude": config["exclude"],
            "text_field": config["text_field"],
            "files": info["files"],
            "bytes": info["bytes"],
            "excluded_files": info["excluded_files"],
            "skipped_records": sum(v["count"] for v in info["skipped"].values()),
            "removed_documents": sum(v["count"] for k, v in info["removed"].items()
                                     if not (config["leakage"] == "flag" and k.startswith("val_train_overlap"))),
            "documents_read": info["documents_seen"],
            "documents": info["documents"],
            "split_mode": info["split_mode"],
            "val_fraction": config["val_fraction"],
            "seed": config["seed"],
            "shard_tokens": config["shard_tokens"],
        },
    }


def manifest_json(config: dict, info: dict, meta: dict) -> dict:
    """What was removed or changed, and why: counts with one example source per reason."""
    return {
        "inputs": config["inputs"],
        "settings": {k: config[k] for k in ("clean", "dedup", "leakage", "minhash", "strict", "val_fraction", "seed")},
        "documents_read": info["documents_seen"],
        "documents_kept": meta["source"]["documents"],
        "skipped": info["skipped"],  # unusable files and records (binary, bad UTF-8, bad JSON, ...)
        "removed": info["removed"],  # documents dropped by cleaning, dedup and val/train leakage
        "modified": info["modified"],  # documents changed by cleaning
        "leakage": config["leakage"],
    }


def publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished dataset into place; an old dataset is removed only after the new one is in."""
    check_out_dir(out, overwrite)  # re-check: another run may have finished meanwhile
    if out.exists():
        old = out.parent / f"{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
