"""Multi-process training on CPU (torchrun + gloo + FSDP2), checkpoints across world sizes, stability,
activation checkpointing, preemption and the learning-rate schedules."""
import json
import math
import signal
import subprocess
import sys
import time

import pytest
import torch

from lm.training import checkpoint
from lm.config.load import load_config
from lm.config.schema import OptimConfig
from lm.training.optim import LRSchedule
from lm.training.trainer import Trainer
from tests.conftest import ROOT, TRAIN_BASE as BASE, losses, train

@pytest.mark.slow
def test_two_process_fsdp_matches_one_process_and_resumes_on_one(char_dataset, tmp_path):
    common = [f"data.dir={char_dataset}", "train.eval_interval=3"]
    train(*common, f"train.out_dir={tmp_path / 'single'}", "train.batch_size=4", "train.max_steps=6")
    # 2 ranks x 2 sequences read the same global samples as 1 rank x 4
    train(*common, f"train.out_dir={tmp_path / 'fsdp'}", "train.batch_size=2", "train.max_steps=3", nproc=2)
    single, fsdp = losses(tmp_path / "single"), losses(tmp_path / "fsdp")
    assert sorted(fsdp) == [1, 2, 3]
    for step in fsdp:
        assert fsdp[step] == pytest.approx(single[step], rel=1e-5)
    info = json.loads((checkpoint.resolve(tmp_path / "fsdp") / "checkpoint.json").read_text())
    assert info["world_size"] == 2 and info["samples"] == 12
    # the 2-rank checkpoint resumes in one process on the same stream
    train(*common, f"train.out_dir={tmp_path / 'fsdp'}", "train.batch_size=4", "train.max_steps=6", resume=True)
    resumed = losses(tmp_path / "fsdp")
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(single[step], rel=1e-5)


@pytest.mark.slow
def test_the_speedrun_options_on_two_processes_match_one(char_dataset, tmp_path):
    """ReLU², zero-initialized projections, an untied head (its own sharded matrix), Muon and WSD: FSDP's
    shards compute what one process does."""
    common = [f"data.dir={char_dataset}", "train.eval_interval=3", "model.mlp=relu2", "model.zero_init=true",
              "model.tie_embeddings=false", "optim.name=muon", "optim.schedule=wsd", "optim.lr=3e-3"]
    train(*common, f"train.out_dir={tmp_path / 'single'}", "train.batch_size=4", "train.max_steps=4")
    train(*common, f"train.out_dir={tmp_path / 'fsdp'}", "train.batch_size=2", "train.max_steps=4", nproc=2)
    single, fsdp = losses(tmp_path / "single"), losses(tmp_path / "fsdp")
    assert sorted(fsdp) == [1, 2, 3, 4]
    assert len(set(single.values())) == 4  # it learns: a zero-initialized model that stayed put would match too
    for step in fsdp:
        assert fsdp[step] == pytest.approx(single[step], rel=1e-5)


@pytest.mark.slow
def test_hsdp_two_replicas_match_one_process(char_dataset, tmp_path):
    common = [f"data.dir={char_dataset}", "train.eval_interval=3", "train.max_steps=3"]
    train(*common, f"train.out_dir={tmp_path / 'single'}", "train.batch_size=4")
    train(*common, f"train.out_dir={tmp_path / 'hsdp'}", "train.batch_size=2", "parallel.replicas=2", nproc=2)
    single, hsdp = losses(tmp_path / "single"), losses(tmp_path / "hsdp")
    assert sorted(hsdp) == [1, 2, 3]
    for step in hsdp:
        assert hsdp[step] == pytest.approx(single[step], rel=1e-5)


def config(char_dataset, out, *extra):
    return load_config(None, [*BASE, f"data.dir={char_dataset}", f"train.out_dir={out}", "train.batch_size=4", *extra])


def test_activation_checkpointing_gives_the_same_losses(char_dataset, tmp_path):
    extra = ["train.max_steps=4", "train.eval_interval=4", "model.dropout=0.1"]
    results = {}
    for mode in ("none", "full", "every"):
        trainer = Trainer(config(char_dataset, tmp_path / mode, *extra, f"parallel.activation_checkpointing={mode}"))
        trainer.run()
        results[mode] = losses(tmp_path / mode)
    assert results["full"] == results["none"] == results["every"]


