"""Triton kernels (flash attention, LayerNorm) on the CPU through Triton's interpreter.

Triton decides interpreter mode when a kernel is decorated, i.e. when our kernel modules are imported
(some Triton versions read TRITON_INTERPRET once, when triton itself is imported), so it is set here
before importing either. Other test modules import torch but never triton or kernels.*, so the top of this
module is early enough whatever order pytest collects in.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lm.kernels._triton as triton_util  # noqa: E402
from lm.kernels import flash_attention as fa  # noqa: E402
from lm.kernels.flash_attention import dropout_keep_mask, flash_attention  # noqa: E402
from lm.kernels.layer_norm import TritonLayerNorm, layer_norm  # noqa: E402
from lm.config.load import load_config  # noqa: E402
from lm.model.gpt import GPT  # noqa: E402


def test_interpreter_is_active():
    assert triton_util.INTERPRET


# ---------------------------------------------------------------- attention helpers

def reference_attention(q, k, v, causal, keep=None, p=0.0):
    """softmax(QK^T * scale + causal mask) [* keep / (1-p)] @ V, in the inputs' dtype."""
    T = q.size(-2)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    if causal:
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    a = s.softmax(-1)
    if keep is not None:
        a = a * keep / (1 - p)
    return a @ v


def padded(x, pad=7):
    """x as a view into a NaN-filled buffer longer along T: any read past T is a NaN in the result."""
    B, H, T, D = x.shape
    buf = torch.full((B, H, T + pad, D), float("nan"), dtype=x.dtype)
    buf[:, :, :T] = x
    return buf[:, :, :T]


def rel_err(a, ref):
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


def run_flash(q, k, v, do, pad, **kw):
    """Kernel output and gradients for fp64 inputs converted to q.dtype, optionally NaN-padded views."""
    xs = [padded(t) if pad else t.clone() for t in (q, k, v)]
    for t in xs:
        t.requires_grad_()
    out = flash_attention(*xs, **kw)
    out.backward(padded(do) if pad else do)
    return out, [t.grad for t in xs]


@pytest.fixture
def poison(monkeypatch):
    """Every output buffer the kernels allocate starts as NaN, so an unwritten element shows up."""
    monkeypatch.setattr(fa, "POISON_OUTPUTS", True)


def make_inputs(B, H, T, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, dtype=torch.float64, generator=g) for _ in range(4)]


# Covers T in {16, 64, 128, 200, 256}, D in {32, 64, 128}, B and H in {1, 2}, causal and not;
# T=200 is a ragged tail at the interpreter's 64-wide blocks, T=16 a single partial block.
ATTN_CASES = [
    (1, 1, 16, 32, True), (2, 1, 16, 64, False), (1, 2, 64, 128, True), (2, 2, 64, 32, False),
    (1, 2, 128, 64, True), (2, 1, 128, 32, True), (1, 1, 128, 128, False), (1, 2, 200, 64, True),
    (2, 1, 200, 32, False), (1, 1, 200, 128, True), (1, 2, 256, 32, False), (1, 1, 256, 64, True),
]


# ---------------------------------------------------------------- attention accuracy

@pytest.mark.parametrize("B,H,T,D,causal", ATTN_CASES)
def test_attention_fp32_matches_fp64(B, H, T, D, causal, poison):
    q, k, v, do = make_inputs(B, H, T, D)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*ref_in, causal)
    ref.backward(do)
    out, grads = run_flash(q.float(), k.float(), v.float(), do.float(), pad=T != 64, causal=causal)
    assert out.dtype == torch.float32 and out.shape == (B, H, T, D)
    assert rel_err(out, ref) < 2e-6
    for g, r in zip(grads, ref_in):
        assert torch.isfinite(g).all()
        assert rel_err(g, r.grad) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,H,T,D,causal", [(1, 2, 200, 64, True), (2, 1, 128, 32, False)])
def test_attention_low_precision_no_worse_than_torch(B, H, T, D, causal, dtype, poison):
    q, k, v, do = make_inputs(B, H, T, D, seed=1)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*ref_in, causal)
    ref.backward(do)
    torch_in = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    torch_out = F.scaled_dot_product_attention(*torch_in, is_causal=causal)
    torch_out.backward(do.to(dtype))
    out, grads = run_flash(q.to(dtype), k.to(dtype), v.to(dtype), do.to(dtype), pad=True, causal=causal)
    assert out.dtype == dtype
    assert rel_err(out, ref) <= 2 * rel_err(torch_out, ref)
    for g, t, r in zip(grads, torch_in, ref_in):
        assert g.dtype == dtype
        assert rel_err(g, r.grad) <= 3 * rel_err(t.grad, r.grad)


