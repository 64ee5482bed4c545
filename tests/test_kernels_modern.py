"""The kernels' modern options on the CPU through Triton's interpreter: RMSNorm in the fused norm
kernels, grouped-query attention (K/V heads shared by groups of query heads) and document-masked
packing (`segments`), each against a float64 PyTorch reference.

TRITON_INTERPRET is set before triton or kernels.* is imported (see tests/test_kernels.py for why).
Sizes are tiny: the interpreter's cost is per program and per block, so B*H stays small, T <= 130.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import lm.kernels._triton as triton_util  # noqa: E402
from lm.kernels import flash_attention as fa  # noqa: E402
from lm.kernels.flash_attention import dropout_keep_mask, flash_attention  # noqa: E402
from lm.kernels.layer_norm import TritonRMSNorm, rms_norm  # noqa: E402

BLOCK = fa._INTERP_BLOCKS["BLOCK_M"]  # the interpreter's block size along queries and keys
assert fa._INTERP_BLOCKS["BLOCK_N"] == BLOCK


def test_interpreter_is_active():
    assert triton_util.INTERPRET


def rel_err(a, ref):
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


# ---------------------------------------------------------------- RMSNorm

def rms_reference(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rms_case(N, rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*rows, N, dtype=torch.float64, generator=g) * 2 + 0.5
    w = torch.randn(N, dtype=torch.float64, generator=g)
    dy = torch.randn(*rows, N, dtype=torch.float64, generator=g)
    return x, w, dy


def rms_run(fn, x, w, dy, dtype):
    """Output and (dx, dw) of fn on copies of x, w in dtype."""
    xs, ws = (t.to(dtype, copy=True).requires_grad_() for t in (x, w))
    y = fn(xs, ws)
    y.backward(dy.to(dtype))
    return y, (xs.grad, ws.grad)


@pytest.mark.parametrize("N", [64, 100])  # 100: a row narrower than its power-of-two block
def test_rms_norm_fp32_matches_fp64(N):
    x, w, dy = rms_case(N, rows=(3, 5))
    ref, ref_grads = rms_run(rms_reference, x, w, dy, torch.float64)
    out, grads = rms_run(lambda x, w: rms_norm(x, w, 1e-5), x, w, dy, torch.float32)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert rel_err(out, ref) < 1e-6
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.float32
        assert rel_err(g, r) < 1e-5


def test_rms_norm_bf16_matches_fp64_loosely():
    x, w, dy = rms_case(100, rows=(6,), seed=1)
    ref, ref_grads = rms_run(rms_reference, x, w, dy, torch.float64)
    out, grads = rms_run(lambda x, w: rms_norm(x, w, 1e-5), x, w, dy, torch.bfloat16)
    theirs, their_grads = rms_run(rms_reference, x, w, dy, torch.bfloat16)  # PyTorch ops in bf16
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 1e-2 and rel_err(out, ref) <= 2 * rel_err(theirs, ref)
    for g, t, r in zip(grads, their_grads, ref_grads):
        assert g.dtype == torch.bfloat16
        assert rel_err(g, r) < 2e-2 and rel_err(g, r) <= 2 * rel_err(t, r)


def test_triton_rms_norm_state_dict_interchanges_with_nn():
    ours, theirs = TritonRMSNorm(64), torch.nn.RMSNorm(64, eps=1e-5)
    assert ours.state_dict().keys() == theirs.state_dict().keys() == {"weight"}
    assert torch.equal(ours.weight, torch.ones(64)) and ours.eps == 1e-5
    with torch.no_grad():
        ours.weight.normal_(generator=torch.Generator().manual_seed(0))
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(4, 5, 64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    back = TritonRMSNorm(64)
    back.load_state_dict(theirs.state_dict())
    assert torch.equal(back.weight, ours.weight)


# ---------------------------------------------------------------- attention helpers

def reference_attention(q, k, v, causal, segments=None, keep=None, p=0.0):
    """softmax(QK^T/sqrt(D) masked) [* keep / (1-p)] @ V, each query head on its group's kv head; a
    query sees a key only in its own document (segments) and, when causal, not after itself."""
    B, H, T, D = q.shape
    group = H // k.size(1)
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    allowed = torch.ones(B, 1, T, T, dtype=torch.bool)
    if causal:
        allowed = allowed & torch.ones(T, T, dtype=torch.bool).tril()
    if segments is not None:
        allowed = allowed & (segments[:, None, :, None] == segments[:, None, None, :])
    s = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~allowed, float("-inf"))
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


def attention_inputs(B, H, kv_heads, T, D, seed=0):
    """fp64 q, k, v and an output gradient."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, H, T, D), (B, kv_heads, T, D), (B, kv_heads, T, D), (B, H, T, D)]
    return [torch.randn(*s, dtype=torch.float64, generator=g) for s in shapes]


