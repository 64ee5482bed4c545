"""Input augmentation (data.augment): inputs only, reproducible per batch, so resume sees the same batches."""
import pytest
import torch

from lm.data.augment import Augmenter, parse_augment
from lm.config.load import load_config
from lm.config.schema import ConfigError
from lm.training.trainer import Trainer
from tests.conftest import losses
from tests.test_train import overrides

V, EOS = 50, 49


def test_the_same_batch_is_augmented_the_same_way_and_another_batch_differently():
    aug = Augmenter(parse_augment(["swap:0.1", "noise:0.1", "drop:0.1"]), V, EOS, seed=3)
    x = torch.randint(0, EOS, (4, 64))
    assert torch.equal(aug(x, 16), aug(x, 16))
    assert not torch.equal(aug(x, 16), aug(x, 20))
    assert torch.equal(x, x.clone())  # the input is not modified in place


def test_swaps_exchange_neighbours_and_keep_each_rows_tokens():
    aug = Augmenter(parse_augment(["swap:0.2"]), V, EOS, seed=0)
    x = torch.stack([torch.randperm(100) for _ in range(2)])  # distinct tokens: each move is visible
    out = aug(x, 0)
    assert not torch.equal(out, x)
    for row_in, row_out in zip(x, out):
        assert sorted(row_in.tolist()) == sorted(row_out.tolist())
        changed = (row_in != row_out).nonzero().flatten().tolist()
        pairs = list(zip(changed[0::2], changed[1::2]))
        assert len(changed) % 2 == 0 and all(j == i + 1 for i, j in pairs)
        assert all(row_out[i] == row_in[j] and row_out[j] == row_in[i] for i, j in pairs)


@pytest.mark.parametrize("kind", ["noise", "drop"])
def test_noise_and_drop_hit_about_p_of_the_positions(kind):
    aug = Augmenter(parse_augment([f"{kind}:0.2"]), V, EOS, seed=0)
    x = torch.zeros(64, 256, dtype=torch.long)
    changed = aug(x, 0) != x
    assert 0.17 < changed.float().mean() < 0.21  # noise may draw the same id (0) now and then
    if kind == "drop":
        assert (aug(x, 0)[changed] == EOS).all()


@pytest.mark.slow
def test_an_augmented_run_resumes_bit_exactly_and_differs_from_a_plain_one(char_dataset, tmp_path):
    extra = ["train.max_steps=6", "train.eval_interval=3", 'data.augment=["swap:0.05", "noise:0.05"]']
    Trainer(load_config(None, overrides(char_dataset, tmp_path / "a", *extra))).run()
    Trainer(load_config(None, overrides(char_dataset, tmp_path / "b", *extra))).run(stop_at_step=3)
    Trainer(load_config(None, overrides(char_dataset, tmp_path / "b", *extra)), resume=True).run()
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    Trainer(load_config(None, overrides(char_dataset, tmp_path / "plain", *extra[:2]))).run()
    assert losses(tmp_path / "plain") != losses(tmp_path / "a")


def test_targets_are_never_augmented(char_dataset, tmp_path):
    trainer = Trainer(load_config(None, overrides(char_dataset, tmp_path / "t", 'data.augment=["noise:0.5"]')))
    seen = []
    original = trainer.model.forward
    trainer.model.forward = lambda x, y=None, **kw: (seen.append((x.clone(), y.clone())), original(x, y, **kw))[1]
    trainer.train_step()
    x, y = seen[0]
    clean = trainer.prefetcher.stream.read(0, x.size(0))
    assert torch.equal(y, torch.from_numpy(clean[:, 1:]))  # the clean next tokens
    assert (x != torch.from_numpy(clean[:, :-1])).float().mean() > 0.3


@pytest.mark.parametrize("spec", ["swap", "blur:0.1", "swap:1.5", "noise:0"])
def test_bad_augment_specs_name_the_key(spec):
    with pytest.raises(ConfigError, match="data.augment"):
        load_config(None, [f'data.augment=["{spec}"]'])


def test_drop_with_document_mask_is_refused():
    from lm.objectives import objective_class

    cfg = load_config(None, ['data.augment=["drop:0.1"]', "data.document_mask=true"])
    with pytest.raises(ConfigError, match="'drop' cannot be combined with data.document_mask"):
        objective_class(cfg).check_combinations(cfg)


def test_with_masked_documents_augmentation_never_moves_writes_or_replaces_eos():
    from lm.data.augment import Augmenter

    eos, vocab = 3, 6
    x = torch.randint(0, vocab, (64, 32), generator=torch.Generator().manual_seed(0))
    x[:, ::5] = eos
    out = Augmenter([("swap", 0.5), ("noise", 0.5)], vocab, eos, seed=1, keep_documents=True)(x, 0)
    assert torch.equal(out == eos, x == eos) and not torch.equal(out, x)
    free = Augmenter([("noise", 0.9)], vocab, eos, seed=1)(x, 0)
    assert not torch.equal(free == eos, x == eos)  # without masks noise writes EOS like any id


@pytest.mark.slow
def test_augment_bench_smoke(cli, tmp_path):
    import json

    from tests.conftest import ROOT

    text = tmp_path / "t.txt"
    text.write_text("".join(f"line {i}: to be or not to be.\n" for i in range(2000)))
    r = cli("bench/augment.py", text, "--smoke", "--out", tmp_path / "a.json", cwd=ROOT)
    assert r.returncode == 0, r.stderr
    results = json.loads((tmp_path / "a.json").read_text())["results"]
    assert set(results) == {"none", "all three"} and all(v["best_val_loss"] > 0 for v in results.values())


def test_a_sample_is_augmented_the_same_in_any_batch():
    """Per-sample generators: one batch of 4 equals two batches of 2 (2 ranks, or grad_accum 2)."""
    from lm.data.augment import Augmenter

    x = torch.randint(0, 50, (4, 24), generator=torch.Generator().manual_seed(0))
    augment = Augmenter([("swap", 0.2), ("noise", 0.2), ("drop", 0.1)], 50, 0, seed=3)
    whole = augment(x, 100)
    assert torch.equal(whole, torch.cat([augment(x[:2], 100), augment(x[2:], 102)]))
    assert not torch.equal(whole, x)