def test_attention_custom_scale_and_contiguous_fallback():
    q, k, v, do = (t.float() for t in make_inputs(1, 2, 64, 32, seed=2))
    k_t = k.transpose(-1, -2).contiguous().transpose(-1, -2)  # head dim not contiguous
    out = flash_attention(q, k_t, v, causal=False, softmax_scale=0.3)
    ref = reference_attention(q.double() * 0.3 * math.sqrt(32), k.double(), v.double(), False)
    assert rel_err(out, ref) < 2e-6


def test_attention_rejects_bad_inputs(monkeypatch):
    q = torch.randn(1, 1, 16, 48)
    with pytest.raises(ValueError, match="power of two"):
        flash_attention(q, q, q, causal=True)
    q = torch.randn(1, 1, 16, 8)
    with pytest.raises(ValueError, match="power of two"):
        flash_attention(q, q, q, causal=True)
    q = torch.randn(1, 1, 16, 32)
    with pytest.raises(ValueError, match="shape"):
        flash_attention(q, q[:, :, :8], q[:, :, :8], causal=True)
    monkeypatch.setattr(triton_util, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        flash_attention(q, q, q, causal=True)


# ---------------------------------------------------------------- attention dropout

@pytest.mark.parametrize("B,H,T,D,causal", [(1, 2, 200, 64, True), (2, 1, 64, 32, False)])
def test_dropout_matches_explicit_mask(B, H, T, D, causal, poison):
    p, seed = 0.3, 1234
    q, k, v, do = make_inputs(B, H, T, D, seed=3)
    keep = dropout_keep_mask(seed, B, H, T, p, "cpu")
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*ref_in, causal, keep=keep, p=p)
    ref.backward(do)
    out, grads = run_flash(q.float(), k.float(), v.float(), do.float(), pad=True, causal=causal,
                           dropout_p=p, seed=seed)
    assert rel_err(out, ref) < 2e-6
    for g, r in zip(grads, ref_in):
        assert rel_err(g, r.grad) < 1e-5


def test_dropout_is_deterministic_per_seed():
    q, k, v, do = (t.float() for t in make_inputs(1, 2, 128, 32, seed=4))
    a, ga = run_flash(q, k, v, do, pad=False, causal=True, dropout_p=0.2, seed=7)
    b, gb = run_flash(q, k, v, do, pad=False, causal=True, dropout_p=0.2, seed=7)
    c, _ = run_flash(q, k, v, do, pad=False, causal=True, dropout_p=0.2, seed=8)
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(ga, gb))
    assert not torch.equal(a, c)
    # No seed: drawn from torch's generator, so torch.manual_seed reproduces the run.
    torch.manual_seed(11)
    d = flash_attention(q, k, v, causal=True, dropout_p=0.2)
    torch.manual_seed(11)
    assert torch.equal(d, flash_attention(q, k, v, causal=True, dropout_p=0.2))
    # p = 0 is the dropout-free kernel whatever the seed.
    plain = flash_attention(q, k, v, causal=True)
    assert torch.equal(plain, flash_attention(q, k, v, causal=True, dropout_p=0.0, seed=99))


def test_dropout_keeps_one_minus_p():
    B, H, T, p = 2, 2, 100, 0.25
    keep = dropout_keep_mask(3, B, H, T, p, "cpu")
    n = keep.numel()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma
    # Different heads and rows draw different masks.
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0, 0], keep[0, 0, 1])


# ---------------------------------------------------------------- LayerNorm

