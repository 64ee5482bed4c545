"""Continued pretraining on CPU: sources with roles and an exact replay share, named validation sets,
freezing phases, EWC (its Fisher on every mesh: tests/test_ewc.py) and resuming all of it bit for bit."""
import json

import numpy as np
import pytest
import torch

from data_prep import DataError, prepare
from lm.training import checkpoint
from lm.config.load import load_config
from lm.config.schema import ConfigError
from lm.training.ewc import fisher_array
from lm.training.trainer import Trainer
from tests import conftest
from tests.conftest import ROOT

TINY = [*conftest.TINY, "optim.warmup_steps=2", "model.dropout=0.1"]


@pytest.fixture(scope="module")
def domains(tiny_corpus, tmp_path_factory):
    """Two char corpora with one tokenizer: A (the tiny corpus) and B (its words spelled backwards)."""
    root = tmp_path_factory.mktemp("domains")
    (root / "b_text").mkdir()
    for f in sorted(tiny_corpus.iterdir()):
        text = "\n".join(" ".join(w[::-1] for w in line.split()) for line in f.read_text().splitlines())
        (root / "b_text" / f.name).write_text(text + "\n")
    prepare([str(tiny_corpus)], root / "A", tokenizer="char", show_progress=False)
    prepare([str(root / "b_text")], root / "B", tokenizer_dir=root / "A", show_progress=False)
    return root / "A", root / "B"


@pytest.fixture(scope="module")
def pretrained(domains, tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "run"
    Trainer(load_config(None, [*TINY, f"data.dir={domains[0]}", f"train.out_dir={out}", "train.max_steps=6",
                               "train.eval_interval=6"])).run()
    return out


def cont(domains, pretrained, out, *extra):
    a, b = domains
    return load_config(None, [*TINY, f"train.out_dir={out}", f"init.from={pretrained}",
                              f'data.sources=["new:0.75:{b}", "replay:0.25:{a}"]', "train.max_steps=8",
                              "train.eval_interval=4", *extra])


def weights(ckpt) -> dict:
    from lm.model.gpt import GPT

    model = GPT(checkpoint.load_config(ckpt).model)
    checkpoint.load_model(ckpt, model)
    return model.state_dict()


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir):
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def test_replay_share_is_exact_in_every_global_batch(domains, pretrained, tmp_path):
    trainer = Trainer(cont(domains, pretrained, tmp_path / "r", "train.grad_accum=2"))
    g = 8  # 1 rank x 4 sequences x 2 micro-batches
    for step in range(100):
        src, _ = trainer.objective.train_stream.mixture.assign(step * g, g)
        assert np.bincount(src, minlength=2).tolist() == [6, 2]
    # a batch that cannot hold 25% exactly is refused, naming the key
    with pytest.raises(ConfigError, match="data.sources.*multiple of 4"):
        Trainer(cont(domains, pretrained, tmp_path / "x", "train.batch_size=2"))


def test_sources_must_share_a_tokenizer_and_be_well_formed(domains, pretrained, tiny_corpus, tmp_path):
    other = tmp_path / "other"
    prepare([str(tiny_corpus)], other, tokenizer="bpe", vocab_size=300, show_progress=False)
    with pytest.raises(DataError, match="different tokenizers"):
        Trainer(load_config(None, [*TINY, f"train.out_dir={tmp_path / 'o'}",
                                   f'data.sources=["new:1:{other}", "replay:1:{domains[0]}"]']))
    for bad in ('["old:1:data/A"]', '["new:x:data/A"]', '["new:-1:data/A"]', '["data/A"]'):
        with pytest.raises(ConfigError, match="data.sources entry"):
            load_config(None, [f"data.sources={bad}"])
    with pytest.raises(ConfigError, match="continual.freeze"):
        load_config(None, ['continual.freeze=["5:1", "2:0"]'])


