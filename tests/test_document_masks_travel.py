"""What a model was trained with travels with it: document masking is part of the model config, so
generation, evaluation and every loader compute what training computed."""
import torch

from lm.config.load import load_config, to_toml
from lm.config.schema import ModelConfig
from lm.model.generate import generate
from lm.model.gpt import GPT

EOS = 3


def _model(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=8, block_size=32, n_layer=2, n_head=2, n_embd=16, document_eos=EOS, **kw)
    return GPT(cfg).eval()


def _greedy_without_cache(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0][0, -1].argmax()))
    return seq[len(prompt):]


def test_the_model_config_carries_the_mask():
    model = _model()
    assert model.document_eos == EOS and GPT(ModelConfig(vocab_size=8, n_layer=1, n_head=1, n_embd=8)).document_eos is None


def test_cached_generation_equals_the_masked_forward_across_documents():
    for position in ("learned", "rope"):
        model = _model(position=position)
        prompts = [[1, 2, EOS, 4, 5], [1, 2, 4, EOS], [5, 6, 7]]  # a closed document, one just closed, none
        got = generate(model, prompts, 20, temperature=0)
        for prompt, tokens in zip(prompts, got):
            assert tokens == _greedy_without_cache(model, prompt, 20), (position, prompt)
        assert any(EOS in t for t in got)  # the generated EOS path was taken


def test_a_training_run_records_the_mask_in_its_config():
    cfg = load_config(None, ["data.document_mask=true"])
    assert cfg.model.document_eos == -1  # set by the trainer from the data's EOS, not by hand


def test_init_from_gives_the_shape_and_names_every_difference_at_once(tmp_path):
    import pytest

    from lm.config.schema import ConfigError
    from lm.training.initialize import adopt_shape

    run = tmp_path / "run"
    ckpt = run / "ckpt" / "step_00000001"
    ckpt.mkdir(parents=True)
    (ckpt / "config.toml").write_text(to_toml(load_config(None, ["model.n_layer=3", "model.n_embd=48",
                                                               "model.n_head=3", "model.block_size=24",
                                                               "model.vocab_size=40"])))
    (ckpt / "checkpoint.json").write_text("{}")
    cfg = load_config(None, [f"init.from={ckpt}"])
    adopt_shape(cfg)
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head, cfg.model.block_size) == (3, 48, 3, 24)
    cfg = load_config(None, [f"init.from={ckpt}", "model.n_layer=2", "model.block_size=32", "model.n_embd=48"])
    with pytest.raises(ConfigError, match=r"model.block_size = 32 \(24 there\), model.n_layer = 2 \(3 there\)"):
        adopt_shape(cfg)
