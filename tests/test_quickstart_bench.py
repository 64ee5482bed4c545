"""bench/quickstart.py: its parsing rule (a sample of `def ` up to the first dedent is one Python function,
as is or with a cut body completed by `pass`), and the whole benchmark at a tiny budget (a few steps of a
tiny model on a small slice of the standard library, two samples) writing a well-formed report."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_quickstart", ROOT / "bench" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_quickstart"] = module
    spec.loader.exec_module(module)
    return module


bench = load_bench()


def test_a_complete_function_parses_and_ends_at_the_first_dedent():
    text = "def area(w, h):\n    # w, h in metres\n    return w * h\n\nclass Box:\n    pass\n"
    source, complete, _ = bench.function_source(text)
    assert complete and source == "def area(w, h):\n    # w, h in metres\n    return w * h\n\n"
    assert bench.parses_as_function(text)
    assert bench.parses_as_function("def f(x): return x\nprint(f(1))\n")  # a one-line def ends at the next line
    assert bench.reached_end(text) and not bench.reached_end("def area(w, h):\n    return w")


def test_lines_at_column_zero_inside_brackets_strings_or_comments_are_no_dedent():
    text = 'def f(\n    a,\n):\n    s = """\nx\n"""\n# note\n    return a\n\nf(1)\n'
    source, complete, _ = bench.function_source(text)
    assert complete and source.endswith("    return a\n\n")
    assert bench.parses_as_function(text)


@pytest.mark.parametrize("text, completion_ends", [
    ("def f(x, y):\n    for a in x:\n", "    for a in x:\n        pass\n"),  # cut after a colon: deeper
    ("def f(x, y):\n    if x:\n        return y\n    z = foo(", "        return y\n        pass\n"),  # mid-line
    ('def f(x):\n    """Return the\n    thing that', "def f(x):\n    pass\n"),  # inside a docstring
    ("def f(self, key):\n    ", "def f(self, key):\n    pass\n"),  # only the header
])
def test_a_cut_body_completed_by_pass_parses(text, completion_ends):
    source, complete, completion = bench.function_source(text)
    assert not complete and source == text and completion.endswith(completion_ends)
    assert bench.parses_as_function(text)


@pytest.mark.parametrize("text", [
    "def \xf1 -> LATIN CAPITAL LETTER E\n    '\\xf1'   #  0xF1 -> LATIN SMALL LETTER N WITH TILDE\n",  # the codec tables
    "def 0x00f1: 'x'\n",
    "def f(x):\nreturn x\n",  # the body never indented: the function ends empty
    "def f(x):\n        a = 1\n    b = 2\n",  # an inconsistent dedent
    "def f(x",  # cut inside the header
    "def f(x):\n    return x\n    )\n",  # a stray bracket in a complete body
])
def test_garbage_does_not_parse(text):
    assert not bench.parses_as_function(text)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quickstart_bench")
    args = ["--out-dir", str(tmp / "run"), "--json", str(tmp / "quickstart.json"), "--samples", "2",
            "--max-new-tokens", "24", "--text-val-bytes", "20000", 'data.inputs=["${stdlib}/json/*.py"]', f"data.dir={tmp / 'data'}",
            "data.vocab_size=400", "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=64",
            "train.max_steps=4", "train.eval_interval=2", "train.eval_sequences=4", "train.batch_size=4"]
    assert bench.main(args) == 0
    return tmp, json.loads((tmp / "quickstart.json").read_text())


@pytest.mark.slow
def test_the_smoke_run_reports_parse_share_bits_per_byte_wall_time_and_load(smoke):
    tmp, report = smoke
    assert report["samples"] == 2 and report["seeds"] == [0, 1] and report["prompt"] == "def "
    assert 0.0 <= report["parse_share"] <= 1.0 and 0.0 <= report["complete_share"] <= 1.0
    assert report["parse_share"] == sum(r["parses"] for r in report["results"]) / 2
    assert report["step"] == 4 and 0.0 < report["val_bpb"] < 20 and math.isfinite(report["val_loss"])
    text_val = report["text_val"]  # the prepared data's val split as text, scored with the run's tokenizer
    assert text_val["dir"] == str(tmp / "data") and 0 < text_val["bytes"] <= 20000 and 0 < text_val["bpb"] < 20
    training = report["training"]
    assert training["wall_s"] > 0 and 0 < training["setup_s"] < training["wall_s"] and training["cpu_s"] > 0
    assert training["data_prepared_in_run"] is True
    load = training["load_average"]
    assert 0 <= load["start"] and load["mean"] <= load["max"] and load["samples"] >= 2
    for row in report["results"]:
        assert row["text"].startswith("def ") and row["function"] == row["text"][:len(row["function"])]
        assert 1 <= row["tokens"] <= 24 and isinstance(row["parses"], bool)


@pytest.mark.slow
def test_an_existing_run_is_scored_without_training_and_a_used_out_dir_is_refused(smoke, capsys):
    tmp, report = smoke
    assert bench.main(["--run-dir", str(tmp / "run"), "--json", str(tmp / "again.json"), "--samples", "2",
                       "--max-new-tokens", "24", "--text-val", "none"]) == 0
    again = json.loads((tmp / "again.json").read_text())
    assert again["training"] is None and again["text_val"]["bpb"] is None
    assert again["val_bpb"] == report["val_bpb"]  # from the run's metrics.jsonl
    assert [r["text"] for r in again["results"]] == [r["text"] for r in report["results"]]  # fixed seeds
    assert bench.main(["--out-dir", str(tmp / "run"), "--json", str(tmp / "x.json")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp / "run" / "metrics.jsonl").exists() and not (tmp / "x.json").exists()


def test_the_quickstart_corpus_leaves_out_generated_tables_and_keeps_the_code():
    """The first release's corpus included 123 encodings/cp*.py codec tables and pydoc's help text, and the
    quickstart's samples were codec-table lines."""
    from data_prep.sources import list_files
    from lm.config.load import load_config

    data = load_config(ROOT / "configs" / "quickstart.toml", []).data
    files = [f.as_posix() for f in list_files(data.inputs, data.exclude)]
    for table in ("/encodings/cp1252.py", "/encodings/mac_roman.py", "/pydoc_data/topics.py", "/html/entities.py"):
        assert not any(f.endswith(table) for f in files), table
    assert not any("/test/" in f or "/tests/" in f or "/idle_test/" in f for f in files)
    for module in ("/argparse.py", "/json/decoder.py", "/asyncio/tasks.py", "/collections/__init__.py"):
        assert any(f.endswith(module) for f in files), module
    assert len(files) > 300
