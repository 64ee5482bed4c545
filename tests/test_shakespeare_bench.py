"""bench/shakespeare_char.py at a tiny budget: both runs (lmforge's train.py and the bare loop) finish on
the same data and the ratio printed is the two wall times measured in this invocation."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_bench_times_lmforge_and_the_bare_loop_side_by_side(tmp_path):
    text = tmp_path / "tiny.txt"
    text.write_text("".join(f"Line {i}: to be or not to be, that is the question.\n" for i in range(400)))
    out = tmp_path / "result.json"
    tiny = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=16", "train.max_steps=6",
            "train.eval_interval=3", "train.eval_sequences=8", "train.batch_size=4"]
    r = subprocess.run([sys.executable, "bench/shakespeare_char.py", str(text), "--out", str(out),
                        "--keep-run", str(tmp_path / "run"), *tiny], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["steps"] == 6
    ours, bare = result["lmforge"], result["bare"]
    assert ours["wall_s"] > 0 and bare["wall_s"] > 0
    assert result["ratio_lmforge_over_bare"] == ours["wall_s"] / bare["wall_s"]
    assert 0 < bare["val_loss"] < 10 and 0 < ours["val_loss"] < 10
    assert "lmforge / bare loop wall time" in r.stdout
    assert (tmp_path / "run" / "metrics.jsonl").exists()  # --keep-run keeps lmforge's run to sample from