def test_a_planted_nan_is_skipped_counted_and_never_reaches_the_weights(char_dataset, tmp_path):
    trainer = Trainer(config(char_dataset, tmp_path / "nan", "train.max_steps=6", "train.eval_interval=3"))
    forward = trainer.model.forward

    def poisoned(idx, targets=None, cache=None):
        logits, loss = forward(idx, targets, cache)
        return logits, loss * float("nan") if trainer.step == 3 and trainer.model.training else loss

    trainer.model.forward = poisoned
    before = {}
    original_step = trainer.train_step

    def step_and_watch():
        if trainer.step == 3:
            before.update({k: v.clone() for k, v in trainer.model.state_dict().items()})
            out = original_step()
            assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
            return out
        return original_step()

    trainer.train_step = step_and_watch
    result = trainer.run()
    assert result["skipped"] == 1 and before
    record = [json.loads(l) for l in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in record if "loss" in r] == [0, 0, 0, 1, 1, 1]
    assert math.isfinite(result["train_loss"])


def test_repeated_nans_roll_back_to_the_last_checkpoint(char_dataset, tmp_path):
    trainer = Trainer(config(char_dataset, tmp_path / "rb", "train.max_steps=8", "train.eval_interval=2",
                             "stability.rollback_after=2", "stability.rollback_lr_factor=0.5"))
    forward = trainer.model.forward
    poisoned_steps = {4, 5}

    def poisoned(idx, targets=None, cache=None):
        logits, loss = forward(idx, targets, cache)
        if trainer.model.training and trainer.step in poisoned_steps:
            poisoned_steps.discard(trainer.step)
            return logits, loss * float("nan")
        return logits, loss

    trainer.model.forward = poisoned
    result = trainer.run()
    assert trainer.stability.rollbacks == 1 and result["skipped"] == 2 and result["step"] == 8
    assert trainer.schedule.scale == 0.5


@pytest.mark.slow
def test_sigterm_saves_a_complete_checkpoint_and_exits_0(char_dataset, tmp_path):
    out = tmp_path / "term"
    cmd = [sys.executable, "train.py", "configs/shakespeare_char.toml", *BASE, f"data.dir={char_dataset}",
           f"train.out_dir={out}", "train.batch_size=4", "train.max_steps=100000", "train.eval_interval=100000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and len(losses(out)) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    ckpt = checkpoint.resolve(out)
    step = json.loads((ckpt / "checkpoint.json").read_text())["step"]
    assert step == max(losses(out)) >= 3
    # a save killed midway leaves only a .tmp directory, which --resume ignores
    (ckpt.parent / f"step_{step + 5:08d}.tmp").mkdir()
    assert checkpoint.resolve(out) == ckpt
    r = train(f"data.dir={char_dataset}", f"train.out_dir={out}", "train.batch_size=4", f"train.max_steps={step + 2}",
              "train.eval_interval=100000", resume=True)
    assert f"resumed from {ckpt}" in r.stdout + r.stderr
    assert max(losses(out)) == step + 2


def test_keep_last_and_keep_every(char_dataset, tmp_path):
    Trainer(config(char_dataset, tmp_path / "k", "train.max_steps=10", "train.eval_interval=100",
                   "train.checkpoint_interval=1", "train.keep_checkpoints=2", "train.keep_every=4")).run()
    assert [p.name for p in checkpoint.checkpoints(tmp_path / "k")] == \
        ["step_00000004", "step_00000008", "step_00000009", "step_00000010"]


def test_learning_rate_schedules():
    def lrs(**kw):
        schedule = LRSchedule(OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, **kw), max_steps=110)
        return schedule, [schedule(s) for s in range(110)]

    _, cos = lrs(schedule="cosine")
    assert cos[9] == pytest.approx(10 / 11) and cos[10] == pytest.approx(1.0) and cos[-1] == pytest.approx(0.1, abs=1e-3)
    _, lin = lrs(schedule="linear")
    assert lin[60] == pytest.approx(1.0 - 0.5 * 0.9)
    _, wsd = lrs(schedule="wsd", wsd_decay_fraction=0.2)
    assert wsd[10:90] == [1.0] * 80 and wsd[100] == pytest.approx(1.0 - 0.5 * 0.9) and wsd[-1] < 0.15
    _, step = lrs(schedule="step", step_every=25, step_gamma=0.5)
    assert (step[34], step[35], step[60]) == (1.0, 0.5, 0.25)
    _, rewarm = lrs(schedule="cosine", rewarm_at=50)
    assert rewarm[49] < 1.0 and rewarm[50] == pytest.approx(1 / 11) and rewarm[60] == pytest.approx(1.0)
    plateau, _ = lrs(schedule="plateau", plateau_patience=2, plateau_factor=0.5)
    for loss in (3.0, 2.0, 2.5, 2.1):
        plateau.observe_val_loss(loss)
    assert plateau(50) == 0.5
