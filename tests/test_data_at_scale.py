"""Issue 17: data for a 10B run. The tiktoken engine gives the reference encoder's ids; the streaming pass
equals what it replaced; inputs from URLs, fsspec and Hugging Face datasets; many tasks merge into one."""
import json
import random
import sysconfig
from pathlib import Path

import numpy as np
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
    mismatches = [t[:30] for t in texts if list(fast(t)) != trained.encode(t)]
    assert mismatches == []
    assert sum(len(fast(t)) for t in texts) > 50_000  # real work was compared


@settings(max_examples=150, deadline=None)
@given(st.text(st.characters(exclude_categories=("Cs",)), max_size=300))
def test_tiktoken_engine_equals_reference_on_arbitrary_unicode(trained, text):
    assert list(trained.fast_encode()(text)) == trained.encode(text)


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
    monkeypatch.setattr(BPETokenizer, "fast_encode", lambda self: (lambda text: np.array([1, 2, 3], np.uint32)))
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
                 "a-b/c.py", "a/b-c.py", "big/site-packages/p/m.py", "big/keep.py", "^x.txt", "ax.txt", "bx.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    os.symlink(tmp_path / "a" / "b", tmp_path / "link")
    os.symlink(tmp_path / "missing", tmp_path / "a" / "broken.py")
    for pattern in ["**", "**/*.py", "*/*", "a/**/*.txt", ".*", "**/.*", "q/a?.py", "q/a[!b].py", "z/*", "a/.h/*.py",
                    "*/.*", "**/b/**", "[^a]x.txt", "[!a]x.txt", "[a-b]x.txt", "*/*/*.py"]:
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
                name = self.path.lstrip("/").split("?")[0]
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


# ---- many tasks, one dataset --------------------------------------------------------------------------------

def _words(rng, n, vocab=3000):
    return " ".join(f"w{rng.randrange(vocab)}" for _ in range(n))


def _one_word_changed(text, rng):
    words = text.split()
    words[rng.randrange(10, len(words) - 10)] = f"x{rng.randrange(10**6)}"
    return " ".join(words)


def _planted_documents() -> list[str]:
    """150 originals, 15 exact copies, 15 near copies and 2 blank documents, shuffled.

    No original gets both kinds of copy: if an exact pair lands in val and the pair's near copy in train, both
    are counted as val_train_overlap_near, so the exact count would depend on the split, and the split hashes
    each document's path (under pytest's temp dir, new each session)."""
    rng = random.Random(11)
    originals = [_words(rng, 80) for _ in range(150)]
    docs = list(originals)
    docs += [originals[i] + "\n" for i in range(0, 150, 10)]  # exact copies (whitespace differs)
    docs += [_one_word_changed(originals[i], rng) for i in range(5, 150, 9) if i % 10]  # near (Jaccard ~0.88)
    docs += ["", "   "]  # cleaning drops these
    rng.shuffle(docs)
    return docs


def _exact_and_near(removed: dict) -> tuple[int, int]:
    """(exact, near) copies removed, as duplicates or as val documents leaking a train copy."""
    return (removed.get("duplicate_exact", 0) + removed.get("val_train_overlap_exact", 0),
            removed.get("duplicate_near", 0) + removed.get("val_train_overlap_near", 0))


def test_the_planted_copies_give_the_same_counts_wherever_the_corpus_lives():
    """Each location of the corpus gives another train/val split (val_score hashes the path): the counts the
    multi-task test checks must hold for every split."""
    from data_prep import CleanConfig, Cleaner, Document
    from data_prep.plan import Planner
    docs = _planted_documents()
    locations = {}  # (exact, near) -> the temp dirs that gave it
    for n in range(40):
        planner = Planner(Cleaner(CleanConfig()), val_fraction=0.2, seed=1337)
        for k, text in enumerate(docs):
            planner.add(Document(text, f"/tmp/pytest-of-user/pytest-{n}/tasks0/src/d{k:03d}.txt"))
        removed = {reason: v["count"] for reason, v in planner.finish().removed.items()}
        locations.setdefault(_exact_and_near(removed), []).append(n)
    assert list(locations) == [(15, 15)], locations


