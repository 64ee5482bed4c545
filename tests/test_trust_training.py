"""The trainer under stress: preemption on many ranks, rollbacks (across freezing phases, repeated),
continued pretraining under torchrun, and the bookkeeping a resumed or multi-rank run must get right."""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest

from data_prep import prepare
from lm.training import checkpoint
from lm.config.load import load_config
from lm.config.schema import ConfigError
from lm.training.trainer import Trainer
from tests import conftest
from tests.conftest import ROOT

TINY = [*conftest.TINY, "optim.schedule=constant", "optim.warmup_steps=0"]


def config(char_dataset, out, *extra):
    return load_config(ROOT / "configs" / "shakespeare_char.toml", [*TINY, f"data.dir={char_dataset}", f"train.out_dir={out}", "train.batch_size=4", *extra])


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def poison(trainer, steps: list[int]):
    """Make the training loss NaN at each listed step (a step listed twice is poisoned twice)."""
    forward, pending = trainer.model.forward, list(steps)

    def poisoned(idx, targets=None, cache=None):
        logits, loss = forward(idx, targets, cache)
        if trainer.model.training and trainer.step in pending:
            pending.remove(trainer.step)
            return logits, loss * float("nan")
        return logits, loss

    trainer.model.forward = poisoned


# ---- rollbacks --------------------------------------------------------------------------------------
def test_rollback_across_a_phase_that_unfroze_layers(char_dataset, tmp_path):
    # block 0 and the embeddings frozen for steps 0-3 (no optimizer state in the step-4 checkpoint), trained
    # from step 4 (state made), then two NaN steps roll back to step 4: the state made since must go
    trainer = Trainer(config(char_dataset, tmp_path / "r", "train.max_steps=8", "train.eval_interval=100",
                             "train.checkpoint_interval=4", 'continual.freeze=["0:1", "4:0"]',
                             "stability.rollback_after=2"))
    poison(trainer, [5, 6])
    result = trainer.run()
    assert trainer.stability.rollbacks == 1 and result["step"] == 8 and result["skipped"] == 2


def test_rollback_lr_factor_compounds(char_dataset, tmp_path):
    trainer = Trainer(config(char_dataset, tmp_path / "c", "train.max_steps=6", "train.eval_interval=2",
                             "stability.rollback_after=1", "stability.rollback_lr_factor=0.5"))
    poison(trainer, [3, 3])  # two rollbacks to the step-2 checkpoint
    trainer.run()
    assert trainer.stability.rollbacks == 2 and trainer.schedule.scale == 0.25


# ---- metrics bookkeeping ----------------------------------------------------------------------------
def test_a_torn_last_metrics_line_does_not_break_resume(char_dataset, tmp_path):
    out = tmp_path / "torn"
    Trainer(config(char_dataset, out, "train.max_steps=4", "train.eval_interval=2")).run(stop_at_step=2)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 2.')  # killed mid-write
    Trainer(config(char_dataset, out, "train.max_steps=4", "train.eval_interval=2"), resume=True).run()
    steps = [r["step"] for r in records(out) if "loss" in r]
    assert steps == [1, 2, 3, 4]


def test_resume_before_the_first_checkpoint_logs_step_0_once(char_dataset, tmp_path):
    out = tmp_path / "zero"
    Trainer(config(char_dataset, out, "train.max_steps=2", "train.eval_interval=2")).run()
    for ckpt in checkpoint.checkpoints(out):  # as if killed before its first checkpoint was written
        import shutil
        shutil.rmtree(ckpt)
    Trainer(config(char_dataset, out, "train.max_steps=2", "train.eval_interval=2"), resume=True).run()
    vals = [r["step"] for r in records(out) if "val_loss" in r]
    assert vals == [0, 2]
    assert [r["step"] for r in records(out) if "loss" in r] == [1, 2]


def test_tokens_per_second_leaves_out_evaluation_and_saving(char_dataset, tmp_path, monkeypatch):
    # a fake clock: each training step takes 1 s, each evaluation 100 s
    clock = [0.0]
    monkeypatch.setattr("lm.training.trainer.time.perf_counter", lambda: clock[0])
    trainer = Trainer(config(char_dataset, tmp_path / "t", "train.max_steps=4", "train.eval_interval=2",
                             "train.checkpoint_interval=100"))
    step, evaluate = trainer.train_step, trainer.evaluator.evaluate

    def timed_step():
        clock[0] += 1.0
        return step()

    def slow_evaluate(model, at):
        clock[0] += 100.0
        return evaluate(model, at)

    trainer.train_step, trainer.evaluator.evaluate = timed_step, slow_evaluate
    trainer.run()
    tokens_per_step = 4 * 32
    assert [r["tokens_per_s"] for r in records(tmp_path / "t") if "loss" in r] == [tokens_per_step] * 4


def test_eval_iters_names_its_replacement(char_dataset, tmp_path):
    with pytest.raises(ConfigError, match="train.eval_sequences"):
        config(char_dataset, tmp_path, "train.eval_iters=2")


