"""Sampling refuses nonsense settings, and a run trained with Triton kernels samples and exports on a CPU."""
import json
import shutil

import pytest
import torch

from data_prep import prepare
from lm.training import checkpoint, checkpoint_files
from lm.config.load import load_config, to_toml
from lm.config.schema import ModelConfig
from lm.model.generate import generate
from lm.model.gpt import GPT
from lm.training.trainer import Trainer
from tests.conftest import assert_user_error, run_main

TINY = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "train.batch_size=4",
        "log.progress=false", "train.device=cpu", "train.max_steps=2", "train.eval_interval=2"]


@pytest.fixture(scope="module")
def runs(tiny_corpus, tmp_path_factory):
    """A tiny trained run ("sdpa"), and a copy whose config says it was trained with both Triton kernels."""
    root = tmp_path_factory.mktemp("trust")
    prepare([str(tiny_corpus)], root / "data", tokenizer="char", show_progress=False)
    Trainer(load_config(None, [*TINY, f"data.dir={root / 'data'}", f"train.out_dir={root / 'sdpa'}"])).run()
    shutil.copytree(root / "sdpa", root / "triton")
    ckpt = checkpoint.resolve(root / "triton")
    for path in [root / "triton" / "config.toml", ckpt / "config.toml"]:
        cfg = checkpoint.load_config(path.parent)
        cfg.model.attention, cfg.model.layernorm = "triton", "triton"
        path.write_text(to_toml(cfg))
    # the checkpoint's record of its files must describe the rewritten config, or the checkpoint is damaged
    record = json.loads((ckpt / "checkpoint.json").read_text())
    record["files"].update(checkpoint_files.describe(ckpt, ["config.toml"]))
    (ckpt / "checkpoint.json").write_text(json.dumps(record))
    return root


NONSENSE = [
    (["--max-new-tokens", "-3"], ["--max-new-tokens", "-3"]),
    (["--temperature", "-1"], ["--temperature", "-1"]),
    (["--temperature", "nan"], ["--temperature", "nan"]),
    (["--top-k", "-2"], ["--top-k", "-2"]),
    (["--top-p", "1.7"], ["--top-p", "1.7"]),
    (["--top-p", "0"], ["--top-p", "0"]),  # keeps no token at all
    (["--repetition-penalty", "0"], ["--repetition-penalty", "0"]),
    (["--num-samples", "0"], ["--num-samples", "0"]),
    (["--stop", ""], ["--stop", "empty"]),  # would end every sample after its first token
    (["--int8", "--dtype", "bfloat16"], ["--int8", "bfloat16"]),
    (["--device", "foo"], ["--device", "foo"]),
    pytest.param(["--device", "cuda"], ["--device", "cuda"],
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")),
]


@pytest.mark.parametrize("flags,fragments", NONSENSE)
def test_sample_cli_refuses_nonsense_settings(runs, flags, fragments):
    assert_user_error(run_main("sample.py", runs / "sdpa", "--max-new-tokens", "5", *flags), *fragments)


@pytest.mark.slow
def test_boundary_settings_still_sample(cli, runs):
    r = cli("sample.py", runs / "sdpa", "--prompt", "the", "--max-new-tokens", "6", "--temperature", "0.5",
            "--top-k", "0", "--top-p", "1", "--repetition-penalty", "0.5", "--num-samples", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("the") and len(r.stdout.rstrip("\n")) > len("the")


@pytest.mark.parametrize("setting,value", [("max_new_tokens", -3), ("temperature", -1.0),
                                           ("temperature", float("inf")), ("top_k", -2), ("top_p", 1.7),
                                           ("top_p", 0.0), ("repetition_penalty", 0.0),
                                           ("repetition_penalty", float("nan"))])
def test_generate_refuses_nonsense_settings(setting, value):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=11, block_size=8, n_layer=1, n_head=1, n_embd=16)).eval()
    kwargs = {"max_new_tokens": 4, setting: value}
    with pytest.raises(ValueError, match=setting):
        generate(model, [[1, 2]], **kwargs)


# ---------------------------------------------------------------- Triton-trained runs on a CPU

def test_inference_backends_switch_to_pytorch_only_where_triton_cannot_run(monkeypatch, capsys):
    from lm.model.attention import inference_backends

    triton_cfg = ModelConfig(attention="triton", layernorm="triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu = inference_backends(triton_cfg, torch.device("cpu"))
    assert (cpu.attention, cpu.layernorm) == ("sdpa", "torch")
    assert (triton_cfg.attention, triton_cfg.layernorm) == ("triton", "triton")  # the caller's is untouched
    note = capsys.readouterr().err.strip().splitlines()
    assert len(note) == 1 and "triton" in note[0] and "sdpa" in note[0]
    plain = ModelConfig()
    assert inference_backends(plain, torch.device("cpu")) == plain and capsys.readouterr().err == ""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert inference_backends(triton_cfg, torch.device("cpu")) == triton_cfg


def test_triton_run_loads_on_cpu_with_the_logits_of_the_pytorch_kernels(monkeypatch, runs):
    from lm.interop.export import load

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _, ours = load(runs / "triton")
    _, reference = load(runs / "sdpa")
    assert (ours.cfg.attention, ours.cfg.layernorm) == ("sdpa", "torch")
    idx = torch.randint(0, ours.cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours.eval()(idx)[0], reference.eval()(idx)[0])


@pytest.mark.slow
def test_triton_run_samples_and_exports_on_cpu(monkeypatch, cli, runs, tmp_path):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the subprocesses must not have the interpreter
    args = ["--prompt", "the", "--max-new-tokens", "15", "--temperature", "0", "--device", "cpu"]
    expected = cli("sample.py", runs / "sdpa", *args)
    assert expected.returncode == 0, expected.stderr
    r = cli("sample.py", runs / "triton", *args)
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected.stdout
    assert "sdpa" in r.stderr and len(r.stderr.strip().splitlines()) == 1

    for fmt in ("safetensors", "hf"):
        e = cli("-m", "lm.export", runs / "triton", "--format", fmt, tmp_path / fmt)
        assert e.returncode == 0, e.stderr
    assert "triton" in (tmp_path / "safetensors" / "config.toml").read_text()  # the run's own config is kept
    exported = cli("sample.py", tmp_path / "safetensors", *args)
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout == expected.stdout
