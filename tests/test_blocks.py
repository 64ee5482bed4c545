"""Block options beyond GPT-2's: RMSNorm, RoPE, SwiGLU, grouped-query attention, query/key norm, no biases,
and document-masked packing."""
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from lm.model.attention import sdpa_attention
from lm.training.checkpoint import CheckpointError, check_shape
from lm.config.load import load_config
from lm.config.schema import PRESETS, Config, ConfigError, ModelConfig, mlp_hidden_size
from lm.model.kv_cache import KVCache
from lm.model.gpt import GPT
from lm.training.plan import param_shapes
from lm.model.position import apply_rope, document_positions, document_segments, rope_tables

V, T, L, H, C = 61, 32, 2, 4, 32
D = C // H
MODERN = dict(norm="rmsnorm", position="rope", mlp="swiglu", n_kv_head=2, qk_norm=True, bias=False)


def gpt2_count(V, T, L, C):
    """GPT-2's parameters: embeddings, then per block two LayerNorms (weight + bias), attention 4C^2 + 4C, MLP
    8C^2 + 5C; a final LayerNorm; the head is tied."""
    return V * C + T * C + L * (4 * C + 4 * C * C + 4 * C + 8 * C * C + 5 * C) + 2 * C


@pytest.mark.parametrize("option, delta", [
    ({}, 0),
    ({"norm": "rmsnorm"}, -(2 * L + 1) * C),  # no bias in RMSNorm
    ({"position": "rope"}, -T * C),  # no position table
    ({"n_kv_head": 1}, -L * 2 * (C - D) * (C + 1)),  # K and V shrink to one head (weights and biases)
    ({"n_kv_head": 2}, -L * 2 * (C - 2 * D) * (C + 1)),
    ({"qk_norm": True}, L * 2 * D),
    ({"bias": False}, -L * (2 * C + 4 * C + 5 * C) - C),  # LayerNorm, attention and MLP biases
    ({"mlp": "swiglu"}, L * (3 * C * 256 + 2 * 256 + C - (8 * C * C + 5 * C))),  # hidden: 8/3 C up to 256
    ({"mlp": "swiglu", "mlp_hidden": 40}, L * (3 * C * 40 + 2 * 40 + C - (8 * C * C + 5 * C))),
])
def test_each_option_has_its_exact_parameter_count(option, delta):
    cfg = ModelConfig(vocab_size=V, block_size=T, n_layer=L, n_head=H, n_embd=C, **option)
    model = GPT(cfg)
    assert model.num_params() == gpt2_count(V, T, L, C) + delta
    assert [(n, tuple(p.shape)) for n, p in model.named_parameters()] == param_shapes(cfg)


def test_llama_style_1b_has_llama_3_2_1b_parameter_count():
    m = ModelConfig(**PRESETS["llama-style-1b"])
    assert mlp_hidden_size(m) == 8192
    # Llama 3.2 1B: 1,235,814,400 parameters with tied embeddings
    assert sum(torch.Size(s).numel() for _, s in param_shapes(m)) == 1_235_814_400
    with torch.device("meta"):
        model = GPT(m)
    assert model.num_params() == 1_235_814_400


def test_swiglu_width_follows_llama():
    assert mlp_hidden_size(ModelConfig(n_embd=4096, n_head=32, mlp="swiglu")) == 11008  # Llama 2 7B
    assert mlp_hidden_size(ModelConfig(n_embd=768, n_head=12)) == 3072


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 10, 16, dtype=torch.float64), torch.randn(1, 2, 10, 16, dtype=torch.float64)
    pos = torch.arange(10)

    def scores(shift):
        cos, sin = rope_tables(pos + shift, 16, 10000.0)
        cos, sin = cos.double(), sin.double()
        return apply_rope(q, cos, sin) @ apply_rope(k, cos, sin).transpose(-1, -2)

    assert torch.allclose(scores(0), scores(37), atol=1e-5)  # the tables are fp32, as Llama's
    assert not torch.allclose(scores(0), q @ k.transpose(-1, -2), atol=1e-3)  # it does rotate


