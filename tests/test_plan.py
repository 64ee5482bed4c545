"""The planner (lm/training/plan.py) against the real thing: parameter counts of the presets, FSDP2 shard bytes over
a fake process group (no memory, no GPUs), sharded initialization, and measured CPU memory."""
import contextlib
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from conftest import ROOT, run_cli
from lm.config.load import load_config
from lm.model.gpt import GPT
from lm.training.parallel import shard
from lm.training.plan import param_shapes, parse_memory, plan, shard_numel

PRESETS = {"gpt-1.3b": 1_315_276_800, "gpt-6.7b": 6_657_150_976, "gpt-10b": 10_433_769_984,
           "llama-style-1b": 1_235_814_400}  # Llama 3.2 1B's count
SMALL_UNEVEN = ["model.vocab_size=65", "model.block_size=24", "model.n_layer=2", "model.n_head=3",
                "model.n_embd=48", "train.dtype=float32"]


def preset(name, *overrides):
    return load_config(ROOT / "configs" / f"{name}.toml", list(overrides))


@contextlib.contextmanager
def fake_world(world_size: int, rank: int):
    """One rank of a `world_size` process group that never communicates: shapes without the memory."""
    dist.init_process_group("fake", rank=rank, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def sharded_meta_model(cfg):
    with torch.device("meta"):
        model = GPT(cfg.model, seed=cfg.train.seed)
    shard(model, cfg, torch.device("cpu"))
    return model


@pytest.mark.parametrize("name", PRESETS)
def test_preset_parameter_counts_are_exact(name):
    cfg = preset(name)
    with torch.device("meta"):
        model = GPT(cfg.model)
    p = plan(cfg, world_size=8)
    assert sum(t.numel() for t in model.parameters()) == p.params == PRESETS[name]
    assert p.embedding_params + p.non_embedding_params == p.params
    assert p.non_embedding_params == model.num_params(non_embedding=True)
    assert [(n, tuple(t.shape)) for n, t in model.named_parameters()] == param_shapes(cfg.model)
    m = cfg.model
    assert p.flops_per_token == 6 * p.params + 12 * m.n_layer * m.n_embd * m.block_size


def test_preset_shapes():
    m = preset("gpt-10b").model
    assert (m.n_layer, m.n_embd, m.n_head, m.n_embd // m.n_head, m.block_size) == (40, 4608, 36, 128, 2048)
    m = preset("gpt-6.7b").model
    assert (m.n_layer, m.n_embd, m.n_head, m.vocab_size) == (32, 4096, 32, 50304)


@pytest.mark.parametrize("name,overrides,world_size,rank", [
    ("gpt-10b", [], 8, 0), ("gpt-10b", [], 8, 7), ("gpt-10b", [], 64, 0), ("gpt-10b", [], 64, 63),
    # uneven dim 0: 65 rows over 8 ranks is 7 x 9 + 2; 48 rows over 64 ranks leaves ranks 48..63 empty
    ("gpt-10b", SMALL_UNEVEN, 8, 7), ("gpt-10b", SMALL_UNEVEN, 64, 63), ("gpt-10b", SMALL_UNEVEN, 7, 6),
])
def test_planned_state_bytes_equal_fsdp2_shards(name, overrides, world_size, rank):
    cfg = preset(name, *overrides)
    with fake_world(world_size, rank):
        model = sharded_meta_model(cfg)
        local = {n: p.to_local() for n, p in model.named_parameters()}
    expected = {n: shard_numel(shape, world_size, rank) for n, shape in param_shapes(cfg.model)}
    assert {n: t.numel() for n, t in local.items()} == expected
    numel = sum(t.numel() for t in local.values())
    assert all(t.dtype == torch.float32 for t in local.values())  # fp32 master weights
    p = plan(cfg, world_size=world_size, rank=rank)
    assert p.mem_params == numel * 4
    assert p.mem_grads == numel * 4  # gradients take the sharded parameter's shape and dtype
    assert p.mem_optimizer == numel * 8  # AdamW exp_avg + exp_avg_sq, fp32, like the shard


@pytest.mark.slow
def test_10b_meta_build_sharded_over_64_fake_ranks_is_fast_and_small():
    # a fresh process, so the peak RSS is this build's and not an earlier test's
    code = """
import time, torch, torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
from lm.config.load import load_config
from lm.model.gpt import GPT
from lm.training.parallel import shard
cfg = load_config("configs/gpt-10b.toml")
def peak():  # this process's own peak (ru_maxrss would carry pytest's over from fork and exec)
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
rss0, t0 = peak(), time.perf_counter()
dist.init_process_group("fake", rank=0, world_size=64, store=FakeStore())
with torch.device("meta"):
    model = GPT(cfg.model)
shard(model, cfg, torch.device("cpu"))
numel = sum(p.to_local().numel() for p in model.parameters())
print(time.perf_counter() - t0, (peak() - rss0) * 1024, numel)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    seconds, grown, numel = out.stdout.split()
    assert float(seconds) < 60
    assert int(grown) < 2e9
    assert int(numel) * 16 == plan(preset("gpt-10b"), world_size=64).mem_params * 4


SHARD_INIT = """
import sys, torch, torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
from lm.config.load import load_config
from lm.model.gpt import GPT
from lm.training.parallel import shard
world_size, rank, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
cfg = load_config(None, sys.argv[4:])
dist.init_process_group("fake", rank=rank, world_size=world_size, store=FakeStore())
with torch.device("meta"):
    model = GPT(cfg.model, seed=cfg.train.seed)
shard(model, cfg, torch.device("cpu"))
model.to_empty(device="cpu")
model.init_weights(cfg.train.seed)
torch.save({n: p.to_local().detach().clone() for n, p in model.named_parameters()}, out)
"""


@pytest.mark.slow
def test_sharded_init_equals_single_process_init(tmp_path):
    # one process per rank: FSDP2's default device mesh keeps the first process group's rank, so
    # re-initializing a fake group in one process would slice every rank's shard like rank 0's
    world_size, overrides = 2, SMALL_UNEVEN + ["model.bias=true", "train.seed=7"]
    procs = [subprocess.Popen([sys.executable, "-c", SHARD_INIT, str(world_size), str(rank),
                               str(tmp_path / f"rank{rank}.pt"), *overrides], cwd=ROOT, stderr=subprocess.PIPE)
             for rank in range(world_size)]
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()
    cfg = load_config(None, overrides)
    whole = {n: p.detach() for n, p in GPT(cfg.model, seed=7).named_parameters()}
    shards = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world_size)]
    for n, full in whole.items():
        chunks = full.chunk(world_size, dim=0)  # FSDP2's dim-0 split: 65 rows -> 33, 32
        for rank in range(world_size):
            assert torch.equal(shards[rank][n], chunks[rank]), f"rank {rank}: {n}"
        joined = torch.cat([s[n] for s in shards])
        assert joined.mean().item() == full.mean().item() and joined.std().item() == full.std().item()
        if n.endswith("c_fc.weight"):  # N(0, 0.02) in both
            assert abs(joined.std().item() - 0.02) < 0.002


MEASURE = """
import json, sys, torch
from lm.config.load import load_config
from lm.training.optim import build_optimizer
from lm.training.parallel import World, build_model
cfg = load_config(None, sys.argv[1:])
model = build_model(cfg, World(), torch.device("cpu"))
optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
g = torch.Generator().manual_seed(0)
x, y = (torch.randint(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.model.block_size), generator=g)
        for _ in range(2))
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
    for _ in range(3):
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
# every allocation (+bytes) and free (-bytes) in order: the peak of live tensor bytes above the weights
events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
live = peak = 0
for e in events:
    live += e.nbytes()
    peak = max(peak, live)
print(json.dumps({"growth": peak}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("loss_chunk", [0, 512])  # whole fp32 logits; the chunked loss (lm/model/loss.py)
def test_planned_peak_matches_measured_cpu_memory(loss_chunk):
    overrides = ["model.n_layer=4", "model.n_embd=512", "model.n_head=8", "model.block_size=256",
                 "model.vocab_size=2048", "model.bias=false", "train.batch_size=8", "train.dtype=float32",
                 "train.threads=2", f"model.loss_chunk={loss_chunk}"]
    # the profiler's allocation record, not RSS: RSS also counts the C heap's fragmentation and lazily
    # loaded libraries, which differed by 200 MB between two machines with the same image
    out = subprocess.run([sys.executable, "-c", MEASURE, *overrides], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    measured = json.loads(out.stdout)["growth"]
    p = plan(load_config(None, overrides), world_size=1, dtype="float32")
    assert p.mem_grad_accum == 0 and p.mem_temporaries > 0
    predicted = p.mem_total - p.mem_params  # the weights were resident before the first step
    assert abs(predicted - measured) / measured < 0.15, (predicted, measured)


def test_chunked_loss_cuts_the_logits_line_at_10b():
    chunked = plan(preset("gpt-10b"), world_size=64)
    whole = plan(preset("gpt-10b", "model.loss_chunk=0"), world_size=64)
    b, s, V, h = 16, 2048, 50304, 4608
    assert whole.mem_logits == whole.mem_logits_whole == chunked.mem_logits_whole == b * s * V * 14  # 23.1 GB
    k = chunked.loss_chunk
    assert k == preset("gpt-10b").model.loss_chunk > 0
    # one bf16-computed chunk (fp32 softmax + bf16 gradient), the fp32 grad_weight (+ a chunk's bf16
    # product), the bf16 grad_hidden of the all-gathered (FSDP) compute
    assert chunked.mem_logits == k * V * 6 + V * h * 6 + b * s * h * 2
    assert chunked.mem_logits * 4 <= whole.mem_logits  # measured: 2.93 GB against 23.08 GB (7.9x)
    assert chunked.mem_total < whole.mem_total and chunked.max_micro_batch > whole.max_micro_batch
    # a chunk above the micro-batch's tokens is one chunk of them
    assert plan(preset("gpt-10b", "model.loss_chunk=1000000"), world_size=64, micro_batch=1).mem_logits == \
        plan(preset("gpt-10b", f"model.loss_chunk={s}"), world_size=64, micro_batch=1).mem_logits


@pytest.mark.slow
def test_plan_cli_prints_the_table_and_json(tmp_path):
    out = run_cli("train.py", "configs/gpt-10b.toml", "--plan", "--world-size", "64", "--plan-json",
                  tmp_path / "plan.json", timeout=120)
    assert out.returncode == 0, out.stderr
    for row in ("parameters", "FLOPs per token", "optimizer state", "activations", "logits", "temporaries",
                "peak total", "largest micro-batch that fits", "tokens/day"):
        assert row in out.stdout
    record = json.loads((tmp_path / "plan.json").read_text())
    assert record["world_size"] == 64 and record["params"] == PRESETS["gpt-10b"] and record["fits"]
    assert math.isclose(record["tokens_per_s"], 0.4 * 64 * 989e12 / record["flops_per_token"])


def test_plan_reports_what_does_not_fit():
    p = plan(preset("gpt-10b"), world_size=1, gpu_memory=parse_memory("80GB"))
    assert not p.fits and p.max_micro_batch == 0
    assert parse_memory("96GiB") == 96 * 2**30
    # keeping gathered weights after forward and no checkpointing cost memory
    base = plan(preset("gpt-10b"), world_size=64)
    kept = plan(preset("gpt-10b", "parallel.reshard_after_forward=false"), world_size=64)
    assert kept.mem_temporaries > base.mem_temporaries
    assert base.mem_activations_none > base.mem_activations_full == base.mem_activations
    assert base.mem_activations_no_flash > base.mem_activations_none
    accum = plan(preset("gpt-10b", "train.grad_accum=4"), world_size=64)
    assert accum.mem_grad_accum == 4 * accum.params and accum.mem_total > base.mem_total
