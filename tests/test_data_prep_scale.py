"""Tests for the scaled-up data_prep: SentencePiece, readers, cleaning, dedup, parallel/resumable
encoding, mixtures and tokenizer hash checks (CPU, small corpora, a few seconds in all)."""
import gzip
import json
import random

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings, strategies as st

from data_prep import (BPETokenizer, DataError, LSHIndex, MinHasher, Mixture, TokenReader,
                       build_blending_indices, jaccard, load_tokenizer, prepare, train_tokenizer)
from data_prep.__main__ import main as cli_main
from data_prep.prepare import FAIL_AFTER_ENV

UNICODE = st.text(st.characters(exclude_categories=("Cs",)), max_size=200)
WORDS = ["the", "model", "token", "def", "return", "12345", " ", "\n", "\t", "é", "日本", "😀", "\r\n", "  x",
         "\u2581", "\ue000", "<|endoftext|>", "e\u0301"]


def corpus(n, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) for _ in range(n)]


def prose(n_docs, seed=0, words=120):
    """Distinct documents of random words from a large vocabulary (pairwise Jaccard ~ 0)."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(20000)]
    return [" ".join(rng.choice(vocab) for _ in range(words)) for _ in range(n_docs)]


@pytest.fixture(scope="module", params=["sp-bpe", "sp-unigram", "bpe"])
def tok(request):
    return train_tokenizer(request.param, corpus(300), 400, special_tokens=["<|user|>"])


# ---------------------------------------------------------------- tokenizers

@settings(max_examples=150, deadline=None)
@given(text=UNICODE)
def test_round_trip_arbitrary_unicode(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_tokenizer_specials_and_files(tok, tmp_path):
    ids = tok.encode("a<|endoftext|><|user|>b")
    assert tok.eos_id not in ids and tok.decode(ids) == "a<|endoftext|><|user|>b"
    assert tok.pad_id is not None and tok.decode([tok.eos_id]) == "<|endoftext|>"
    long_line = "word " * 5000  # > SentencePiece's default max_sentence_length
    assert tok.decode(tok.encode(long_line)) == long_line
    path = tok.save(tmp_path)
    assert path.name in ("tokenizer.model", "tokenizer.json")
    again = load_tokenizer(tmp_path)
    assert again.encode_batch(["x y\n", "😀"]) == tok.encode_batch(["x y\n", "😀"])


def test_sentencepiece_trained_on_long_lines_and_sample(tmp_path):
    text = "\n".join(" ".join(["alpha beta gamma"] * 2000) for _ in range(3))  # 96 KB lines
    (tmp_path / "in.txt").write_text(text)
    meta = prepare([str(tmp_path / "in.txt")], tmp_path / "out", tokenizer="sp-bpe", vocab_size=300,
                   tokenizer_sample_bytes=20_000, show_progress=False)
    assert meta["tokenizer"]["file"] == "tokenizer.model" and "20000 characters" in meta["tokenizer"]["trained_on"]
    tok = load_tokenizer(tmp_path / "out")
    assert len(tok.encode("alpha beta gamma")) < 6  # learned from the long lines, not skipped


# ---------------------------------------------------------------- readers and cleaning

def test_bad_inputs_are_skipped_counted_and_strict(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "good.txt").write_text("a good document with words")
    (src / "cafe.md").write_text("cafe\u0301 \x07bell")  # NFD + a control character
    (src / "binary.bin").write_bytes(b"\x89PNG\x00\x00\xff\xfe")
    (src / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (src / "empty.txt").write_text("")
    (src / "recs.jsonl").write_text('{"text": "json one"}\n{"text": oops}\n{"body": "x"}\n{"text": 3}\n')
    with gzip.open(src / "g.jsonl.gz", "wt") as f:
        f.write('{"text": "gzip record"}\n')
    (src / "z.txt.zst").write_bytes(zstandard.ZstdCompressor().compress("zstd text".encode()))
    (src / "broken.txt.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["parquet row", None]}), src / "t.parquet")
    out = tmp_path / "out"
    meta = prepare([str(src)], out, tokenizer="char", val_fraction=0.0, show_progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    skipped = {k: v["count"] for k, v in manifest["skipped"].items()}
    assert skipped == {"binary_file": 1, "invalid_utf8": 1, "jsonl_invalid_json": 1, "jsonl_missing_field": 1,
                       "jsonl_field_not_string": 1, "corrupt_compressed": 1, "parquet_not_string": 1}
    assert manifest["skipped"]["jsonl_invalid_json"]["example"].endswith("recs.jsonl:2")
    assert manifest["removed"]["empty"] == {"count": 1, "example": str(src / "empty.txt")}
    assert manifest["modified"]["unicode_normalized"]["count"] == 1
    assert manifest["modified"]["control_chars_removed"]["count"] == 1
    tok = load_tokenizer(out)
    r = TokenReader(out, "train")
    texts = sorted(tok.decode(r.document(i)) for i in range(r.num_docs))
    assert texts == sorted(["a good document with words", "caf\u00e9 bell", "json one", "gzip record",
                            "zstd text", "parquet row"])
    assert meta["source"]["documents"] == 6
    with pytest.raises(DataError, match=r"recs\.jsonl:2: invalid JSON"):
        prepare([str(src / "recs.jsonl")], tmp_path / "o2", tokenizer="char", strict=True, show_progress=False)
    with pytest.raises(DataError, match=r"broken\.txt\.gz: corrupt compressed data"):
        prepare([str(src / "broken.txt.gz")], tmp_path / "o2", tokenizer="char", strict=True, show_progress=False)
    assert not (tmp_path / "o2.tmp-prepare").exists()


def test_min_chars_and_missing_pyarrow_message(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("short")
    (tmp_path / "b.txt").write_text("long enough document")
    meta = prepare([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], tmp_path / "out", tokenizer="char",
                   clean=__import__("data_prep").CleanConfig(min_chars=10), val_fraction=0.0, show_progress=False)
    assert meta["source"]["documents"] == 1
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["removed"]["too_short"]["example"] == str(tmp_path / "a.txt")
    import sys
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match=r"pip install lmforge\[parquet\]"):
        prepare([str(tmp_path / "x.parquet")], tmp_path / "o2", show_progress=False)


# ---------------------------------------------------------------- dedup

def _mutate(doc, rng, target):
    """A copy with 5-gram Jaccard just >= `target` against `doc` (random word substitutions)."""
    out = doc.split()
    while True:
        cand = list(out)
        cand[rng.randrange(len(cand))] = f"x{rng.randrange(10**6)}"
        if jaccard(doc, " ".join(cand)) < target:
            return " ".join(out)
        out = cand


def test_near_duplicate_recall_and_precision():
    rng = random.Random(1)
    base = prose(200, seed=2, words=300)
    hasher, index = MinHasher(), LSHIndex()
    for i, d in enumerate(base):
        index.add(i, hasher.signature(d))
    high = [(i, _mutate(base[i], rng, rng.uniform(0.8, 0.97))) for i in range(100)]
    low = [(i, _mutate(base[i], rng, rng.uniform(0.2, 0.5))) for i in range(100, 200)]
    assert all(jaccard(base[i], d) >= 0.8 for i, d in high)
    found = sum(i in index.find_all(hasher.signature(d)) for i, d in high)
    false = sum(bool(index.find_all(hasher.signature(d))) for _, d in low if jaccard(base[0], d) < 0.5)
    recall = found / len(high)
    precision = found / max(found + false, 1)
    print(f"near-dup recall {recall:.3f} precision {precision:.3f}")
    assert recall >= 0.9 and precision >= 0.9


def test_planted_duplicates_and_val_leakage(tmp_path):
    rng = random.Random(3)
    docs = prose(60, seed=4)
    planted = {"exact": docs[0], "near": _mutate(docs[1], rng, 0.9)}
    src = tmp_path / "in"
    src.mkdir()
    for i, d in enumerate(docs):
        (src / f"d{i:03d}.txt").write_text(d)
    (src / "z_exact.txt").write_text(docs[0] + "\n")  # whitespace differs only
    (src / "z_near.txt").write_text(planted["near"])
    meta = prepare([str(src)], tmp_path / "out", tokenizer="char", val_fraction=0.3, seed=0, show_progress=False)
    removed = json.loads((tmp_path / "out" / "manifest.json").read_text())["removed"]
    exact = removed.get("duplicate_exact", {}).get("count", 0) + removed.get("val_train_overlap_exact", {}).get("count", 0)
    near = removed.get("duplicate_near", {}).get("count", 0) + removed.get("val_train_overlap_near", {}).get("count", 0)
    assert exact == 1 and near == 1 and meta["source"]["documents"] == 60
    # A val/train overlap specifically: plant an exact and a near copy of every val document. Copies whose
    # own hash sends them to train are leaks; with leakage="remove" the val original goes.
    tok = load_tokenizer(tmp_path / "out")
    val = TokenReader(tmp_path / "out", "val")
    val_docs = [tok.decode(val.document(i)) for i in range(val.num_docs)]
    leak_src = tmp_path / "leak"
    leak_src.mkdir()
    for i, d in enumerate(docs):
        (leak_src / f"d{i:03d}.txt").write_text(d)
    for j, d in enumerate(val_docs):
        (leak_src / f"copy{j}.txt").write_text(d)
        (leak_src / f"near{j}.txt").write_text(_mutate(d, rng, 0.85))
    counts, val_sizes = {}, {}
    for mode in ("remove", "flag"):
        out = tmp_path / f"leak_{mode}"
        prepare([str(leak_src)], out, tokenizer="char", val_fraction=0.3, seed=0, dedup="none", leakage=mode,
                show_progress=False)
        removed = json.loads((out / "manifest.json").read_text())["removed"]
        counts[mode] = {k: v["count"] for k, v in removed.items() if k.startswith("val_train_overlap")}
        splits = {s: TokenReader(out, s) for s in ("train", "val")}
        val_sizes[mode] = splits["val"].num_docs
        texts = {s: [tok.decode(r.document(i)) for i in range(r.num_docs)] for s, r in splits.items()}
        if mode == "remove":  # no val document left with an exact or near copy in train
            assert not set(texts["train"]) & set(texts["val"])
            assert all(jaccard(t, v) < 0.7 for t in texts["train"] for v in texts["val"])
    for mode in counts:  # flag keeps the val copies, so later documents can match them again: counts differ
        assert counts[mode].get("val_train_overlap_exact", 0) >= 2 and counts[mode].get("val_train_overlap_near", 0) >= 2
    assert val_sizes["remove"] < val_sizes["flag"]


# ---------------------------------------------------------------- parallel, resumable encoding

def _shard_bytes(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix in (".bin", ".idx")}


@pytest.fixture(scope="module")
def enc_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    src = root / "in"
    src.mkdir()
    for i, d in enumerate(corpus(150, seed=7) + prose(50, seed=8, words=40)):
        (src / f"d{i:03d}.txt").write_text(d)
    tokdir = root / "tok"
    tokdir.mkdir()
    BPETokenizer.train(corpus(100), 320).save(tokdir)
    return src, tokdir


def test_bit_identical_with_1_and_2_workers(enc_corpus, tmp_path):
    src, tokdir = enc_corpus
    metas = []
    for w in (1, 2):
        metas.append(prepare([str(src)], tmp_path / f"w{w}", tokenizer_dir=tokdir, shard_tokens=400, workers=w,
                             show_progress=False))
    assert len(metas[0]["splits"]["train"]["shards"]) > 3
    assert _shard_bytes(tmp_path / "w1") == _shard_bytes(tmp_path / "w2")
    assert metas[0]["splits"] == metas[1]["splits"]


def test_killed_run_resumes_to_identical_shards(enc_corpus, tmp_path, monkeypatch):
    src, tokdir = enc_corpus
    ref = prepare([str(src)], tmp_path / "ref", tokenizer_dir=tokdir, shard_tokens=400, show_progress=False)
    out = tmp_path / "out"
    monkeypatch.setenv(FAIL_AFTER_ENV, "2")
    with pytest.raises(RuntimeError, match="simulated interruption"):
        prepare([str(src)], out, tokenizer_dir=tokdir, shard_tokens=400, show_progress=False)
    work = tmp_path / "out.tmp-prepare"
    assert not out.exists() and not (work / "meta.json").exists()  # nothing looks complete
    state = json.loads((work / "state.json").read_text())
    assert len(state["progress"]["train"]["shards"]) == 2  # val waits in pending_val.* until the end
    monkeypatch.delenv(FAIL_AFTER_ENV)
    meta = prepare([str(src)], out, tokenizer_dir=tokdir, shard_tokens=400, show_progress=False)
    assert meta["source"]["resumed"] is True and not work.exists()
    assert _shard_bytes(out) == _shard_bytes(tmp_path / "ref")
    assert meta["splits"] == ref["splits"]
    TokenReader(out, "train").verify()


def test_tokenizer_hash_mismatch_refused(enc_corpus, tmp_path):
    src, tokdir = enc_corpus
    out = tmp_path / "out"
    prepare([str(src)], out, tokenizer_dir=tokdir, show_progress=False)
    other = BPETokenizer.train(corpus(50, seed=9), 300)
    other.save(out)  # same file name, different tokenizer
    with pytest.raises(DataError, match=r"tokenizer\.json: tokenizer file sha256 .* disagrees with meta\.json"):
        TokenReader(out, "train")
    with pytest.raises(DataError, match=r"tokenizer\.json: tokenizer file sha256"):
        load_tokenizer(out)


def test_cli_sentencepiece_workers_and_inspect(enc_corpus, tmp_path, capsys):
    src, _ = enc_corpus
    out = tmp_path / "out"
    assert cli_main(["prepare", str(src), "--out", str(out), "--tokenizer", "sp-unigram", "--vocab-size", "300",
                     "--workers", "2", "--min-chars", "3", "--quiet"]) == 0
    assert cli_main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "document length (tokens)" in text and "checksums OK" in text and "tokenizer.model" in text


# ---------------------------------------------------------------- mixtures

@pytest.mark.parametrize("weights", [[0.5, 0.5], [0.05, 0.95], [0.2, 0.3, 0.5], [0.05, 0.15, 0.8],
                                     [1, 2, 3], [0.123, 0.877], [0.01, 0.01, 0.98]])
def test_mixture_prefixes_within_one_sample(weights):
    m = Mixture(weights)
    n = 20000
    src, ordinal = m.assign(0, n)
    w = np.asarray(weights, dtype=float) / sum(weights)
    counts = np.cumsum(np.eye(len(weights), dtype=np.int64)[src], axis=0)
    expected = np.arange(1, n + 1)[:, None] * w[None, :]
    assert np.abs(counts - expected).max() <= 1.0 + 1e-9
    # Ordinals of each source count 0, 1, 2, ... exactly (a small source's later epochs continue).
    for i in range(len(weights)):
        assert np.array_equal(ordinal[src == i], np.arange(np.count_nonzero(src == i)))
    ref_src, ref_ord = build_blending_indices(m.int_weights, 3000)
    assert np.array_equal(ref_src, src[:3000]) and np.array_equal(ref_ord, ordinal[:3000])


def test_mixture_rank_independent_and_fast_seek():
    m = Mixture([0.05, 0.25, 0.7])
    whole_src, whole_ord = m.assign(0, 10000)
    rng = random.Random(0)
    cuts = sorted(rng.sample(range(1, 10000), 20))
    pieces = list(zip([0, *cuts], [*cuts, 10000]))
    rng.shuffle(pieces)  # chunks in any order, as different ranks would ask
    for a, b in pieces:
        s, o = m.assign(a, b - a)
        assert np.array_equal(s, whole_src[a:b]) and np.array_equal(o, whole_ord[a:b])
    far = 10**12 + 7  # seek is O(1): far beyond anything a loop could reach
    s, o = m.assign(far, 1000)
    counts = m.counts(far)
    assert np.abs(counts - far * m.weights).max() <= 1.0
    for i in range(3):
        assert np.array_equal(o[s == i], counts[i] + np.arange(np.count_nonzero(s == i)))


def test_mixture_multi_epoch_small_source_and_bad_weights():
    m = Mixture([0.9, 0.1])
    src, ordinal = m.assign(0, 100_000)
    small = ordinal[src == 1]
    assert small[-1] == len(small) - 1 == 9999  # keeps increasing: the caller takes ordinal % source size
    epochs = small % 37
    assert np.array_equal(np.bincount(epochs[:37 * 270]), np.full(37, 270))  # every window equally often
    for bad in ([0.5, 0.0], [1.0, -1.0], [], [float("nan")]):
        with pytest.raises(DataError):
            Mixture(bad)


def test_huge_document_encoded_in_pieces_equals_whole(tmp_path):
    from data_prep.tokenizer import split_for_encoding
    rng = random.Random(5)
    lines = ["".join(rng.choice(WORDS) for _ in range(rng.randint(0, 12))) for _ in range(3000)]
    text = "\n".join(lines)
    tok = BPETokenizer.train(corpus(100), 320)
    pieces = list(split_for_encoding(text, 1000, tok.cut_at))
    assert len(pieces) > 10 and "".join(pieces) == text
    assert [i for ids in tok.encode_batch(pieces) for i in ids] == tok.encode(text)