# ---- many ranks ----------------------------------------------------------------------------------------
def torchrun(*args, nproc=2, timeout=300):
    """train.py under torchrun with `nproc` workers; nproc=0 runs plain python (no process group)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc else [sys.executable]
    r = subprocess.run([*launcher, "train.py", "configs/shakespeare_char.toml", *TINY, *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_validation_is_the_same_sequences_for_any_world_size(char_dataset, tmp_path):
    common = [f"data.dir={char_dataset}", "train.max_steps=2", "train.eval_interval=2"]
    torchrun(*common, f"train.out_dir={tmp_path / 'one'}", "train.batch_size=4", nproc=0)
    torchrun(*common, f"train.out_dir={tmp_path / 'two'}", "train.batch_size=2", "train.eval_sequences=8")
    # torchrun with one worker takes the FSDP path too (one shard), and matches
    torchrun(*common, f"train.out_dir={tmp_path / 'fsdp1'}", "train.batch_size=4", nproc=1)
    vals = {run: {r["step"]: r["val_loss"] for r in records(tmp_path / run) if "val_loss" in r}
            for run in ("one", "two", "fsdp1")}
    assert vals["one"].keys() == vals["two"].keys() == vals["fsdp1"].keys() == {0, 2}
    for step in vals["one"]:
        assert vals["two"][step] == pytest.approx(vals["one"][step], rel=1e-5)
        assert vals["fsdp1"][step] == pytest.approx(vals["one"][step], rel=1e-5)
    assert checkpoint.load_info(checkpoint.checkpoints(tmp_path / "fsdp1")[-1])["world_size"] == 1


@pytest.fixture(scope="module")
def domains(tiny_corpus, tmp_path_factory):
    """Corpus A (the tiny corpus) and B (its words reversed) with one tokenizer, and a run pretrained on A."""
    root = tmp_path_factory.mktemp("cpt")
    (root / "b_text").mkdir()
    for f in sorted(tiny_corpus.iterdir()):
        (root / "b_text" / f.name).write_text(" ".join(w[::-1] for w in f.read_text().split()) + "\n")
    prepare([str(tiny_corpus)], root / "A", tokenizer="char", show_progress=False)
    prepare([str(root / "b_text")], root / "B", tokenizer_dir=root / "A", show_progress=False)
    Trainer(config(root / "A", root / "pre", "train.max_steps=4", "train.eval_interval=4", "model.bias=true")).run()
    return root


@pytest.mark.slow
def test_continued_pretraining_under_torchrun_equals_one_process(domains, tmp_path):
    """init.from under torchrun, from our checkpoint and from a HF directory, with replay and EWC on."""
    a, b, pre = domains / "A", domains / "B", domains / "pre"
    hf = tmp_path / "hf"
    r = subprocess.run([sys.executable, "-m", "lm.export", str(pre), "--format", "hf", str(hf)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    common = [f'data.sources=["new:0.5:{b}", "replay:0.5:{a}"]', "train.max_steps=3", "train.eval_interval=3",
              "continual.ewc_batches=2", "continual.ewc_lambda=10", "model.dropout=0.0", "model.bias=true"]
    for source in (str(pre), f"hf:{hf}"):
        tag = "hf" if source.startswith("hf:") else "ours"
        torchrun(*common, f"init.from={source}", f"train.out_dir={tmp_path / (tag + '1')}", "train.batch_size=4",
                 nproc=0)
        torchrun(*common, f"init.from={source}", f"train.out_dir={tmp_path / (tag + '2')}", "train.batch_size=2")
        one, two = records(tmp_path / (tag + "1")), records(tmp_path / (tag + "2"))
        assert [r["step"] for r in two if "loss" in r] == [1, 2, 3]
        for ra, rb in zip((r for r in one if "loss" in r or "val_loss" in r),
                          (r for r in two if "loss" in r or "val_loss" in r)):
            for key in ("loss", "val_loss", "val/replay_loss", "ewc_penalty"):
                if key in ra:
                    assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-7), (tag, ra["step"], key)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sigterm_to_one_rank_at_random_moments_always_saves_and_never_hangs(char_dataset, tmp_path):
    """Each trial: two workers (launched directly, so each one's exit code is seen) resume the run; once
    they train, one of them gets SIGTERM after a random delay. Both must exit 0 within the timeout and
    leave a newer complete checkpoint."""
    out, rng = tmp_path / "pre", random.Random(0)
    cmd = [sys.executable, "train.py", "configs/shakespeare_char.toml", *TINY, f"data.dir={char_dataset}",
           f"train.out_dir={out}", "train.batch_size=2", "train.max_steps=1000000", "train.eval_interval=1000000",
           "--resume"]
    last_step = 0
    for trial in range(20):
        # PYTHONFAULTHANDLER: a worker that aborts prints every thread's Python stack
        env = {**os.environ, "PYTHONFAULTHANDLER": "1", "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(_free_port())}
        workers = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                    env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(2)]
        try:
            deadline = time.time() + 120
            while time.time() < deadline and not any(
                    r.get("step", 0) > last_step for r in _records_if_any(out) if "loss" in r):
                assert all(w.poll() is None for w in workers), "a worker ended before training"
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.3))
            workers[rng.randrange(2)].send_signal(signal.SIGTERM)
            codes = [w.wait(timeout=90) for w in workers]
        finally:
            for w in workers:
                if w.poll() is None:
                    w.kill()
        errors = [w.stderr.read()[-1500:] for w in workers]
        assert codes == [0, 0], f"trial {trial}: exit codes {codes}\n{errors}"
        newest = checkpoint.checkpoints(out)[-1]
        step = checkpoint.load_info(newest)["step"]
        assert step > last_step, f"trial {trial}: no newer checkpoint"
        last_step = step


def _records_if_any(run_dir):
    try:
        return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.endswith("}")]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def test_a_config_saved_by_the_first_release_still_loads():
    from lm.config.load import config_from_toml_text

    cfg = config_from_toml_text("[train]\nbatch_size = 4\neval_iters = 2\n", "old/config.toml")
    assert cfg.train.eval_sequences == 8
