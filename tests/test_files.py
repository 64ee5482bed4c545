"""lm.files: every reader turns malformed content into one line naming the file; every writer leaves
either the complete output or nothing, and never overwrites unless asked."""
import json
import pickle

import pytest
import torch

from data_prep import DataError
from lm import files


def test_read_json_names_the_file_and_what_is_wrong(tmp_path):
    p = tmp_path / "m.json"
    with pytest.raises(DataError, match="m.json: missing"):
        files.read_json(p)
    p.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        files.read_json(p)
    p.write_text("[1]")
    with pytest.raises(DataError, match="expected a JSON object, found a JSON list"):
        files.read_json(p)
    p.write_bytes(b"\xff\xfe")
    with pytest.raises(DataError, match="not UTF-8"):
        files.read_json(p)


def test_field_checks_presence_type_finiteness_and_range(tmp_path):
    rec = {"n": 3, "b": True, "x": float("inf"), "s": "a"}
    assert files.field(rec, "n", "f") == 3
    with pytest.raises(DataError, match="'missing' is missing"):
        files.field(rec, "missing", "f")
    assert files.field(rec, "missing", "f", default=7) == 7
    with pytest.raises(DataError, match="expected an integer"):
        files.field(rec, "b", "f")  # bool is not a number
    with pytest.raises(DataError, match="must be finite"):
        files.field(rec, "x", "f", types=(float,))
    with pytest.raises(DataError, match="must be positive"):
        files.field(rec, "n", "f", check=(lambda v: v > 5, "must be positive"))


def _save(tmp_path, tensors, name="w.safetensors"):
    with files.output_dir(tmp_path / "out") as out:
        files.save_safetensors(tensors, out / name, {"format": "pt"})
    return tmp_path / "out" / name


def test_safetensors_reader_refuses_pickles_truncation_and_nonfinite(tmp_path):
    path = _save(tmp_path, {"a": torch.ones(4, 4), "b": torch.zeros(3, dtype=torch.int8)})
    tensors, meta = files.read_safetensors(path)
    assert meta == {"format": "pt"} and tensors["a"].shape == (4, 4)
    bad = tmp_path / "pickle.safetensors"
    bad.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(DataError, match="not a safetensors file"):
        files.read_safetensors(bad)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated"):
        files.read_safetensors(cut)
    nan = _save(tmp_path / "n", {"a": torch.tensor([1.0, float("nan")])})
    with pytest.raises(DataError, match="NaN or infinite"):
        files.read_safetensors(nan)
    with pytest.raises(DataError, match="'c' is missing"):
        files.expect_tensor(tensors, "c", path)
    with pytest.raises(DataError, match=r"shape \(4, 4\), expected \(2, 2\)"):
        files.expect_tensor(tensors, "a", path, shape=(2, 2))
    with pytest.raises(DataError, match="is int8, expected float32"):
        files.expect_tensor(tensors, "b", path, dtypes=(torch.float32,))


def test_output_dir_leaves_nothing_on_failure_and_refuses_existing(tmp_path):
    dest = tmp_path / "export"
    with pytest.raises(RuntimeError):
        with files.output_dir(dest) as out:
            (out / "config.json").write_text("{}")
            raise RuntimeError("disk full halfway")
    assert not dest.exists() and list(tmp_path.iterdir()) == []
    with files.output_dir(dest) as out:
        (out / "a").write_text("1")
    assert (dest / "a").read_text() == "1"
    with pytest.raises(DataError, match="already exists"):
        with files.output_dir(dest):
            pass
    with files.output_dir(dest, force=True) as out:
        (out / "b").write_text("2")
    assert sorted(p.name for p in dest.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_write_file_refuses_an_existing_file_unless_forced(tmp_path):
    p = tmp_path / "results.json"
    p.write_text("precious")
    with pytest.raises(DataError, match="already exists"):
        files.write_file(p, "{}")
    assert p.read_text() == "precious"
    files.write_file(p, json.dumps({"a": 1}), force=True)
    assert json.loads(p.read_text()) == {"a": 1}


def test_a_full_disk_ends_in_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import errno
    import os

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(DataError, match="cannot write .No space left on device"):
        files.write_file(tmp_path / "x.json", "{}")
    with pytest.raises(DataError, match="cannot write .No space left on device"):
        with files.output_dir(tmp_path / "out") as out:
            (out / "model.safetensors").write_bytes(b"123")
    assert list(tmp_path.iterdir()) == []
