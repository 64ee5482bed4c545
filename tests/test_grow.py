"""Growing a trained model (lm/grow/): the grown model computes the same logits (depth, width, both;
GPT-2 and Llama-style blocks, GQA, shared layers), every new weight learns, the grown run trains under
2-process FSDP like in one process, and the refusals are one line."""
import json
import os
import subprocess
import sys

import pytest
import torch

from data_prep import prepare
from lm.training import checkpoint
from lm.config.load import load_config
from lm.config.schema import ConfigError, ModelConfig
from lm.interop.export import load
from lm.grow import GrowSpec, block_sources, grow_model, grown_config
from lm.grow.run import main
from lm.model.gpt import GPT
from lm.training.trainer import Trainer
from tests import conftest
from tests.conftest import ROOT, assert_user_error, run_cli

BLOCKS = {
    "gpt2": ModelConfig(vocab_size=53, block_size=16, n_layer=2, n_head=2, n_embd=16, bias=True),
    "llama_gqa": ModelConfig(vocab_size=53, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                             norm="rmsnorm", position="rope", mlp="swiglu", bias=False, qk_norm=True),
    "shared": ModelConfig(vocab_size=53, block_size=16, n_layer=4, n_head=2, n_embd=16, share_layers=2,
                          activation="gelu_tanh"),
    "head_dim": ModelConfig(vocab_size=53, block_size=16, n_layer=2, n_head=3, n_embd=16, head_dim=8,
                            position="rope", mlp_hidden=40),  # a pruned model's shape: heads of 8, not 16/3
}
GROWTHS = {"depth": dict(depth=2), "width": dict(width=2), "both": dict(depth=2, width=2),
           "width3_kv_kept": dict(width=3, kv_kept=True)}


