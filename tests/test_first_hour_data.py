"""Issue 12, items 3 and 4: a prepared data.dir never silently stands in for other inputs or settings, and a
download never lands on a path the user named as their own input."""
import json
import urllib.request
from pathlib import Path

import pytest

from data_prep import DataError, prepare, read_meta
from data_prep.cleaning import Cleaner, CleanConfig
from data_prep.plan import DocumentPlan, Planner
from data_prep.sources import Document
from lm.config.load import load_config
from lm.config.schema import DataConfig
from lm.data.batches import download_path, ensure_prepared

ROOT = Path(__file__).resolve().parents[1]
URL = "https://example.org/corpora/input.txt"


@pytest.fixture
def texts(tmp_path):
    """Two small single-file corpora, a.txt and b.txt."""
    for name, word in (("a", "alpha beta gamma"), ("b", "delta epsilon zeta")):
        (tmp_path / f"{name}.txt").write_text("\n".join(f"{word} {i}" for i in range(200)) + "\n")
    return tmp_path


def char_cfg(data_dir, *inputs, **kw) -> DataConfig:
    return DataConfig(dir=str(data_dir), inputs=[str(p) for p in inputs], tokenizer="char", **kw)


@pytest.fixture
def downloads(monkeypatch):
    """Replaces the network: every urlretrieve writes a small corpus to its destination and is recorded."""
    calls = []

    def fake_urlretrieve(url, dest):
        calls.append((url, Path(dest)))
        Path(dest).write_text("".join(f"line {i} of the downloaded corpus\n" for i in range(300)))

    monkeypatch.setattr(urllib.request, "urlretrieve", fake_urlretrieve)
    return calls


# ---- item 3: changed inputs or settings on an already prepared data.dir ---------------------------------

def test_changed_inputs_are_refused_naming_both_lists(texts):
    d = texts / "data"
    ensure_prepared(char_cfg(d, texts / "a.txt"), show_progress=False)
    before = (d / "meta.json").read_bytes()
    with pytest.raises(DataError) as e:
        ensure_prepared(char_cfg(d, texts / "b.txt"), show_progress=False)
    msg = str(e.value)
    assert "\n" not in msg
    assert str(d) in msg and str(texts / "a.txt") in msg and str(texts / "b.txt") in msg
    assert "data.dir" in msg
    assert (d / "meta.json").read_bytes() == before  # nothing re-prepared or touched


@pytest.mark.parametrize("change, fragment", [
    ({"tokenizer": "bpe", "vocab_size": 300}, "data.tokenizer"),
    ({"val_fraction": 0.2}, "data.val_fraction"),
    ({"exclude": ["**/b.txt"]}, "data.exclude"),
    ({"text_field": "body"}, "data.text_field"),
])
def test_changed_preparation_settings_are_refused(texts, change, fragment):
    d = texts / "data"
    ensure_prepared(char_cfg(d, texts / "a.txt"), show_progress=False)
    cfg = char_cfg(d, texts / "a.txt")
    for key, value in change.items():
        setattr(cfg, key, value)
    with pytest.raises(DataError, match=fragment) as e:
        ensure_prepared(cfg, show_progress=False)
    assert str(d) in str(e.value)


def test_changed_bpe_vocab_size_is_refused(texts):
    d = texts / "data"
    ensure_prepared(DataConfig(dir=str(d), inputs=[str(texts / "a.txt")], vocab_size=300), show_progress=False)
    ensure_prepared(DataConfig(dir=str(d), inputs=[str(texts / "a.txt")], vocab_size=300), show_progress=False)
    with pytest.raises(DataError, match="data.vocab_size"):
        ensure_prepared(DataConfig(dir=str(d), inputs=[str(texts / "a.txt")], vocab_size=400), show_progress=False)


def test_the_same_inputs_written_differently_are_accepted(texts, monkeypatch):
    monkeypatch.chdir(texts)
    ensure_prepared(char_cfg("data", "./a.txt"), show_progress=False)
    assert ensure_prepared(char_cfg("data", "a.txt"), show_progress=False) == Path("data")
    assert ensure_prepared(char_cfg("data", texts / "a.txt"), show_progress=False) == Path("data")
    (texts / "sub").mkdir()
    monkeypatch.chdir(texts / "sub")  # a relative input written from another directory still matches
    assert ensure_prepared(char_cfg(texts / "data", "../a.txt"), show_progress=False) == texts / "data"


