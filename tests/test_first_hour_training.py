"""What a newcomer runs into with train.py: the command line, resuming on another number of ranks, and
continued pretraining as a user first runs it."""
import json
import os
import subprocess
import sys

import pytest

from data_prep import prepare
from lm.config.load import load_config
from lm.training.trainer import Trainer
from tests.conftest import ROOT

TINY = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "train.eval_sequences=8",
        "log.progress=false", "log.interval=1", "train.device=cpu", "train.dtype=float32"]
CONFIG = ROOT / "configs" / "shakespeare_char.toml"


def train(*args, nproc=0):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc else [sys.executable]
    return subprocess.run([*launcher, "train.py", str(CONFIG), *TINY, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---- the command line -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_flags_may_come_anywhere_among_the_overrides(char_dataset, tmp_path):
    out = tmp_path / "run"
    r = train(f"data.dir={char_dataset}", f"train.out_dir={out}", "--resume", "train.max_steps=1", "train.eval_interval=1",
              "train.batch_size=2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert [x["step"] for x in records(out) if "loss" in x] == [1]


@pytest.mark.slow
def test_no_arguments_asks_for_the_config_only():
    r = subprocess.run([sys.executable, "train.py"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "required: config" in r.stderr and "overrides" not in r.stderr.splitlines()[-1]


@pytest.mark.slow
def test_a_bad_override_value_names_the_override_not_the_file(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "configs/quickstart.toml", "train.max_steps=-5"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: override 'train.max_steps=-5': train.max_steps = -5 must be >= 1"


# ---- resuming on another number of ranks keeps the global batch ---------------------------------------
@pytest.mark.slow
def test_resume_on_fewer_ranks_keeps_the_global_batch_and_says_so(char_dataset, tmp_path):
    common = [f"data.dir={char_dataset}", "train.batch_size=2", "train.eval_interval=2", "optim.warmup_steps=0",
              "optim.schedule=constant"]
    r = train(*common, f"train.out_dir={tmp_path / 'two'}", "train.max_steps=2", nproc=2)
    assert r.returncode == 0, r.stderr[-2000:]
    r = train(*common, f"train.out_dir={tmp_path / 'two'}", "train.max_steps=4", "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout + r.stderr
    assert "global batch: 4 sequences in step_00000002 (2 x 2 x 1), 4 now (1 ranks x batch_size 2 x grad_accum 2)" in out
    samples = {x["step"]: x["samples"] for x in records(tmp_path / "two") if "loss" in x}
    assert samples == {1: 4, 2: 8, 3: 12, 4: 16}
    # the same steps as a single process with the whole batch in one micro-batch
    r = train(*common[:1], "train.batch_size=4", *common[2:], f"train.out_dir={tmp_path / 'one'}", "train.max_steps=4")
    assert r.returncode == 0, r.stderr[-2000:]
    one = {x["step"]: x["loss"] for x in records(tmp_path / "one") if "loss" in x}
    two = {x["step"]: x["loss"] for x in records(tmp_path / "two") if "loss" in x}
    for step in (3, 4):
        assert two[step] == pytest.approx(one[step], rel=1e-5)


@pytest.mark.slow
def test_resume_that_cannot_keep_the_global_batch_is_refused_with_the_numbers(char_dataset, tmp_path):
    common = [f"data.dir={char_dataset}", "train.batch_size=3", "train.eval_interval=1", f"train.out_dir={tmp_path / 'r'}"]
    assert train(*common, "train.max_steps=1").returncode == 0
    r = train(*common, "train.max_steps=2", "--resume", nproc=2)
    assert r.returncode != 0
    assert "global batch of 3 sequences (1 ranks x batch_size 3 x grad_accum 1) is not a multiple of 2 ranks " \
           "x batch_size 3" in r.stderr


# ---- continued pretraining as a user runs it -------------------------------------------------------------
def test_a_plain_continuation_tracks_the_old_domain_by_default(char_dataset, tiny_corpus, tmp_path):
    (tmp_path / "b_text").mkdir()
    for f in sorted(tiny_corpus.iterdir()):
        (tmp_path / "b_text" / f.name).write_text(" ".join(w[::-1] for w in f.read_text().split()) + "\n")
    new = tmp_path / "B"
    prepare([str(tmp_path / "b_text")], new, tokenizer_dir=char_dataset, show_progress=False)
    old_run = tmp_path / "old"
    Trainer(load_config(CONFIG, [*TINY, f"data.dir={char_dataset}", f"train.out_dir={old_run}", "train.batch_size=4",
                                 "train.max_steps=2", "train.eval_interval=2"])).run()
    cont = Trainer(load_config(CONFIG, [*TINY, f"data.dir={new}", f"train.out_dir={tmp_path / 'cont'}",
                                        f"init.from={old_run}", "train.batch_size=4", "train.max_steps=2",
                                        "train.eval_interval=2"]))
    cont.run()
    last = [x for x in records(tmp_path / "cont") if "val_loss" in x][-1]
    assert {"val/new_loss", "val/replay_loss", "val/new_bpb", "val/replay_bpb", "forgetting", "adaptation"} <= last.keys()
    # the old domain scored here is the old run's own validation text: its loss at step 0 is the old run's last
    old_last = [x for x in records(old_run) if "val_loss" in x][-1]["val_loss"]
    first = [x for x in records(tmp_path / "cont") if "val_loss" in x][0]
    assert first["val/replay_loss"] == pytest.approx(old_last, rel=1e-6)


def test_validation_text_does_not_depend_on_the_training_seed(char_dataset, tmp_path):
    losses = {}
    for seed in (1, 2):
        trainer = Trainer(load_config(CONFIG, [*TINY, f"data.dir={char_dataset}", f"train.out_dir={tmp_path / str(seed)}",
                                               "train.batch_size=4", f"train.seed={seed}"]))
        sets = trainer.evaluator.sets
        losses[seed] = sets[0].stream.starts(0, 8).tolist()
    assert losses[1] == losses[2]


def test_each_continual_example_enables_one_method():
    methods = {}
    for name in ("replay", "ewc", "freeze"):
        cfg = load_config(ROOT / "configs" / f"continue_{name}.toml")
        methods[name] = {"replay": bool(cfg.data.sources), "ewc": cfg.continual.ewc_batches > 0,
                         "freeze": bool(cfg.continual.freeze)}
        assert cfg.init.from_
    for name, enabled in methods.items():
        assert [m for m, on in enabled.items() if on] == [name]
