import math

import pytest
import torch

from lm.config.load import load_config
from lm.config.schema import ModelConfig
from lm.model.generate import filter_logits, generate
from lm.model.kv_cache import KVCache
from lm.model.gpt import GPT


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=97, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    return GPT(ModelConfig(**{**cfg, **kw}))


def test_gpt2_124m_preset_has_exact_parameter_count():
    cfg = load_config(None, ["model.preset=gpt2-124m"])
    with torch.device("meta"):
        model = GPT(cfg.model)
    assert model.num_params() == 124_439_808
    assert model.lm_head.weight is model.transformer.wte.weight


def test_explicit_keys_override_the_preset():
    cfg = load_config(None, ["model.preset=gpt2-124m", "model.n_layer=2"])
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.vocab_size) == (2, 768, 50257)


def test_changing_a_later_token_never_changes_earlier_logits():
    model = tiny().eval()
    idx = torch.randint(0, 97, (2, 32))
    base, _ = model(idx)
    for t in (0, 7, 31):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 97
        logits, _ = model(changed)
        torch.testing.assert_close(logits[:, :t], base[:, :t], rtol=0, atol=0)
        assert not torch.allclose(logits[:, t], base[:, t])


def test_loss_at_init_is_near_uniform():
    model = tiny(vocab_size=1000, n_embd=64)
    idx, targets = torch.randint(0, 1000, (2, 4, 32))  # (the tied head favours repeating the input token)
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(1000)) < 0.05


def test_residual_projections_are_scaled_down_with_depth():
    model = tiny(n_layer=8, n_embd=128, vocab_size=64)
    proj = model.transformer.h[0].mlp.c_proj.weight.std().item()
    fc = model.transformer.h[0].mlp.c_fc.weight.std().item()
    assert proj == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert fc == pytest.approx(0.02, rel=0.05)


def test_tiny_model_overfits_one_batch():
    model = tiny()
    idx = torch.randint(0, 97, (4, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.05


def test_kv_cache_gives_the_same_logits_as_a_full_forward():
    model = tiny(bias=False).eval()
    idx = torch.randint(0, 97, (3, 20))
    full, _ = model(idx)
    cache = KVCache(model.cfg, 3, 32, "cpu", torch.float32)
    pieces = [model(idx[:, :8], cache=cache)[0]]
    pieces += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(8, 12)]
    pieces.append(model(idx[:, 12:], cache=cache)[0])  # several tokens after a prefix
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def greedy_without_cache(model, prompt, n, keep):
    """Recompute the whole window for every token; slide it like generate() does at the context limit."""
    seq, start, block = list(prompt), 0, model.cfg.block_size
    for _ in range(n):
        if len(seq) - start > block:
            start = len(seq) - keep
        logits, _ = model(torch.tensor([seq[start:]]))
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt):]


def test_greedy_generation_with_cache_equals_recomputing_everything():
    model = tiny().eval()
    assert generate(model, [[5, 17, 3]], 25, temperature=0)[0] == greedy_without_cache(model, [5, 17, 3], 25, 24)
    # past the context limit (block 32) the window slides and the cache is rebuilt
    assert generate(model, [[5, 17, 3]], 70, temperature=0)[0] == greedy_without_cache(model, [5, 17, 3], 70, 24)


def test_context_limit_can_stop_instead_of_sliding():
    model = tiny().eval()
    out = generate(model, [[1] * 30], 10, temperature=0, at_limit="stop")[0]
    assert len(out) == 3  # slots 31 and 32 fill the context; the token sampled from slot 32 is the last
    with pytest.raises(ValueError, match="does not fit"):
        generate(model, [[1] * 40], 5, at_limit="stop")


def test_a_batch_of_prompts_gives_the_same_tokens_as_each_prompt_alone():
    model = tiny().eval()
    prompts = [[4], [9, 8, 7, 6, 5, 4, 3], [11, 12, 13]]
    batched = generate(model, prompts, 25, temperature=0)  # within the context (a batch slides together)
    assert batched == [generate(model, [p], 25, temperature=0)[0] for p in prompts]


def test_top_k_1_equals_greedy():
    model = tiny().eval()
    sampled = generate(model, [[3, 1, 4]], 20, temperature=1.3, top_k=1, generator=torch.Generator().manual_seed(0))
    assert sampled == generate(model, [[3, 1, 4]], 20, temperature=0)


def test_eos_and_stop_end_a_row_and_repetition_penalty_avoids_repeats():
    model = tiny().eval()
    free = generate(model, [[2, 2]], 12, temperature=0)[0]
    eos = free[4]
    assert generate(model, [[2, 2]], 12, temperature=0, eos_id=eos)[0] == free[:free.index(eos) + 1]
    assert generate(model, [[2, 2]], 12, temperature=0, stop=lambda row, toks: len(toks) == 3)[0] == free[:3]
    strict = generate(model, [[2, 2]], 30, temperature=0, repetition_penalty=1e9)[0]
    assert 2 not in strict and len(set(strict)) == len(strict)


def test_sampling_with_a_seed_is_reproducible():
    model = tiny()
    draw = lambda seed: generate(model, [[1, 2]] * 3, 30, temperature=1.0,
                                 generator=torch.Generator().manual_seed(seed))
    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
    assert torch.isfinite(filter_logits(logits, top_k=2)[0, :2]).all()
    # the smallest set with mass >= 0.7 is {0.5, 0.25}; >= 0.75 is exactly reached by the same two
    kept = torch.isfinite(filter_logits(logits, top_p=0.7)[0])
    assert kept.tolist() == [True, True, False, False]
    kept = torch.isfinite(filter_logits(logits, top_p=0.76)[0])
    assert kept.tolist() == [True, True, True, False]
    assert torch.isfinite(filter_logits(logits, top_p=0.01)[0]).tolist() == [True, False, False, False]
