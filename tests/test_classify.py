"""Sequence classification (train.task = "classify", lm/model/classifier.py, lm/objectives/classification.py): the head on padded batches, class
weights, oversampling, metrics and the best checkpoint, early stopping, resume, init from our runs and HF
directories, layer-wise lr decay, the CLI, two processes, and the bench's smoke run."""
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_prep import DataError, prepare
from lm.training import checkpoint
from lm.classify import main as classify_main
from lm.model.classifier import BEST_DIR, LABELS_FILE, attach_head
from lm.objectives.classification import classification_metrics
from lm.objectives.classification_data import ExampleSampler, apportion, pad
from lm.config.load import load_config
from lm.config.schema import ConfigError
from lm.model.gpt import GPT
from lm.training.optim import build_optimizer
from lm.training.trainer import Trainer
from tests.conftest import ROOT

TINY = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=64", "model.activation=gelu_tanh",
        "train.batch_size=8", "train.eval_sequences=8", "log.progress=false", "log.interval=1", "train.device=cpu",
        "optim.warmup_steps=2", "train.dtype=float32", "train.threads=1"]
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex "
         "every jolly vexing box of frozen pizza").split()
GROUPS = {"a": WORDS[:7], "b": WORDS[7:14], "c": WORDS[14:]}


def examples(n: int, seed: int) -> list[dict]:
    """70 / 20 / 10 % of classes a, b, c; a text is words of its class's group (in the char vocabulary)."""
    rng = random.Random(seed)
    labels = ["a" if i % 10 < 7 else "b" if i % 10 < 9 else "c" for i in range(n)]
    return [{"text": " ".join(rng.choice(GROUPS[y]) for _ in range(rng.randint(3, 12))), "label": y} for y in labels]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def setup(tiny_corpus, tmp_path_factory):
    """A char dataset, a pretraining run on it (the classifiers' start), and train / val JSONL files."""
    root = tmp_path_factory.mktemp("classify")
    prepare([str(tiny_corpus)], root / "char", tokenizer="char", show_progress=False)
    Trainer(load_config(None, [*TINY, f"data.dir={root / 'char'}", f"train.out_dir={root / 'lm'}",
                               "train.max_steps=4", "train.eval_interval=4"])).run()
    write_jsonl(root / "train.jsonl", examples(200, 0))
    write_jsonl(root / "val.jsonl", examples(60, 1))
    return root


def classify_cfg(setup, out, *extra):
    return load_config(None, [*TINY, f"init.from={setup / 'lm'}", f"train.out_dir={out}", "train.task=classify",
                              f"classify.train_file={setup / 'train.jsonl'}",
                              f"classify.val_file={setup / 'val.jsonl'}", "optim.lr=3e-3", *extra])


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_head_logits_of_a_padded_batch_equal_each_sequence_alone(pooling):
    cfg = load_config(None, [*TINY, "model.vocab_size=50", 'classify.labels=["x", "y", "z"]',
                             f"classify.pooling={pooling}"])
    model = GPT(cfg.model, seed=3)
    attach_head(model, cfg)
    model.eval()
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 50, (n,), generator=g).numpy() for n in (5, 17, 1, 40, 9)]
    ids, lengths = pad(rows, pad_id=0, device="cpu")
    ids = torch.where(torch.arange(ids.shape[1]) < lengths[:, None], ids, torch.randint(0, 50, ids.shape, generator=g))
    with torch.no_grad():
        batch = model(ids, lengths=lengths)[0]
        alone = torch.cat([model(torch.from_numpy(r)[None], lengths=torch.tensor([len(r)]))[0] for r in rows])
    assert batch.shape == (5, 3)
    torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-6)