@pytest.fixture(scope="module")
def task_corpus(tmp_path_factory):
    """60 files (text and JSONL) with exact copies, near copies and val/train overlaps across files."""
    root = tmp_path_factory.mktemp("tasks")
    src = root / "src"
    src.mkdir()
    docs = _planted_documents()
    for f in range(60):
        part = docs[f::60]
        if f % 3 == 0:
            (src / f"part{f:02d}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
        else:  # one document per text file: the rest of this slice goes into its own files
            for j, d in enumerate(part):
                (src / f"file{f:02d}_{j}.txt").write_text(d)
    from data_prep.prepare import prepare_tokenizer
    prepare_tokenizer([str(src)], root / "tok", vocab_size=400, show_progress=False)
    single = prepare([str(src)], root / "single", tokenizer_dir=root / "tok", shard_tokens=3000, val_fraction=0.2,
                     show_progress=False)
    return src, root / "tok", root / "single", single


def _documents_by_split(out):
    from data_prep import load_tokenizer
    tok = load_tokenizer(out)
    return {s: sorted(tok.decode(TokenReader(out, s).document(i)) for i in range(TokenReader(out, s).num_docs))
            for s in ("train", "val")}


def _removed(out):
    return {k: v["count"] for k, v in json.loads((out / "manifest.json").read_text())["removed"].items()}


def test_two_tasks_keep_the_documents_one_task_keeps(task_corpus, tmp_path):
    from data_prep.tasks import STAGES, merge
    src, tok, single_out, single = task_corpus
    out = tmp_path / "out"
    for stage in STAGES:  # each stage for every task before the next: what chained array jobs do
        for k in (0, 1):
            prepare([str(src)], out, tokenizer_dir=tok, shard_tokens=3000, val_fraction=0.2, show_progress=False,
                    tasks=2, task=k, stage=stage)
    meta = merge(out)
    assert meta["source"]["tasks"] == 2 and not (tmp_path / "out.tmp-tasks").exists()
    removed = _removed(single_out)
    exact, near = _exact_and_near(removed)
    assert exact == 15 and near >= 14  # the planted copies were found (15 exact, 15 near)
    assert _removed(out) == removed
    for split in ("train", "val"):
        assert meta["splits"][split]["tokens"] == single["splits"][split]["tokens"]
        assert meta["splits"][split]["docs"] == single["splits"][split]["docs"]
    assert _documents_by_split(out) == _documents_by_split(single_out)
    names = {sh["file"] for sh in meta["splits"]["train"]["shards"]}
    assert any(n.startswith("train_t00000_") for n in names) and any(n.startswith("train_t00001_") for n in names)
    for split in ("train", "val"):
        TokenReader(out, split).verify()


def test_a_killed_task_resumes_and_the_merge_checks_every_task(task_corpus, tmp_path, monkeypatch):
    import threading

    from data_prep.prepare import FAIL_AFTER_ENV
    from data_prep.tasks import merge
    src, tok, single_out, single = task_corpus
    out = tmp_path / "out"
    kw = dict(tokenizer_dir=tok, shard_tokens=3000, val_fraction=0.2, show_progress=False, tasks=2)
    errors = {}

    def run(k):  # both tasks at once, waiting for each other at the stage barriers
        try:
            prepare([str(src)], out, task=k, **kw)
        except BaseException as e:
            errors[k] = e

    monkeypatch.setenv(FAIL_AFTER_ENV, "1")  # every task dies after its first new shard
    threads = [threading.Thread(target=run, args=(k,)) for k in (0, 1)]
    [t.start() for t in threads]
    [t.join(timeout=300) for t in threads]
    assert all("simulated interruption" in str(errors.get(k)) for k in (0, 1))
    with pytest.raises(DataError, match="tasks 0, 1 of 2 have not finished"):
        merge(out)
    monkeypatch.delenv(FAIL_AFTER_ENV)
    state = json.loads((tmp_path / "out.tmp-tasks" / "task-00001" / "state.json").read_text())
    assert len(state["progress"]["train"]["shards"]) == 1  # the shard written before the kill is kept
    signed = (tmp_path / "out.tmp-tasks" / "task-00001" / "sign.done").stat().st_mtime_ns
    for k in (0, 1):
        summary = prepare([str(src)], out, task=k, **kw)
    assert summary["task"] == 1
    assert (tmp_path / "out.tmp-tasks" / "task-00001" / "sign.done").stat().st_mtime_ns == signed  # not redone
    shard = next((tmp_path / "out.tmp-tasks" / "task-00000").glob("train_t00000_00000.bin"))
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="train_t00000_00000.bin: checksum or token ids disagree"):
        merge(out)
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    meta = merge(out)
    assert _documents_by_split(out) == _documents_by_split(single_out)
    assert meta["splits"]["train"]["tokens"] == single["splits"]["train"]["tokens"]


