"""Cross-layer parameter sharing (model.share_layers = K, ALBERT-style): groups of K consecutive layers run
one block's weights."""
import json
import os

import pytest
import torch

from lm.config.load import load_config
from lm.config.schema import ConfigError, ModelConfig
from lm.model.kv_cache import KVCache
from lm.interop.hf import unrolled
from lm.model.gpt import GPT
from lm.training.plan import flops_per_token, param_shapes
from tests.conftest import losses, train

os.environ["HF_HUB_OFFLINE"] = "1"

V, T, C = 50, 16, 32
SHARED = ModelConfig(vocab_size=V, block_size=T, n_layer=4, n_head=2, n_embd=C, share_layers=2)


def test_parameters_are_counted_once_and_flops_per_use():
    model = GPT(SHARED)
    flat = ModelConfig(vocab_size=V, block_size=T, n_layer=4, n_head=2, n_embd=C)
    block = 12 * C * C + 13 * C  # GPT-2 block with biases
    assert len(model.transformer.h) == 2
    assert model.num_params() == GPT(flat).num_params() - 2 * block
    assert [(n, tuple(p.shape)) for n, p in model.named_parameters()] == param_shapes(SHARED)
    assert flops_per_token(SHARED) == flops_per_token(flat)  # every layer still computes


def test_gradients_of_a_shared_block_are_the_sum_over_its_uses():
    torch.manual_seed(0)
    shared = GPT(SHARED)
    flat = unrolled(shared)  # layer i holds block i // 2's tensors ...
    flat.load_state_dict({k: v.clone() for k, v in flat.state_dict().items()}, assign=True)  # ... now its own copies
    flat.lm_head.weight = flat.transformer.wte.weight
    x = torch.randint(0, V, (3, T))
    loss_shared, loss_flat = shared(x, x)[1], flat(x, x)[1]
    assert torch.allclose(loss_shared, loss_flat)
    loss_shared.backward()
    loss_flat.backward()
    for name, p in shared.transformer.h.named_parameters():
        block, rest = name.split(".", 1)
        uses = [flat.transformer.h.get_parameter(f"{layer}.{rest}").grad for layer in (2 * int(block), 2 * int(block) + 1)]
        assert torch.allclose(p.grad, uses[0] + uses[1], atol=1e-6), name


def test_activation_checkpointing_and_the_kv_cache_see_every_use():
    torch.manual_seed(0)
    model, ckpt = GPT(SHARED), GPT(SHARED)
    ckpt.load_state_dict(model.state_dict())
    ckpt.checkpointed = {0, 1, 2, 3}
    x = torch.randint(0, V, (2, T))
    model(x, x)[1].backward()
    ckpt(x, x)[1].backward()
    for a, b in zip(model.parameters(), ckpt.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6)
    model.eval()
    with torch.no_grad():
        full = model(x)[0]
        cache = KVCache(SHARED, 2, T, "cpu", torch.float32)
        steps = [model(x[:, :6], cache=cache)[0]] + [model(x[:, i:i + 1], cache=cache)[0] for i in range(6, T)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_share_layers_must_divide_n_layer():
    with pytest.raises(ConfigError, match="model.share_layers"):
        load_config(None, ["model.n_layer=6", "model.share_layers=4"])


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory, tiny_corpus):
    from data_prep import prepare

    root = tmp_path_factory.mktemp("shared")
    prepare([str(tiny_corpus)], root / "data", tokenizer="char", show_progress=False)
    return root


@pytest.mark.slow
def test_fsdp_with_shared_layers_matches_one_process_and_trains_samples_and_exports(cli, shared_run):
    common = [f"data.dir={shared_run / 'data'}", "train.eval_interval=3", "train.max_steps=3", "model.n_layer=4",
              "model.share_layers=2"]
    train(*common, f"train.out_dir={shared_run / 'single'}", "train.batch_size=4")
    train(*common, f"train.out_dir={shared_run / 'fsdp'}", "train.batch_size=2", nproc=2)
    single, fsdp = losses(shared_run / "single"), losses(shared_run / "fsdp")
    assert sorted(fsdp) == [1, 2, 3]
    for step in fsdp:
        assert fsdp[step] == pytest.approx(single[step], rel=1e-5)
    r = cli("sample.py", shared_run / "fsdp", "--max-new-tokens", "8", "--num-samples", "1")
    assert r.returncode == 0, r.stderr
    out = shared_run / "hf"
    r = cli("-m", "lm.export", shared_run / "single", "--format", "hf", out)
    assert r.returncode == 0 and "unrolled" in r.stderr, r.stderr
    assert json.loads((out / "config.json").read_text())["n_layer"] == 4
    import transformers

    from lm.interop.export import load

    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    _, ours = load(shared_run / "single")
    x = torch.randint(0, ours.cfg.vocab_size, (2, 20))
    with torch.no_grad():
        assert (hf(x).logits - ours(x)[0]).abs().max() <= 1e-4
