"""Prompt/completion tuning ([sft]): completion-only loss, packing without crossing examples, the data format."""
import json

import pytest
import torch
import torch.nn.functional as F

from data_prep import DataError
from lm.config.load import load_config
from lm.config.schema import ModelConfig
from lm.model.gpt import GPT
from lm.objectives.sft_data import IGNORE, PackedStream, pack, read_examples, split_targets
from lm.training.trainer import Trainer
from tests.conftest import losses
from tests.test_train import overrides

EOS = 29


def test_packing_keeps_whole_examples_and_marks_only_completions_as_targets():
    examples = [([1, 2, 3], [4, 5]), ([6], [7, 8, 9]), ([10, 11], [12])]
    rows = pack(examples, block_size=10, eos=EOS)
    assert rows.shape == (2, 11)
    x, y = split_targets(torch.from_numpy(rows[:, :-1]), torch.from_numpy(rows[:, 1:]))
    full = torch.where(torch.from_numpy(rows) < 0, -torch.from_numpy(rows) - 1, torch.from_numpy(rows))
    assert full[0].tolist() == [1, 2, 3, 4, 5, EOS, 6, 7, 8, 9, EOS]  # the third example did not fit
    # targets: completion tokens and the EOS that ends a completion; never a prompt token
    assert y[0].tolist() == [IGNORE, IGNORE, 4, 5, EOS, IGNORE, 7, 8, 9, EOS]
    assert full[1].tolist()[:5] == [10, 11, 12, EOS, EOS] and y[1].tolist()[:3] == [IGNORE, 12, EOS]
    assert (y[1, 3:] == IGNORE).all()  # the filler


def test_a_long_example_keeps_its_completion_and_the_end_of_its_prompt():
    rows = pack([(list(range(1, 20)), [21, 22, 23])], block_size=7, eos=EOS)
    full = [(-t - 1 if t < 0 else t) for t in rows[0]]
    assert full == [16, 17, 18, 19, 21, 22, 23, EOS]


def test_the_loss_counts_completion_tokens_only_and_each_example_as_if_alone():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=30, block_size=24, n_layer=2, n_head=2, n_embd=32, loss_chunk=0)).eval()
    model.document_eos = EOS
    examples = [([1, 2, 3, 4], [5, 6, 7]), ([8, 9], [10, 11, 12, 13]), ([14, 15, 16], [17, 18])]
    rows = torch.from_numpy(pack(examples, 24, EOS))
    x, y = split_targets(rows[:, :-1], rows[:, 1:])
    with torch.no_grad():
        packed = model(x, y)[1]
        terms = []
        for prompt, completion in examples:  # each alone: CE of completion + EOS given the prompt
            ids = torch.tensor([prompt + completion + [EOS]])
            logits = model(ids)[0][0]
            start = len(prompt) - 1
            terms.append(F.cross_entropy(logits[start:start + len(completion) + 1], ids[0, start + 1:],
                                         reduction="none"))
        assert torch.allclose(packed, torch.cat(terms).mean(), atol=1e-5)


def test_chat_and_field_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n"
                    + json.dumps({"q": "a", "a": "b"}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl: line 2: needs string fields 'prompt'"):
        read_examples(path, "prompt", "completion", "messages")
    assert read_examples(path, "q", "a", "messages") == [("user: hi\nassistant: ", "hello"), ("a", "b")]
    path.write_text('{"prompt": "x", "completion": "y"}\nnot json\n')
    with pytest.raises(DataError, match="d.jsonl: line 2: not valid JSON"):
        read_examples(path, "prompt", "completion", "messages")


def test_the_stream_reads_each_row_once_per_epoch_in_a_seeded_order():
    rows = pack([([i], [i + 1]) for i in range(1, 20, 2)], block_size=3, eos=EOS)
    stream = PackedStream(rows, seed=4)
    epoch = stream.read(0, len(rows))
    assert sorted(map(tuple, epoch)) == sorted(map(tuple, rows))
    assert (stream.read(3, 4) == epoch[3:7]).all()


def test_sft_trains_from_a_pretrained_run_and_resumes_bit_exactly(char_dataset, tmp_path):
    examples = tmp_path / "sft.jsonl"
    words = "the quick brown fox jumps over a lazy dog".split()
    examples.write_text("".join(json.dumps({"prompt": f"say {w} twice\n", "completion": f"{w} {w}."}) + "\n"
                                for w in words * 6))
    Trainer(load_config(None, overrides(char_dataset, tmp_path / "base", "train.max_steps=2"))).run()
    sft = ["train.max_steps=6", "train.eval_interval=3", f"sft.train_file={examples}", f"init.from={tmp_path / 'base'}",
           "train.eval_sequences=4"]
    first = Trainer(load_config(None, overrides(char_dataset, tmp_path / "a", *sft)))
    assert first.model.document_eos is not None
    result = first.run()
    assert result["val_loss"] < 10 and result["step"] == 6
    Trainer(load_config(None, overrides(char_dataset, tmp_path / "b", *sft))).run(stop_at_step=3)
    Trainer(load_config(None, overrides(char_dataset, tmp_path / "b", *sft)), resume=True).run()
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_prompt_positions_get_no_gradient():
    """Whatever a prompt position's target were, the loss would not change: its logits get zero gradient."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=30, block_size=16, n_layer=1, n_head=2, n_embd=16, loss_chunk=0))
    model.document_eos = EOS
    rows = torch.from_numpy(pack([([1, 2, 3, 4], [5, 6]), ([7, 8], [9])], 16, EOS))
    x, y = split_targets(rows[:, :-1], rows[:, 1:])
    logits, loss = model(x, y)
    logits.retain_grad()
    loss.backward()
    per_position = logits.grad.abs().sum(-1)
    assert (per_position[y == IGNORE] == 0).all() and (per_position[y != IGNORE] > 0).all()


@pytest.mark.slow
def test_sft_bench_smoke(cli, tmp_path):
    from tests.conftest import ROOT

    out = tmp_path / "sft.json"
    r = cli("bench/sft.py", "--smoke", "--out", out, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    for name in ("before", "after"):
        assert 0 < result[name]["completion_loss"] < 20 and 0 <= result[name]["parse_share"] <= 1


def test_the_step_loss_is_the_mean_over_every_target_of_the_global_batch(char_dataset, tmp_path):
    """Rows hold different numbers of targets: grad_accum 2 x 2 rows gives the loss of 1 x 4 rows (and so
    does 2 ranks x 2 rows: tests/test_matrix.py)."""
    examples = tmp_path / "sft.jsonl"
    words = "the quick brown fox jumps over a lazy dog".split()
    examples.write_text("".join(json.dumps({"prompt": f"say {w}\n", "completion": f"{w} " * (1 + i % 4)}) + "\n"
                                for i, w in enumerate(words * 4)))
    common = ["train.max_steps=1", f"sft.train_file={examples}", "sft.val_fraction=0", "train.eval_interval=100",
              "model.dropout=0.0"]
    one = Trainer(load_config(None, overrides(char_dataset, tmp_path / "a", *common, "train.batch_size=4")))
    two = Trainer(load_config(None, overrides(char_dataset, tmp_path / "b", *common, "train.batch_size=2",
                                              "train.grad_accum=2")))
    a, b = one.train_step()["loss"], two.train_step()["loss"]
    assert a == pytest.approx(b, rel=1e-6)
    for name, p in one.model.named_parameters():
        assert torch.allclose(p, dict(two.model.named_parameters())[name], atol=1e-6), name
