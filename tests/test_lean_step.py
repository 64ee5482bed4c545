"""The training step's overheads: the next batch read ahead on a thread, one device-to-host sync per step,
and torch.compile of the blocks or of the whole model giving the eager losses."""
import functools
import json
import sys

import numpy as np
import pytest
import torch

from data_prep import TokenReader
from lm.config.load import load_config
from lm.data.batches import Prefetcher, SampleStream
from lm.training.trainer import Trainer
from tests import conftest
from tests.conftest import ROOT

TINY = [*conftest.TINY, "model.dropout=0.0"]


def config(char_dataset, out, *extra):
    return load_config(ROOT / "configs" / "shakespeare_char.toml",
                       [*TINY, f"data.dir={char_dataset}", f"train.out_dir={out}", "train.batch_size=4", *extra])


@pytest.mark.parametrize("background", [True, None], ids=["thread", "cpu default: on the spot"])
def test_prefetched_batches_equal_direct_reads_in_order_and_out_of_order(char_dataset, background):
    stream = SampleStream(TokenReader(char_dataset, "train"), 32, 7, "train")
    prefetcher = Prefetcher(stream, 4, torch.device("cpu"), background=background)
    assert (prefetcher.pool is not None) == bool(background)
    try:
        for first, ahead in [(0, 4), (4, 8), (8, 12), (100, 104), (104, 108), (4, 8)]:  # (100, 4): a jump
            x, y = prefetcher.batch(first, next_first=ahead)
            ex, ey = stream.batch(first, 4, torch.device("cpu"))
            assert torch.equal(x, ex) and torch.equal(y, ey)
    finally:
        prefetcher.close()


def test_one_device_to_host_sync_per_step(char_dataset, tmp_path, monkeypatch):
    trainer = Trainer(config(char_dataset, tmp_path / "sync", "train.max_steps=3", "train.grad_accum=2"))
    trainer.train_step()  # warm: the first step builds the trainable list
    syncs = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, _name=name, **k):
            # ours only: PyTorch's CPU AdamW reads its (host) step counters with .item(), no device sync
            caller = sys._getframe(1).f_code.co_filename
            if str(ROOT / "lm") in caller or str(ROOT / "data_prep") in caller:
                syncs.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    trainer.train_step()
    monkeypatch.undo()
    assert syncs == ["tolist"]


@pytest.mark.parametrize("scope", ["blocks", "model"])
def test_compiled_blocks_or_whole_model_give_the_eager_losses(char_dataset, tmp_path, monkeypatch, scope):
    # aot_eager traces with dynamo and AOT autograd like inductor does, without a C++ build per graph
    monkeypatch.setattr(torch.nn.Module, "compile",
                        functools.partialmethod(torch.nn.Module.compile, backend="aot_eager"))
    losses = {}
    for mode in ("none", scope):
        out = tmp_path / mode
        trainer = Trainer(config(char_dataset, out, "train.max_steps=3", "train.eval_interval=3", f"parallel.compile={mode}"))
        if mode == "model":
            assert trainer.model._compiled_call_impl is not None
        trainer.run()
        losses[mode] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
                        if '"loss"' in line]
    np.testing.assert_allclose(losses[scope], losses["none"], rtol=1e-5)


def test_compile_true_in_a_saved_config_means_blocks():
    from lm.config.load import config_from_toml_text

    assert config_from_toml_text("[parallel]\ncompile = true\n", "old").parallel.compile == "blocks"
    assert config_from_toml_text("[parallel]\ncompile = false\n", "old").parallel.compile == "none"