def test_class_weights_change_the_loss_exactly_as_cross_entropy_weight(setup, tmp_path):
    """The step's loss is F.cross_entropy(weight=...) of its global batch, also over micro-batches."""
    counts = np.array([140, 40, 20])  # the training file's a / b / c
    for spec, weights in (("balanced", 200 / (3 * counts)), ("[1.0, 2.5, 7.0]", np.array([1.0, 2.5, 7.0]))):
        trainer = Trainer(classify_cfg(setup, tmp_path / spec, f"classify.class_weights={spec}", "train.grad_accum=2"))
        try:
            batches = [trainer.prefetcher.batch(first) for first in (0, 8)]  # the first step's two micro-batches
            rows = [r for (ids, lengths), _ in batches for r in zip(ids, lengths)]
            ids, lengths = pad([r[:n].numpy() for r, n in rows], 0, "cpu")
            y = torch.cat([y for _, y in batches])
            with torch.no_grad():
                logits = trainer.model(ids, lengths=lengths)[0]
            expected = F.cross_entropy(logits, y, weight=torch.tensor(weights, dtype=torch.float32)).item()
            assert trainer.train_step()["loss"] == pytest.approx(expected, rel=1e-6)
            assert abs(expected - F.cross_entropy(logits, y).item()) > 1e-3
        finally:
            trainer.close()


def test_oversampling_yields_the_requested_shares():
    labels = np.array([0] * 900 + [1] * 90 + [2] * 10)
    for shares in ([1.0, 1.0, 1.0], [0.5, 0.3, 0.2]):
        sampler = ExampleSampler(labels, 3, shares, seed=7)
        share = np.array(shares) / sum(shares)
        epoch = sampler.epoch_size
        assert epoch == int(np.ceil(900 / share[0]))  # the majority is never undersampled
        for e in range(3):  # every epoch holds the shares exactly (whole slots, largest remainders)
            drawn = labels[sampler.indices(e * epoch, epoch)]
            assert np.bincount(drawn, minlength=3).tolist() == apportion(epoch, share).tolist()
            assert np.all(np.abs(np.bincount(drawn) / epoch - share) <= 1 / epoch)
            majority = sampler.indices(e * epoch, epoch)
            assert sorted(majority[labels[majority] == 0].tolist()) == list(range(900))  # each once
        window = labels[sampler.indices(123, 1000)]  # any long window is near the shares too
        assert np.allclose(np.bincount(window, minlength=3) / 1000, share, atol=0.04)
    plain = ExampleSampler(labels, 3, None, seed=7)
    assert sorted(plain.indices(1000, 1000).tolist()) == list(range(1000))  # an epoch is every example once
    assert np.array_equal(plain.indices(1500, 10), plain.indices(1000, 510)[500:])  # a pure function of the index


def test_metrics_of_a_confusion_matrix():
    m = classification_metrics(np.array([[5, 1, 0], [2, 2, 0], [0, 0, 0]]), ["p", "q", "r"])
    assert m["val/accuracy"] == pytest.approx(7 / 10)
    assert m["val/precision/p"] == pytest.approx(5 / 7) and m["val/recall/p"] == pytest.approx(5 / 6)
    assert m["val/precision/q"] == pytest.approx(2 / 3) and m["val/recall/q"] == pytest.approx(2 / 4)
    f1 = [2 * (5 / 7) * (5 / 6) / (5 / 7 + 5 / 6), 2 * (2 / 3) * 0.5 / (2 / 3 + 0.5)]
    assert m["val/macro_f1"] == pytest.approx(sum(f1) / 2)  # r never occurs: left out, as scikit-learn does
    assert m["val/confusion"] == [[5, 1, 0], [2, 2, 0], [0, 0, 0]]