def reference_run(q, k, v, do, causal, **kw):
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = reference_attention(*xs, causal, **kw)
    out.backward(do)
    return out, [t.grad for t in xs]


def flash_run(q, k, v, do, pad=False, dtype=torch.float32, **kw):
    """Kernel output and (dq, dk, dv) for fp64 inputs converted to dtype, optionally NaN-padded views."""
    xs = [(padded(t.to(dtype)) if pad else t.to(dtype, copy=True)).requires_grad_() for t in (q, k, v)]
    out = flash_attention(*xs, **kw)
    out.backward(padded(do.to(dtype)) if pad else do.to(dtype))
    return out, [t.grad for t in xs]


def assert_close_to_reference(out, grads, ref, ref_grads, out_tol=2e-6, grad_tol=1e-5):
    assert rel_err(out, ref) < out_tol
    for g, r in zip(grads, ref_grads):
        assert g.shape == r.shape and torch.isfinite(g).all()
        assert rel_err(g, r) < grad_tol


def segments_from_lengths(*rows):
    """(B, T) int32 document ids, one row per list of document lengths."""
    return torch.stack([torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32),
                                                torch.tensor(lengths)) for lengths in rows])


@pytest.fixture
def poison(monkeypatch):
    """Every output buffer the kernels allocate starts as NaN, so an unwritten element shows up."""
    monkeypatch.setattr(fa, "POISON_OUTPUTS", True)


# ---------------------------------------------------------------- grouped-query attention

# H = 4 query heads over 1 (multi-query) or 2 kv heads; T=100 and 130 end in a partial block.
@pytest.mark.parametrize("kv_heads,T,D,causal", [
    (1, 64, 32, True), (2, 100, 16, True), (2, 100, 32, False), (1, 130, 16, False),
])
def test_gqa_matches_fp64(kv_heads, T, D, causal, poison):
    q, k, v, do = attention_inputs(1, 4, kv_heads, T, D)
    ref, ref_grads = reference_run(q, k, v, do, causal)
    out, grads = flash_run(q, k, v, do, pad=True, causal=causal)
    assert out.shape == q.shape and grads[1].shape == k.shape
    assert_close_to_reference(out, grads, ref, ref_grads)


