"""End-to-end training on CPU: resume, checkpoints, sampling, and the errors a user can run into."""
import json
import shutil

import pytest
import torch

from lm.training import checkpoint
from lm.config.load import load_config
from lm.model.gpt import GPT
from lm.training.trainer import Trainer
from tests import conftest
from tests.conftest import ROOT, assert_user_error, losses, run_main

TINY = [*conftest.TINY, "optim.warmup_steps=3"]


def overrides(data_dir, out_dir, *extra):
    return [*TINY, f"data.dir={data_dir}", f"train.out_dir={out_dir}", *extra]


def weights(ckpt) -> dict:
    model = GPT(checkpoint.load_config(ckpt).model)
    checkpoint.load_model(ckpt, model)
    return model.state_dict()


def test_stop_and_resume_gives_bit_identical_losses(char_dataset, tmp_path):
    extra = ["train.max_steps=12", "train.eval_interval=4", "model.dropout=0.1", "train.grad_accum=2"]
    Trainer(load_config(None, overrides(char_dataset, tmp_path / "a", *extra))).run()
    Trainer(load_config(None, overrides(char_dataset, tmp_path / "b", *extra))).run(stop_at_step=6)
    assert max(losses(tmp_path / "b")) == 6
    Trainer(load_config(None, overrides(char_dataset, tmp_path / "b", *extra)), resume=True).run()
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert a == b  # exact float equality, step by step
    wa, wb = (weights(checkpoint.resolve(tmp_path / run)) for run in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_saved_checkpoint_reloads_to_identical_logits(char_dataset, tmp_path):
    trainer = Trainer(load_config(None, overrides(char_dataset, tmp_path / "r", "train.max_steps=3")))
    trainer.run()
    ckpt = checkpoint.resolve(tmp_path / "r")
    assert ckpt.name == "step_00000003"
    assert {".metadata", "rng_rank0.pt", "config.toml", "checkpoint.json", "chars.json"} <= {p.name for p in ckpt.iterdir()}
    model = GPT(checkpoint.load_config(ckpt).model)
    checkpoint.load_model(ckpt, model)
    idx = torch.randint(0, model.cfg.vocab_size, (2, 32))
    trainer.model.eval(), model.eval()
    assert torch.equal(model(idx)[0], trainer.model(idx)[0])
    assert (tmp_path / "r" / "config.toml").read_text() == (ckpt / "config.toml").read_text()


def test_keep_checkpoints_prunes_the_oldest(char_dataset, tmp_path):
    Trainer(load_config(None, overrides(char_dataset, tmp_path / "k", "train.max_steps=8",
                                        "train.eval_interval=2", "train.keep_checkpoints=2"))).run()
    assert [p.name for p in checkpoint.checkpoints(tmp_path / "k")] == ["step_00000006", "step_00000008"]


def train_cli(cli, data_dir, out_dir, *extra):
    return cli("train.py", "configs/shakespeare_char.toml", *overrides(data_dir, out_dir, *extra))


def train_main(data_dir, out_dir, *extra):
    """train.py's main in this process: for refusals, which end before anything trains."""
    return run_main("train.py", ROOT / "configs" / "shakespeare_char.toml", *overrides(data_dir, out_dir, *extra))


@pytest.mark.slow
def test_resume_with_another_model_shape_is_refused(cli, char_dataset, tmp_path):
    assert train_cli(cli, char_dataset, tmp_path / "r", "train.max_steps=2").returncode == 0
    r = train_cli(cli, char_dataset, tmp_path / "r", "train.max_steps=4", "model.n_embd=64", "--resume")
    assert_user_error(r, "model.n_embd = 32", "asks for 64")


@pytest.mark.slow
def test_existing_run_is_never_overwritten_without_resume(cli, char_dataset, tmp_path):
    assert train_cli(cli, char_dataset, tmp_path / "r", "train.max_steps=2").returncode == 0
    ckpt = checkpoint.resolve(tmp_path / "r")
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    assert_user_error(train_cli(cli, char_dataset, tmp_path / "r", "train.max_steps=2"), "--resume")
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before


def test_vocab_smaller_than_the_tokenizer_is_refused(char_dataset, tmp_path):
    assert_user_error(train_main(char_dataset, tmp_path / "r", "model.vocab_size=5"),
                      "model.vocab_size = 5", "meta.json")


def test_missing_data_path_is_named(tmp_path):
    missing = tmp_path / "nowhere.txt"
    r = train_main(tmp_path / "d", tmp_path / "r", f'data.inputs=["{missing}"]', "data.url=")
    assert_user_error(r, str(missing))
    assert not (tmp_path / "d").exists()


def test_empty_corpus_is_refused(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    r = train_main(tmp_path / "d", tmp_path / "r", f'data.inputs=["{tmp_path / "empty.txt"}"]', "data.url=")
    assert_user_error(r, "empty")


def test_shard_disagreeing_with_its_meta_is_refused(char_dataset, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(char_dataset, broken)
    shard = broken / "train_00000.bin"
    shard.write_bytes(shard.read_bytes()[:-6])
    assert_user_error(train_main(broken, tmp_path / "r"), str(shard))


@pytest.mark.slow
def test_sample_cli_is_reproducible_with_a_seed(cli, char_dataset, tmp_path):
    assert train_cli(cli, char_dataset, tmp_path / "r", "train.max_steps=3").returncode == 0
    args = ["sample.py", tmp_path / "r", "--prompt", "the ", "--max-new-tokens", "40", "--num-samples", "2"]
    first, second = cli(*args, "--seed", "3"), cli(*args, "--seed", "3")
    other = cli(*args, "--seed", "4")
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout != other.stdout
    assert first.stdout.count("the ") >= 2


def test_sample_from_a_missing_run_is_a_user_error(tmp_path):
    assert_user_error(run_main("sample.py", tmp_path / "nope"), str(tmp_path / "nope"))


@pytest.mark.slow
def test_quickstart_pipeline_end_to_end_on_a_tiny_budget(cli, tmp_path):
    r = cli("train.py", "configs/quickstart.toml", 'data.inputs=["${stdlib}/json/*.py"]',
            f"data.dir={tmp_path / 'data'}", "data.vocab_size=400", f"train.out_dir={tmp_path / 'run'}",
            "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=64",
            "train.max_steps=4", "train.eval_interval=2", "train.eval_sequences=4", "log.progress=false")
    assert r.returncode == 0, r.stderr
    assert "val loss" in r.stdout + r.stderr
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["tokenizer"]["kind"] == "bpe" and meta["splits"]["val"]["docs"] >= 1
    s = cli("sample.py", tmp_path / "run", "--max-new-tokens", "30")
    assert s.returncode == 0, s.stderr
    assert s.stdout.strip()
