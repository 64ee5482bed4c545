import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd=ROOT, timeout=600):
    """Run one of the project's command-line entry points; returns the CompletedProcess."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def run_main(entry: str, *args) -> subprocess.CompletedProcess:
    """An entry point's main(argv) run in this process, as `run_cli` would run it (no interpreter start-up,
    no second import of torch): "sample.py", "train.py" or a module such as "lm.eval". An exception that
    escapes main fails the test, as a traceback would."""
    import contextlib
    import importlib
    import io

    module = importlib.import_module(entry.removesuffix(".py"))
    if not hasattr(module, "main"):
        module = importlib.import_module(f"{entry}.__main__")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = module.main([str(a) for a in args])
        except SystemExit as e:  # argparse's own errors
            code = e.code if isinstance(e.code, int) else 2
    return subprocess.CompletedProcess([entry, *args], code, out.getvalue(), err.getvalue())


def assert_user_error(result, *fragments):
    """A command-line run that ended as a user error should: exit 2, one `error: ...` line, no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ")
    for fragment in fragments:
        assert fragment in line, line


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A few hundred KB of varied text documents, made here so tests need no download."""
    root = tmp_path_factory.mktemp("corpus")
    words = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex "
             "every jolly vexing box of frozen pizza").split()
    for d in range(40):
        lines = [" ".join(words[(d * 7 + i * 3 + j) % len(words)] for j in range(5 + (i + d) % 9)) + "."
                 for i in range(60)]
        (root / f"doc{d:02d}.txt").write_text("\n".join(lines) + "\n")
    return root


# ---- shared set-up for training tests ---------------------------------------------------------------
# A model small enough that a step takes milliseconds; test files add what their case needs.
TINY = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "train.batch_size=4",
        "train.eval_sequences=8", "log.progress=false", "log.interval=1", "train.device=cpu", "train.dtype=float32"]
LLAMA = ["model.norm=rmsnorm", "model.position=rope", "model.mlp=swiglu", "model.bias=false"]


def training_overrides(data_dir, out_dir, *extra) -> list[str]:
    return [*TINY, f"data.dir={data_dir}", f"train.out_dir={out_dir}", *extra]


def metric_records(run_dir) -> list[dict]:
    import json

    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def char_dataset(tiny_corpus, tmp_path_factory) -> Path:
    """tiny_corpus prepared with the character tokenizer, once per session."""
    from data_prep import prepare

    out = tmp_path_factory.mktemp("char_dataset") / "char"
    prepare([str(tiny_corpus)], out, tokenizer="char", show_progress=False)
    return out


# ---- train.py as a user runs it, on one process or several ------------------------------------------------
# (TRAIN_BASE: a tiny model on configs/shakespeare_char.toml, a constant lr, no warmup)
TRAIN_BASE = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "train.eval_sequences=8",
              "log.progress=false", "log.interval=1", "train.device=cpu", "optim.schedule=constant",
              "optim.warmup_steps=0", "train.dtype=float32"]


def train(*args, nproc=1, resume=False, check=True):
    """`python train.py configs/shakespeare_char.toml TRAIN_BASE... ARGS` as a user runs it, on `nproc`
    processes (torchrun, gloo) when more than one."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    cmd = [*launcher, "train.py", "configs/shakespeare_char.toml", *TRAIN_BASE, *args] + (["--resume"] if resume else [])
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def losses(run_dir) -> dict[int, float]:
    """step -> training loss, from a run's metrics.jsonl."""
    records = metric_records(run_dir)
    return {r["step"]: r["loss"] for r in records if "loss" in r}