def test_task_numbers_come_from_flags_slurm_or_torchrun(monkeypatch):
    from data_prep.tasks import file_task, task_from_environment
    for var in ("SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)
    assert task_from_environment(None, None) == (1, 0)
    assert task_from_environment(4, 3) == (4, 3)
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "5")
    assert task_from_environment(None, None) == (8, 5)
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "16")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "11")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    assert task_from_environment(None, None) == (16, 10)
    with pytest.raises(DataError, match="task 4 is not one of the 4 tasks"):
        task_from_environment(4, 4)
    # adding files moves no other file between tasks
    files = [f"corpus/part{i}.jsonl" for i in range(200)]
    before = {f: file_task(f, 8) for f in files}
    assert {f: file_task(f, 8) for f in files + ["corpus/new.jsonl"]} | {} == before | {"corpus/new.jsonl": file_task("corpus/new.jsonl", 8)}
    assert len(set(before.values())) == 8


@pytest.mark.slow
def test_prepare_sbatch_steps_run_as_a_slurm_array_would(task_corpus, tmp_path):
    """configs/prepare.sbatch's three steps as SLURM runs them: tokenizer, two array tasks at once, merge."""
    import os
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    src, _, single_out, _ = task_corpus
    env = dict(os.environ, PREPARE_SETTINGS="--vocab-size 400 --val-fraction 0.2 --shard-tokens 3000",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    out = tmp_path / "data"
    script = str(root / "configs" / "prepare.sbatch")
    tok_settings = dict(env, PREPARE_SETTINGS="--vocab-size 400 --val-fraction 0.2")
    subprocess.run(["bash", script, "tokenizer", str(out), str(src)], env=tok_settings, check=True, cwd=root)
    tasks = [subprocess.Popen(["bash", script, "task", str(out), str(src)], cwd=root, stderr=subprocess.PIPE,
                              env=dict(env, SLURM_ARRAY_TASK_COUNT="2", SLURM_ARRAY_TASK_ID=str(k),
                                       SLURM_ARRAY_TASK_MIN="0", SLURM_CPUS_PER_TASK="1")) for k in (0, 1)]
    for p in tasks:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()
    subprocess.run(["bash", script, "merge", str(out)], env=env, check=True, cwd=root)
    assert _documents_by_split(out) == _documents_by_split(single_out)


# ---- review findings: each failed on the first version of the streaming pass --------------------------------

def test_a_resumed_single_document_run_keeps_its_val_part(tmp_path, monkeypatch):
    """Killed while the val part of a single-document corpus was encoding, after its train part had closed
    shards: the first version had checkpointed 'document 0 done' and the rerun published an empty val."""
    from data_prep.stream import EncodePass
    text = "".join(f"line {i} of the only document, with some words\n" for i in range(400))
    (tmp_path / "one.txt").write_text(text)
    ref = prepare([str(tmp_path / "one.txt")], tmp_path / "ref", tokenizer="char", shard_tokens=1000, show_progress=False)
    real = EncodePass._add_pending

    def killed(self, *args):
        raise KeyboardInterrupt("killed while the val part was being written")

    monkeypatch.setattr(EncodePass, "_add_pending", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(tmp_path / "one.txt")], tmp_path / "out", tokenizer="char", shard_tokens=1000, show_progress=False)
    monkeypatch.setattr(EncodePass, "_add_pending", real)
    meta = prepare([str(tmp_path / "one.txt")], tmp_path / "out", tokenizer="char", shard_tokens=1000,
                   show_progress=False)
    assert meta["splits"] == ref["splits"] and meta["splits"]["val"]["docs"] == 1