def test_rope_matches_the_complex_number_definition():
    """Rotation of pair (x_i, x_{i+D/2}) by angle pos * theta^(-2i/D), as multiplication by e^{i angle}."""
    x = torch.randn(1, 1, 5, 8, dtype=torch.float64)
    pos = torch.arange(5)
    cos, sin = rope_tables(pos, 8, 100.0)
    ours = apply_rope(x, cos.double(), sin.double())
    angle = pos[:, None].double() * 100.0 ** (-torch.arange(0, 8, 2).double() / 8)
    z = torch.complex(x[..., :4], x[..., 4:]) * torch.exp(1j * angle)
    assert torch.allclose(ours, torch.cat([z.real, z.imag], dim=-1), atol=1e-12)


def test_grouped_query_attention_reads_each_kv_head_for_its_group():
    torch.manual_seed(0)
    q = torch.randn(2, 8, 12, 16)
    k, v = torch.randn(2, 2, 12, 16), torch.randn(2, 2, 12, 16)
    ours = sdpa_attention(q, k, v, causal=True, dropout_p=0.0)
    # query heads 0-3 read kv head 0, 4-7 kv head 1 (Llama's repeat_kv)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_causal=True)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_gqa_with_as_many_kv_heads_as_query_heads_is_plain_attention():
    torch.manual_seed(0)
    plain = GPT(ModelConfig(vocab_size=V, block_size=T, n_layer=L, n_head=H, n_embd=C))
    full = GPT(ModelConfig(vocab_size=V, block_size=T, n_layer=L, n_head=H, n_embd=C, n_kv_head=H))
    full.load_state_dict(plain.state_dict())
    x = torch.randint(0, V, (2, T))
    assert torch.equal(plain(x)[0], full(x)[0])


@pytest.mark.parametrize("option", [MODERN, {"n_kv_head": 1}, {"position": "rope"}], ids=["modern", "mqa", "rope"])
def test_kv_cache_decoding_equals_the_full_forward(option):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=V, block_size=T, n_layer=L, n_head=H, n_embd=C, **option)).eval()
    x = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        full = model(x)[0]
        cache = KVCache(model.cfg, 2, 12, "cpu", torch.float32)
        prefix = model(x[:, :5], cache=cache)[0]
        steps = [model(x[:, i:i + 1], cache=cache)[0] for i in range(5, 12)]
    assert torch.allclose(torch.cat([prefix, *steps], dim=1), full, atol=1e-5)


def test_left_padded_rows_under_rope_match_each_row_alone():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=V, block_size=T, n_layer=L, n_head=H, n_embd=C, **MODERN)).eval()
    short, long = torch.randint(0, V, (1, 4)), torch.randint(0, V, (1, 7))
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    with torch.no_grad():
        cache = KVCache(model.cfg, 2, 7, "cpu", torch.float32, pad=torch.tensor([3, 0]))
        both = model(batch, cache=cache)[0]
        alone = model(short)[0]
    assert torch.allclose(both[0, 3:], alone[0], atol=1e-5)


def _token_losses(model, x):
    logits = model(x)[0]
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1), reduction="none")


@pytest.mark.parametrize("option", [{}, MODERN], ids=["gpt2", "modern"])
def test_a_packed_batch_with_document_mask_scores_each_document_as_if_alone(option):
    torch.manual_seed(0)
    eos = V - 1
    model = GPT(ModelConfig(vocab_size=V, block_size=T, n_layer=L, n_head=H, n_embd=C, **option)).eval()
    docs = [torch.randint(0, eos, (n,)) for n in (9, 5, 11)]
    docs = [torch.cat([d, torch.tensor([eos])]) for d in docs]  # each ends with EOS, as shards hold them
    packed = torch.cat(docs)[None]
    model.document_eos = eos
    with torch.no_grad():
        logits = model(packed)[0][0]
        model.document_eos = None
        start = 0
        for doc in docs:
            alone = model(doc[None])[0][0]
            assert torch.allclose(logits[start:start + len(doc)], alone, atol=1e-5)
            start += len(doc)
        # and the loss over within-document targets is their token-weighted mean
        model.document_eos = eos
        within = torch.cat([_token_losses(model, d[None]) for d in docs])
        assert torch.allclose(within.mean(), torch.cat([
            F.cross_entropy(logits[s:s + len(d) - 1], d[1:], reduction="none")
            for s, d in zip((0, 10, 16), docs)]).mean(), atol=1e-5)


