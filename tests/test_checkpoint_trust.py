"""Checkpoints a user can trust (issue 11): loading one runs no pickled code; a damaged file ends in one
`error: ...` line naming it (exit 2) and loses nothing on disk; a checkpoint is listed only when it is
complete, and `--resume` refuses a damaged newest one unless told to fall back to the last good one."""
import errno
import io
import json
import os
import pickle
import shutil
import zlib
from pathlib import Path

import pytest
import torch

import sample
import train
from lm.training import checkpoint, checkpoint_files, checkpoint_save
from lm import export
from lm.training.checkpoint import CheckpointError
from lm.config.load import load_config
from lm.config.schema import ConfigError
from lm.model.gpt import GPT
from lm.training.trainer import Trainer
from tests import conftest

TINY = [*conftest.TINY, "optim.warmup_steps=3", "train.eval_interval=2", "train.keep_checkpoints=2"]
NEWEST, OLDER = "step_00000004", "step_00000002"
CONFIG = "configs/shakespeare_char.toml"  # what train.py reads; a checkpoint of another shape is refused


def overrides(char_dataset, run, *extra):
    return [*TINY, f"data.dir={char_dataset}", f"train.out_dir={run}", *extra]


@pytest.fixture(scope="module")
def trained(char_dataset, tmp_path_factory):
    """One tiny run, trained once: checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("trust_run") / "run"
    Trainer(load_config(CONFIG, overrides(char_dataset, run, "train.max_steps=4"))).run()
    return run


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A copy of the trained run for one test to damage."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


def snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def reseal(ckpt: Path):
    """Make checkpoint.json's record of the files match them again, as an attacker (or a writer with a bug)
    can: the checks under test must hold without trusting that record."""
    path = ckpt / "checkpoint.json"
    info = json.loads(path.read_text())
    if "files" in info:
        info["files"] = {p.name: {"size": p.stat().st_size, "crc32": f"{zlib.crc32(p.read_bytes()):08x}"}
                         for p in sorted(ckpt.iterdir()) if p.is_file() and p.name != "checkpoint.json"}
    path.write_text(json.dumps(info))


def train_main(capsys, char_dataset, run, *extra) -> tuple[int, str]:
    """train.py in this process (the same code path as the command, without a fresh interpreter)."""
    code = train.main([CONFIG, *overrides(char_dataset, run, *extra)])
    return code, capsys.readouterr().err


def assert_one_line_error(code, stderr, *fragments):
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), stderr
    for fragment in fragments:
        assert fragment in line, line


# ---- 1. no code runs from a checkpoint --------------------------------------------------------------
def _str(text: str) -> bytes:
    raw = text.encode()
    return pickle.SHORT_BINUNICODE + bytes([len(raw)]) + raw


def _global(module: str, name: str) -> bytes:  # protocol 4: a dotted name resolves through attributes
    return _str(module) + _str(name) + pickle.STACK_GLOBAL


def _call(func: bytes, *args: bytes) -> bytes:
    return func + pickle.MARK + b"".join(args) + pickle.TUPLE + pickle.REDUCE


def _pickle4(body: bytes) -> bytes:
    return pickle.PROTO + b"\x04" + body + pickle.STOP


class _Touch:
    """Unpickled with code allowed, creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(ckpt: Path, payload: str, marker: Path):
    """Replace the checkpoint's .metadata by a pickle that creates `marker` if anything runs it."""
    touch, create = _str(f"touch {marker}"), _str(f"open({str(marker)!r}, 'w').close()")

    def system_via(module):  # a dotted name through a DCP module that imports os
        return _call(_global(module, "os.system"), touch)

    if payload == "function GLOBAL":  # protocol 2 GLOBAL of a DCP function that torch.load()s with code
        torch.save({"x": _Touch(marker)}, ckpt / "evil.pt")
        body = (b"\x80\x02ctorch.distributed.checkpoint.format_utils\ntorch_save_to_dcp\n" + pickle.MARK
                + _str(str(ckpt / "evil.pt")) + _str(str(ckpt / "evil_out")) + pickle.TUPLE + pickle.REDUCE)
        data = body + pickle.STOP
    else:
        data = _pickle4({
            "filesystem os.system": system_via("torch.distributed.checkpoint.filesystem"),
            "metadata os.system": system_via("torch.distributed.checkpoint.metadata"),
            "builtins eval": _call(_global("builtins", "eval"), create),
            "builtins exec": _call(_global("builtins", "exec"), create),
            "posix system": _call(_global("posix", "system"), touch),
            "nested REDUCE": _call(_global("torch.distributed.checkpoint.metadata", "Metadata"),
                                   system_via("torch.distributed.checkpoint.filesystem")),
        }[payload])
    (ckpt / ".metadata").write_bytes(data)
    reseal(ckpt)


