"""Trust for the trainer's own surfaces (issue "Trust for every command"): a read-only or failing run
directory, the closing line, a finished run resumed, non-finite settings, prompt/completion edge cases
and classification with many classes. Each case ends in one line or does the right thing."""
import errno
import json
import time

import numpy as np
import pytest

from data_prep import DataError
from lm.training import checkpoint
from lm.objectives.classification import PER_CLASS_LIMIT, classification_metrics, prediction_metrics
from lm.config.load import load_config
from lm.config.schema import ConfigError
from lm.objectives.sft_data import fit, pack, prepare_sft, read_examples
from lm.training.trainer import Trainer
from tests.conftest import ROOT, assert_user_error, run_cli
from tests.test_train import overrides
from train import done_line

EOS = 29


# ---- the run directory ------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_run_directory_that_cannot_be_written_is_one_line(char_dataset, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(checkpoint.CheckpointError, match=r"train.out_dir = .*file/run: cannot write there"):
        Trainer(load_config(None, overrides(char_dataset, blocker / "run")))
    r = run_cli("train.py", ROOT / "configs" / "shakespeare_char.toml",
                *overrides(char_dataset, blocker / "run", "train.max_steps=2"))
    assert_user_error(r, "cannot write there")


def test_metrics_that_cannot_be_written_mid_run_warn_once_and_the_run_goes_on(char_dataset, tmp_path, monkeypatch):
    import lm.training.metrics

    trainer = Trainer(load_config(None, overrides(char_dataset, tmp_path / "r", "train.max_steps=4")))
    real_open, calls = open, []

    def read_only(path, mode="r", *args, **kwargs):
        if "a" in mode:
            calls.append(path)
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(lm.training.metrics, "open", read_only, raising=False)
    result = trainer.run()
    trainer.close()
    assert result["step"] == 4 and len(calls) == 1  # tried once, then left alone


def test_the_closing_line_says_when_validation_was_measured():
    base = {"step": 42, "val_loss": 9.040821170806884, "val_bpb": 1.23456789, "skipped": 0}
    assert done_line({**base, "val_step": 42}) == "done: step 42, val loss 9.0408, val bits/byte 1.2346, skipped steps 0"
    assert "val loss 9.0408 (at step 0)" in done_line({**base, "val_step": 0})
    assert "bits/byte" not in done_line({**base, "val_step": 42, "val_bpb": None})  # classification


@pytest.mark.slow
def test_resuming_a_finished_run_says_so_and_trains_nothing(char_dataset, tmp_path):
    args = overrides(char_dataset, tmp_path / "r", "train.max_steps=2", "train.eval_interval=2")
    config = ROOT / "configs" / "shakespeare_char.toml"
    assert run_cli("train.py", config, *args).returncode == 0
    r = run_cli("train.py", config, *args, "--resume")
    assert r.returncode == 0 and "is finished" in r.stdout and "model:" not in r.stdout + r.stderr


# ---- numbers -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("setting", ["classify.class_weights=[inf, 1.0, 1.0]", "distill.temperature=inf",
                                     "optim.lr=nan", "sft.val_fraction=-0.5", "sft.val_fraction=1.0"])
def test_settings_that_cannot_train_are_refused(setting):
    key = setting.split("=")[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [setting])


def test_drop_augmentation_is_refused_with_prompt_completion_packing():
    from lm.objectives import objective_class

    cfg = load_config(None, ['data.augment=["drop:0.1"]', "sft.train_file=x.jsonl"])
    with pytest.raises(ConfigError, match="data.augment 'drop' cannot be combined with sft.train_file"):
        objective_class(cfg).check_combinations(cfg)


# ---- prompt/completion ---------------------------------------------------------------------------
def test_a_completion_that_fills_the_window_keeps_its_beginning_and_one_prompt_token():
    assert pack([([1, 2, 3], list(range(10, 16)))], 4, 0).tolist() == [[-4, 10, 11, 12, 13]]
    assert pack([(list(range(1, 9)), list(range(10, 16)))], 4, 0).tolist() == [[-9, 10, 11, 12, 13]]
    ids, cut = fit([1, 2, 3], [10, 11, 12], 5, 0)  # just fits with its EOS
    assert ids == [-4, 10, 11, 12, 0] and not cut


def _sft_files(tmp_path, examples):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    return path


class _Chars:
    def encode(self, text):
        return [ord(c) % 28 for c in text]

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


def test_one_example_with_a_validation_fraction_is_one_line(tmp_path):
    path = _sft_files(tmp_path, [{"prompt": "a", "completion": "b"}])
    cfg = load_config(None, [f"sft.train_file={path}", "model.block_size=16"])
    with pytest.raises(DataError, match="1 example.*holds out all of them"):
        prepare_sft(cfg, _Chars(), EOS)


def test_an_empty_assistant_turn_is_refused(tmp_path):
    path = _sft_files(tmp_path, [{"messages": [{"role": "user", "content": "hi"},
                                               {"role": "assistant", "content": ""}]}])
    with pytest.raises(DataError, match="line 1: .*non-empty assistant turn"):
        read_examples(path, "prompt", "completion", "messages")


def test_a_cut_completion_is_noted_and_validation_scores_each_example_once(tmp_path):
    long = {"prompt": "p", "completion": "x" * 40}
    path = _sft_files(tmp_path, [{"prompt": "pp", "completion": "abc"}] * 6 + [long])
    (tmp_path / "v").mkdir()
    val = _sft_files(tmp_path / "v", [{"prompt": "q", "completion": "de"}] * 3)
    cfg = load_config(None, [f"sft.train_file={path}", f"sft.val_file={val}", "model.block_size=16"])
    notes = []
    _, val_set = prepare_sft(cfg, _Chars(), EOS, note=notes.append)
    assert len(notes) == 1 and "1 of 7 training completions" in notes[0]
    assert val_set.sequences == 1  # three 4-token examples packed in one row, read once
    assert val_set.bytes_per_token == pytest.approx(6 / 9)  # "de" x3 bytes over 3 x (2 + EOS) targets


# ---- classification with many classes ------------------------------------------------------------
def test_many_classes_are_scored_without_a_classes_squared_matrix():
    rng = np.random.default_rng(0)
    labels = [f"c{i}" for i in range(10_000)]
    truth, predicted = rng.integers(0, 10_000, 10_000), rng.integers(0, 10_000, 10_000)
    predicted[:5000] = truth[:5000]
    start = time.perf_counter()
    metrics = prediction_metrics(truth, predicted, labels)
    assert time.perf_counter() - start < 5  # a C x C bincount per batch took hours
    assert metrics["val/accuracy"] == pytest.approx(np.mean(truth == predicted))
    assert "val/confusion" not in metrics and len(metrics) == 2


def test_few_classes_keep_the_confusion_matrix_and_per_class_metrics():
    truth, predicted = np.array([0, 0, 1, 2, 2]), np.array([0, 1, 1, 2, 0])
    confusion = np.zeros((3, 3), dtype=np.int64)
    np.add.at(confusion, (truth, predicted), 1)
    assert prediction_metrics(truth, predicted, ["a", "b", "c"]) == classification_metrics(confusion, ["a", "b", "c"])
    assert PER_CLASS_LIMIT >= 3