def test_bytes_of_a_document_longer_than_an_encode_chunk_are_all_counted(tmp_path):
    text = "word and another word\n" * 120_000  # 2.6 MB: three encode chunks
    (tmp_path / "big.txt").write_text(text)
    meta = prepare([str(tmp_path / "big.txt")], tmp_path / "out", tokenizer="char", show_progress=False)
    assert meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"] == len(text.encode())


def test_a_bad_record_in_strict_mode_is_one_error_naming_it(code_corpus, tmp_path):
    _, tok = code_corpus
    src = tmp_path / "d.jsonl"
    src.write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: invalid JSON"):
        prepare([str(src)], tmp_path / "out", tokenizer_dir=tok, strict=True, show_progress=False)


def test_a_url_query_is_not_a_glob_nor_part_of_the_format(http_server, tmp_path):
    url = f"{http_server.url}/corpus.jsonl?download=1"
    docs = list(iter_documents([url]))
    assert len(docs) == 3000 and docs[0].text.startswith("record 0")  # JSONL records, not one text document


def test_a_stream_that_ends_early_is_read_again_from_where_it_stopped(monkeypatch):
    import io

    import data_prep.remote as remote
    monkeypatch.setattr(remote, "BACKOFF_S", 0.0)
    data = bytes(range(256)) * 40
    opened = []

    def opener():
        opened.append(1)
        return io.BytesIO(data[:1000] if len(opened) == 1 else data)  # the first connection ends cleanly, early

    stream = io.BufferedReader(remote.RetryingStream("https://x/y.bin", opener, size=len(data)))
    assert stream.read() == data and len(opened) == 2


def test_cli_runs_one_stage_and_says_so(task_corpus, tmp_path, capsys, monkeypatch):
    from data_prep.__main__ import main
    for var in ("SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_ID", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)
    src, tok, _, _ = task_corpus
    assert main(["prepare", str(src), "--out", str(tmp_path / "o"), "--tokenizer-from", str(tok), "--tasks", "2",
                 "--task", "1", "--stage", "sign", "--quiet"]) == 0
    assert "task 1 of 2: stage sign done" in capsys.readouterr().out
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    from data_prep.tasks import task_from_environment
    assert task_from_environment(4, None) == (4, 2)  # --tasks given, the task from the array
    assert task_from_environment(None, 3) == (4, 3)  # --task given: taken as is


def test_many_copies_in_one_lsh_bucket_give_the_same_result_on_one_or_two_tasks(tmp_path):
    """A bucket keeps its first 64 documents on both paths (else 50k boilerplate copies cost 50k^2 checks)."""
    from data_prep.prepare import prepare_tokenizer
    from data_prep.tasks import STAGES, merge
    rng = random.Random(5)
    base = _words(rng, 120)
    src = tmp_path / "src"
    src.mkdir()
    docs = [_one_word_changed(base, rng) for _ in range(160)] + [_words(rng, 60) for _ in range(40)]
    for i, d in enumerate(docs):
        (src / f"d{i:03d}.txt").write_text(d)
    prepare_tokenizer([str(src)], tmp_path / "tok", tokenizer="char", show_progress=False)
    kw = dict(tokenizer_dir=tmp_path / "tok", val_fraction=0.3, leakage="flag", show_progress=False)
    one = prepare([str(src)], tmp_path / "one", **kw)
    for stage in STAGES:
        for k in (0, 1):
            prepare([str(src)], tmp_path / "two", tasks=2, task=k, stage=stage, **kw)
    two = merge(tmp_path / "two")
    assert one["source"]["documents"] < 80  # the copies went
    assert _removed(tmp_path / "one") == _removed(tmp_path / "two")
    assert _documents_by_split(tmp_path / "one") == _documents_by_split(tmp_path / "two")
    assert two["splits"]["train"]["tokens"] == one["splits"]["train"]["tokens"]


