"""Tests for data_prep: tokenizers, sources, splitting, shards and the CLI (CPU, small corpora)."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from data_prep import (BPETokenizer, CharTokenizer, DataError, ShardWriter, TokenReader, dtype_for_vocab,
                       is_prepared, iter_documents, load_tokenizer, prepare, split_documents)
from data_prep.sources import Document, SourceStats

REPO = Path(__file__).resolve().parents[1]
EOS = "<|endoftext|>"
UNICODE = st.text(st.characters(exclude_categories=("Cs",)), max_size=200)


def synthetic_corpus(n_docs=60, seed=0):
    rng = random.Random(seed)
    words = ["the", "model", "token", "def", "return", "self", "data", "shard", " ", "\n", "\t", "=", "(", ")",
             "é", "日本", "😀", "\r\n", "\x00", "  indent"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 60))) for _ in range(n_docs)]


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train(synthetic_corpus(), vocab_size=300)


def write_corpus(root: Path, docs, suffix=".txt"):
    root.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(docs):
        (root / f"doc{i:03d}{suffix}").write_bytes(text.encode("utf-8"))
    return root


def read_docs(reader, tok):
    """Decode a whole split and cut it at EOS: the document boundaries must survive the round trip."""
    ids = reader.read(0, reader.num_tokens)
    assert reader.num_tokens == 0 or ids[-1] == reader.eos_id
    cuts = np.flatnonzero(ids == reader.eos_id)
    out, start = [], 0
    for c in cuts:
        out.append(tok.decode(ids[start:c]))
        start = c + 1
    return out


# ---------------------------------------------------------------- tokenizers

@settings(max_examples=300, deadline=None)
@given(UNICODE)
def test_bpe_round_trip_arbitrary_unicode(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


@settings(max_examples=50, deadline=None)
@given(st.lists(UNICODE, max_size=8))
def test_bpe_encode_batch_matches_encode(bpe, texts):
    assert bpe.encode_batch(texts) == [bpe.encode(t) for t in texts]


def test_bpe_edge_cases(bpe, tmp_path):
    for text in ["\r\n", "\x00", "😀", "  leading spaces", "\n\n\t", "日本語 text", ""]:
        assert bpe.decode(bpe.encode(text)) == text
    # A literal EOS string in a document is ordinary text, not a document boundary.
    ids = bpe.encode("a<|endoftext|>b")
    assert bpe.eos_id not in ids and bpe.decode(ids) == "a<|endoftext|>b"
    assert bpe.decode([bpe.eos_id]) == EOS  # decode keeps special tokens
    assert 257 <= bpe.vocab_size <= 300
    path = bpe.save(tmp_path)
    assert path == tmp_path / "tokenizer.json"
    again = load_tokenizer(tmp_path)
    assert again.kind == "bpe" and again.eos_id == bpe.eos_id
    assert again.encode("the model 😀") == bpe.encode("the model 😀")


def test_bpe_vocab_too_small():
    with pytest.raises(DataError, match="at least 257"):
        BPETokenizer.train(["abc"], vocab_size=100)


def test_char_tokenizer_round_trip_and_unknown(tmp_path):
    tok = CharTokenizer.train(["hello", "world\n"])
    assert tok.chars == sorted(set("helloworld\n"))
    assert tok.eos_id == len(tok.chars) and tok.vocab_size == len(tok.chars) + 1
    assert tok.decode(tok.encode("hello\nworld")) == "hello\nworld"
    assert tok.decode(tok.encode("low") + [tok.eos_id]) == "low" + EOS
    with pytest.raises(DataError, match=r"'z' at position 2"):
        tok.encode("hez")
    path = tok.save(tmp_path)
    assert json.loads(path.read_text()) == {"kind": "char", "chars": tok.chars}
    assert load_tokenizer(tmp_path).encode("hello") == tok.encode("hello")


def test_load_tokenizer_missing(tmp_path):
    with pytest.raises(DataError, match="no tokenizer.json or chars.json"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------- sources

def test_sources_order_exclude_and_errors(tmp_path):
    write_corpus(tmp_path / "a" / "sub", ["one", "two"], ".py")
    write_corpus(tmp_path / "a", ["three"], ".md")
    (tmp_path / "a" / "sub" / "skip.py").write_text("skipped")
    (tmp_path / "a" / "bad.txt").write_bytes(b"\xff\xfe\x00bad utf8 \xc3")
    docs = list(iter_documents([str(tmp_path / "a")], exclude=["**/skip.py"]))
    assert [Path(d.source).name for d in docs] == ["doc000.md", "doc000.py", "doc001.py"]
    globbed = list(iter_documents([str(tmp_path / "**" / "*.py")], exclude=["*/skip.py"]))
    assert [d.text for d in globbed] == ["one", "two"]
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError, match=str(missing)):
        iter_documents([str(missing)])
    with pytest.raises(DataError, match="matches no files"):
        iter_documents([str(tmp_path / "**" / "*.rs")])


def test_crlf_preserved(tmp_path):
    (tmp_path / "x.txt").write_bytes(b"a\r\nb\r\n")
    assert [d.text for d in iter_documents([str(tmp_path / "x.txt")])] == ["a\r\nb\r\n"]


def test_jsonl_input_and_bad_line(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"body": "first doc"}\n\n{"body": "second\\ndoc", "x": 1}\n')
    docs = list(iter_documents([str(good)], text_field="body"))
    assert [d.text for d in docs] == ["first doc", "second\ndoc"]
    assert docs[1].source == f"{good}:3"
    # strict mode: a bad record is an error naming file:line.
    with pytest.raises(DataError, match=r"good\.jsonl:1: record has no field 'text'"):
        list(iter_documents([str(good)], strict=True))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        list(iter_documents([str(bad)], strict=True))
    # default: skipped and counted with an example (see test_data_prep_scale.py for the manifest).
    stats = SourceStats()
    assert [d.text for d in iter_documents([str(bad)], stats=stats)] == ["ok"]
    assert stats.skipped.counts == {"jsonl_invalid_json": 1} and stats.skipped.examples["jsonl_invalid_json"] == f"{bad}:2"


# ---------------------------------------------------------------- splitting

def test_single_document_split_by_position(tmp_path):
    text = "".join(random.Random(1).choice("abcdefgh \n") for _ in range(1003))
    (tmp_path / "in.txt").write_text(text)
    out = tmp_path / "out"
    meta = prepare([str(tmp_path / "in.txt")], out, tokenizer="char", show_progress=False)
    assert meta["source"]["split_mode"] == "position"
    tok = load_tokenizer(out)
    cut = int(len(text) * 0.9)
    assert read_docs(TokenReader(out, "train"), tok) == [text[:cut]]
    assert read_docs(TokenReader(out, "val"), tok) == [text[cut:]]
    assert len(text[cut:]) == 101


def test_multi_document_split_deterministic():
    docs = [Document(f"text {i}", f"f{i}.txt") for i in range(200)]
    train, val = split_documents(docs, 0.1, seed=1337)
    assert (train, val) == split_documents(docs, 0.1, seed=1337)
    assert (train, val) != split_documents(docs, 0.1, seed=7)
    assert 5 <= len(val) <= 40 and len(train) + len(val) == 200
    # Independent of input order: a document's side depends only on (seed, source, text).
    train_r, val_r = split_documents(docs[::-1], 0.1, seed=1337)
    assert set(val_r) == set(val)
    # At least one document on each side, and none at all when val_fraction is 0.
    two = docs[:2]
    for seed in range(20):
        t, v = split_documents(two, 0.1, seed)
        assert len(t) == 1 and len(v) == 1
    assert split_documents(docs, 0.0, 0) == (docs, [])


# ---------------------------------------------------------------- shards

def test_prepare_round_trip_through_shards(bpe, tmp_path):
    texts = synthetic_corpus(80, seed=3) + ["\x00", "😀 emoji", "\r\n", "  x"]
    write_corpus(tmp_path / "in", texts)
    tokdir = tmp_path / "tok"
    tokdir.mkdir()
    bpe.save(tokdir)
    out = tmp_path / "out"
    # clean=None: documents stay byte-exact (the default cleaning would strip the "\x00" control chars).
    meta = prepare([str(tmp_path / "in")], out, tokenizer_dir=tokdir, shard_tokens=500, show_progress=False,
                   clean=None)
    assert is_prepared(out) and not any(p.name.startswith("out.tmp") for p in tmp_path.iterdir())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == bpe.vocab_size
    by_source = {str(tmp_path / "in" / f"doc{i:03d}.txt"): t for i, t in enumerate(texts)}
    decoded = []
    for split in ("train", "val"):
        reader = TokenReader(out, split)
        assert len(reader.shards) >= (2 if split == "train" else 1)
        docs = read_docs(reader, bpe)
        assert len(docs) == reader.num_docs
        for i, text in enumerate(docs):
            assert bpe.decode(reader.document(i)) == text
        decoded += docs
        reader.verify()
    assert sorted(decoded) == sorted(texts)


def test_reader_reads_across_shard_boundaries(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 1000, size=rng.integers(1, 40)) for _ in range(50)]
    w = ShardWriter(tmp_path, "train", "uint16", eos_id=1000, shard_tokens=64)
    for d in docs:
        w.add_document(d)
    entry = w.close()
    meta = {"format_version": 1, "dtype": "uint16", "vocab_size": 1001, "eos_id": 1000,
            "tokenizer": {"kind": "char", "file": "chars.json", "sha256": ""}, "splits": {"train": entry}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    r = TokenReader(tmp_path, "train")
    assert len(r.shards) > 3
    flat = np.concatenate([np.append(d, 1000) for d in docs])
    assert r.num_tokens == len(flat) and r.num_docs == 50
    for start, length in [(0, len(flat)), (60, 10), (63, 2), (5, 0), (len(flat) - 1, 1)]:
        got = r.read(start, length)
        assert got.dtype == np.int64 and np.array_equal(got, flat[start:start + length])
    for i, d in enumerate(docs):
        assert np.array_equal(r.document(i), d)
    with pytest.raises(IndexError):
        r.read(len(flat) - 1, 2)


def test_writer_rejects_ids_that_do_not_fit(tmp_path):
    w = ShardWriter(tmp_path, "train", "uint16", eos_id=0)
    with pytest.raises(DataError, match="70000"):
        w.add_document([1, 70000])


def test_dtype_selection():
    assert dtype_for_vocab(256) == "uint16"
    assert dtype_for_vocab(65536) == "uint16"
    assert dtype_for_vocab(65537) == "uint32"
    assert dtype_for_vocab(200_000) == "uint32"


@pytest.fixture
def prepared(tmp_path):
    write_corpus(tmp_path / "in", synthetic_corpus(30, seed=5))
    out = tmp_path / "out"
    prepare([str(tmp_path / "in")], out, tokenizer="char", show_progress=False)
    return out


def test_truncated_shard_is_caught_at_open(prepared):
    shard = prepared / "train_00000.bin"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 3)
    with pytest.raises(DataError, match=r"train_00000\.bin: size .* disagrees with meta\.json") as e:
        TokenReader(prepared, "train")
    assert "\n" not in str(e.value)


def test_tampered_files_fail_open_or_verify(prepared):
    index = prepared / "val_00000.idx"
    data = bytearray(index.read_bytes())
    data[-1] ^= 1
    index.write_bytes(bytes(data))
    reader = TokenReader(prepared, "val")  # same size, and training never reads the index: open succeeds
    with pytest.raises(DataError, match=r"val_00000\.idx: sha256"):
        reader.verify()
    shard = prepared / "val_00000.bin"
    data = bytearray(shard.read_bytes())
    data[0] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"val_00000\.bin: checksum mismatch"):  # the tokens are checked at open
        TokenReader(prepared, "val")


def test_reader_open_errors(prepared, tmp_path):
    with pytest.raises(DataError, match="no split 'test'"):
        TokenReader(prepared, "test")
    (prepared / "val_00000.idx").unlink()
    with pytest.raises(DataError, match=r"val_00000\.idx: shard file listed in meta\.json is missing"):
        TokenReader(prepared, "val")
    (prepared / "meta.json").unlink()
    assert not is_prepared(prepared)
    with pytest.raises(DataError, match=r"meta\.json.*python -m data_prep prepare"):
        TokenReader(prepared, "train")
    with pytest.raises(DataError, match="does not exist"):
        TokenReader(tmp_path / "missing", "train")


def test_unknown_format_version(prepared):
    meta = json.loads((prepared / "meta.json").read_text())
    meta["format_version"] = 99
    (prepared / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="format_version 99"):
        TokenReader(prepared, "train")


def test_prepare_refuses_existing_and_overwrites(prepared):
    src = str(prepared.parent / "in")
    with pytest.raises(DataError, match="already holds a prepared dataset"):
        prepare([src], prepared, tokenizer="char", show_progress=False)
    meta = prepare([src], prepared, tokenizer="char", val_fraction=0.0, overwrite=True, show_progress=False)
    assert list(meta["splits"]) == ["train"]
    assert sorted(p.name for p in prepared.parent.iterdir()) == ["in", "out"]


def test_empty_corpus_and_missing_input(tmp_path):
    write_corpus(tmp_path / "in", ["", ""])
    with pytest.raises(DataError, match="empty corpus"):
        prepare([str(tmp_path / "in")], tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()
    missing = tmp_path / "does_not_exist"
    with pytest.raises(DataError, match=str(missing)):
        prepare([str(missing)], tmp_path / "out", show_progress=False)


def test_bpe_vocab_recorded_is_actual(tmp_path):
    write_corpus(tmp_path / "in", ["tiny corpus", "another tiny one"])
    meta = prepare([str(tmp_path / "in")], tmp_path / "out", vocab_size=5000, show_progress=False)
    assert meta["vocab_size"] == load_tokenizer(tmp_path / "out").vocab_size < 5000


# ---------------------------------------------------------------- CLI

def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "data_prep", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)


def test_cli_prepare_inspect_and_error(tmp_path):
    write_corpus(tmp_path / "in", synthetic_corpus(20, seed=9))
    out = tmp_path / "out"
    r = run_cli("prepare", str(tmp_path / "in"), "--out", str(out), "--vocab-size", "300", "--quiet")
    assert r.returncode == 0, r.stderr
    r = run_cli("inspect", str(out))
    assert r.returncode == 0, r.stderr
    assert "[train]" in r.stdout and "[val]" in r.stdout and "checksums OK" in r.stdout
    r = run_cli("prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "o2"))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ")
    assert str(tmp_path / "missing") in r.stderr and "Traceback" not in r.stderr
    r = run_cli("inspect", str(tmp_path / "o2"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "prepare" in r.stderr


@settings(max_examples=25, deadline=None)
@given(st.lists(UNICODE.filter(bool), min_size=1, max_size=10))
def test_bpe_round_trip_through_shard_writer(bpe, tmp_path_factory, texts):
    out = tmp_path_factory.mktemp("shards")
    bpe.save(out)
    w = ShardWriter(out, "train", dtype_for_vocab(bpe.vocab_size), bpe.eos_id, shard_tokens=50)
    for ids in bpe.encode_batch(texts):
        w.add_document(ids)
    meta = {"format_version": 1, "dtype": "uint16", "vocab_size": bpe.vocab_size, "eos_id": bpe.eos_id,
            "tokenizer": {"kind": "bpe", "file": "tokenizer.json", "sha256": ""}, "splits": {"train": w.close()}}
    (out / "meta.json").write_text(json.dumps(meta))
    reader = TokenReader(out, "train")
    assert read_docs(reader, bpe) == texts
    assert [bpe.decode(reader.document(i)) for i in range(reader.num_docs)] == texts


def test_failed_prepare_leaves_nothing(tmp_path):
    write_corpus(tmp_path / "in", ["abc", "abd", "xyz"])
    tokdir = tmp_path / "tok"
    tokdir.mkdir()
    CharTokenizer.train(["abcd"]).save(tokdir)
    with pytest.raises(DataError, match=r"doc002\.txt: .*'x' at position 0"):
        prepare([str(tmp_path / "in")], tmp_path / "out", tokenizer_dir=tokdir, val_fraction=0.0,
                show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "tok"]