PAYLOADS = ["filesystem os.system", "metadata os.system", "builtins eval", "builtins exec", "posix system",
            "nested REDUCE", "function GLOBAL"]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_crafted_metadata_runs_nothing(run, tmp_path, payload):
    ckpt, marker = run / "ckpt" / NEWEST, tmp_path / "pwned"
    plant(ckpt, payload, marker)
    with pytest.raises(CheckpointError, match=r"\.metadata"):
        checkpoint.load_model(ckpt, GPT(checkpoint.load_config(ckpt).model))
    assert not marker.exists()


@pytest.mark.slow
def test_crafted_metadata_through_resume_and_sample_runs_nothing(cli, char_dataset, run, tmp_path):
    marker = tmp_path / "pwned"
    plant(run / "ckpt" / NEWEST, "filesystem os.system", marker)
    before = snapshot(run / "ckpt")
    r = cli("train.py", CONFIG, *overrides(char_dataset, run, "train.max_steps=6"), "--resume")
    assert_one_line_error(r.returncode, r.stderr, ".metadata")
    s = cli("sample.py", run, "--max-new-tokens", "5")
    assert_one_line_error(s.returncode, s.stderr, ".metadata")
    assert not marker.exists()
    assert snapshot(run / "ckpt") == before


def test_a_bytes_entry_is_never_unpickled_with_code(run, tmp_path):
    """DCP loads a BytesStorageMetadata entry with torch.load(weights_only=False): metadata made only of
    allowed classes could still point a tensor's key at a pickle that runs code."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    ckpt, marker = run / "ckpt" / NEWEST, tmp_path / "pwned"
    metadata = pickle.loads((ckpt / ".metadata").read_bytes())  # our own fixture's file
    buffer = io.BytesIO()
    torch.save(_Touch(marker), buffer)
    (ckpt / "__0_1.distcp").write_bytes(buffer.getvalue())
    key = "model.transformer.wte.weight"
    metadata.state_dict_metadata[key] = BytesStorageMetadata()
    metadata.storage_data[MetadataIndex(key)] = _StorageInfo("__0_1.distcp", 0, len(buffer.getvalue()))
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
    reseal(ckpt)
    with pytest.raises(CheckpointError, match=str(ckpt)):
        checkpoint.load_model(ckpt, GPT(checkpoint.load_config(ckpt).model))
    assert not marker.exists()


def test_storage_paths_outside_the_checkpoint_are_refused(run):
    ckpt = run / "ckpt" / NEWEST
    metadata = pickle.loads((ckpt / ".metadata").read_bytes())
    for info in metadata.storage_data.values():
        info.relative_path = f"../{OLDER}/{info.relative_path}"
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
    reseal(ckpt)
    with pytest.raises(CheckpointError, match=f"{OLDER}/__0_0.distcp"):
        checkpoint.load_model(ckpt, GPT(checkpoint.load_config(ckpt).model))


def test_an_allowed_name_that_is_not_a_class_is_still_refused(run, monkeypatch):
    """Only classes (and the dtypes and layout helper named one by one) come out of the unpickler, even
    if a function were listed by mistake."""
    monkeypatch.setitem(checkpoint_files._METADATA_CLASSES, ("posix", "system"), os.system)
    ckpt = run / "ckpt" / NEWEST
    (ckpt / ".metadata").write_bytes(_pickle4(_call(_global("posix", "system"), _str("true"))))
    reseal(ckpt)
    with pytest.raises(CheckpointError, match="posix.system"):
        checkpoint.load_model(ckpt, GPT(checkpoint.load_config(ckpt).model))


# ---- 2. damaged files: one line naming the file, exit 2, nothing lost -------------------------------
def _truncate(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _scramble(path: Path):
    path.write_bytes(os.urandom(path.stat().st_size))


def _edit_info(change):
    def edit(ckpt: Path):
        path = ckpt / "checkpoint.json"
        info = json.loads(path.read_text())
        change(info)
        path.write_text(json.dumps(info))
    return edit


def _wrong_rng(ckpt: Path):
    torch.save({"cpu": "not a ByteTensor"}, ckpt / "rng_rank0.pt")
    reseal(ckpt)


def _not_toml(ckpt: Path):
    (ckpt / "config.toml").write_text("[model\nn_embd = ")
    reseal(ckpt)


DAMAGE = {  # name: (damage, the file the error line must name)
    "truncated shard": (lambda c: _truncate(c / "__0_0.distcp"), "__0_0.distcp"),
    "random shard": (lambda c: _scramble(c / "__0_0.distcp"), "__0_0.distcp"),
    "truncated metadata": (lambda c: _truncate(c / ".metadata"), ".metadata"),
    "random metadata": (lambda c: _scramble(c / ".metadata"), ".metadata"),
    "garbage rng": (lambda c: _scramble(c / "rng_rank0.pt"), "rng_rank0.pt"),
    "wrong-typed rng": (_wrong_rng, "rng_rank0.pt"),
    "checkpoint.json not JSON": (lambda c: (c / "checkpoint.json").write_text("{\"step\": 4,"), "checkpoint.json"),
    "step a string": (_edit_info(lambda i: i.update(step="4")), "'step'"),
    "samples missing": (_edit_info(lambda i: i.pop("samples")), "'samples'"),
    "negative samples": (_edit_info(lambda i: i.update(samples=-1)), "'samples'"),
    "schedule not a table": (_edit_info(lambda i: i.update(schedule=[1, 2])), "'schedule'"),
    "config.toml not TOML": (_not_toml, "config.toml"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_resume_from_a_damaged_file_is_one_line(capsys, char_dataset, run, damage):
    ckpt = run / "ckpt" / NEWEST
    change, named = DAMAGE[damage]
    change(ckpt)
    before = snapshot(run / "ckpt")
    code, err = train_main(capsys, char_dataset, run, "train.max_steps=6", "--resume")
    assert_one_line_error(code, err, named)
    assert snapshot(run / "ckpt") == before


@pytest.mark.parametrize("damage", ["truncated shard", "random shard", "random metadata", "config.toml not TOML"])
def test_sample_from_a_damaged_file_is_one_line(capsys, run, damage):
    ckpt = run / "ckpt" / NEWEST
    change, named = DAMAGE[damage]
    change(ckpt)
    code = sample.main([str(ckpt), "--max-new-tokens", "3"])
    assert_one_line_error(code, capsys.readouterr().err, named)


def _absurd_shape(ckpt: Path):
    path = ckpt / "config.toml"
    path.write_text(path.read_text().replace("n_embd = 32", f"n_embd = {2 ** 30}"))
    reseal(ckpt)


@pytest.mark.parametrize("damage", ["config.toml not TOML", "absurd shape"])
@pytest.mark.parametrize("command", ["sample", "export"])
def test_a_damaged_config_is_refused_before_building_the_model(capsys, run, tmp_path, damage, command):
    ckpt = run / "ckpt" / NEWEST
    (_absurd_shape if damage == "absurd shape" else _not_toml)(ckpt)
    if command == "sample":
        code = sample.main([str(ckpt), "--max-new-tokens", "3"])
    else:
        code = export.main([str(ckpt), str(tmp_path / "out"), "--format", "safetensors"])
    assert_one_line_error(code, capsys.readouterr().err, "config.toml",
                          *(["model.n_embd = 1073741824"] if damage == "absurd shape" else []))


@pytest.mark.parametrize("shape, key", [
    (["model.n_embd=1073741824"], "model.n_embd = 1073741824"),
    (["model.n_layer=100000000", "model.n_embd=1024", "model.n_head=16"], "model.n_layer = 100000000"),
    (["model.vocab_size=1000000000000", "model.n_embd=1024", "model.n_head=16"], "model.vocab_size = 1000000000000"),
])
def test_an_absurd_model_shape_is_a_config_error(shape, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, ["model.n_head=2", *shape])
    load_config("configs/gpt-10b.toml")  # the largest preset stays well inside


def _model_and_optimizer(ckpt: Path):
    model = GPT(checkpoint.load_config(ckpt).model)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    optimizer.step()
    return model, optimizer


def save_step(run: Path, step: int):
    ckpt = run / "ckpt" / OLDER
    model, optimizer = _model_and_optimizer(ckpt)
    cfg = checkpoint.load_config(ckpt)
    info = {k: v for k, v in checkpoint.load_info(ckpt).items() if k not in ("step", "files")}
    return checkpoint_save.save(run, step, model, optimizer, info, cfg, ckpt / "chars.json", keep_last=2)


class _FullDisk:
    """A file on a full disk: it opens, and every write fails."""

    def __init__(self, file):
        self.file = file

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.file.name)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def _fill_disk_at(monkeypatch, name: str):
    """Writing the file called `name` fails with ENOSPC (torch reports that as "unexpected pos")."""
    real = io.open

    def fake(file, mode="r", *args, **kwargs):
        opened = real(file, mode, *args, **kwargs)
        return _FullDisk(opened) if Path(str(file)).name == name and "w" in mode else opened

    monkeypatch.setattr(io, "open", fake)
    monkeypatch.setattr("builtins.open", fake)


@pytest.mark.parametrize("step", [6, 4], ids=["new step", "re-save of the newest"])
@pytest.mark.parametrize("name", ["__0_0.distcp", ".metadata.tmp", "rng_rank0.pt", "checkpoint.json"])
def test_disk_full_during_a_save_says_so_and_keeps_what_was_there(run, monkeypatch, name, step):
    before = snapshot(run / "ckpt")
    _fill_disk_at(monkeypatch, name)
    with pytest.raises(CheckpointError, match=f"{run / 'ckpt'}: disk full"):
        save_step(run, step)
    monkeypatch.undo()
    assert snapshot(run / "ckpt") == before  # the old checkpoints, byte for byte, and no partial .tmp
    assert [p.name for p in checkpoint.checkpoints(run)] == [OLDER, NEWEST]


def test_export_that_cannot_write_is_one_line(capsys, run, tmp_path, monkeypatch):
    (tmp_path / "taken").write_text("a file, not a directory")
    code = export.main([str(run), str(tmp_path / "taken"), "--format", "safetensors"])
    assert_one_line_error(code, capsys.readouterr().err, str(tmp_path / "taken"), "not a directory")
    _fill_disk_at(monkeypatch, "config.toml")
    code = export.main([str(run), str(tmp_path / "out"), "--format", "safetensors"])
    assert_one_line_error(code, capsys.readouterr().err, str(tmp_path / "out"), os.strerror(errno.ENOSPC))


def test_a_read_only_checkpoint_directory_is_one_line(run, monkeypatch):
    """Tests run as root, whom chmod does not stop: the refusal a read-only directory gives is simulated."""
    before = snapshot(run / "ckpt")
    real = os.mkdir

    def mkdir(path, *args, **kwargs):
        if str(path).startswith(str(run)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    with pytest.raises(CheckpointError, match=f"{run / 'ckpt'}.*(permission|read-only)"):
        save_step(run, 6)
    monkeypatch.undo()
    assert snapshot(run / "ckpt") == before


# ---- 3. complete or not listed ----------------------------------------------------------------------
def _remove(*names):
    return lambda ckpt: [(ckpt / n).unlink() for n in names]


INCOMPLETE = {  # a kill while pruning or saving, or damage after the fact
    "shards and metadata gone": _remove("__0_0.distcp", ".metadata"),
    "shard gone": _remove("__0_0.distcp"),
    "shard truncated": lambda ckpt: _truncate(ckpt / "__0_0.distcp"),
    "rng gone": _remove("rng_rank0.pt"),
}


@pytest.mark.parametrize("damage", INCOMPLETE)
def test_only_complete_checkpoints_are_listed(run, damage):
    INCOMPLETE[damage](run / "ckpt" / NEWEST)
    assert [p.name for p in checkpoint.checkpoints(run)] == [OLDER]


def test_find_resumable_refuses_a_damaged_newest_unless_told_to_use_the_last_good(run, tmp_path):
    assert checkpoint.find_resumable(run).name == NEWEST
    assert checkpoint.find_resumable(tmp_path / "fresh") is None
    INCOMPLETE["shard gone"](run / "ckpt" / NEWEST)
    with pytest.raises(CheckpointError, match=f"{NEWEST}.*{OLDER}.*--resume-from-last-good"):
        checkpoint.find_resumable(run)
    assert checkpoint.find_resumable(run, last_good=True).name == OLDER
    with pytest.raises(CheckpointError, match=f"{NEWEST}.*{OLDER}"):
        checkpoint.resolve(run)


def test_old_checkpoints_without_a_file_record_still_load(run):
    """Written before the record existed: complete when .metadata, checkpoint.json and every file the
    metadata names are there."""
    for ckpt in checkpoint.checkpoints(run):
        _edit_info(lambda info: info.pop("files", None))(ckpt)
    assert [p.name for p in checkpoint.checkpoints(run)] == [OLDER, NEWEST]
    checkpoint.load_model(checkpoint.resolve(run), GPT(checkpoint.load_config(run / "ckpt" / NEWEST).model))
    _remove("__0_0.distcp")(run / "ckpt" / NEWEST)
    assert [p.name for p in checkpoint.checkpoints(run)] == [OLDER]


def test_a_damaged_newest_checkpoint_is_refused_by_resume_and_sample(cli, capsys, char_dataset, run):
    INCOMPLETE["shards and metadata gone"](run / "ckpt" / NEWEST)  # checkpoint.json alone: a killed prune
    before = snapshot(run / "ckpt")
    r = cli("train.py", CONFIG, *overrides(char_dataset, run, "train.max_steps=6"), "--resume")
    assert_one_line_error(r.returncode, r.stderr, NEWEST, OLDER, "--resume-from-last-good")
    code = sample.main([str(run), "--max-new-tokens", "3"])
    assert_one_line_error(code, capsys.readouterr().err, NEWEST, OLDER)
    assert snapshot(run / "ckpt") == before


def test_resume_from_last_good_says_what_it_skipped_and_saves_whole(capsys, char_dataset, run):
    INCOMPLETE["shards and metadata gone"](run / "ckpt" / NEWEST)
    code = train.main([CONFIG, *overrides(char_dataset, run, "train.max_steps=6"), "--resume-from-last-good"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert NEWEST in out.out + out.err and OLDER in out.out + out.err  # which was skipped, which resumed
    assert [p.name for p in checkpoint.checkpoints(run)] == [NEWEST, "step_00000006"]  # step 4 re-saved whole


def test_a_re_save_keeps_the_old_checkpoint_until_the_new_one_is_in_place(run, monkeypatch):
    before = snapshot(run / "ckpt" / NEWEST)
    real = {"rename": os.rename, "replace": os.replace}

    def failing(kind):
        def move(src, dst, *args, **kwargs):  # moving the finished .tmp into place fails
            if str(src).endswith(".tmp"):
                raise OSError(errno.EIO, os.strerror(errno.EIO), str(src))
            return real[kind](src, dst, *args, **kwargs)
        return move

    for kind in real:
        monkeypatch.setattr(os, kind, failing(kind))
    with pytest.raises(CheckpointError):
        save_step(run, 4)
    monkeypatch.undo()
    assert snapshot(run / "ckpt" / NEWEST) == before
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == [OLDER, NEWEST]


def test_leftovers_of_a_killed_save_are_cleaned_at_the_next_save(run):
    root = run / "ckpt"
    (root / "step_00000005.tmp").mkdir()
    (root / "step_00000005.tmp" / "__0_0.distcp").write_bytes(b"partial")
    os.rename(root / NEWEST, root / f"{NEWEST}.old")  # killed between moving the old aside and the new in
    before = snapshot(root / f"{NEWEST}.old")
    save_step(run, 6)
    assert sorted(p.name for p in root.iterdir()) == [NEWEST, "step_00000006"]
    assert snapshot(root / NEWEST) == before


def test_a_save_is_durable_before_it_is_listed(run, monkeypatch):
    """Every file, the .tmp directory, and the checkpoint directory after the rename are fsynced;
    checkpoint.json, the completion record, is the last file synced."""
    synced, real = [], os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    final = save_step(run, 6)
    tmp = f"{final}.tmp"
    files = [p for p in synced if Path(p).parent == Path(tmp)]
    assert {Path(p).name for p in files} >= {"config.toml", "chars.json", "rng_rank0.pt", "checkpoint.json"}
    assert Path(files[-1]).name == "checkpoint.json"
    assert tmp in synced and synced.index(tmp) > synced.index(files[-1])
    assert str(run / "ckpt") in synced[synced.index(tmp):]
