"""Issue 22 "Trust for every command", data_prep's part: every JSON data_prep reads back goes through one
validating reader, numeric settings are checked, symlink loops, huge documents, remote 5xx and full disks
end in one line (or bounded memory), and the multi-task sign stage is as compact as the planner."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_user_error, run_cli
from data_prep import DataError, prepare
from data_prep.prepare import prepare_tokenizer
from data_prep.tasks import STAGES


def data_prep_cli(*args):
    """`python -m data_prep ARGS` run in this process (no interpreter start: ~2 s each on a loaded machine),
    as a CompletedProcess-like result for assert_user_error; an uncaught exception fails the test itself."""
    import contextlib
    import io
    from types import SimpleNamespace

    from data_prep.__main__ import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def _words(rng, n):
    return " ".join(f"w{rng.randrange(3000)}" for _ in range(n))


@pytest.fixture(scope="module")
def small_src(tmp_path_factory):
    import random
    rng = random.Random(3)
    root = tmp_path_factory.mktemp("r3")
    src = root / "src"
    src.mkdir()
    for i in range(24):
        (src / f"d{i:02d}.txt").write_text(_words(rng, 60) + "\n")
    prepare_tokenizer([str(src)], root / "tok", vocab_size=300, show_progress=False)
    return src, root / "tok"


@pytest.fixture(scope="module")
def finished_tasks(small_src, tmp_path_factory):
    """A two-task run whose tasks have all finished, not yet merged: `out` and its `out.tmp-tasks`."""
    src, tok = small_src
    out = tmp_path_factory.mktemp("tasks") / "out"
    for stage in STAGES:
        for k in (0, 1):
            prepare([str(src)], out, tokenizer_dir=tok, val_fraction=0.2, show_progress=False, tasks=2, task=k,
                    stage=stage)
    return out


def _copy_tasks(finished, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(Path(f"{finished}.tmp-tasks"), tmp_path / "out.tmp-tasks")
    return out, tmp_path / "out.tmp-tasks"


def _edit_json(path, edit):
    obj = json.loads(path.read_text())
    obj = edit(obj)
    path.write_text(json.dumps(obj))


# ---------------------------------------------------------------- task manifests and merge inputs

def _set(*keys, value):
    def edit(obj):
        o = obj
        for k in keys[:-1]:
            o = o[k]
        o[keys[-1]] = value
        return obj
    return edit


def _first_shard(field, value):
    def edit(obj):
        split = next(s for s, e in obj["entries"].items() if e["shards"])
        obj["entries"][split]["shards"][0][field] = value
        return obj
    return edit


BAD_DONE = [
    ("not json", None, "not valid JSON"),
    ("{}", None, "fingerprint is missing"),
    ("[1]", None, "must be a JSON object"),
    ("null", None, "must be a JSON object"),
    (None, _set("entries", value=[1]), "entries must be a JSON object"),
    (None, _set("entries", "train", value="x"), "entries.train must be a JSON object"),
    (None, _set("entries", "test", value={"tokens": 0, "docs": 0, "bytes": 0, "shards": []}), "entries.test"),
    (None, _set("documents", value="12"), "documents must be an integer >= 0"),
    (None, _set("removed", value={"x": {"count": "1", "example": "a"}}), "removed.x.count"),
    (None, _set("skipped", value=[]), "skipped must be a JSON object"),
    (None, _first_shard("tokens", -5), "tokens must be an integer >= 0"),
    (None, _first_shard("file", "../../../etc/passwd"), "is not a plain file name"),
    (None, _first_shard("file", 7), "file must be a string"),
    (None, _set("task", value=0), "task 1's result says it is task 0"),
    (None, _set("tasks", value=3), "is task 1 of 3, not 1 of 2"),
]


@pytest.mark.parametrize("content,edit,fragment", BAD_DONE)
def test_a_damaged_encode_done_is_one_line_naming_file_and_field(finished_tasks, tmp_path, content, edit, fragment):
    out, root = _copy_tasks(finished_tasks, tmp_path)
    done = root / "task-00001" / "encode.done"
    if content is not None:
        done.write_text(content)
    else:
        _edit_json(done, edit)
    result = data_prep_cli("merge", out)
    assert_user_error(result, str(done), fragment)
    assert not out.exists()


@pytest.mark.parametrize("content,fragment", [
    ("{", "not valid JSON"), ("[]", "must be a JSON object"), ('{"tasks": 2}', "is missing"),
    (_set("tasks", value=0), "tasks must be >= 1"), (_set("tasks", value="2"), "tasks must be an integer"),
    (_set("val_fraction", value=1.5), "val_fraction must be a number in [0, 1)"),
    (_set("files", value=[3]), "files[0] must be a string")])
def test_a_damaged_task_config_is_one_line(finished_tasks, tmp_path, content, fragment):
    out, root = _copy_tasks(finished_tasks, tmp_path)
    if callable(content):
        _edit_json(root / "config-00000.json", content)
    else:
        (root / "config-00000.json").write_text(content)
    result = data_prep_cli("merge", out)
    assert_user_error(result, "config-00000.json", fragment)


def test_merge_of_missing_or_partial_task_output_is_one_line_each(finished_tasks, tmp_path):
    out, root = _copy_tasks(finished_tasks, tmp_path)
    assert_user_error(data_prep_cli("merge", tmp_path / "nothing"), "no task has started here")
    k = next(k for k in (0, 1) if json.loads((root / f"task-{k:05d}" / "encode.done").read_text())["entries"]["train"]["shards"])
    shard = json.loads((root / f"task-{k:05d}" / "encode.done").read_text())["entries"]["train"]["shards"][0]
    path = root / f"task-{k:05d}" / shard["file"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 // 2 * 2])  # a partial shard
    assert_user_error(data_prep_cli("merge", out), shard["file"], "tokens, the task's manifest says")
    path.write_bytes(data[:-1])  # cut inside a token
    assert_user_error(data_prep_cli("merge", out), shard["file"], "a partial shard")
    path.unlink()
    assert_user_error(data_prep_cli("merge", out), shard["file"], "is missing")
    path.write_bytes(data)
    (root / "task-00001" / "encode.done").unlink()
    assert_user_error(data_prep_cli("merge", out), "tasks 1 of 2 have not finished")
    shutil.rmtree(root / "task-00001")
    assert_user_error(data_prep_cli("merge", out), "tasks 1 of 2 have not finished")


def test_a_damaged_sign_done_or_other_stage_file_is_one_line(small_src, tmp_path):
    src, tok = small_src
    out = tmp_path / "out"
    kw = dict(tokenizer_dir=tok, val_fraction=0.2, show_progress=False, tasks=2)
    for k in (0, 1):
        prepare([str(src)], out, task=k, stage="sign", **kw)
    sign = tmp_path / "out.tmp-tasks" / "task-00001" / "sign.done"
    saved = sign.read_text()
    sign.write_text("[1]")
    with pytest.raises(DataError, match=rf"{sign}: the file must be a JSON object"):
        prepare([str(src)], out, task=0, stage="match", **kw)
    sign.write_text(json.dumps(dict(json.loads(saved), fingerprint=5)))
    with pytest.raises(DataError, match=rf"{sign}: fingerprint must be a string"):
        prepare([str(src)], out, task=0, stage="match", **kw)


def test_a_damaged_work_state_starts_over_instead_of_a_traceback(small_src, tmp_path, monkeypatch):
    from data_prep.prepare import FAIL_AFTER_ENV
    src, tok = small_src
    out = tmp_path / "out"
    kw = dict(tokenizer_dir=tok, val_fraction=0.2, show_progress=False, shard_tokens=500)
    monkeypatch.setenv(FAIL_AFTER_ENV, "1")
    with pytest.raises(RuntimeError):
        prepare([str(src)], out, **kw)
    monkeypatch.delenv(FAIL_AFTER_ENV)
    state = tmp_path / "out.tmp-prepare" / "state.json"
    _edit_json(state, _set("progress", "train", value=[1, 2]))
    meta = prepare([str(src)], out, **kw)
    reference = prepare([str(src)], tmp_path / "ref", **kw)
    assert meta["splits"] == reference["splits"]


@pytest.mark.parametrize("content", ["[1]", '{"splits": 5}', '{"splits": [1]}', "{"])
def test_a_damaged_hf_dataset_dict_is_one_line(tmp_path, content):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset_dict.json").write_text(content)
    result = data_prep_cli("prepare", tmp_path / "ds", "--out", tmp_path / "out", "--quiet")
    assert_user_error(result, "dataset_dict.json")


# ---------------------------------------------------------------- numeric settings

@pytest.mark.parametrize("flags,fragment", [
    (["--tasks", "0"], "--tasks"), (["--tasks", "-2"], "--tasks"), (["--tasks", "2", "--task", "2"], "task 2"),
    (["--tasks", "2", "--task", "-1"], "task -1"), (["--vocab-size", "0"], "vocab"),
    (["--vocab-size", "-5"], "vocab"), (["--val-fraction", "1"], "val_fraction"),
    (["--val-fraction", "-0.1"], "val_fraction"), (["--val-fraction", "nan"], "val_fraction"),
    (["--shard-tokens", "0"], "shard_tokens"), (["--workers", "0"], "workers"),
    (["--min-chars", "-1"], "min_chars"), (["--minhash-bands", "0"], "MinHash"),
    (["--near-threshold", "1.5"], "threshold"), (["--tokenizer-sample-bytes", "-3"], "tokenizer_sample_bytes"),
    (["--wait", "-1"], "wait"), (["--wait", "nan"], "wait")])
def test_bad_numeric_flags_are_refused_in_one_line(tiny_corpus, tmp_path, flags, fragment):
    result = data_prep_cli("prepare", tiny_corpus, "--out", tmp_path / "out", "--quiet",
                     "--tokenizer", "char", *flags)
    assert_user_error(result, fragment)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp-prepare").exists()


@pytest.mark.parametrize("flags,fragment", [(["--vocab-size", "0"], "vocab"), (["--val-fraction", "2"], "val_fraction"),
                                            (["--tokenizer-sample-bytes", "-1"], "tokenizer_sample_bytes")])
def test_bad_numeric_flags_of_the_tokenizer_command(tiny_corpus, tmp_path, flags, fragment):
    result = data_prep_cli("tokenizer", tiny_corpus, "--out", tmp_path / "tok", "--quiet", *flags)
    assert_user_error(result, fragment)


# ---------------------------------------------------------------- symlink loops

def test_a_symlink_loop_in_a_directory_or_under_a_glob_is_not_followed_forever(tmp_path):
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "doc.txt").write_text("some text here\n")
    (src / "a" / "b" / "other.txt").write_text("other text there\n")
    os.symlink(src / "a", src / "a" / "b" / "loop")  # a -> b -> loop -> a ...
    os.symlink("self", src / "self")  # a link to itself: neither file nor directory
    from data_prep.sources import list_files
    for spec in (str(src), f"{src}/**/*.txt", f"{src}/**"):
        files = list_files([spec])
        names = sorted(p.name for p in files)
        assert names == ["doc.txt", "other.txt"], (spec, names)  # each file once, no error
    result = run_cli("-m", "data_prep", "prepare", f"{src}/**/*.txt", "--out", tmp_path / "out", "--quiet",
                     "--tokenizer", "char", "--val-fraction", "0", timeout=120)  # a process: a hang times out
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- huge documents: bounded memory

def _line_of_words(rng, n):
    return " ".join(rng.choice(["alpha", "beta", "gamma,", "d3lta", "é", "中文", "x", "'s", "42"]) for _ in range(n))


def test_hashing_a_text_in_tiny_pieces_equals_hashing_it_whole(monkeypatch):
    import hashlib
    import random

    import data_prep.dedup as dedup
    from data_prep.plan import val_score
    from data_prep.sources import Document
    rng = random.Random(1)
    pieces = ["ab", "c", " ", "  ", "\n", "\t", "\x0b", "\u3000", "é中", "\x1c", "\ud800"]
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 120))) for _ in range(150)]
    whole = [(dedup.MinHasher().signature(t), val_score(7, Document(t, "s"))) for t in texts]
    for size in (1, 2, 5, 33):
        monkeypatch.setattr(dedup, "HASH_PIECE_CHARS", size)
        for t, (sig, score) in zip(texts, whole):
            reference = hashlib.blake2b(" ".join(t.split()).encode("utf-8", "surrogatepass"), digest_size=16).digest()
            assert dedup.exact_key(t) == reference, (t, size)
            got = dedup.MinHasher().signature(t)
            assert (got is None and sig is None) or np.array_equal(got, sig), (t, size)
            assert val_score(7, Document(t, "s")) == score


def test_a_one_line_document_encoded_in_tiny_pieces_gives_the_ids_of_encoding_it_whole(small_src, tmp_path, monkeypatch):
    import random

    import data_prep.stream as stream
    from data_prep import TokenReader, load_tokenizer
    from data_prep.tokenizer import split_for_encoding
    src, tok_dir = small_src
    tok = load_tokenizer(tok_dir)
    rng = random.Random(2)
    line = _line_of_words(rng, 3000) + "  two  spaces " + _line_of_words(rng, 200)
    pieces = list(split_for_encoding(line, 50, tok.cut_at))
    assert len(pieces) > 100 and "".join(pieces) == line  # a line is cut (at single spaces), nothing lost
    assert [i for p in pieces for i in tok.encode(p)] == tok.encode(line)
    corpus = tmp_path / "corpus"
    shutil.copytree(src, corpus)
    (corpus / "zz_one_line.txt").write_text(line)
    monkeypatch.setattr(stream, "SEGMENT_CHARS", 50)
    monkeypatch.setattr(stream, "CHUNK_CHARS", 300)  # the document spans many encode chunks
    prepare([str(corpus)], tmp_path / "out", tokenizer_dir=tok_dir, val_fraction=0.0, show_progress=False)
    reader = TokenReader(tmp_path / "out", "train")
    docs = [reader.document(i).tolist() for i in range(reader.num_docs)]
    assert tok.encode(line) in docs


def _peak_rss_of_prepare(tmp_path, mb, tok_dir):
    """Peak RSS (VmHWM) of a prepare of one `mb` MB single-line document beside two small ones, and the
    peak of the same process before it reads anything."""
    import random
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(4)
    words = [_line_of_words(rng, 2000) for _ in range(50)]
    with open(src / "big.txt", "w") as f:
        written = 0
        while written < mb << 20:
            chunk = " ".join(rng.choice(words) for _ in range(20)) + " "
            f.write(chunk)
            written += len(chunk)
    (src / "a.txt").write_text(words[0])
    (src / "b.txt").write_text(words[1])
    script = f"""
