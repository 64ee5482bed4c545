"""The chunked head + cross-entropy (lm/model/loss.py, model.loss_chunk) against F.cross_entropy on whole logits:
values and gradients in fp32, bf16 and under autocast, ignored targets, a chunk that does not divide the
tokens, the tied head through GPT.forward, FSDP2 over two CPU processes, and the memory it saves."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from lm.config.load import load_config
from lm.config.schema import ModelConfig
from lm.model.loss import linear_cross_entropy
from lm.model.gpt import GPT

# fp32: the same arithmetic in another order. bf16: both sides round the logits' matmul and the gradient
# matmuls to bf16 (8 bits of mantissa), in different places: 1.6e-2 relative (torch's bf16 default) plus
# an absolute 2e-3 of gradients whose largest entries are ~0.3.
FP32 = dict(rtol=1e-5, atol=1e-6)
BF16 = dict(rtol=1.6e-2, atol=2e-3)


def inputs(N=37, C=16, V=50, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, C, generator=g).to(dtype).requires_grad_()
    weight = (0.5 * torch.randn(V, C, generator=g)).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::5] = -100  # ignored, as F.cross_entropy's default ignore_index
    return hidden, weight, targets


def reference(hidden, weight, targets, grad_output=1.0):
    loss = F.cross_entropy(F.linear(hidden, weight).float(), targets)
    gh, gw = torch.autograd.grad(loss * grad_output, (hidden, weight))
    return loss.detach(), gh, gw


def chunked(hidden, weight, targets, chunk, grad_output=1.0):
    loss = linear_cross_entropy(hidden, weight, targets, chunk)
    gh, gw = torch.autograd.grad(loss * grad_output, (hidden, weight))
    return loss.detach(), gh, gw


@pytest.mark.parametrize("chunk", [1, 8, 37, 1000])  # 8 leaves a last chunk of 5 tokens
def test_fp32_loss_and_gradients_equal_cross_entropy(chunk):
    h, w, t = inputs()
    for got, want in zip(chunked(h, w, t, chunk, 3.0), reference(h, w, t, 3.0)):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, **FP32)


def test_bf16_loss_and_gradients_equal_cross_entropy():
    h, w, t = inputs(N=300, C=64, V=500, dtype=torch.bfloat16)
    got, want = chunked(h, w, t, 64, 1 / 3), reference(h, w, t, 1 / 3)  # (as loss / grad_accum)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)  # the loss is summed in fp32 on both sides
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a.float(), b.float(), **BF16)


def test_autocast_computes_in_bf16_and_keeps_fp32_gradients():
    h, w, t = inputs(N=300, C=64, V=500)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = chunked(h, w, t, 64), reference(h, w, t)
    assert got[1].dtype == got[2].dtype == torch.float32  # the parameters' dtype, as autocast gives
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, **BF16)
    # really in bf16: the loss of the same bf16 logits is the reference's to fp32 rounding, while the
    # loss of fp32 logits differs by far more
    assert (got[0] - want[0]).abs() < 1e-6
    assert (chunked(h, w, t, 64)[0] - want[0]).abs() > 1e-4


def test_no_grad_all_ignored_and_bad_arguments():
    h, w, t = inputs()
    want = reference(h, w, t)[0]
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, t, 8), want, **FP32)
    everything_ignored = torch.full_like(t, -100)
    assert torch.isnan(linear_cross_entropy(h, w, everything_ignored, 8))  # as F.cross_entropy's mean
    assert torch.isnan(F.cross_entropy(F.linear(h, w), everything_ignored))
    with pytest.raises(ValueError, match="chunk"):
        linear_cross_entropy(h, w, t, 0)
    with pytest.raises(ValueError, match="expected"):
        linear_cross_entropy(h, w.T, t, 8)


def test_a_second_backward_through_the_same_graph_is_refused():
    h, w, t = inputs()
    loss = linear_cross_entropy(h, w, t, 8)
    loss.backward(retain_graph=True)  # the stored gradients are scaled in place by the first backward
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


def tiny(loss_chunk: int) -> GPT:
    return GPT(ModelConfig(vocab_size=97, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0,
                           loss_chunk=loss_chunk), seed=3)


def test_gpt_forward_with_the_tied_head_gives_the_same_loss_and_gradients():
    whole, parts = tiny(0), tiny(24)  # 3 x 31 = 93 tokens: 24, 24, 24, 21
    assert parts.lm_head.weight is parts.transformer.wte.weight
    idx = torch.randint(0, 97, (3, 32))
    x, y = idx[:, :-1], idx[:, 1:].clone()
    y[0, :5] = -100
    logits, loss = whole(x, y)
    none, chunked_loss = parts(x, y)
    assert logits is not None and none is None  # the chunked path never forms the logits
    torch.testing.assert_close(chunked_loss, loss, **FP32)
    loss.backward()
    chunked_loss.backward()
    grads = dict(parts.named_parameters())
    for name, p in whole.named_parameters():  # transformer.wte.weight: the embedding's and the head's
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
    # without targets (generation) the logits are returned as before
    torch.testing.assert_close(parts(x)[0], whole(x)[0], rtol=0, atol=0)
    # evaluation (no grad) takes the loss-only path
    with torch.no_grad():
        torch.testing.assert_close(parts(x, y)[1], whole(x, y)[1], **FP32)


def test_loss_chunk_is_validated():
    from lm.config.schema import ConfigError

    assert load_config(None, ["model.loss_chunk=4096"]).model.loss_chunk == 4096
    with pytest.raises(ConfigError, match="model.loss_chunk"):
        load_config(None, ["model.loss_chunk=-1"])


FSDP = """
import json, sys, torch, torch.distributed as dist
from lm.config.load import load_config
from lm.model.gpt import GPT
from lm.training.parallel import shard
dist.init_process_group("gloo")
rank = dist.get_rank()
dtype = sys.argv[1]
grads, losses = {}, {}
for chunk in (0, 13):
    cfg = load_config(None, ["model.vocab_size=61", "model.block_size=16", "model.n_layer=2", "model.n_head=2",
                             "model.n_embd=32", f"model.loss_chunk={chunk}", f"train.dtype={dtype}"])
    with torch.device("meta"):
        model = GPT(cfg.model, seed=5)
    shard(model, cfg, torch.device("cpu"))
    model.to_empty(device="cpu")
    model.init_weights(5)
    g = torch.Generator().manual_seed(rank)
    idx = torch.randint(0, 61, (2, 17), generator=g)
    logits, loss = model(idx[:, :-1], idx[:, 1:])
    assert (logits is None) == (chunk > 0)
    loss.backward()
    losses[chunk] = loss.item()
    grads[chunk] = {n: p.grad.full_tensor().float() for n, p in model.named_parameters()}