def test_without_document_mask_a_packed_document_sees_the_ones_before_it():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=V, block_size=T, n_layer=L, n_head=H, n_embd=C)).eval()
    a, b = torch.randint(0, V - 1, (6,)), torch.randint(0, V - 1, (6,))
    packed = torch.cat([a, torch.tensor([V - 1]), b])[None]
    with torch.no_grad():
        assert not torch.allclose(model(packed)[0][0, 7:], model(b[None])[0][0], atol=1e-3)


def test_document_segments_and_positions():
    x = torch.tensor([[5, 0, 3, 4, 0, 0, 7]])
    assert document_segments(x, eos_id=0).tolist() == [[0, 0, 1, 1, 1, 2, 3]]
    assert document_positions(document_segments(x, 0)).tolist() == [[0, 1, 0, 1, 2, 0, 0]]


def test_activation_checkpointing_keeps_gradients_with_rope_and_documents():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, block_size=T, n_layer=L, n_head=H, n_embd=C, **MODERN)
    plain, ckpt = GPT(cfg), GPT(cfg)
    ckpt.checkpointed = {0, 1}
    x = torch.randint(0, V, (2, T))
    grads = []
    for model in (plain, ckpt):
        model.document_eos = 3
        model(x, x)[1].backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("override, key", [
    ("model.n_kv_head=3", "model.n_kv_head"),
    ("model.norm=rms", "model.norm"),
    ("model.position=alibi", "model.position"),
    ("model.mlp=geglu", "model.mlp"),
    ("model.rope_theta=0.5", "model.rope_theta"),
])
def test_bad_block_options_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, ["model.n_head=4", "model.n_embd=32", override])


def test_a_checkpoint_of_another_block_is_refused_by_name(tmp_path):
    saved, current = Config(), Config()
    current.model = dataclasses.replace(current.model, norm="rmsnorm")
    with pytest.raises(CheckpointError, match="model.norm"):
        check_shape(tmp_path, saved, current)
    current.model = dataclasses.replace(saved.model, n_kv_head=saved.model.n_head)  # 0 and n_head: the same
    check_shape(tmp_path, saved, current)


def test_training_with_document_mask_and_llama_blocks(tiny_corpus, tmp_path):
    from data_prep import prepare
    from lm.training.trainer import Trainer

    prepare([str(tiny_corpus)], tmp_path / "data", tokenizer="char", show_progress=False)
    cfg = load_config(None, ["model.n_layer=1", "model.n_head=4", "model.n_embd=32", "model.block_size=64",
                             "model.norm=rmsnorm", "model.position=rope", "model.mlp=swiglu", "model.n_kv_head=1",
                             "data.document_mask=true", f"data.dir={tmp_path / 'data'}", "train.batch_size=4",
                             f"train.out_dir={tmp_path / 'run'}", "train.max_steps=4", "train.eval_interval=4",
                             "train.eval_sequences=4", "log.progress=false", "train.device=cpu"])
    trainer = Trainer(cfg)
    eos = trainer.model.document_eos
    assert eos == int(json.loads((tmp_path / "data" / "meta.json").read_text())["eos_id"])
    result = trainer.run()
    trainer.close()
    assert math.isfinite(result["val_loss"]) and result["step"] == 4


@pytest.mark.slow
def test_blocks_bench_smoke(cli, tmp_path):
    from conftest import ROOT

    text = tmp_path / "text.txt"
    text.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(400)))
    out = tmp_path / "blocks.json"
    r = cli("bench/blocks.py", text, "--smoke", "--only", "gpt2,llama", "--steps-char", "2", "--steps-code", "2",
            "--out", out, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    results = json.loads(out.read_text())["results"]
    for corpus in ("shakespeare_char", "quickstart"):
        gpt2, llama = results[corpus]["gpt2"], results[corpus]["llama"]
        assert abs(gpt2["params"] - llama["params"]) <= 3 * 32  # equal to within one MLP column
        assert math.isfinite(llama["val_loss"]) and llama["tokens_per_s"] > 0