def test_key_index_holds_what_a_dict_of_lists_holds_across_flushes_and_merges():
    from data_prep.keyindex import KeyIndex
    rng = random.Random(1)
    index, reference = KeyIndex(buffer_entries=5), {}
    for row in range(400):
        key = rng.choice([rng.getrandbits(64), rng.randrange(30)])  # some keys many times
        index.add(key, row)
        reference.setdefault(key, []).append(row)
        if row % 37 == 0:
            probe = list(reference)[:20] + [rng.getrandbits(64) for _ in range(5)]
            assert index.lookup(probe) == [reference.get(k, []) for k in probe]  # rows oldest first
    assert len(index) == 400 and len(index._runs) < 10  # merged like a binary counter, not one run per flush


def test_signature_store_reads_rows_back_from_memory_and_disk(tmp_path):
    from data_prep.keyindex import SignatureStore
    store = SignatureStore(7, tmp_path, buffer_rows=3)
    rows = np.random.default_rng(0).integers(0, 2**32, size=(11, 7), dtype=np.uint32)
    for r in rows:
        store.append(r)
    picked = np.array([0, 4, 5, 10, 2])
    assert np.array_equal(store.get(picked), rows[picked])


@pytest.mark.slow
def test_the_dedup_index_holds_a_few_hundred_bytes_per_document():
    """Peak RSS of prepare grows with the documents only through the planner's index: it must stay small
    (a dict per band and signatures in memory took ~2 KB per document: 250 GB for 125M documents)."""
    import tracemalloc
    from data_prep.dedup import LSHIndex
    first, n = 10_000, 30_000  # growth between the two: the fixed buffers are full at the first
    sigs = np.random.default_rng(0).integers(0, 2**32, size=(n, 112), dtype=np.uint32)
    tracemalloc.start()
    index = LSHIndex()
    for i in range(n):
        index.find_all_then_add(i, sigs[i])
        if i + 1 == first:
            before, _ = tracemalloc.get_traced_memory()
    after, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    per_document = (after - before) / (n - first)
    assert per_document < 400, f"{per_document:.0f} bytes per document"


def test_small_index_buffers_give_the_same_dataset(tmp_path, monkeypatch):
    """The index's flushes, merges and signature file change nothing the planner decides."""
    from data_prep import keyindex
    rng = random.Random(7)
    base = _words(rng, 120)
    src = tmp_path / "src"
    src.mkdir()
    docs = [_one_word_changed(base, rng) for _ in range(40)] + [_words(rng, 60) for _ in range(40)]
    docs += docs[50:60]  # exact copies
    for i, d in enumerate(docs):
        (src / f"d{i:03d}.txt").write_text(d)
    kw = dict(tokenizer="char", val_fraction=0.3, show_progress=False)
    prepare([str(src)], tmp_path / "default", **kw)
    monkeypatch.setattr(keyindex.KeyIndex.__init__, "__defaults__", (3,))
    monkeypatch.setattr(keyindex.SignatureStore.__init__, "__defaults__", (None, 2))
    prepare([str(src)], tmp_path / "small", **kw)
    assert _removed(tmp_path / "small") == _removed(tmp_path / "default")
    assert sum(_removed(tmp_path / "default").values()) > 40
    assert _documents_by_split(tmp_path / "small") == _documents_by_split(tmp_path / "default")