def trained_like(cfg: ModelConfig, seed=0) -> GPT:
    """A model whose every weight (norm gains and biases too) is away from its initial value, so a
    misplaced copy or a lost scale shows in the logits."""
    torch.manual_seed(seed)
    model = GPT(cfg, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def spec_for(cfg: ModelConfig, depth=1, width=1, kv_kept=False, **extra) -> GrowSpec:
    n_head = cfg.n_head * width
    return GrowSpec(n_layer=cfg.n_layer * depth, n_embd=cfg.n_embd * width, n_head=n_head,
                    n_kv_head=(cfg.n_kv_head or cfg.n_head) if kv_kept else 0, **extra)


def grown(model: GPT, spec: GrowSpec) -> GPT:
    new = grown_config(model.cfg, spec)
    sources = block_sources(model.cfg.n_layer // model.cfg.share_layers, new.n_layer // new.share_layers,
                            spec.depth, spec.where)
    return grow_model(model, new, sources, spec.noise_snr_db, spec.seed)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("growth", GROWTHS)
def test_grown_model_computes_the_same_logits(block, growth):
    cfg = BLOCKS[block]
    model = trained_like(cfg)
    spec = spec_for(cfg, **GROWTHS[growth])
    big = grown(model, spec).eval()
    assert big.num_params() > model.num_params()
    idx = torch.randint(0, cfg.vocab_size, (3, cfg.block_size), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (big(idx)[0] - model(idx)[0]).abs().max().item()
    assert diff <= 1e-5, f"{block} {growth}: max abs logit diff {diff:.3g}"


def test_zero_blocks_go_where_asked_and_stacking_changes_the_function():
    cfg = BLOCKS["gpt2"]
    assert block_sources(2, 4, "zero", None) == [0, None, 1, None]
    assert block_sources(4, 6, "zero", None) == [0, 1, None, 2, 3, None]
    assert block_sources(2, 4, "zero", [0, 1]) == [None, None, 0, 1]
    assert block_sources(2, 5, "stack", None) == [0, 1, 0, 1, 0]
    model = trained_like(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.block_size))
    first = grown(model, spec_for(cfg, depth=2, where=[0, 1]))
    with torch.no_grad():
        assert (first(idx)[0] - model(idx)[0]).abs().max() <= 1e-5
        stacked = grown(model, GrowSpec(n_layer=4, depth="stack"))
        assert (stacked(idx)[0] - model(idx)[0]).abs().max() > 1e-2  # not function-preserving: said so


def test_every_new_weight_gets_a_gradient_and_cloned_units_diverge():
    """A zero block's first step: only its two residual projections have gradients (dL/dy outer the
    branch's input; every other weight's gradient passes through those zero matrices). One AdamW step
    moves them off zero, and from the second step every element of every new weight has a gradient."""
    cfg = BLOCKS["llama_gqa"]
    model = trained_like(cfg)
    big = grown(model, spec_for(cfg, depth=2, width=2)).train()
    new_block = "transformer.h.1."  # [0, None, 1, None]
    optimizer = torch.optim.AdamW(big.parameters(), lr=1e-3)
    idx = torch.randint(0, cfg.vocab_size, (4, cfg.block_size), generator=torch.Generator().manual_seed(2))
    reached = {name: torch.zeros_like(p, dtype=torch.bool) for name, p in big.named_parameters()}
    for step in range(3):
        optimizer.zero_grad()
        big(idx[:, :-1], idx[:, 1:])[1].backward()
        grads = {name: p.grad for name, p in big.named_parameters()}
        if step == 0:
            for name, g in grads.items():
                if name.startswith(new_block):
                    assert (g.abs().sum() > 0) == ("c_proj" in name), name
        for name, g in grads.items():
            reached[name] |= g != 0
        optimizer.step()
    missing = {name: int((~r).sum()) for name, r in reached.items() if not r.all()}
    assert not missing, f"elements that never got a gradient: {missing}"
    # the two copies of the hidden vector, equal at the start, now compute different things: the
    # widening added capacity (test_without_noise_cloned_units_stay_copies: without noise they would not)
    assert copies_differ(big, idx) > 1e-3


def copies_differ(model: GPT, idx) -> float:
    """Largest difference between the two halves of the residual stream after the first block."""
    seen = {}
    hook = model.transformer.h[0].register_forward_hook(lambda m, i, out: seen.update(x=out))
    with torch.no_grad():
        model(idx)
    hook.remove()
    half = seen["x"].shape[-1] // 2
    return (seen["x"][..., :half] - seen["x"][..., half:]).abs().max().item()


def test_cloned_halves_start_equal():
    cfg = BLOCKS["llama_gqa"]
    big = grown(trained_like(cfg), spec_for(cfg, width=2))
    assert copies_differ(big, torch.randint(0, cfg.vocab_size, (2, cfg.block_size))) <= 1e-5


def test_without_noise_cloned_units_stay_copies():
    """Why the noise: with exact copies the two halves get the same gradient and never part."""
    cfg = BLOCKS["gpt2"]
    big = grown(trained_like(cfg), spec_for(cfg, width=2, noise_snr_db=float("inf"))).train()
    optimizer = torch.optim.AdamW(big.parameters(), lr=1e-2)
    idx = torch.randint(0, cfg.vocab_size, (4, cfg.block_size))
    for _ in range(3):
        optimizer.zero_grad()
        big(idx[:, :-1], idx[:, 1:])[1].backward()
        optimizer.step()
    w = big.transformer.h[0].mlp.c_fc.weight  # rows: MLP units cloned in blocks
    assert torch.allclose(w[: w.shape[0] // 2], w[w.shape[0] // 2:], atol=1e-6)
    assert copies_differ(big, idx) <= 1e-5


@pytest.mark.parametrize("spec, fragment", [
    (GrowSpec(n_layer=1), "would shrink the model"),
    (GrowSpec(n_embd=24), "is not a multiple of n_embd 16"),
    (GrowSpec(n_embd=32, n_head=3), "is not a multiple of n_head 2"),
    (GrowSpec(n_embd=32, n_head=2), "growth keeps each head's size"),
    (GrowSpec(n_embd=32, n_kv_head=3), "is not a multiple of n_kv_head 2"),
    (GrowSpec(n_layer=4, n_embd=16), None),
    (GrowSpec(), "nothing to grow"),
    (GrowSpec(n_layer=4, depth="stack", where=[1, 3]), "--depth stack copies"),
])
def test_refusals_are_one_line(spec, fragment):
    cfg = BLOCKS["gpt2"]
    if fragment is None:
        grown_config(cfg, spec)
        return
    with pytest.raises(ConfigError, match=fragment) as info:
        grown_config(cfg, spec)
    assert "\n" not in str(info.value)


def test_grouped_heads_must_divide_and_shared_layers_must_fit():
    llama = BLOCKS["llama_gqa"]
    with pytest.raises(ConfigError, match="does not divide n_head 8"):
        grown_config(llama, GrowSpec(n_embd=64, n_kv_head=6))
    with pytest.raises(ConfigError, match="not a multiple of model.share_layers = 2"):
        grown_config(BLOCKS["shared"], GrowSpec(n_layer=5))
    with pytest.raises(ConfigError, match="expected 2 distinct block indices"):
        block_sources(2, 4, "zero", [1, 1])


# ---- the command line: a trained run in, a run directory out ----------------------------------------
TINY = [*conftest.TINY, "optim.warmup_steps=2", "optim.schedule=constant", "model.bias=true"]


@pytest.fixture(scope="module")
def run(tiny_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("grow")
    prepare([str(tiny_corpus)], root / "data", tokenizer="char", show_progress=False)
    out = root / "small"
    Trainer(load_config(None, [*TINY, f"data.dir={root / 'data'}", f"train.out_dir={out}", "train.max_steps=4",
                               "train.eval_interval=4"])).run()
    return out


def logits_of(path, idx):
    _, model = load(path)
    with torch.no_grad():
        return model(idx)[0]


def test_cli_writes_a_run_that_loads_samples_and_continues(run, tmp_path, capsys):
    out = tmp_path / "big"
    assert main([str(run), str(out), "--n-layer", "4", "--n-embd", "64"]) == 0
    assert "function-preserving" in capsys.readouterr().out
    idx = torch.randint(0, 20, (2, 32))
    assert (logits_of(out, idx) - logits_of(run, idx)).abs().max() <= 1e-5
    saved = checkpoint.load_config(checkpoint.resolve(out))
    assert (saved.model.n_layer, saved.model.n_embd, saved.model.n_head) == (4, 64, 4)
    assert saved.init.from_ == str(out) and saved.data.dir == checkpoint.load_config(checkpoint.resolve(run)).data.dir
    record = json.loads((out / "grow.json").read_text())
    assert record["blocks"] == [0, None, 1, None] and record["function_preserving"]
    assert not list(tmp_path.glob(".big*"))  # the temporary sibling is gone
    # an existing OUT is refused, then replaced with --force
    assert main([str(run), str(out), "--n-layer", "4"]) == 2
    assert "already exists (a non-empty directory); choose another path or pass --force" in capsys.readouterr().err
    assert main([str(run), str(out), "--n-layer", "3", "--force"]) == 0
    assert checkpoint.load_config(checkpoint.resolve(out)).model.n_layer == 3
    # lm.export reads it (so do lm.eval and sample.py: the same loader)
    from lm.export import main as export

    assert export([str(out), str(tmp_path / "exported"), "--format", "safetensors"]) == 0
    assert (logits_of(tmp_path / "exported", idx) - logits_of(run, idx)).abs().max() <= 1e-5
    # growing into the source run itself is refused, even with --force
    assert main([str(run), str(run), "--n-layer", "4", "--force"]) == 2
    assert "holds the input" in capsys.readouterr().err
    # sample.py reads it; training continues from it with its own config (schedule and optimizer afresh)
    import sample  # the repository root is on sys.path, as for `tests.conftest`

    assert sample.main([str(out), "--max-new-tokens", "5", "--prompt", "the"]) == 0
    cont = tmp_path / "cont"
    result = Trainer(load_config(out / "config.toml", [f"train.out_dir={cont}", "train.max_steps=2",
                                                         "train.eval_interval=2"])).run()
    assert result["step"] == 2


@pytest.mark.slow
def test_cli_refusal_is_one_line_and_exit_2(run, tmp_path):
    r = run_cli("-m", "lm.grow", run, tmp_path / "x", "--n-embd", "48")
    assert_user_error(r, "--n-embd 48 is not a multiple of n_embd 32")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("argv, fragment", [
    (["--n-layer", "1"], "would shrink the model"),
    (["--n-embd", "64", "--n-head", "2"], "growth keeps each head's size"),
    (["--n-embd", "64", "--n-kv-head", "3"], "is not a multiple of n_kv_head 2"),
    (["--n-embd", "64", "--n-head", "3"], "--n-head 3 is not a multiple of n_head 2"),
    (["--n-layer", "4", "--depth", "stack", "--where", "1,3"], "--depth stack copies"),
])
def test_refusals_in_process(run, tmp_path, capsys, argv, fragment):
    assert main([str(run), str(tmp_path / "x"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0]
    assert not (tmp_path / "x").exists()


def test_missing_source_and_config_source_are_refused(tmp_path, capsys):
    assert main([str(tmp_path / "nothing"), str(tmp_path / "x"), "--n-layer", "4"]) == 2
    assert "no such run or checkpoint directory" in capsys.readouterr().err
    assert main([str(ROOT / "configs/gpt-10b.toml"), str(tmp_path / "x"), "--n-layer", "60"]) == 2
    assert "a config holds no trained weights" in capsys.readouterr().err


def test_plan_10b_to_15b(capsys):
    assert main([str(ROOT / "configs/gpt-10b.toml"), "--plan", "--n-layer", "60", "--world-size", "64"]) == 0
    text = capsys.readouterr().out
    assert "10,433,769,984" in text and "40 layers x 4608 wide" in text and "60 layers x 4608 wide" in text
    assert main([str(ROOT / "configs/gpt-10b.toml"), "--plan", "--n-layer", "60", "--json"]) == 0
    plans = json.loads(capsys.readouterr().out)
    assert plans["before"]["params"] == 10_433_769_984
    assert 15.0e9 < plans["after"]["params"] < 16.0e9
    assert plans["after"]["mem_total"] > plans["before"]["mem_total"]


def fsdp_train(*args, nproc):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    r = subprocess.run([*(launcher if nproc > 1 else [sys.executable]), "train.py", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow
def test_grown_run_trains_under_two_process_fsdp_like_one_process(run, tmp_path):
    out = tmp_path / "big"
    assert main([str(run), str(out), "--n-layer", "4", "--n-embd", "64"]) == 0
    common = [str(out / "config.toml"), "train.max_steps=3", "train.eval_interval=3", "log.interval=1"]
    fsdp_train(*common, f"train.out_dir={tmp_path / 'one'}", "train.batch_size=4", nproc=1)
    fsdp_train(*common, f"train.out_dir={tmp_path / 'two'}", "train.batch_size=2", nproc=2)

    def losses(directory):
        records = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in records if "loss" in r}

    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(two) == [1, 2, 3]
    for step in two:
        assert two[step] == pytest.approx(one[step], rel=1e-5)