import data_prep.prepare, data_prep.tasks, tokenizers, tiktoken
from data_prep.prepare import prepare
def hwm():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) // 1024
base = hwm()
prepare([{str(src)!r}], {str(tmp_path / 'out')!r}, tokenizer_dir={str(tok_dir)!r}, show_progress=False)
print(base, hwm())
"""
    result = run_cli("-c", script, timeout=600)
    assert result.returncode == 0, result.stderr
    base, peak = map(int, result.stdout.split())
    return base, peak


@pytest.mark.slow
def test_a_huge_one_line_document_takes_memory_of_a_few_copies_of_itself(small_src, tmp_path):
    """Before: ~23 bytes per byte of the line (its words as Python strings, whole-text MinHash arrays, one
    list of Python ints for its tokens); now the text, a cleaned copy at most, and bounded pieces."""
    base, peak = _peak_rss_of_prepare(tmp_path, 8, small_src[1])
    assert peak - base < 30 + 4 * 8, f"{peak - base} MB over the base {base} MB for an 8 MB line"


# ---------------------------------------------------------------- multi-task sign stage: compact

@pytest.mark.slow
def test_the_sign_stage_holds_a_few_dozen_bytes_per_document(small_src, tmp_path, monkeypatch):
    """What the sign stage keeps per document until it writes its files: ~2.2 KB of Python tuples before
    (a docs, an exact and 14 band tuples), now a few typed arrays (planner-like, ~250 B or less). Measured as
    the slope between two corpus sizes after a warm-up: what a call keeps whatever its size (modules imported
    on first use, the hasher's power tables: ~1.2 MB) is not per document."""
    import random
    import tracemalloc

    from data_prep.tasks import Task, tasks_root
    rng = random.Random(9)
    sizes = {"warm-up": 500, "small": 2000, "large": 8000}
    for name, n in sizes.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "docs.jsonl").write_text(
            "".join(json.dumps({"text": _words(rng, 12)}) + "\n" for _ in range(n)))
    kept = {}
    original = Task._sign_documents

    def measure(self, *args):
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        result = original(self, *args)
        kept[current] = max(kept.get(current, 0), tracemalloc.get_traced_memory()[0] - before)
        tracemalloc.stop()
        return result

    monkeypatch.setattr(Task, "_sign_documents", measure)
    for current in sizes:
        for k in (0, 1):
            prepare([str(tmp_path / current)], tmp_path / f"out_{current}", tokenizer_dir=small_src[1],
                    show_progress=False, tasks=2, task=k, stage="sign")
    per_document = (kept["large"] - kept["small"]) / (sizes["large"] - sizes["small"])
    print(f"sign stage: {per_document:.0f} bytes per document ({kept})")
    assert 0 < per_document < 250, f"{per_document:.0f} bytes per document"
    out = tmp_path / "out_large"
    for k in (0, 1):  # and the rows the sign stage wrote are those every task's match stage reads
        prepare([str(tmp_path / "large")], out, tokenizer_dir=small_src[1], show_progress=False, tasks=2, task=k,
                stage="match")
    assert (tasks_root(out) / "task-00000" / "match.done").is_file()