def test_ewc_lambda_zero_is_plain_training_and_val_sets_report_forgetting(domains, pretrained, tmp_path):
    Trainer(cont(domains, pretrained, tmp_path / "plain")).run()
    Trainer(cont(domains, pretrained, tmp_path / "zero", "continual.ewc_batches=2", "continual.ewc_lambda=0")).run()
    Trainer(cont(domains, pretrained, tmp_path / "ewc", "continual.ewc_batches=2", "continual.ewc_lambda=50")).run()
    assert losses(tmp_path / "plain") == losses(tmp_path / "zero")
    assert losses(tmp_path / "ewc") != losses(tmp_path / "plain")
    assert all(r["ewc_penalty"] > 0 for r in records(tmp_path / "ewc") if "loss" in r and r["step"] > 1)
    evals = [r for r in records(tmp_path / "plain") if "val/new_loss" in r]
    assert [r["step"] for r in evals] == [0, 4, 8]
    assert evals[0]["forgetting"] == evals[0]["adaptation"] == 0.0
    last = evals[-1]
    assert last["forgetting"] == last["val/replay_loss"] - evals[0]["val/replay_loss"]
    assert last["adaptation"] == evals[0]["val/new_loss"] - last["val/new_loss"] > 0
    fisher = fisher_array(tmp_path / "ewc" / "ewc.pt")
    assert np.mean(np.concatenate([f.ravel() for f in fisher.values()])) == pytest.approx(1.0, rel=1e-5)


def test_frozen_layers_stay_bit_identical_until_their_phase_ends(domains, pretrained, tmp_path):
    trainer = Trainer(cont(domains, pretrained, tmp_path / "f", 'continual.freeze=["0:1", "4:0"]'))
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.run(stop_at_step=4)
    frozen = [n for n in start if n.startswith(("transformer.wte", "transformer.wpe", "transformer.h.0.", "lm_head"))]
    state = trainer.model.state_dict()
    assert frozen and all(torch.equal(state[n], start[n]) for n in frozen)
    assert not torch.equal(state["transformer.h.1.mlp.c_fc.weight"], start["transformer.h.1.mlp.c_fc.weight"])
    params = dict(trainer.model.named_parameters())
    assert all(params[n].grad is None and params[n] not in trainer.optimizer.state for n in frozen if n in params)
    trainer.run()  # the phase "4:0" unfreezes everything, in the same process
    state = trainer.model.state_dict()
    assert all(not torch.equal(state[n], start[n]) for n in frozen)


def test_resume_mid_continued_training_with_ewc_and_phases(domains, pretrained, tmp_path):
    extra = ["continual.ewc_batches=2", "continual.ewc_lambda=10", 'continual.freeze=["0:1", "5:0"]',
             "train.eval_interval=3"]
    Trainer(cont(domains, pretrained, tmp_path / "a", *extra)).run()
    Trainer(cont(domains, pretrained, tmp_path / "b", *extra)).run(stop_at_step=3)
    Trainer(cont(domains, pretrained, tmp_path / "b", *extra), resume=True).run()
    a, b = records(tmp_path / "a"), records(tmp_path / "b")
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    drop = ("wall_s", "tokens_per_s", "peak_mem_gb", "mfu")
    evals = lambda rs: {r["step"]: {k: v for k, v in r.items() if k not in drop} for r in rs if "val_loss" in r}
    assert evals(a) == evals(b)
    wa, wb = (weights(checkpoint.resolve(tmp_path / run)) for run in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_init_optimizer_loads_the_moments_and_the_example_config_is_valid(domains, pretrained, tmp_path):
    fresh = Trainer(cont(domains, pretrained, tmp_path / "w"))
    assert not fresh.optimizer.state  # weights only: AdamW starts from zero moments
    trainer = Trainer(cont(domains, pretrained, tmp_path / "o", "init.optimizer=true"))
    saved = Trainer(load_config(None, [*TINY, f"data.dir={domains[0]}", f"train.out_dir={pretrained}"]),
                    resume=True)
    by_name = lambda t: {n: t.optimizer.state[p]["exp_avg"] for n, p in t.model.named_parameters()}
    ours, theirs = by_name(trainer), by_name(saved)
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)
    assert trainer.step == trainer.samples == 0
    cfg = load_config(ROOT / "configs" / "continue_replay.toml")
    assert cfg.init.from_ and len(cfg.data.sources) == 2  # the replay example (one method per example)


def test_online_ewc_adds_the_discounted_prior_fisher(domains, pretrained, tmp_path):
    one = ["continual.ewc_batches=2", "train.max_steps=1"]
    Trainer(cont(domains, pretrained, tmp_path / "first", *one)).run()
    Trainer(cont(domains, pretrained, tmp_path / "second", *one, f"continual.ewc_prior={tmp_path / 'first' / 'ewc.pt'}",
                 "continual.ewc_gamma=0.5")).run()
    first, second = fisher_array(tmp_path / "first" / "ewc.pt"), fisher_array(tmp_path / "second" / "ewc.pt")
    for name in first:  # same starting weights and data: F_new == F_first
        np.testing.assert_allclose(second[name], 1.5 * first[name], rtol=1e-6)
