"""Issue 17: data for a 10B run. The tiktoken engine gives the reference encoder's ids; the streaming pass
equals what it replaced; inputs from URLs, fsspec and Hugging Face datasets; many tasks merge into one."""
import json
import random
import sysconfig
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from data_prep import BPETokenizer, DataError, TokenReader, iter_documents, prepare
from data_prep.fast_bpe import convert, why_not_convertible

pytest.importorskip("tiktoken")

TRICKY = ["don't", "I'll", "we've", "'s'S", "  leading", "trailing   ", "\n\n\n", "\r\n\r\n", "\t\tx", "12345678",
          "x1.5e-3", "<|endoftext|>", "<|pad|>", "日本語のテキスト", "😀😀 👍🏽", "e\u0301", "\u00a0nbsp", "\u2028",
          "a\u200bb", "ÿþ", "   \n  ", "mixed\u3000space", "$$$ ((( )))", "'''", "αβγ ΑΒΓ", "\x00\x01"]


def _stdlib_texts(n: int, seed: int = 0) -> list[str]:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    rng = random.Random(seed)
    return [f.read_text(encoding="utf-8", errors="replace") for f in rng.sample(files, n)]


@pytest.fixture(scope="module")
def trained():
    """A BPE with many merges, trained on code, prose and the tricky strings."""
    texts = _stdlib_texts(60) + TRICKY * 20
    return BPETokenizer.train(texts, 4000, special_tokens=["<|pad|>"])


def test_tiktoken_engine_gives_the_reference_ids_on_varied_text(trained):
    fast = trained.fast_encode()
    assert fast is not None
    texts = _stdlib_texts(40, seed=1) + TRICKY + ["".join(random.Random(3).choices(TRICKY, k=400))]
    mismatches = [t[:30] for t in texts if fast(t) != trained.encode(t)]
    assert mismatches == []
    assert sum(len(fast(t)) for t in texts) > 50_000  # real work was compared


@settings(max_examples=150, deadline=None)
@given(st.text(st.characters(exclude_categories=("Cs",)), max_size=300))
def test_tiktoken_engine_equals_reference_on_arbitrary_unicode(trained, text):
    assert trained.fast_encode()(text) == trained.encode(text)


def test_tokenizers_tiktoken_cannot_reproduce_keep_the_reference_encoder(trained):
    spec = json.loads(trained._tok.to_str())
    assert why_not_convertible(spec) is None
    for change, reason in [(("pre_tokenizer", "add_prefix_space", True), "pre-tokenizer"),
                           (("model", "dropout", 0.1), "dropout"),
                           (("model", "continuing_subword_prefix", "##"), "continuing_subword_prefix")]:
        other = json.loads(trained._tok.to_str())
        other[change[0]][change[1]] = change[2]
        assert reason in why_not_convertible(other)
        assert convert(json.dumps(other)) is None
    with_norm = dict(spec, normalizer={"type": "NFKC"})
    assert "normalizer" in why_not_convertible(with_norm)
    # merges whose token ids are out of merge order: tiktoken's rank order would merge differently
    swapped = json.loads(trained._tok.to_str())
    swapped["model"]["merges"][10], swapped["model"]["merges"][11] = (swapped["model"]["merges"][11],
                                                                      swapped["model"]["merges"][10])
    assert convert(json.dumps(swapped)) is None


def _shards(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix in (".bin", ".idx")}


@pytest.fixture(scope="module")
def code_corpus(tmp_path_factory, trained):
    root = tmp_path_factory.mktemp("code")
    src = root / "src"
    src.mkdir()
    for i, text in enumerate(_stdlib_texts(50, seed=5)):
        (src / f"m{i:02d}.py").write_text(text, encoding="utf-8")
    (root / "tok").mkdir()
    trained.save(root / "tok")
    return src, root / "tok"


def test_prepare_with_tiktoken_equals_prepare_with_hf(code_corpus, tmp_path, monkeypatch):
    src, tok = code_corpus
    fast = prepare([str(src)], tmp_path / "fast", tokenizer_dir=tok, shard_tokens=20_000, show_progress=False)
    monkeypatch.setenv("LMFORGE_ENCODER", "hf")
    ref = prepare([str(src)], tmp_path / "hf", tokenizer_dir=tok, shard_tokens=20_000, show_progress=False)
    assert fast["splits"] == ref["splits"] and len(fast["splits"]["train"]["shards"]) > 2
    assert _shards(tmp_path / "fast") == _shards(tmp_path / "hf")


