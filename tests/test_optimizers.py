"""The optimizers (lm/training/optim.py): Newton-Schulz, Muon against a plain reference, which parameters Muon takes,
weight decay on matrices only, a bit-exact resume for each optimizer, each under 2-process FSDP, config
errors, and bench/optimizers.py at a tiny budget."""
import json
import math
import subprocess
import sys

import pytest
import torch

from lm.training import checkpoint, checkpoint_files
from lm.config.load import load_config
from lm.config.schema import ConfigError
from lm.model.gpt import GPT
from lm.training.optim import NS_COEFFICIENTS, build_optimizer, newton_schulz
from lm.training.trainer import Trainer
from tests.conftest import ROOT
from tests.conftest import TRAIN_BASE as BASE, losses, train
from tests.test_train import weights

NAMES = ("adamw", "sgd", "rmsprop", "muon")
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    """Matrices this small gain nothing from a second thread, and on a busy machine lose ~10x to contention
    (the subprocess runs get OMP_NUM_THREADS=1 likewise)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_gpt(*extra) -> tuple[GPT, object]:
    cfg = load_config(None, ["model.n_layer=2", "model.n_head=4", "model.n_kv_head=2", "model.n_embd=32",
                             "model.block_size=16", "model.vocab_size=50", *extra])
    return GPT(cfg.model, seed=3), cfg


@pytest.mark.parametrize("shape", [(96, 32), (32, 96), (64, 40), (40, 64)])
def test_newton_schulz_brings_singular_values_near_one(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 1e3  # the scale is normalized away
    x = newton_schulz(g, steps=5)
    assert x.shape == g.shape and x.dtype == g.dtype
    s = torch.linalg.svdvals(x.double())
    assert 0.5 <= s.min() and s.max() <= 1.5, s  # the quintic's designed band is about [0.7, 1.2]
    u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    polar = u @ vh  # the exact orthogonal factor it approximates: the same directions
    assert torch.nn.functional.cosine_similarity(x.double().flatten(), polar.flatten(), dim=0) > 0.97


def plain_muon(w, grads, lrs, wd, beta, splits):
    """Muon written out in float64: Nesterov momentum, each part of rows normalized and put through five
    quintic Newton-Schulz steps (transposed when tall), scaled by 0.2 sqrt(max(rows, cols)), decoupled decay."""
    a, b, c = NS_COEFFICIENTS
    w, buf = w.double(), torch.zeros_like(w, dtype=torch.float64)
    for g, lr in zip(grads, lrs):
        g = g.double()
        buf = beta * buf + (1 - beta) * g
        u = (1 - beta) * g + beta * buf
        parts = []
        for part in (u.split(splits) if splits else [u]):
            tall = part.shape[0] > part.shape[1]
            x = part.T if tall else part
            x = x / (x.norm() + 1e-7)  # the reference's guard against a zero gradient
            for _ in range(5):
                x = a * x + b * (x @ x.T) @ x + c * (x @ x.T) @ (x @ x.T) @ x
            parts.append((x.T if tall else x) * 0.2 * math.sqrt(max(part.shape)))
        w = w * (1 - lr * wd) - lr * torch.cat(parts)
    return w


def test_muon_matches_a_plain_reference_and_adamw_takes_the_rest():
    model, cfg = tiny_gpt("optim.name=muon", "optim.lr=0.01", "optim.muon_lr=0.05", "optim.momentum=0.9",
                          "optim.weight_decay=0.1")
    model.double()  # Newton-Schulz in fp64 too: a gradient's near-zero singular values grow fp32 rounding ~500x
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, cfg.optim, CPU)
    lrs, grads = [0.01, 0.005, 0.0025], {n: [] for n in start}  # the schedule's lr, set on every group
    x = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(1))
    for lr in lrs:
        for group in optimizer.param_groups:
            group["lr"] = lr
        model(x, x.roll(1, 1))[1].backward()
        for n, p in model.named_parameters():
            grads[n].append(p.grad.clone())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    params = dict(model.named_parameters())
    # Muon's lr follows the schedule in proportion: muon_lr / lr = 5
    for name, splits in [("transformer.h.1.attn.c_attn.weight", [32, 16, 16]),  # q, k, v of 2 kv heads
                         ("transformer.h.0.mlp.c_fc.weight", None),  # tall, 128 x 32
                         ("transformer.h.0.mlp.c_proj.weight", None)]:  # wide
        expected = plain_muon(start[name], grads[name], [5 * lr for lr in lrs], 0.1, 0.9, splits)
        torch.testing.assert_close(params[name], expected, rtol=1e-9, atol=1e-12)
    # the rest is AdamW, at the schedule's lr, decaying the embeddings only
    rest = ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.h.0.ln_1.bias",
            "transformer.h.0.attn.c_attn.bias"]
    copies = {n: start[n].clone().requires_grad_() for n in rest}
    adamw = torch.optim.AdamW([{"params": [copies[n] for n in rest[:2]], "weight_decay": 0.1},
                               {"params": [copies[n] for n in rest[2:]], "weight_decay": 0.0}],
                              betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    for i, lr in enumerate(lrs):
        for group in adamw.param_groups:
            group["lr"] = lr
        for n in rest:
            copies[n].grad = grads[n][i]
        adamw.step()
    for n in rest:
        torch.testing.assert_close(params[n], copies[n].detach(), rtol=1e-9, atol=1e-12)


def test_muon_takes_the_hidden_matrices_by_name():
    def split(model, cfg):
        optimizer = build_optimizer(model, cfg.optim, CPU)
        names = {id(p): n for n, p in model.named_parameters()}
        muon = {names[id(p)] for g in optimizer.param_groups if g["muon"] for p in g["params"]}
        adamw = {names[id(p)] for g in optimizer.param_groups if not g["muon"] for p in g["params"]}
        assert not muon & adamw and len(muon | adamw) == len(names)
        return muon, adamw

    muon, adamw = split(*tiny_gpt("optim.name=muon", "model.bias=true"))
    assert muon == {f"transformer.h.{i}.{m}" for i in (0, 1)
                    for m in ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")}
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias",
            "transformer.h.0.ln_1.weight", "transformer.h.1.mlp.c_fc.bias"} <= adamw  # lm_head is wte (tied)
    muon, adamw = split(*tiny_gpt("optim.name=muon", "model.mlp=swiglu", "model.norm=rmsnorm",
                                  "model.position=rope", "model.qk_norm=true", "model.bias=false"))
    assert {m.split(".", 3)[3] for m in muon} == {"attn.c_attn.weight", "attn.c_proj.weight", "mlp.gate_proj.weight",
                                                  "mlp.up_proj.weight", "mlp.c_proj.weight"}
    assert "transformer.h.0.attn.q_norm.weight" in adamw and "transformer.wte.weight" in adamw


@pytest.mark.parametrize("name", NAMES)
def test_weight_decay_reaches_matrices_only(name):
    model, cfg = tiny_gpt(f"optim.name={name}", "model.bias=true", "optim.weight_decay=0.5", "optim.lr=0.1")
    optimizer = build_optimizer(model, cfg.optim, CPU)
    for group in optimizer.param_groups:
        assert all(p.dim() >= 2 for p in group["params"]) if group["weight_decay"] else \
            all(p.dim() < 2 for p in group["params"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # no gradient: only weight decay can move a parameter
    optimizer.step()
    for n, p in model.named_parameters():
        if p.dim() >= 2:  # pulled towards 0 (RMSprop's first, normalized step may overshoot some elements)
            assert (p * before[n]).sum() < (before[n] ** 2).sum(), n
        else:
            assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("name", NAMES)
def test_every_optimizer_resumes_bit_exactly(name, char_dataset, tmp_path):
    def cfg(run):
        return load_config(None, [*BASE, f"data.dir={char_dataset}", f"train.out_dir={tmp_path / run}", "train.batch_size=4",
                                  f"optim.name={name}", "optim.schedule=cosine", "optim.warmup_steps=2",
                                  "train.max_steps=4", "train.eval_interval=4", "optim.muon_lr=0.02",
                                  "optim.momentum=0.5" if name == "rmsprop" else "optim.nesterov=true"])

    Trainer(cfg("straight")).run()
    Trainer(cfg("resumed")).run(stop_at_step=2)
    assert max(losses(tmp_path / "resumed")) == 2
    Trainer(cfg("resumed"), resume=True).run()
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(straight) == sorted(resumed) == [1, 2, 3, 4]
    assert straight == resumed  # exact float equality
    ws, wr = (weights(checkpoint.resolve(tmp_path / run)) for run in ("straight", "resumed"))
    assert all(torch.equal(ws[k], wr[k]) for k in ws)
    # the state was in the checkpoint, under the parameters' names
    state = {"adamw": "exp_avg_sq", "sgd": "momentum_buffer", "rmsprop": "momentum_buffer", "muon": "momentum_buffer"}
    keys = checkpoint_files.read_metadata(checkpoint.resolve(tmp_path / "resumed")).state_dict_metadata
    assert f"optim.transformer.h.0.mlp.c_fc.weight.{state[name]}" in keys


def test_resuming_with_another_optimizer_is_refused(char_dataset, tmp_path):
    def cfg(name):
        return load_config(None, [*BASE, f"data.dir={char_dataset}", f"train.out_dir={tmp_path / 'r'}", "train.batch_size=4",
                                  "train.max_steps=2", f"optim.name={name}"])

    Trainer(cfg("adamw")).run()
    with pytest.raises(checkpoint.CheckpointError) as e:
        Trainer(cfg("muon"), resume=True)
    message = str(e.value)
    assert "\n" not in message and "optim.name = 'adamw'" in message and "'muon'" in message


@pytest.mark.slow
def test_two_process_fsdp_muon_matches_one_process_and_resumes_on_one(char_dataset, tmp_path):
    # mlp_hidden 67: c_fc's 67 rows shard unevenly (34 + 33); c_attn's q | k | v boundary falls inside a shard
    common = [f"data.dir={char_dataset}", "train.eval_interval=4", "optim.name=muon", "optim.muon_lr=0.02",
              "model.mlp_hidden=67", "optim.warmup_steps=2"]

    def one_process(run, steps, resume=False):
        cfg = load_config(ROOT / "configs" / "shakespeare_char.toml",  # what train() runs, with BASE
                          [*BASE, *common, f"train.out_dir={tmp_path / run}", "train.batch_size=4",
                           f"train.max_steps={steps}"])
        Trainer(cfg, resume=resume).run()
        return cfg

    single = one_process("single", 6)
    # 2 ranks x 2 sequences read the same global samples as 1 rank x 4
    train(*common, f"train.out_dir={tmp_path / 'fsdp'}", "train.batch_size=2", "train.max_steps=4", nproc=2)
    one, two = losses(tmp_path / "single"), losses(tmp_path / "fsdp")
    assert sorted(two) == [1, 2, 3, 4]
    for step in two:
        assert two[step] == pytest.approx(one[step], rel=1e-5)
    w1, w2 = weights(tmp_path / "single" / "ckpt" / "step_00000004"), weights(checkpoint.resolve(tmp_path / "fsdp"))
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-5, atol=1e-6)
    assert not torch.equal(w1["transformer.h.0.mlp.c_fc.weight"],
                           GPT(single.model, seed=single.train.seed).transformer.h[0].mlp.c_fc.weight)
    # the 2-rank checkpoint's sharded momentum resumes in one process
    one_process("fsdp", 6, resume=True)
    resumed = losses(tmp_path / "fsdp")
    for step in (5, 6):
        assert resumed[step] == pytest.approx(one[step], rel=1e-5)



@pytest.mark.slow
@pytest.mark.parametrize("name, lr, atol", [("sgd", 0.05, 1e-6), ("rmsprop", 0.002, 2e-4)])
def test_two_process_fsdp_elementwise_optimizers_match_one_process(name, lr, atol, char_dataset, tmp_path):
    # AdamW's FSDP run is test_distributed's; these keep their state per element of each rank's shard.
    # RMSprop's early steps are lr * g / (sqrt(0.05) |g| + eps): where |g| is near eps, the ranks' reduction-
    # order rounding of g (~1e-9) moves the step by up to ~lr / 10, so weights agree to lr / 10 = 2e-4 (a step:
    # ~1e-2; 1e-4 failed at 1.005e-4 on one session's train/val split, which hashes the corpus's temporary path).
    common = [f"data.dir={char_dataset}", "train.eval_interval=4", f"optim.name={name}", f"optim.lr={lr}",
              "optim.momentum=0.5", "model.mlp_hidden=67", "optim.warmup_steps=2", "train.max_steps=4"]
    cfg = load_config(ROOT / "configs" / "shakespeare_char.toml",
                      [*BASE, *common, f"train.out_dir={tmp_path / 'single'}", "train.batch_size=4"])
    Trainer(cfg).run()
    train(*common, f"train.out_dir={tmp_path / 'fsdp'}", "train.batch_size=2", nproc=2)
    one, two = losses(tmp_path / "single"), losses(tmp_path / "fsdp")
    assert sorted(two) == sorted(one) == [1, 2, 3, 4]
    for step in two:
        assert two[step] == pytest.approx(one[step], rel=1e-5)
    w1, w2 = (weights(checkpoint.resolve(tmp_path / run)) for run in ("single", "fsdp"))
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-5, atol=atol)
    keys = checkpoint_files.read_metadata(checkpoint.resolve(tmp_path / "fsdp")).state_dict_metadata
    assert "optim.transformer.h.0.mlp.c_fc.weight.momentum_buffer" in keys

@pytest.mark.parametrize("override, key", [
    ("optim.name=adam", "optim.name"), ("optim.momentum=1.0", "optim.momentum"),
    ("optim.momentum=-0.5", "optim.momentum"), ("optim.ns_steps=0", "optim.ns_steps"),
    ("optim.muon_lr=-0.1", "optim.muon_lr"), ("optim.nesterov=1", "optim.nesterov"),
])
def test_bad_optimizer_settings_are_one_line_errors(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert key in str(e.value) and "\n" not in str(e.value)
    if override == "optim.name=adam":
        assert "did you mean 'adamw'" in str(e.value)


@pytest.mark.slow
def test_the_optimizer_bench_smoke(tmp_path):
    text = tmp_path / "tiny.txt"
    text.write_text("".join(f"Line {i}: to be or not to be, that is the question.\n" for i in range(300)))
    out = tmp_path / "optimizers.json"
    r = subprocess.run([sys.executable, "bench/optimizers.py", str(text), "--smoke", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [row["optimizer"] for row in result["best"]] == list(NAMES)
    assert all(0 < row["val_loss"] < 10 and row["lr"] > 0 for row in result["best"])
    assert result["steps"] == 3 and len(result["runs"]) == len(NAMES)
    for name in NAMES:
        assert name in r.stdout