def test_classify_run_logs_metrics_keeps_the_best_and_classifies(setup, tmp_path, capsys):
    out = tmp_path / "run"
    trainer = Trainer(classify_cfg(setup, out, "train.max_steps=60", "train.eval_interval=20", "classify.pooling=mean",
                                   "classify.oversample=true", "optim.layer_decay=0.8",
                                   'continual.freeze=["0:2", "5:0"]', "train.keep_checkpoints=1"))
    result = trainer.run()
    trainer.close()
    assert json.loads((out / LABELS_FILE).read_text()) == ["a", "b", "c"]
    evals = [r for r in records(out) if "val/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 20, 40, 60]
    last = evals[-1]
    assert np.array(last["val/confusion"]).shape == (3, 3) and np.array(last["val/confusion"]).sum() == 60
    assert {f"val/{m}/{c}" for m in ("precision", "recall", "f1") for c in "abc"} <= set(last)
    assert last["val/macro_f1"] > 0.8  # the groups of words are easy to tell apart
    best = max(evals[1:], key=lambda r: r["val/macro_f1"])  # the first best (ties keep the earlier)
    assert result["best_step"] == best["step"] and result["best"] == best["val/macro_f1"]
    assert checkpoint.load_info(out / BEST_DIR)["step"] == best["step"]
    assert checkpoint.load_config(out / BEST_DIR).classify.labels == ["a", "b", "c"]

    capsys.readouterr()
    assert classify_main([str(out), "--text", "the quick brown fox", "--text", "jolly box of frozen pizza",
                          "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["label"] for line in lines] == ["a", "c"]
    assert all(sum(line["probabilities"].values()) == pytest.approx(1, abs=1e-5) for line in lines)
    assert classify_main([str(setup / "lm"), "--text", "the"]) == 2  # a pretraining run is no classifier
    assert "is not a classifier" in capsys.readouterr().err


def test_early_stopping_keeps_the_best_and_a_resume_does_not_train_on(setup, tmp_path):
    out = tmp_path / "stop"
    extra = ["train.max_steps=20", "train.eval_interval=1", "optim.lr=1e-12", "optim.min_lr=0", "optim.warmup_steps=0",
             "classify.metric=accuracy", "classify.patience=2", "train.keep_checkpoints=1"]
    trainer = Trainer(classify_cfg(setup, out, *extra))
    result = trainer.run()
    trainer.close()
    assert result["step"] == 3 and result["stopped_early"] and result["best_step"] == 1  # nothing improves
    assert [p.name for p in checkpoint.checkpoints(out)] == ["step_00000003"]
    assert checkpoint.load_info(out / BEST_DIR)["step"] == 1  # pruned from ckpt/, kept in best/
    trainer = Trainer(classify_cfg(setup, out, *extra), resume=True)
    assert trainer.run()["step"] == 3
    trainer.close()


def test_classify_resume_repeats_the_uninterrupted_run(setup, tmp_path):
    extra = ["train.max_steps=8", "train.eval_interval=4", "model.dropout=0.1", "classify.oversample=[1, 1, 2]",
             "classify.class_weights=balanced", "classify.pooling=mean", "train.grad_accum=2"]
    for name, stop in (("a", None), ("b", 4)):
        trainer = Trainer(classify_cfg(setup, tmp_path / name, *extra))
        trainer.run(stop_at_step=stop)
        trainer.close()
    trainer = Trainer(classify_cfg(setup, tmp_path / "b", *extra), resume=True)
    trainer.run()
    trainer.close()
    a, b = ({r["step"]: r["loss"] for r in records(tmp_path / n) if "loss" in r} for n in "ab")
    assert sorted(a) == list(range(1, 9)) and a == b


def test_layer_decay_scales_each_layers_lr(setup, tmp_path):
    trainer = Trainer(classify_cfg(setup, tmp_path / "r", "optim.layer_decay=0.5", "train.max_steps=2"))
    try:
        trainer.train_step()
        lr = trainer.schedule(0)
        expected = {"transformer.wte.weight": 0.125, "transformer.wpe.weight": 0.125,
                    "transformer.h.0.ln_1.weight": 0.25, "transformer.h.1.mlp.c_fc.weight": 0.5,
                    "transformer.ln_f.weight": 1.0, "cls_head.weight": 1.0}
        params = dict(trainer.model.named_parameters())
        for name, scale in expected.items():
            group = next(g for g in trainer.optimizer.param_groups if any(p is params[name] for p in g["params"]))
            assert group["lr_scale"] == scale and group["lr"] == pytest.approx(lr * scale)
        assert len(build_optimizer(trainer.model, load_config(None, []).optim, trainer.device).param_groups) == 2
    finally:
        trainer.close()


def test_init_from_a_hugging_face_directory(setup, tmp_path):
    from lm.interop.export import export_hf, load

    ckpt, model = load(setup / "lm")
    (tmp_path / "hf").mkdir()
    export_hf(ckpt, model, tmp_path / "hf")
    trainer = Trainer(classify_cfg(setup, tmp_path / "r", f"init.from=hf:{tmp_path / 'hf'}", "train.max_steps=2"))
    try:
        body = {k: v for k, v in trainer.model.state_dict().items() if not k.startswith("cls_head")}
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in body.items())
        assert trainer.run()["step"] == 2
    finally:
        trainer.close()


def test_mistakes_are_named(setup, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "the fox", "label": "a"}, {"text": "a dog"}])
    with pytest.raises(DataError, match=r"bad.jsonl: line 2: has no field 'label'"):
        Trainer(classify_cfg(setup, tmp_path / "r", f"classify.train_file={bad}"))
    other = write_jsonl(tmp_path / "other.jsonl", [{"text": "the fox", "label": "zebra"}])
    with pytest.raises(DataError, match="label 'zebra' is not among the training labels"):
        Trainer(classify_cfg(setup, tmp_path / "r", f"classify.val_file={other}"))
    with pytest.raises(ConfigError, match="class_weights has 2 weights for 3 labels"):
        Trainer(classify_cfg(setup, tmp_path / "r", "classify.class_weights=[1, 2]"))
    with pytest.raises(ConfigError, match="data.document_mask cannot be combined with classification"):
        Trainer(classify_cfg(setup, tmp_path / "r", "data.document_mask=true"))
    with pytest.raises(ConfigError, match="classify.train_file is empty"):
        load_config(None, ["train.task=classify"])