def test_a_fast_encoder_that_disagrees_stops_prepare(code_corpus, tmp_path, monkeypatch):
    src, tok = code_corpus
    monkeypatch.setattr(BPETokenizer, "fast_encode", lambda self: (lambda text: [1, 2, 3]))
    with pytest.raises(DataError, match="tiktoken encoder gives other ids .* LMFORGE_ENCODER=hf"):
        prepare([str(src)], tmp_path / "out", tokenizer_dir=tok, show_progress=False)
    assert not (tmp_path / "out").exists()


def test_a_lone_surrogate_in_jsonl_is_replaced_and_counted(tmp_path):
    """Before: the encoder raised TypeError on JSON's "\\ud800" escape and prepare died with a traceback."""
    src = tmp_path / "d.jsonl"
    src.write_text('{"text": "broken \\ud800 surrogate"}\n' + "".join(
        json.dumps({"text": f"document number {i} " * 5}) + "\n" for i in range(20)), encoding="utf-8")
    prepare([str(src)], tmp_path / "out", tokenizer="char", show_progress=False)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["modified"]["lone_surrogates_replaced"]["count"] == 1
    docs = [d.text for d in iter_documents([str(src)])]
    assert "\ud800" in docs[0]  # the reader hands it on; cleaning replaces it
    reader_texts = []
    from data_prep import load_tokenizer
    tok = load_tokenizer(tmp_path / "out")
    for split in ("train", "val"):
        r = TokenReader(tmp_path / "out", split)
        reader_texts += [tok.decode(r.document(i)) for i in range(r.num_docs)]
    assert "broken \ufffd surrogate" in reader_texts


# ---- file discovery: glob's answer, without entering excluded trees --------------------------------------

def test_file_discovery_equals_glob_and_skips_excluded_trees(tmp_path, monkeypatch):
    import glob
    import os

    from data_prep.sources import _expand, list_files
    for name in ["a/b/c.py", "a/.h/x.py", ".top.py", "a/.hid.py", "z/[x].txt", "a/b/d/e.txt", "q/a1.py", "q/ab.py",
                 "a-b/c.py", "a/b-c.py", "big/site-packages/p/m.py", "big/keep.py"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    os.symlink(tmp_path / "a" / "b", tmp_path / "link")
    os.symlink(tmp_path / "missing", tmp_path / "a" / "broken.py")
    for pattern in ["**", "**/*.py", "*/*", "a/**/*.txt", ".*", "**/.*", "q/a?.py", "q/a[!b].py", "z/*", "a/.h/*.py",
                    "*/.*", "**/b/**"]:
        spec = f"{tmp_path}/{pattern}"
        expected = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        assert _expand(spec, []) == expected, pattern
    assert _expand(str(tmp_path), []) == sorted(p for p in tmp_path.rglob("*") if p.is_file())
    entered = []
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda d: entered.append(str(d)) or real_scandir(d))
    files = list_files([f"{tmp_path}/**/*.py"], ["*/site-packages/*"])
    assert tmp_path / "big" / "keep.py" in files and not any("site-packages" in str(f) for f in files)
    assert not any("site-packages" in d for d in entered)  # the excluded tree was never listed


# ---- inputs from anywhere: a local HTTP server, fsspec's memory filesystem, datasets directories ----------

class _Server:
    """An HTTP server on 127.0.0.1 serving `files` (name -> bytes), with Range support; `drop_after[name] = n`
    makes the next GET of that file send n bytes of the body and cut the connection (once)."""

    def __init__(self, files: dict):
        import http.server
        import threading

        self.files, self.drop_after, self.gets = files, {}, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _body(self):
                name = self.path.lstrip("/")
                if name not in server.files:
                    self.send_error(404)
                    return None
                data = server.files[name]
                start, end = 0, len(data)
                rng = self.headers.get("Range")
                if rng:
                    lo, hi = rng.split("=")[1].split("-")
                    start, end = int(lo), min(int(hi) + 1 if hi else len(data), len(data))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(end - start))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("ETag", f'"{hash(data) & 0xffff}"')
                self.end_headers()
                return name, data[start:end]

            def do_HEAD(self):
                self._body()

            def do_GET(self):
                got = self._body()
                if got is None:
                    return
                name, body = got
                server.gets.append(name)
                cut = server.drop_after.pop(name, None)
                if cut is not None:
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.connection.shutdown(2)  # the connection drops mid-body
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


@pytest.fixture
def http_server():
    pytest.importorskip("aiohttp")
    lines = [json.dumps({"text": f"record {i} " + "word " * (i % 50)}) for i in range(3000)]
    server = _Server({"corpus.jsonl": ("\n".join(lines) + "\n").encode(), "book.txt": ("a line of a book\n" * 20000).encode()})
    yield server
    server.close()