def test_placeholder_inputs_match_their_expansion(tmp_path):
    d = tmp_path / "data"
    cfg = DataConfig(dir=str(d), inputs=["${stdlib}/json/__init__.py"], tokenizer="char")
    ensure_prepared(cfg, show_progress=False)
    assert "${stdlib}" not in read_meta(d)["source"]["inputs"][0]
    assert ensure_prepared(cfg, show_progress=False) == d


def test_a_directory_prepared_by_hand_is_used_when_the_config_names_no_inputs(texts):
    d = texts / "data"
    prepare([str(texts / "a.txt")], d, tokenizer="char", show_progress=False)
    assert ensure_prepared(DataConfig(dir=str(d)), show_progress=False) == d
    # the same with a config that would download when unprepared: the directory is the user's choice
    assert ensure_prepared(DataConfig(dir=str(d), url=URL, tokenizer="bpe"), show_progress=False) == d


@pytest.mark.slow
def test_train_cli_refuses_the_quickstart_with_other_inputs(texts, cli):
    """The issue's report: the quickstart's data.dir holds stdlib shards and data.inputs names another corpus."""
    d = texts / "python_stdlib"
    cfg = load_config(ROOT / "configs" / "quickstart.toml", ['data.inputs=["${stdlib}/json/*.py"]',
                                                             f"data.dir={d}", "data.vocab_size=300"])
    ensure_prepared(cfg.data, show_progress=False)
    r = cli("train.py", "configs/quickstart.toml", f'data.inputs=["{texts / "a.txt"}"]', f"data.dir={d}",
            "data.vocab_size=300", f"train.out_dir={texts / 'run'}", "train.device=cpu", "log.progress=false")
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "Traceback" not in r.stderr
    assert str(texts / "a.txt") in line and "/json/*.py" in line and str(d) in line
    assert not (texts / "run").exists()


# ---- item 4: downloads go to a path the config owns --------------------------------------------------

def test_url_downloads_into_a_path_owned_by_data_dir(tmp_path, downloads):
    d = tmp_path / "data"
    assert ensure_prepared(DataConfig(dir=str(d), url=URL, tokenizer="char"), show_progress=False) == d
    target = tmp_path / "data.download" / "input.txt"
    assert [(url, dest.parent) for url, dest in downloads] == [(URL, target.parent)]  # written nowhere else
    assert download_path(DataConfig(dir=str(d), url=URL)) == target
    assert target.is_file() and sorted(target.parent.iterdir()) == [target]
    assert json.loads((d / "manifest.json").read_text())["inputs"] == [str(target)]
    # a rerun neither downloads again nor refuses its own download
    assert ensure_prepared(DataConfig(dir=str(d), url=URL, tokenizer="char"), show_progress=False) == d
    assert len(downloads) == 1


def test_a_missing_user_input_is_refused_even_with_a_url(tmp_path, downloads):
    mine = tmp_path / "mine.txt"
    cfg = DataConfig(dir=str(tmp_path / "data"), inputs=[str(mine)], url=URL, tokenizer="char")
    with pytest.raises(DataError, match="no such file") as e:
        ensure_prepared(cfg, show_progress=False)
    assert str(mine) in str(e.value)
    assert downloads == [] and not mine.exists() and not (tmp_path / "data").exists()


def test_a_download_failing_its_checksum_is_not_kept(tmp_path, downloads):
    cfg = DataConfig(dir=str(tmp_path / "data"), url=URL, sha256="0" * 64, tokenizer="char")
    with pytest.raises(DataError, match="sha256"):
        ensure_prepared(cfg, show_progress=False)
    assert not download_path(cfg).exists() and not (tmp_path / "data").exists()


def test_shakespeare_char_config_takes_its_download(tmp_path, downloads):
    cfg = load_config(ROOT / "configs" / "shakespeare_char.toml", [f"data.dir={tmp_path / 'sc'}", "data.sha256="])
    assert cfg.data.inputs == [] and cfg.data.url
    ensure_prepared(cfg.data, show_progress=False)
    assert [dest.parent for _, dest in downloads] == [tmp_path / "sc.download"]
    assert (tmp_path / "sc.download" / "input.txt").is_file()
    assert read_meta(tmp_path / "sc")["tokenizer"]["kind"] == "char"


# ---- issue 11: data_prep's plan has its own name -----------------------------------------------------

def test_planner_returns_a_document_plan():
    planner = Planner(Cleaner(CleanConfig()), 0.0, seed=0)
    planner.add(Document("some text", "x.txt"))
    plan = planner.finish()
    assert isinstance(plan, DocumentPlan) and plan.kept == 1
