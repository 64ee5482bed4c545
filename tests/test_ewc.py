"""EWC's Fisher: the mean of per-sequence squared gradients, normalized to mean 1, and the same (values and
penalty) in one process, under 2-process FSDP and under HSDP with 2 replicas of 1 shard."""
import contextlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from data_prep import TokenReader, prepare
from lm.config.schema import ModelConfig
from lm.data.batches import SampleStream
from lm.training.ewc import _sample_labels, estimate_fisher, fisher_array
from lm.model.gpt import GPT
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def data(tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ewc") / "char"
    prepare([str(tiny_corpus)], out, tokenizer="char", show_progress=False)
    return out


def mean(fisher: dict) -> float:
    return float(np.concatenate([f.ravel() for f in fisher.values()]).astype(np.float64).mean())


@pytest.mark.parametrize("labels", ["empirical", "model"])
def test_fisher_is_the_mean_of_per_sequence_squared_gradients(data, labels):
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, dropout=0.1,
                            vocab_size=TokenReader(data, "train").vocab_size), seed=3)
    stream = SampleStream(TokenReader(data, "train"), 32, seed=5, name="train")
    got = estimate_fisher(model, stream, batches=2, batch_size=3, rank=0, world=1, labels=labels, seed=7,
                          autocast=contextlib.nullcontext)
    assert model.training  # the estimate runs in eval mode and restores the mode

    # brute force: one sequence at a time, the squared gradient of its mean token loss
    model.eval()
    params = dict(model.named_parameters())
    want = {name: torch.zeros_like(p) for name, p in params.items()}
    for i in range(2 * 3):
        x, y = stream.batch(i, 1, torch.device("cpu"))
        logits, _ = model(x)
        if labels == "model":
            y = _sample_labels(logits.detach(), i, 7)
        loss = torch.nn.functional.cross_entropy(logits[0], y[0])
        for (name, _), g in zip(params.items(), torch.autograd.grad(loss, list(params.values()))):
            want[name] += g * g
    scale = sum(w.double().sum() for w in want.values()).item() / sum(w.numel() for w in want.values())
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name] / scale, rtol=1e-5, atol=1e-7, msg=name)
    assert mean({n: f.numpy() for n, f in got.items()}) == pytest.approx(1.0, rel=1e-6)


COMMON = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "model.dropout=0.0",
          "train.eval_sequences=8", "train.eval_interval=3", "train.max_steps=3", "log.progress=false",
          "log.interval=1", "train.device=cpu", "train.dtype=float32", "optim.schedule=constant",
          "optim.warmup_steps=0", "continual.ewc_batches=3", "continual.ewc_lambda=1000"]
MESHES = {"one": (1, ["train.batch_size=4"]), "fsdp": (2, ["train.batch_size=2"]),
          "hsdp": (2, ["train.batch_size=2", "parallel.replicas=2"])}


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """The same global samples (Fisher and training) on 1 process, FSDP over 2 and HSDP 2 x 1."""
    root = tmp_path_factory.mktemp("meshes")
    for name, (nproc, extra) in MESHES.items():
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
        r = subprocess.run([*launcher, "train.py", "configs/shakespeare_char.toml", *COMMON, *extra,
                            f"data.dir={data}", f"continual.ewc_data={data}", f"train.out_dir={root / name}"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
    return root


def records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}


@pytest.mark.slow
def test_fisher_mean_is_one_on_every_mesh(runs):
    for name in MESHES:
        assert mean(fisher_array(runs / name / "ewc.pt")) == pytest.approx(1.0, rel=1e-6), name


@pytest.mark.slow
def test_fisher_and_penalty_are_the_same_on_one_process_fsdp_and_hsdp(runs):
    one = fisher_array(runs / "one" / "ewc.pt")
    for mesh in ("fsdp", "hsdp"):
        other = fisher_array(runs / mesh / "ewc.pt")
        assert other.keys() == one.keys()
        for name in one:
            np.testing.assert_allclose(other[name], one[name], rtol=1e-5, atol=1e-7, err_msg=f"{mesh} {name}")
    # the penalty and its gradient: step 2 is the first away from the anchor, step 3 trains on its gradient
    base = records(runs / "one")
    assert base[2]["ewc_penalty"] > 0
    for mesh in ("fsdp", "hsdp"):
        rec = records(runs / mesh)
        for step in (2, 3):
            for key in ("ewc_penalty", "loss"):
                assert rec[step][key] == pytest.approx(base[step][key], rel=1e-5), (mesh, step, key)