def ln_case(N, bias, rows=(3, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*rows, N, dtype=torch.float64, generator=g) * 2 + 0.5
    w = torch.randn(N, dtype=torch.float64, generator=g)
    b = torch.randn(N, dtype=torch.float64, generator=g) if bias else None
    dy = torch.randn(*rows, N, dtype=torch.float64, generator=g)
    return x, w, b, dy


def ln_grads(fn, x, w, b, dy, dtype):
    params = [t.to(dtype, copy=True).requires_grad_() if t is not None else None for t in (x, w, b)]
    y = fn(params[0], params[1], params[2])
    y.backward(dy.to(dtype))
    return y, [t.grad for t in params if t is not None]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("N", [64, 100, 768, 1023])
def test_layer_norm_fp32_matches_fp64(N, bias):
    x, w, b, dy = ln_case(N, bias)
    ref_fn = lambda x, w, b: F.layer_norm(x, (N,), w, b, 1e-5)  # noqa: E731
    ref, ref_grads = ln_grads(ref_fn, x, w, b, dy, torch.float64)
    out, grads = ln_grads(lambda x, w, b: layer_norm(x, w, b, 1e-5), x, w, b, dy, torch.float32)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert rel_err(out, ref) < 1e-6
    assert len(grads) == len(ref_grads)
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_norm_low_precision_no_worse_than_torch(dtype):
    N = 768
    x, w, b, dy = ln_case(N, True, rows=(6,))
    ref_fn = lambda x, w, b: F.layer_norm(x, (N,), w, b, 1e-5)  # noqa: E731
    ref, ref_grads = ln_grads(ref_fn, x, w, b, dy, torch.float64)
    tref, tgrads = ln_grads(ref_fn, x, w, b, dy, dtype)
    out, grads = ln_grads(lambda x, w, b: layer_norm(x, w, b, 1e-5), x, w, b, dy, dtype)
    assert out.dtype == dtype
    assert rel_err(out, ref) <= 2 * rel_err(tref, ref)
    for g, t, r in zip(grads, tgrads, ref_grads):
        assert g.dtype == dtype
        assert rel_err(g, r) <= 2 * rel_err(t, r)


@pytest.mark.parametrize("rms", [False, True])
def test_rows_wider_than_the_fused_backward_match_fp64(rms, monkeypatch):
    """Rows past MAX_FUSED_BWD_N (16384 on a GPU; lowered here to keep the interpreter quick) take the
    backward in PyTorch from the kernel's saved statistics: the same gradients as fp64."""
    from lm.kernels import layer_norm as ln

    monkeypatch.setattr(ln, "MAX_FUSED_BWD_N", 64)
    N = 100
    x, w, b, dy = ln_case(N, not rms, rows=(5,))
    if rms:
        fn = lambda x, w, b: ln.rms_norm(x, w, 1e-5)  # noqa: E731
        ref_fn = lambda x, w, b: F.rms_norm(x, (N,), w, 1e-5)  # noqa: E731
    else:
        fn = lambda x, w, b: layer_norm(x, w, b, 1e-5)  # noqa: E731
        ref_fn = lambda x, w, b: F.layer_norm(x, (N,), w, b, 1e-5)  # noqa: E731
    ref, ref_grads = ln_grads(ref_fn, x, w, b, dy, torch.float64)
    out, grads = ln_grads(fn, x, w, b, dy, torch.float32)
    assert len(grads) == len(ref_grads) == (2 if rms else 3)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.float32 and rel_err(g, r) < 1e-5


def test_layer_norm_backward_is_deterministic():
    x, w, b, dy = ln_case(100, True, rows=(37,))  # several programs share the dW/dB reduction
    first = ln_grads(lambda x, w, b: layer_norm(x, w, b, 1e-5), x, w, b, dy, torch.float32)[1]
    second = ln_grads(lambda x, w, b: layer_norm(x, w, b, 1e-5), x, w, b, dy, torch.float32)[1]
    assert all(torch.equal(a, c) for a, c in zip(first, second))


@pytest.mark.parametrize("bias", [True, False])
def test_triton_layer_norm_module_matches_nn(bias):
    torch.manual_seed(0)
    ours, theirs = TritonLayerNorm(64, bias=bias), torch.nn.LayerNorm(64, bias=bias)
    assert isinstance(ours, torch.nn.LayerNorm)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    with torch.no_grad():
        ours.weight.normal_()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(4, 5, 64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the model with both kernels

def tiny_gpt(attention, layernorm, dropout=0.0):
    cfg = load_config(None, [f"model.attention={attention}", f"model.layernorm={layernorm}",
                             "model.n_layer=2", "model.n_head=2", "model.n_embd=64",
                             "model.block_size=32", "model.vocab_size=50", f"model.dropout={dropout}"])
    torch.manual_seed(0)
    return GPT(cfg.model)


def train_losses(model, batches):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for x, y in batches:
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_gpt_trains_the_same_with_triton_kernels():
    ours, theirs = tiny_gpt("triton", "triton"), tiny_gpt("sdpa", "torch")
    assert ours.state_dict().keys() == theirs.state_dict().keys()  # checkpoints interchange
    theirs.load_state_dict(ours.state_dict())
    g = torch.Generator().manual_seed(1)
    # One sequence per batch: the interpreter's cost is per program, i.e. per LayerNorm row.
    batches = [(torch.randint(0, 50, (1, 32), generator=g), torch.randint(0, 50, (1, 32), generator=g))
               for _ in range(3)]
    ours_losses, theirs_losses = train_losses(ours, batches), train_losses(theirs, batches)
    for a, b in zip(ours_losses, theirs_losses):
        assert abs(a - b) <= 1e-4 * abs(b)


def test_gpt_with_attention_dropout_follows_torch_seed():
    x = torch.randint(0, 50, (1, 32), generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(2):
        model = tiny_gpt("triton", "triton", dropout=0.1)
        torch.manual_seed(5)
        losses.append(train_losses(model, [(x, x)] * 2))
    assert losses[0] == losses[1] and all(math.isfinite(v) for v in losses[0])
