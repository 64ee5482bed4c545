"""Run-directory tools: consolidating a sharded checkpoint, and plotting the curves."""
import pytest
import torch

from data_prep import prepare
from lm.training import checkpoint
from lm.interop.export import load
from tests.conftest import train


@pytest.mark.slow
def test_consolidate_a_two_rank_checkpoint_and_plot_its_curves(tiny_corpus, tmp_path, cli):
    data = tmp_path / "data"
    prepare([str(tiny_corpus)], data, tokenizer="char", show_progress=False)
    run = tmp_path / "run"
    train(f"data.dir={data}", f"train.out_dir={run}", "train.batch_size=2", "train.max_steps=2",
          "train.eval_interval=2", nproc=2)
    r = cli("-m", "lm.consolidate", run, tmp_path / "one")
    assert r.returncode == 0, r.stderr
    assert {"model.safetensors", "config.json", "config.toml", "chars.json"} <= {p.name for p in (tmp_path / "one").iterdir()}
    _, sharded = load(run)
    _, single = load(tmp_path / "one")
    assert all(torch.equal(a, b) for a, b in zip(sharded.state_dict().values(), single.state_dict().values()))
    assert checkpoint.load_info(checkpoint.resolve(run))["world_size"] == 2

    r = cli("-m", "lm.plot", run, "--out", tmp_path / "curves.png")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli("-m", "lm.plot", tmp_path / "nowhere").returncode == 2
