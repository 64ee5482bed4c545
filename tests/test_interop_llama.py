"""A Llama-shaped run (RMSNorm, RoPE, SwiGLU, grouped-query attention) exports as a Hugging Face
LlamaForCausalLM directory and imports back."""
import json
import os

import pytest
import torch

from data_prep import prepare
from lm.training.checkpoint import CheckpointError
from lm.config.load import load_config
from lm.config.schema import ConfigError, ModelConfig
from lm.interop.export import load
from lm.model.generate import generate
from lm.interop.hf import hf_config, read_hf_config
from lm.model.gpt import GPT
from lm.training.trainer import Trainer

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may reach the network
import transformers  # noqa: E402  (the dev extra)

LLAMA = ["model.norm=rmsnorm", "model.position=rope", "model.mlp=swiglu", "model.n_kv_head=2", "model.bias=false",
         "model.rope_theta=500"]
TINY = ["model.n_layer=2", "model.n_head=4", "model.n_embd=32", "model.block_size=48", "train.batch_size=4",
        "train.eval_sequences=4", "log.progress=false", "train.device=cpu", "train.max_steps=3",
        "train.eval_interval=3", "optim.lr=3e-2", "optim.warmup_steps=0"]


@pytest.fixture(scope="module")
def trained(tiny_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("interop_llama")
    prepare([str(tiny_corpus)], root / "data", tokenizer="bpe", vocab_size=300, show_progress=False)
    cfg = load_config(None, [*TINY, *LLAMA, f"data.dir={root / 'data'}", f"train.out_dir={root / 'run'}"])
    Trainer(cfg).run()  # a high lr moves the norm gains off 1, so a misplaced one would show
    return root


@pytest.fixture(scope="module")
def exported(trained):
    """The run exported to a HF directory, in this process."""
    from lm.export import main as export_main

    out = trained / "hf"
    assert export_main([str(trained / "run"), "--format", "hf", str(out)]) == 0
    return out


@pytest.mark.slow
def test_llama_export_loads_in_transformers_with_equal_logits_and_greedy_tokens(cli, trained):
    out = trained / "hf_cli"
    r = cli("-m", "lm.export", trained / "run", "--format", "hf", out)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    _, ours = load(trained / "run")
    assert ours.transformer.h[0].ln_1.weight.sub(1).abs().max() > 1e-3
    idx = torch.randint(0, ours.cfg.vocab_size, (3, 40))
    with torch.no_grad():
        diff = (hf(idx).logits - ours(idx)[0]).abs().max().item()
    assert diff <= 1e-4
    prompt = transformers.AutoTokenizer.from_pretrained(out)("the quick brown", return_tensors="pt").input_ids
    theirs = hf.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0,
                         min_new_tokens=20)[0, prompt.shape[1]:].tolist()
    assert theirs == generate(ours, [prompt[0].tolist()], 20, temperature=0)[0]


def test_llama_import_is_bit_exact_and_trains_from_it(trained, exported):
    out = exported
    cfg = load_config(None, [*TINY, *LLAMA, f"data.dir={trained / 'data'}", f"train.out_dir={trained / 'again'}",
                             f"init.from=hf:{out}", "train.max_steps=1"])
    assert read_hf_config(out).n_kv_head == 2
    trainer = Trainer(cfg)
    _, ours = load(trained / "run")
    for key, value in ours.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[key], value), key
    trainer.run()


def test_a_llama_import_into_another_shape_names_the_key(trained, exported):
    cfg = load_config(None, [*TINY, *LLAMA, "model.n_kv_head=1", f"data.dir={trained / 'data'}",
                             f"train.out_dir={trained / 'other'}", f"init.from=hf:{exported}"])
    with pytest.raises(ConfigError, match=r"model.n_kv_head = 1 \(2 there\)"):
        Trainer(cfg)


def test_a_block_no_hf_format_holds_is_refused_in_one_line(cli, tmp_path):
    with pytest.raises(CheckpointError, match="qk_norm"):
        hf_config(ModelConfig(vocab_size=10, n_head=2, n_embd=8, norm="rmsnorm", position="rope", mlp="swiglu",
                              qk_norm=True), eos_id=0)
    with pytest.raises(CheckpointError, match="model.position = 'rope'"):
        hf_config(ModelConfig(vocab_size=10, n_head=2, n_embd=8, position="rope"), eos_id=0)


def test_llama_config_with_rope_scaling_is_refused(tmp_path):
    model = GPT(ModelConfig(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=8, norm="rmsnorm",
                            position="rope", mlp="swiglu"))
    config = hf_config(model.cfg, eos_id=0)
    config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="rope type = 'llama3'"):
        read_hf_config(tmp_path)
