"""Hugging Face export and import, our safetensors format, and int8 sampling."""
import os

import pytest
import torch

from data_prep import prepare
from lm.config.load import load_config
from lm.interop.export import load
from lm.model.generate import generate
from lm.interop.hf import to_hf_state
from lm.compress.quantize import quantize_int8
from lm.training.trainer import Trainer

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may reach the network
import transformers  # noqa: E402  (the dev extra)

TINY = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=48", "train.batch_size=4",
        "train.eval_sequences=4", "log.progress=false", "train.device=cpu", "train.max_steps=3",
        "train.eval_interval=3"]


@pytest.fixture(scope="module", params=["bpe", "char"])
def trained(request, tiny_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"interop_{request.param}")
    prepare([str(tiny_corpus)], root / "data", tokenizer=request.param, vocab_size=300, show_progress=False)
    bias = "true" if request.param == "bpe" else "false"  # HF GPT-2 always has biases: zeros are exported
    cfg = load_config(None, [*TINY, f"data.dir={root / 'data'}", f"train.out_dir={root / 'run'}",
                             f"model.bias={bias}", "model.activation=gelu_tanh"])
    Trainer(cfg).run()
    return root


def export(cli, src, out, fmt):
    r = cli("-m", "lm.export", src, "--format", fmt, out)
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.slow
def test_hf_export_loads_in_transformers_with_equal_logits_and_greedy_tokens(cli, trained):
    out = export(cli, trained / "run", trained / "hf", "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    _, ours = load(trained / "run")
    ours.eval()
    idx = torch.randint(0, ours.cfg.vocab_size, (3, 40))
    with torch.no_grad():
        diff = (hf(idx).logits - ours(idx)[0]).abs().max().item()
    assert diff <= 1e-4
    prompt = tok("the quick brown", return_tensors="pt").input_ids
    assert prompt.shape[1] > 1
    theirs = hf.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0,
                         min_new_tokens=20)[0, prompt.shape[1]:].tolist()
    assert theirs == generate(ours, [prompt[0].tolist()], 20, temperature=0)[0]
    text = "the lazy fox\nquietly hexes."
    assert tok.decode(tok(text).input_ids) == text


@pytest.mark.slow
def test_hf_import_then_export_round_trips_bit_exactly(trained, tmp_path, cli):
    out = trained / "hf" if (trained / "hf").exists() else export(cli, trained / "run", trained / "hf", "hf")
    from safetensors.torch import load_file

    original = load_file(str(out / "model.safetensors"))
    cfg = load_config(None, [*TINY, f"data.dir={trained / 'data'}", f"train.out_dir={tmp_path / 'r'}",
                             "model.bias=true", "model.activation=gelu_tanh", f"init.from=hf:{out}"])
    exported = to_hf_state(Trainer(cfg).model)
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)


@pytest.mark.slow
def test_hf_import_of_another_shape_is_refused(cli, trained, tmp_path):
    out = trained / "hf" if (trained / "hf").exists() else export(cli, trained / "run", trained / "hf", "hf")
    r = cli("train.py", "configs/shakespeare_char.toml", *TINY, f"data.dir={trained / 'data'}",
            f"train.out_dir={tmp_path / 'r'}", "model.n_embd=64", "model.bias=true",
            "model.activation=gelu_tanh", f"init.from=hf:{out}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "model.n_embd = 64 (32 there)" in r.stderr


@pytest.mark.slow
def test_safetensors_export_samples_like_the_checkpoint(cli, trained):
    out = export(cli, trained / "run", trained / "st", "safetensors")
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.toml"}
    args = ["--prompt", "the", "--max-new-tokens", "15", "--temperature", "0"]
    assert cli("sample.py", out, *args).stdout == cli("sample.py", trained / "run", *args).stdout
    r = cli("-m", "lm.export", trained / "run", "--format", "safetensors", out)
    assert r.returncode == 2 and "already exists" in r.stderr  # nothing is overwritten


def test_int8_logits_stay_close_to_fp32(trained):
    _, model = load(trained / "run")
    model.eval()
    idx = torch.randint(0, model.cfg.vocab_size, (2, 40))
    with torch.no_grad():
        ref, _ = model(idx)
        q, _ = quantize_int8(load(trained / "run")[1].eval())(idx)
    assert (q - ref).abs().max() <= 0.02 * ref.abs().max()
    assert (q.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95