if rank == 0:
    diff = {n: (grads[13][n] - grads[0][n]).abs().max().item() for n in grads[0]}
    scale = {n: grads[0][n].abs().max().item() for n in grads[0]}
    print(json.dumps({"losses": [losses[0], losses[13]], "diff": diff, "scale": scale}))
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 3e-2)])
def test_fsdp2_gathered_head_gets_the_same_gradients(dtype, tol, tmp_path):
    """Two CPU processes (gloo): the chunked loss receives the root's all-gathered (in bf16: cast) tied
    weight; the reduce-scattered gradients equal those of the whole-logits loss."""
    script = tmp_path / "fsdp_loss.py"
    script.write_text(FSDP)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), dtype], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["losses"][1] == pytest.approx(r["losses"][0], rel=tol / 10)
    assert "transformer.wte.weight" in r["diff"]
    for name, diff in r["diff"].items():
        assert diff <= tol * r["scale"][name] + 1e-7, name


def peak_bytes(chunk: int) -> int:
    """Peak bytes of live CPU tensors during forward + backward, counted by torch's MemTracker (it follows
    every storage through a dispatch mode: exact, unlike RSS, which proactive reclaim can disturb)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    N, C, V = 4096, 64, 8192
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, C, generator=g, requires_grad=True)
    weight = torch.randn(V, C, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (N,), generator=g)
    tracker = MemTracker()
    tracker.track_external(hidden, weight, targets)
    with tracker:
        if chunk:
            loss = linear_cross_entropy(hidden, weight, targets, chunk)
        else:
            loss = F.cross_entropy(F.linear(hidden, weight).float(), targets)
        loss.backward()
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


def test_chunked_loss_peak_memory_is_a_fraction_of_whole_logits():
    logits = 4096 * 8192 * 4  # one fp32 logits matrix: 134 MB
    whole, parts = peak_bytes(0), peak_bytes(256)
    assert whole >= 3 * logits  # logits, their log-softmax and their gradient (measured 406 MB)
    # the inputs (3 MB), one 256 x 8192 chunk (8.4 MB) and the N x C and V x C gradients (3.1 MB), with
    # room for the chunk's temporaries (measured 15 MB)
    assert parts < 3 * 256 * 8192 * 4 + 2 * (4096 + 8192) * 64 * 4 + 3 * 2**20
    assert whole > 20 * parts  # (measured 406 MB vs 15 MB)
