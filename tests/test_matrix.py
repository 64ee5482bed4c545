"""Features compose: every cell of objective {lm, sft, classify, distill} x block {gpt2, llama} x document
masks {off, on} x augmentation {none, noise} either refuses in one line naming both features, or runs,
resumes bit-exactly, and its last in-training evaluation is what lm.eval computes on the saved checkpoint;
on 2 ranks every running cell gives the losses of 1 (tests/matrix.py runs the cells)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lm.eval.__main__ import main as lm_eval
from tests.conftest import ROOT
from tests.matrix import CELLS, cell_id, overrides, refusal, run_cell, train_teacher, write_inputs

_PLACEHOLDERS = (Path("data"), {"sft": Path("sft.jsonl"), "classify": Path("c.jsonl")}, Path("teacher"), Path("o"))
REFUSALS = {cell: refusal(cell, overrides(cell, *_PLACEHOLDERS)) for cell in CELLS}
RUNNING = [cell for cell in CELLS if REFUSALS[cell] is None]
ONE_RANK: dict[str, dict] = {}  # results of the cells run here, for the 2-rank comparison


@pytest.fixture(scope="module")
def matrix(char_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix")
    return char_dataset, write_inputs(root / "inputs"), train_teacher(char_dataset, root / "teacher"), root


def test_the_matrix_has_every_cell():
    assert len(CELLS) == 32 and len(RUNNING) == 26  # classification refuses document masks and augmentation


@pytest.mark.parametrize("cell", [c for c in CELLS if REFUSALS[c]], ids=cell_id)
def test_a_refused_cell_names_both_features(cell):
    objective, _, mask, augment = cell
    message = REFUSALS[cell]
    assert "\n" not in message and "classification" in message
    assert ("data.document_mask" if mask else "data.augment") in message


def _one_rank(cell, matrix, tmp_path):
    data, inputs, teacher, _ = matrix
    if cell_id(cell) not in ONE_RANK:
        ONE_RANK[cell_id(cell)] = run_cell(cell, data, inputs, teacher, tmp_path / cell_id(cell))
    return ONE_RANK[cell_id(cell)]


@pytest.mark.slow
@pytest.mark.parametrize("cell", RUNNING, ids=cell_id)
def test_a_running_cell_resumes_exactly_and_lm_eval_agrees(cell, matrix, tmp_path, capsys):
    result = _one_rank(cell, matrix, tmp_path)
    full, resumed = result["full"], result["resumed"]
    assert list(full["losses"]) == [1, 2, 3, 4]
    assert full["losses"] == resumed["losses"]  # bit-exact
    assert full["val"][-1] == {**resumed["val"][-1], "wall_s": full["val"][-1]["wall_s"]}
    data = matrix[0]
    out = tmp_path / "eval.json"
    code = lm_eval([result["checkpoint"], "--tasks", f"ppl:{data}:name=heldout", "--limit", "3", "--batch-size", "4",
                    "--device", "cpu", "--out", str(out)])
    if cell[0] == "classify":  # not a language model: refused in one line
        assert code == 2 and "not a language model" in capsys.readouterr().err
        return
    assert code == 0
    scored = json.loads(out.read_text())["tasks"]["heldout"]
    trained = full["val"][-1]
    for key in ("loss", "bpb", "tokens"):
        assert scored[key] == pytest.approx(trained[f"eval/heldout/{key}"], rel=1e-6), key


@pytest.mark.slow
def test_two_ranks_give_every_running_cell_the_losses_of_one(matrix, tmp_path):
    data, inputs, teacher, _ = matrix
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tests.matrix",
           str(data), str(out), str(teacher)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads((out / "results.json").read_text())
    assert sorted(two) == sorted(cell_id(c) for c in RUNNING)
    for cell in RUNNING:
        one, other = _one_rank(cell, matrix, tmp_path / "one"), two[cell_id(cell)]
        assert other["full"]["losses"] == other["resumed"]["losses"], cell_id(cell)  # exact on 2 ranks too
        a = [one["full"]["losses"][s] for s in sorted(one["full"]["losses"])]
        b = [other["full"]["losses"][str(s)] for s in sorted(one["full"]["losses"])]
        assert b == pytest.approx(a, rel=1e-5), cell_id(cell)