def test_url_inputs_stream_from_a_local_http_server_and_equal_local_files(http_server, tmp_path, monkeypatch):
    import data_prep.remote as remote
    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)
    for name, data in http_server.files.items():
        (tmp_path / name).write_bytes(data)
    local = [d for d in iter_documents([str(tmp_path / "corpus.jsonl"), str(tmp_path / "book.txt")])]
    http_server.drop_after["corpus.jsonl"] = 70_000  # the first GET breaks off after 70 KB: retried at the offset
    urls = [f"{http_server.url}/corpus.jsonl", f"{http_server.url}/book.txt"]
    remote_docs = list(iter_documents(urls))
    assert [d.text for d in remote_docs] == [d.text for d in local]  # nothing lost, nothing repeated
    assert remote_docs[0].source == f"{http_server.url}/corpus.jsonl:1"
    assert http_server.gets.count("corpus.jsonl") == 2
    meta = prepare(urls, tmp_path / "out", tokenizer="char", show_progress=False)
    assert meta["source"]["inputs"] == urls and meta["source"]["resolved_inputs"] == urls
    assert meta["source"]["documents"] > 2000


def test_a_missing_or_failing_url_is_one_error_naming_it(http_server, tmp_path, monkeypatch):
    import data_prep.remote as remote
    monkeypatch.setattr(remote, "BACKOFF_S", 0.0)
    url = f"{http_server.url}/nope.jsonl"
    with pytest.raises(DataError, match=rf"{url}: no such file"):
        list(iter_documents([url]))
    monkeypatch.setattr(remote, "RETRIES", 2)
    bad = remote.RemoteFile(f"{http_server.url}/corpus.jsonl")

    class Failing:
        def read(self, n):
            raise ConnectionResetError("reset by peer")

        def seek(self, *a):
            return 0

        def close(self):
            pass

    stream = remote.RetryingStream(bad.url, lambda: Failing(), retries=2)
    with pytest.raises(DataError, match=rf"{bad.url}: read failed after 2 retries \(ConnectionResetError"):
        stream.read(10)
    with pytest.raises(DataError, match="unknown-scheme://x/y.txt: cannot open this URL's filesystem"):
        list(iter_documents(["unknown-scheme://x/y.txt"]))


def test_fsspec_memory_filesystem_globs_and_directories(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    fs.pipe("/lmf/a.txt", b"first document text")
    fs.pipe("/lmf/sub/b.jsonl", b'{"text": "second"}\n{"text": "third"}\n')
    fs.pipe("/lmf/sub/c.txt.gz", __import__("gzip").compress(b"fourth, compressed"))
    assert [d.text for d in iter_documents(["memory://lmf/**/*.jsonl"])] == ["second", "third"]
    texts = [d.text for d in iter_documents(["memory://lmf"])]
    assert texts == ["first document text", "second", "third", "fourth, compressed"]
    assert [d.text for d in iter_documents(["memory://lmf"], exclude=["*.gz"])][-1] == "third"
    with pytest.raises(DataError, match="memory://lmf/none/\\*.txt: pattern matches no files"):
        list(iter_documents(["memory://lmf/none/*.txt"]))


def test_a_saved_datasets_directory_and_a_parquet_folder_are_inputs(tmp_path):
    datasets = pytest.importorskip("datasets")
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    texts = [f"row {i}: " + "text " * (i % 7) for i in range(40)]
    ds = datasets.Dataset.from_dict({"content": texts, "n": list(range(40))})
    ds.save_to_disk(str(tmp_path / "saved"), num_shards=3)
    datasets.DatasetDict({"train": ds, "extra": ds.select(range(4))}).save_to_disk(str(tmp_path / "dict"))
    assert [d.text for d in iter_documents([str(tmp_path / "saved")], text_field="content")] == texts
    assert [d.text for d in iter_documents([str(tmp_path / "dict")], text_field="content")] == texts + texts[:4]
    (tmp_path / "pq").mkdir()
    for k in range(2):
        pq.write_table(pa.table({"text": texts[k * 20:(k + 1) * 20]}), tmp_path / "pq" / f"part-{k}.parquet")
    assert [d.text for d in iter_documents([str(tmp_path / "pq")])] == texts
    meta = prepare([str(tmp_path / "saved")], tmp_path / "out", tokenizer="char", text_field="content",
                   show_progress=False)
    assert meta["source"]["files"] == 3 and meta["source"]["documents_read"] == 40
    with pytest.raises(DataError, match="has no column 'body'"):
        list(iter_documents([str(tmp_path / "saved")], text_field="body", strict=True))