@pytest.mark.slow
def test_two_processes_train_like_one(setup, tmp_path):
    """FSDP2 over 2 gloo processes reads the same global batches and gives the same losses and metrics."""
    common = [*TINY, "model.bias=true", f"init.from={setup / 'lm'}", "train.task=classify", "optim.lr=3e-3",
              "train.max_steps=3", "train.eval_interval=3", f"classify.train_file={setup / 'train.jsonl'}",
              f"classify.val_file={setup / 'val.jsonl'}", "classify.class_weights=balanced"]
    config = ROOT / "configs/shakespeare_char.toml"  # what train.py reads below
    trainer = Trainer(load_config(config, [*common, f"train.out_dir={tmp_path / 'one'}"]))
    trainer.run()
    trainer.close()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           "configs/shakespeare_char.toml", *common, "train.batch_size=4", f"train.out_dir={tmp_path / 'two'}"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = records(tmp_path / "one"), records(tmp_path / "two")
    assert [x["loss"] for x in one if "loss" in x] == pytest.approx([x["loss"] for x in two if "loss" in x], rel=1e-5)
    last_one, last_two = (next(x for x in reversed(rs) if "val/confusion" in x) for rs in (one, two))
    assert last_one["val/confusion"] == last_two["val/confusion"]
    assert last_one["val_loss"] == pytest.approx(last_two["val_loss"], rel=1e-5)
    assert checkpoint.load_info(tmp_path / "two" / BEST_DIR)["world_size"] == 2


@pytest.mark.slow
def test_bench_smoke_run(tmp_path):
    # stand-ins for ../shared/data's novels, so the check needs nothing beside the repository
    texts = {"war": "the prince spoke of the army and the war in moscow while the count listened. ",
             "play": "o romeo wherefore art thou, said juliet upon the balcony in verona tonight! "}
    for name, sentence in texts.items():
        (tmp_path / f"{name}.txt").write_text("".join(f"{sentence}{i}\n" for i in range(3000)))
    out = tmp_path / "classify.json"
    r = subprocess.run([sys.executable, "bench/classify.py", "--smoke", "--work", str(tmp_path / "work"),
                        "--warandpeace", str(tmp_path / "war.txt"), "--shakespeare", str(tmp_path / "play.txt"),
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert list(result["table"]) == ["plain", "class weights", "oversampling"]
    assert {"macro_f1", "minority_recall", "accuracy"} <= set(result["table"]["plain"])
    assert "shakespeare recall" in r.stdout and result["smoke"]