def test_gqa_equals_mha_on_repeated_kv(poison):
    """Reading a shared kv head gives what multi-head attention gives on repeated K/V (the Hkv == H
    path): the same forward and dQ bit for bit, and dK/dV equal to the sum over each group."""
    q, k, v, do = (t.float() for t in attention_inputs(2, 4, 2, 100, 16, seed=1))
    gqa, gqa_grads = flash_run(q, k, v, do, causal=True)
    mha, mha_grads = flash_run(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), do, causal=True)
    assert torch.equal(gqa, mha) and torch.equal(gqa_grads[0], mha_grads[0])
    for g, m in zip(gqa_grads[1:], mha_grads[1:]):
        torch.testing.assert_close(g, m.view(2, 2, 2, 100, 16).sum(2), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- document masking (segments)

@pytest.mark.parametrize("kv_heads,causal", [(2, True), (1, False)])
def test_segments_match_masked_fp64(kv_heads, causal, poison):
    # Row 0: the second document starts in block 0, so block 1's rows of the third document find key
    # block 0 (the first one visited) fully masked. Row 1: a one-token document on a block edge.
    segments = segments_from_lengths([60, 10, 60], [64, 1, 65])
    q, k, v, do = attention_inputs(2, 2, kv_heads, 130, 16, seed=2)
    ref, ref_grads = reference_run(q, k, v, do, causal, segments=segments)
    out, grads = flash_run(q, k, v, do, pad=True, causal=causal, segments=segments)
    assert_close_to_reference(out, grads, ref, ref_grads)


def test_one_document_equals_no_segments():
    q, k, v, do = (t.float() for t in attention_inputs(1, 2, 2, 100, 16, seed=3))
    whole = torch.zeros(1, 100, dtype=torch.int32)
    for causal in (True, False):
        plain, plain_grads = flash_run(q, k, v, do, causal=causal)
        seg, seg_grads = flash_run(q, k, v, do, causal=causal, segments=whole)
        torch.testing.assert_close(seg, plain, rtol=1e-6, atol=1e-6)
        for a, b in zip(seg_grads, plain_grads):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def documents_alone(q, k, v, do, lengths, causal):
    """Output and gradients of attention run on each document of a packed row by itself, joined."""
    outs, grads, start = [], [[], [], []], 0
    for n in lengths:
        piece = [t[:, :, start:start + n].contiguous() for t in (q, k, v, do)]
        out, g = flash_run(*piece, causal=causal)
        outs.append(out)
        for acc, x in zip(grads, g):
            acc.append(x)
        start += n
    return torch.cat(outs, 2), [torch.cat(g, 2) for g in grads]


@pytest.mark.parametrize("causal", [True, False])
def test_packed_row_equals_each_document_alone(causal):
    lengths = [40, 26, 64]
    q, k, v, do = (t.float() for t in attention_inputs(1, 2, 1, sum(lengths), 16, seed=4))
    packed, packed_grads = flash_run(q, k, v, do, causal=causal, segments=segments_from_lengths(lengths))
    alone, alone_grads = documents_alone(q, k, v, do, lengths, causal)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-6)
    for a, b in zip(packed_grads, alone_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def whole_row_bounds(segments):
    """_document_bounds as if every position's document were the whole row: nothing is skipped."""
    B, T = segments.shape
    return (torch.zeros(B, T, dtype=torch.int32), torch.full((B, T), T, dtype=torch.int32))


@pytest.mark.filterwarnings("ignore:All-NaN slice")
@pytest.mark.parametrize("causal", [True, False])
def test_blocks_of_other_documents_are_never_read(causal, monkeypatch):
    """Two documents of one block each. Every input of one document is NaN; the other's output and
    gradients stay finite and right only if no program loads a block of the NaN document (a masked
    load would still give 0 * NaN = NaN). With skipping disabled the same run does produce NaN."""
    q, k, v, do = (t.float() for t in attention_inputs(1, 2, 1, 2 * BLOCK, 16, seed=5))
    segments = segments_from_lengths([BLOCK, BLOCK])
    for doc, other in ((0, slice(BLOCK, None)), (1, slice(0, BLOCK))):
        mine = slice(doc * BLOCK, (doc + 1) * BLOCK)
        poisoned = [t.clone() for t in (q, k, v, do)]
        for t in poisoned:
            t[:, :, other] = float("nan")
        out, grads = flash_run(*poisoned, causal=causal, segments=segments)
        alone, alone_grads = flash_run(*(t[:, :, mine] for t in (q, k, v, do)), causal=causal)
        torch.testing.assert_close(out[:, :, mine], alone, rtol=1e-5, atol=1e-6)
        for g, a in zip(grads, alone_grads):
            torch.testing.assert_close(g[:, :, mine], a, rtol=1e-5, atol=1e-5)

        with monkeypatch.context() as m:
            m.setattr(fa, "_document_bounds", whole_row_bounds)
            out, grads = flash_run(*poisoned, causal=causal, segments=segments)
        assert not all(torch.isfinite(t[:, :, mine]).all() for t in (out, *grads))


def crosses_block_edge(lengths):
    """Whether a document starts in one block and ends in the next: the later documents of that next
    block then find the first key block a program visits fully masked for them."""
    start = 0
    for n in lengths:
        if start // BLOCK != (start + n - 1) // BLOCK:
            return True
        start += n
    return False


@pytest.mark.parametrize("causal", [True, False])
def test_many_small_documents(causal, poison):
    g = torch.Generator().manual_seed(11)
    lengths = []
    while sum(lengths) < 130:
        lengths.append(min(int(torch.randint(1, 10, (1,), generator=g)), 130 - sum(lengths)))
    assert 1 in lengths and crosses_block_edge(lengths)  # single-token documents see only themselves
    segments = segments_from_lengths(lengths)
    q, k, v, do = attention_inputs(1, 2, 1, 130, 16, seed=7)
    ref, ref_grads = reference_run(q, k, v, do, causal, segments=segments)
    out, grads = flash_run(q, k, v, do, causal=causal, segments=segments)
    assert_close_to_reference(out, grads, ref, ref_grads)


# ---------------------------------------------------------------- dropout with both

def test_dropout_with_gqa_and_segments_matches_explicit_mask(poison):
    p, seed = 0.3, 1234
    B, H, T = 1, 4, 100
    segments = segments_from_lengths([30, 70])
    q, k, v, do = attention_inputs(B, H, 2, T, 16, seed=8)
    keep = dropout_keep_mask(seed, B, H, T, p, "cpu")  # one mask per query head, as without GQA
    ref, ref_grads = reference_run(q, k, v, do, True, segments=segments, keep=keep, p=p)
    out, grads = flash_run(q, k, v, do, pad=True, causal=True, dropout_p=p, seed=seed, segments=segments)
    assert_close_to_reference(out, grads, ref, ref_grads)


# ---------------------------------------------------------------- input checks

def test_rejects_bad_heads_and_segments():
    q, kv = torch.randn(1, 4, 16, 16), torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        flash_attention(q, kv, kv, causal=True)
    with pytest.raises(ValueError, match="shape"):
        flash_attention(q, kv[:, :2], kv[:, :1], causal=True)
    kv = kv[:, :2]
    with pytest.raises(ValueError, match="must match q's batch"):
        flash_attention(q, kv.expand(2, 2, 16, 16), kv.expand(2, 2, 16, 16), causal=True)
    good = torch.zeros(1, 16, dtype=torch.int32)
    for bad, why in [(good[:, :8], r"\(B, T\)"), (good[0], r"\(B, T\)"), (good.long(), "int32"),
                     (torch.tensor([[0] * 8 + [1] * 4 + [0] * 4], dtype=torch.int32), "non-decreasing")]:
        with pytest.raises(ValueError, match=why):
            flash_attention(q, kv, kv, causal=True, segments=bad)


# ---------------------------------------------------------------- through the model

def test_llama_blocks_with_document_mask_run_our_kernels_like_pytorch():
    """model.attention/layernorm = "triton" with RMSNorm, qk-norm, GQA and document segments: the logits and
    gradients of the PyTorch paths, with the same weights."""
    import dataclasses

    from lm.config.schema import ModelConfig
    from lm.model.gpt import GPT

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, block_size=48, n_layer=1, n_head=4, n_embd=64, norm="rmsnorm",
                      position="rope", mlp="swiglu", n_kv_head=2, qk_norm=True, bias=False)
    reference = GPT(cfg)
    ours = GPT(dataclasses.replace(cfg, attention="triton", layernorm="triton"))
    ours.load_state_dict(reference.state_dict())
    x = torch.randint(0, 40, (2, 48))
    x[:, [7, 20, 21, 33]] = 39  # EOS: several documents per row, one of a single token
    grads = []
    for model in (reference, ours):
        model.document_eos = 39
        logits, _ = model(x)
        loss = model(x, x)[1]
        loss.backward()
        grads.append((logits.detach(), [p.grad for p in model.parameters()]))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-4)
    for a, b in zip(grads[0][1], grads[1][1]):
        assert torch.allclose(a, b, atol=1e-4)


# ---------------------------------------------------------------- what a GPU hands to PyTorch

@pytest.mark.parametrize("kv_heads,causal,p", [(2, True, 0.0), (1, False, 0.0), (2, True, 0.3)])
def test_sdpa_fallback_computes_what_the_kernel_does(kv_heads, causal, p):
    """sdpa_fallback, which flash_attention runs on a GPU for the dtype/head dims runs_on_gpu() gives to
    PyTorch, matches our kernel: grouped K/V heads, documents, and dropout with the same keep-mask."""
    segments = segments_from_lengths([30, 40, 30], [100])
    q, k, v, _ = (t.float() for t in attention_inputs(2, 4, kv_heads, 100, 32, seed=3))
    ours = flash_attention(q, k, v, causal=causal, dropout_p=p, seed=11, segments=segments)
    theirs = fa.sdpa_fallback(q, k, v, causal=causal, dropout_p=p, softmax_scale=32 ** -0.5, seed=11,
                              segments=segments)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
