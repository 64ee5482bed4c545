"""The speedrun recipe's options (model.mlp = "relu2", model.zero_init): shape, gradients, resume, off by
default; configs/shakespeare_char_fast.toml is nanoGPT's config plus bench/speedrun.py's ingredients; and the
bench's smoke run."""
import dataclasses
import json
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, metric_records, training_overrides
from lm.training.checkpoint import CheckpointError
from lm.config.load import load_config
from lm.config.schema import ConfigError, ModelConfig
from lm.model.gpt import GPT

sys.path.append(str(ROOT / "bench"))  # after the root: bench/data_prep.py must not shadow the package

SMALL = dict(vocab_size=61, block_size=16, n_layer=2, n_head=2, n_embd=32)


def test_new_options_are_off_by_default():
    cfg = ModelConfig()
    assert cfg.mlp == "gelu" and cfg.zero_init is False
    model = GPT(ModelConfig(**SMALL, tie_embeddings=False))
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2)
    assert isinstance(model.transformer.h[0].mlp.gelu, torch.nn.GELU)


def test_relu2_is_relu_squared_with_gelus_weights_and_gradients_reach_every_weight():
    gelu, relu2 = GPT(ModelConfig(**SMALL), seed=3), GPT(ModelConfig(**SMALL, mlp="relu2"), seed=3)
    assert {n: p.shape for n, p in gelu.named_parameters()} == {n: p.shape for n, p in relu2.named_parameters()}
    mlp = relu2.transformer.h[0].mlp
    x = torch.randn(2, 5, 32)
    assert torch.allclose(mlp(x), mlp.c_proj(F.relu(mlp.c_fc(x)) ** 2))
    idx = torch.randint(0, 61, (3, 16))
    logits, _ = relu2(idx)
    assert logits.shape == (3, 16, 61)
    _, loss = relu2(idx, idx)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in relu2.named_parameters()
               if n.endswith("weight"))


def test_zero_init_zeroes_the_residual_projections_and_an_untied_head_and_still_learns():
    model = GPT(ModelConfig(**SMALL, zero_init=True, tie_embeddings=False))
    zero = {n for n, p in model.named_parameters() if n.endswith("weight") and not p.any()}
    assert zero == {f"transformer.h.{i}.{part}.c_proj.weight" for i in range(2) for part in ("attn", "mlp")} | \
        {"lm_head.weight"}
    idx = torch.randint(0, 61, (4, 16))
    logits, _ = model(idx)
    assert torch.equal(logits, torch.zeros_like(logits))  # uniform first predictions
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):  # the head moves first, then the gradient reaches the blocks through it
        _, loss = model(idx, idx)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.any() for n, p in model.named_parameters() if n.endswith("weight"))
    tied = GPT(ModelConfig(**SMALL, zero_init=True))  # a tied head is the embedding: not zeroed
    assert tied.lm_head.weight.any()


def test_bad_mlp_is_refused_by_name():
    with pytest.raises(ConfigError, match="model.mlp"):
        load_config(None, ["model.mlp=relu3"])


def test_hf_export_refuses_relu2():
    from lm.interop.hf import family

    with pytest.raises(CheckpointError, match="relu2"):
        family(dataclasses.replace(ModelConfig(**SMALL), mlp="relu2"))


def test_stop_and_resume_with_the_new_options_is_bit_identical(char_dataset, tmp_path):
    from lm.training.trainer import Trainer

    extra = ["model.mlp=relu2", "model.zero_init=true", "model.tie_embeddings=false", "optim.name=muon",
             "optim.schedule=wsd", "train.max_steps=6", "train.eval_interval=3"]

    def run(name, **kw):
        trainer = Trainer(load_config(None, training_overrides(char_dataset, tmp_path / name, *extra)), **kw)
        try:
            trainer.run(**({"stop_at_step": 3} if name == "b" and not kw else {}))
        finally:
            trainer.close()

    run("a")
    run("b")
    run("b", resume=True)
    losses = {name: [(r["step"], r["loss"]) for r in metric_records(tmp_path / name) if "loss" in r] for name in "ab"}
    assert [s for s, _ in losses["a"]] == list(range(1, 7))
    assert losses["a"] == losses["b"]  # exact float equality, step by step


def test_the_fast_config_is_nanogpts_plus_the_speedrun_ingredients():
    from speedrun import EVAL, FAST_CONFIG, STEPS, recipe_overrides
    from shakespeare_char import CONFIG

    fast = load_config(FAST_CONFIG, []).to_dict()
    built = load_config(CONFIG, [*recipe_overrides(), *STEPS, *EVAL]).to_dict()
    fast["train"].pop("out_dir"), built["train"].pop("out_dir")
    assert fast == built


def test_the_ablation_takes_out_each_ingredient_and_adds_each_left_off_one():
    from speedrun import INGREDIENTS, LEFT_OFF, ablation_rows

    rows = dict(ablation_rows())
    recipe = rows["recipe (all)"]
    assert rows["nanoGPT config"] == [] and set(recipe) == {o for v in INGREDIENTS.values() for o in v}
    for name, overrides in INGREDIENTS.items():
        assert rows[f"+ {name}"] == overrides
        assert set(rows[f"recipe - {name}"]) == set(recipe) - set(overrides)
    for name, overrides in LEFT_OFF.items():
        assert rows[f"recipe + {name}"] == [*recipe, *overrides]
        assert not set(overrides) & set(recipe)  # left off means not in the recipe
    assert len(rows) == 2 + 2 * len(INGREDIENTS) + len(LEFT_OFF)


@pytest.mark.slow  # two training commands and a data preparation: ~15-40 s on 2 shared cores
def test_speedrun_smoke(cli, tmp_path):
    text = tmp_path / "tiny.txt"
    text.write_text("".join(f"Line {i}: to be or not to be, that is the question.\n" for i in range(400)))
    out = tmp_path / "speedrun.json"
    r = cli("bench/speedrun.py", text, "--smoke", "--rounds", "1", "--out", out, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    (only,) = result["rounds"]
    base, ours = only["baseline"], only["ours"]
    assert base["steps"] == 6 and ours["steps"] == 6 and ours["tokens"] == 6 * 4 * 16
    assert base["wall_s"] > 0 and ours["wall_s"] > 0 and 0 < base["val_loss"] < 10
    assert result["target"] == [base["val_loss"]]
    if ours["reached"]:  # the ratio is ours' time to the baseline's loss over the baseline's time
        assert only["ratio"] == ours["to_target_s"] / base["wall_s"]
    assert "median ours / baseline" in r.stdout or "did not reach" in r.stdout
