"""Weight-only int8 / int4 checkpoints (`python -m lm.quantize RUN --bits 8|4 OUT`): round-trip error
bounds, the files' size, and that sample.py and init.from read them."""
import pytest
import torch

from data_prep import prepare
from lm.config.load import load_config
from lm.interop.export import load
from lm.compress.quantize import dequantize_int4_groups, quantize_int4_groups, quantize_int8_rows, quantized_state
from lm.training.trainer import Trainer
from tests.conftest import assert_user_error


def test_int8_rows_round_trip_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(37, 50) * torch.logspace(-3, 1, 37)[:, None]  # rows of very different scales
    q, scale = quantize_int8_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (37,)
    error = (q.float() * scale[:, None] - w).abs()
    assert (error <= scale[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("cols, group", [(64, 32), (50, 16), (7, 4)])
def test_int4_groups_round_trip_within_half_a_step(cols, group):
    torch.manual_seed(0)
    w = torch.randn(9, cols) * torch.logspace(-2, 1, cols)[None, :]  # groups of very different scales
    packed, scale = quantize_int4_groups(w, group)
    assert packed.dtype == torch.uint8 and packed.shape == (9, -(-cols // group) * group // 2)
    back = dequantize_int4_groups(packed, scale, cols)
    step = scale.float().repeat_interleave(group, dim=1)[:, :cols]
    assert ((back - w).abs() <= step / 2 * 1.002 + 1e-6).all()
    # the packing itself: each byte holds columns 2j (low nibble) and 2j+1 (high), offset by 8
    q = torch.round(back / step).to(torch.int64)
    assert ((packed[:, 0] & 0xF).long() - 8).tolist() == q[:, 0].tolist()


@pytest.fixture(scope="module")
def run(tiny_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    prepare([str(tiny_corpus)], root / "data", tokenizer="char", show_progress=False)
    cfg = load_config(None, ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=32",
                             f"data.dir={root / 'data'}", f"train.out_dir={root / 'run'}", "train.max_steps=3",
                             "train.batch_size=4", "train.eval_interval=3", "train.eval_sequences=4",
                             "log.progress=false", "train.device=cpu"])
    Trainer(cfg).run()
    return root


@pytest.mark.slow
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_checkpoint_is_smaller_loads_samples_and_stays_close(cli, run, bits):
    out = run / f"int{bits}"
    r = cli("-m", "lm.quantize", run / "run", "--bits", bits, "--group-size", 32, out)
    assert r.returncode == 0, r.stderr
    _, full = load(run / "run")
    _, quant = load(out)
    weights = 4 * sum(v.numel() for k, v in full.state_dict().items() if k != "lm_head.weight")
    size = (out / "model.safetensors").stat().st_size
    assert size < weights * {8: 0.3, 4: 0.2}[bits]
    x = torch.randint(0, full.cfg.vocab_size, (2, 32))
    with torch.no_grad():
        a, b = full(x)[0], quant(x)[0]
    assert (a - b).abs().max() < {8: 0.05, 4: 0.5}[bits] * a.abs().max()
    for key, value in quant.state_dict().items():
        assert torch.equal(value, full.state_dict()[key]) == (value.dim() != 2), key  # only matrices change
    r = cli("sample.py", out, "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr


def test_int4_state_is_about_an_eighth_of_fp32_for_matrices():
    from lm.config.schema import ModelConfig
    from lm.model.gpt import GPT

    model = GPT(ModelConfig(vocab_size=512, block_size=64, n_layer=2, n_head=4, n_embd=256, bias=False))
    matrices = sum(v.numel() for k, v in model.state_dict().items() if v.dim() == 2 and k != "lm_head.weight")
    stored = quantized_state(model, 4, group_size=64)
    int4_bytes = sum(v.numel() * v.element_size() for k, v in stored.items() if k.endswith((".int4", ".scale")))
    assert int4_bytes == matrices // 2 + 2 * matrices // 64  # half a byte per weight + one fp16 per group


@pytest.mark.slow
def test_quantize_refuses_bad_arguments_in_one_line(cli, run, tmp_path):
    assert_user_error(cli("-m", "lm.quantize", run / "run", "--bits", "4", "--group-size", "3", tmp_path / "q"),
                      "--group-size 3")
    assert_user_error(cli("-m", "lm.quantize", tmp_path / "nothing", "--bits", "8", tmp_path / "q2"), "nothing")