# ---------------------------------------------------------------- remote inputs: transient server errors

class _FlakyServer:
    """A local HTTP server: `fail[name]` lists the statuses the next requests for `name` get, then 200."""

    def __init__(self, files):
        import http.server
        import threading
        server = self
        self.files, self.fail, self.requests = files, {}, []

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self, body: bool):
                name = self.path.lstrip("/")
                server.requests.append((self.command, name))
                queue = server.fail.get(name) or []
                status = queue.pop(0) if queue else (200 if name in server.files else 404)
                data = server.files.get(name, b"") if status in (200, "drop") else b"error page"
                self.send_response(200 if status == "drop" else status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    if status == "drop":  # the connection breaks off half way through the body
                        self.wfile.write(data[:len(data) // 2])
                        self.wfile.flush()
                        self.connection.shutdown(2)
                        return
                    self.wfile.write(data)

            def do_HEAD(self):
                self._answer(False)

            def do_GET(self):
                self._answer(True)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def flaky():
    pytest.importorskip("aiohttp")
    server = _FlakyServer({"a.txt": b"some text of a remote file\n" * 100, "b.jsonl": b'{"text": "x y z"}\n' * 50})
    yield server
    server.httpd.shutdown()


def _cli_with_fast_retries(*args):
    script = ("import sys, data_prep.remote as r; r.BACKOFF_S = 0.01; from data_prep.__main__ import main; "
              f"sys.exit(main({[str(a) for a in args]!r}))")
    return run_cli("-c", script, timeout=120)


def test_an_http_500_is_retried_then_one_line_naming_url_and_status(flaky, tmp_path):
    url = f"{flaky.url}/a.txt"
    flaky.fail["a.txt"] = [500] * 100
    result = _cli_with_fast_retries("prepare", url, "--out", tmp_path / "out", "--quiet", "--tokenizer", "char")
    assert_user_error(result, url, "HTTP 500")
    assert "no such file" not in result.stderr
    assert len(flaky.requests) > 3  # retried
    after = result.stderr[result.stderr.index("error: "):]
    assert after.strip().count("\n") == 0, after  # nothing (aiohttp's "Unclosed connection") after the error line


def test_transient_5xx_then_success_prepares_and_a_404_is_no_such_file(flaky, tmp_path, monkeypatch):
    import data_prep.remote as remote
    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)
    flaky.fail["a.txt"] = [503, 502]  # the listing's HEAD and its retry fail, then it works
    flaky.fail["b.jsonl"] = [200, 500]  # listed fine, the first GET of the content fails
    meta = prepare([f"{flaky.url}/a.txt", f"{flaky.url}/b.jsonl"], tmp_path / "out", tokenizer="char",
                   show_progress=False, val_fraction=0)
    assert meta["source"]["files"] == 2
    result = _cli_with_fast_retries("prepare", f"{flaky.url}/missing.txt", "--out", tmp_path / "o2", "--quiet")
    assert_user_error(result, f"{flaky.url}/missing.txt: no such file")
    assert len([r for r in flaky.requests if r[1] == "missing.txt"]) <= 2  # a 404 is not retried


@pytest.mark.parametrize("failure,fragment", [(500, "HTTP 500"), ("drop", "read failed after")])
def test_a_stream_failing_mid_read_does_not_leave_unclosed_session_warnings(flaky, tmp_path, failure, fragment):
    url = f"{flaky.url}/a.txt"
    flaky.files["a.txt"] = b"word " * 400_000  # 2 MB: a connection is mid-body when it breaks
    flaky.fail["a.txt"] = [200] + [failure] * 100  # listed, then every GET fails
    result = _cli_with_fast_retries("prepare", url, "--out", tmp_path / "out", "--quiet", "--tokenizer", "char")
    assert_user_error(result, url, fragment)
    assert "Unclosed" not in result.stderr, result.stderr


# ---------------------------------------------------------------- writes: full disk, nothing overwritten

def _cli_with_file_size_limit(limit, *args):
    """The data_prep CLI where no file may grow past `limit` bytes: writes fail as on a full disk (EFBIG)."""
    script = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
              "from data_prep.__main__ import main; "
              f"sys.exit(main({[str(a) for a in args]!r}))")
    return run_cli("-c", script, timeout=300)


@pytest.mark.parametrize("limit", [200, 8000])
def test_a_full_disk_is_one_line_and_publishes_nothing(tiny_corpus, tmp_path, limit):
    out = tmp_path / "out"
    result = _cli_with_file_size_limit(limit, "prepare", tiny_corpus, "--out", out, "--quiet", "--tokenizer", "char",
                                       "--shard-tokens", "50000")
    assert_user_error(result, str(tmp_path))
    assert not out.exists()
    assert not list(tmp_path.rglob("*.tmp"))  # no torn temporary file either


def test_a_full_disk_while_saving_a_tokenizer_leaves_no_partial_file(tiny_corpus, tmp_path):
    result = _cli_with_file_size_limit(1000, "tokenizer", tiny_corpus, "--out", tmp_path / "tok", "--quiet",
                                       "--vocab-size", "300")
    assert_user_error(result, "tokenizer.json")
    assert not list((tmp_path / "tok").iterdir())


def test_the_tokenizer_command_does_not_overwrite_an_existing_tokenizer(tiny_corpus, tmp_path):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("mine")
    result = data_prep_cli("tokenizer", tiny_corpus, "--out", tmp_path / "tok", "--quiet",
                     "--vocab-size", "300")
    assert_user_error(result, "tokenizer.json", "--overwrite")
    assert (tmp_path / "tok" / "tokenizer.json").read_text() == "mine"
    result = data_prep_cli("tokenizer", tiny_corpus, "--out", tmp_path / "tok", "--quiet",
                     "--vocab-size", "300", "--overwrite")
    assert result.returncode == 0, result.stderr


def test_a_big_binary_file_under_a_directory_is_skipped_without_reading_it_whole(tmp_path):
    """Tokenizer training on ${stdlib} peaked at 1.2 GB while sampling: a 1 GB shared library read whole
    before its first byte was found undecodable."""
    import tracemalloc

    from data_prep.sources import SourceStats, iter_documents
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "lib.so").write_bytes(b"\x7fELF\x02\x01\x01\x00" + b"\xff\x00" * (10 << 20))
    (tmp_path / "src" / "a.txt").write_text("héllo " * 1000)
    stats = SourceStats()
    tracemalloc.start()
    docs = list(iter_documents([str(tmp_path / "src")], stats=stats))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [d.text for d in docs] == ["héllo " * 1000]
    assert stats.skipped.to_json()["binary_file"]["count"] == 1
    assert peak < 4 << 20, f"{peak >> 20} MB traced for a 20 MB binary file"


