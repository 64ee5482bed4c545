"""Pruning (`python -m lm.prune`): magnitude masks that stay zero through fine-tuning and resume, and
structured pruning of heads and neurons that really shrinks the model."""
import math

import pytest
import torch

from data_prep import prepare
from lm.config.load import load_config
from lm.config.schema import ModelConfig
from lm.interop.export import load
from lm.model.gpt import GPT
from lm.compress.prune import MASKS_FILE, Masks, keep_top, magnitude_masks, prune_heads, prune_neurons, prunable
from lm.training.trainer import Trainer
from tests.conftest import assert_user_error

TINY = ["model.n_layer=2", "model.n_head=4", "model.n_embd=32", "model.block_size=32", "train.batch_size=4",
        "train.eval_sequences=4", "log.progress=false", "train.device=cpu", "optim.warmup_steps=0"]


def test_magnitude_masks_remove_the_smallest_weights_globally_or_per_matrix():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=20, block_size=8, n_layer=2, n_head=2, n_embd=16))
    weights = prunable(model)
    total = sum(w.numel() for w in weights.values())
    masks = magnitude_masks(model, 0.5, "global")
    assert sum(int((~m).sum()) for m in masks.values()) == total // 2
    kept_min = min(w.detach().abs()[m].min() for w, m in zip(weights.values(), masks.values()))
    dropped_max = max(w.detach().abs()[~m].max() for w, m in zip(weights.values(), masks.values()))
    assert dropped_max <= kept_min
    for name, m in magnitude_masks(model, 0.3, "layer").items():
        assert int((~m).sum()) == int(0.3 * weights[name].numel())
    assert "transformer.wte.weight" not in masks  # the embedding (and the tied head) stay whole


def zeroed_units(model, kind, keep):
    """Original model's logits with every unit outside `keep` silenced (their outputs zeroed)."""
    handles = []
    for block, idx in zip(model.transformer.h, keep):
        if kind == "heads":
            gate = torch.zeros(block.attn.n_head)
            gate[idx] = 1
            gate = gate.repeat_interleave(block.attn.head_dim)
            module = block.attn.c_proj
        else:
            module = block.mlp.c_proj
            gate = torch.zeros(module.in_features)
            gate[idx] = 1
        handles.append(module.register_forward_pre_hook(lambda m, a, g=gate: (a[0] * g,)))
    return handles


@pytest.mark.parametrize("kind, option", [("heads", {}), ("heads", {"qk_norm": True, "position": "rope"}),
                                          ("neurons", {}), ("neurons", {"mlp": "swiglu", "bias": False})])
def test_a_pruned_model_equals_the_original_with_those_units_silenced(kind, option):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=30, block_size=16, n_layer=2, n_head=4, n_embd=32, **option)).eval()
    units = 4 if kind == "heads" else model.transformer.h[0].mlp.c_proj.in_features
    scores = [torch.rand(units) for _ in range(2)]
    keep = keep_top(scores, 0.5)
    pruned = (prune_heads if kind == "heads" else prune_neurons)(model, keep)
    assert pruned.num_params() < model.num_params()
    x = torch.randint(0, 30, (2, 16))
    handles = zeroed_units(model, kind, keep)
    with torch.no_grad():
        expected = model(x)[0]
        for h in handles:
            h.remove()
        assert torch.allclose(pruned(x)[0], expected, atol=1e-5)
        assert not torch.allclose(model(x)[0], expected, atol=1e-4)  # the silenced units did matter


@pytest.fixture(scope="module")
def run(tiny_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("prune")
    prepare([str(tiny_corpus)], root / "data", tokenizer="char", show_progress=False)
    cfg = load_config(None, [*TINY, f"data.dir={root / 'data'}", f"train.out_dir={root / 'run'}",
                             "train.max_steps=3", "train.eval_interval=3"])
    Trainer(cfg).run()
    return root


@pytest.mark.slow
def test_magnitude_masks_stay_zero_through_fine_tuning_and_resume(cli, run):
    out = run / "mag"
    r = cli("-m", "lm.prune", run / "run", out, "--method", "magnitude", "--sparsity", "0.5")
    assert r.returncode == 0, r.stderr
    masks = Masks.load(out / MASKS_FILE).masks
    common = [*TINY, f"data.dir={run / 'data'}", f"train.out_dir={run / 'ft'}", "train.eval_interval=2"]
    Trainer(load_config(None, [*common, f"init.from={out}", "train.max_steps=2"])).run()
    assert (run / "ft" / MASKS_FILE).is_file()
    Trainer(load_config(None, [*common, f"init.from={out}", "train.max_steps=4"]), resume=True).run()
    _, tuned = load(run / "ft")
    params = dict(tuned.named_parameters())
    _, start = load(out)
    for name, mask in masks.items():
        assert (params[name][~mask] == 0).all(), name
        assert not torch.equal(params[name][mask], dict(start.named_parameters())[name][mask])  # the rest trained


@pytest.mark.slow
@pytest.mark.parametrize("method", ["heads", "neurons"])
def test_structured_pruning_writes_a_smaller_run_that_samples_and_trains(cli, run, method):
    out = run / method
    r = cli("-m", "lm.prune", run / "run", out, "--method", method, "--sparsity", "0.5", "--batches", "2")
    assert r.returncode == 0, r.stderr
    _, full = load(run / "run")
    _, pruned = load(out)
    assert pruned.num_params() < full.num_params()
    assert (pruned.cfg.n_head, pruned.cfg.head_dim) == ((2, 8) if method == "heads" else (4, 0))
    r = cli("sample.py", out, "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr
    cfg = load_config(out / "config.toml", [f"data.dir={run / 'data'}", f"train.out_dir={run / (method + '_ft')}",
                                            f"init.from={out}", "train.max_steps=1", "log.progress=false"])
    assert Trainer(cfg).run()["step"] == 1


@pytest.mark.slow
def test_prune_refuses_bad_input_in_one_line(cli, run, tmp_path):
    assert_user_error(cli("-m", "lm.prune", run / "run", tmp_path / "o", "--method", "heads", "--sparsity", "1.5"),
                      "--sparsity 1.5")


@pytest.mark.slow
def test_compress_bench_smoke(cli, run, tmp_path):
    import json

    out = tmp_path / "compress.json"
    r = cli("bench/compress.py", "--smoke", "--data", run / "data", "--out", out)
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["teacher heads 50%"]["params"] < rows["teacher 2x64"]["params"]
    assert rows["teacher int4"]["disk_mb"] < rows["teacher int8"]["disk_mb"] < rows["teacher 2x64"]["disk_mb"]
    assert all(math.isfinite(row["val_loss"]) for row in rows.values())