@pytest.mark.parametrize("name,damage", [
    ("docs.npy", b"not numpy"), ("exact-to-00000.bin", b"\x01\x02\x03"), ("bands-to-00001.bin", b"\x01"),
    ("sigs.u32", b"\x01\x02\x03\x04\x05"), ("flags-to-00001.npy", b"junk")])
def test_a_damaged_stage_file_between_stages_is_one_line(small_src, tmp_path, name, damage):
    src, tok = small_src
    out = tmp_path / "out"
    kw = dict(tokenizer_dir=tok, val_fraction=0.2, show_progress=False, tasks=2)
    last = "match" if name.startswith("flags") else "sign"
    for stage in STAGES[:STAGES.index(last) + 1]:
        for k in (0, 1):
            prepare([str(src)], out, task=k, stage=stage, **kw)
    path = tmp_path / "out.tmp-tasks" / "task-00000" / name
    path.write_bytes(damage)
    with pytest.raises(DataError) as e:
        for stage in STAGES[STAGES.index(last) + 1:]:
            for k in (1, 0):
                prepare([str(src)], out, task=k, stage=stage, **kw)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_a_full_disk_during_merge_is_one_line_and_a_rerun_publishes(finished_tasks, tmp_path):
    out, root = _copy_tasks(finished_tasks, tmp_path)
    result = _cli_with_file_size_limit(200, "merge", out)
    assert_user_error(result, str(root))
    assert not out.exists() and not list(tmp_path.rglob("*.tmp"))
    result = data_prep_cli("merge", out)
    assert result.returncode == 0, result.stderr
    assert (out / "meta.json").is_file()
