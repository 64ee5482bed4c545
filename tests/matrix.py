"""The combination matrix: objective x block x document masks x augmentation, run in one process by
tests/test_matrix.py and in two by `torchrun --nproc_per_node=2 -m tests.matrix DATA OUT`.

A cell either refuses in one line naming both features, or runs 4 steps, resumes bit-exactly from step 2,
and logs an evaluation task whose value lm.eval reproduces on the saved checkpoint."""
from __future__ import annotations

import itertools
import json
import os
import sys
from pathlib import Path

OBJECTIVES = ("lm", "sft", "classify", "distill")
BLOCKS = ("gpt2", "llama")
MASKS = (False, True)
AUGMENTS = ("none", "noise")
CELLS = list(itertools.product(OBJECTIVES, BLOCKS, MASKS, AUGMENTS))
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex every jolly box".split()
BASE = ["model.n_layer=2", "model.n_head=2", "model.n_embd=16", "model.block_size=16", "train.eval_sequences=4",
        "log.progress=false", "log.interval=1", "train.device=cpu", "train.dtype=float32", "optim.warmup_steps=1",
        "train.max_steps=4", "train.eval_interval=2", "train.threads=1"]  # no dropout: it differs across ranks
LLAMA = ["model.norm=rmsnorm", "model.position=rope", "model.mlp=swiglu", "model.bias=false", "model.n_kv_head=1"]


def cell_id(cell) -> str:
    objective, block, mask, augment = cell
    return f"{objective}-{block}-{'mask' if mask else 'nomask'}-{augment}"


def write_inputs(root: Path) -> dict[str, Path]:
    """The JSONL files the objectives read, in the tiny corpus's characters."""
    root.mkdir(parents=True, exist_ok=True)
    sft, cls = root / "sft.jsonl", root / "classify.jsonl"
    sft.write_text("".join(json.dumps({"prompt": f"say {w}.", "completion": f" {w} {w}."}) + "\n" for w in WORDS * 2))
    cls.write_text("".join(json.dumps({"text": f"{w} {WORDS[(i * 3) % len(WORDS)]}", "label": "ab"[len(w) % 2]}) + "\n"
                           for i, w in enumerate(WORDS * 2)))
    return {"sft": sft, "classify": cls}


def overrides(cell, data: Path, inputs: dict, teacher: Path, out: Path, world_size: int = 1) -> list[str]:
    objective, block, mask, augment = cell
    args = [*BASE, f"data.dir={data}", f"train.out_dir={out}", f"train.batch_size={4 // world_size}"]
    if block == "llama":
        args += LLAMA
    if mask:
        args.append("data.document_mask=true")
    if augment == "noise":
        args.append('data.augment=["noise:0.1"]')
    if objective == "sft":
        args += [f"sft.train_file={inputs['sft']}", "sft.val_fraction=0.25"]
    elif objective == "classify":
        args += ["train.task=classify", f"classify.train_file={inputs['classify']}", "classify.val_fraction=0.25"]
    elif objective == "distill":
        args += [f"distill.teacher={teacher}", "distill.alpha=0.5", "distill.temperature=2.0"]
    if objective != "classify":
        args += [f"eval.tasks=[\"ppl:{data}:name=heldout\"]", "eval.limit=3"]
    return args


def refusal(cell, args) -> str | None:
    """The one-line refusal of a cell's config, or None when it runs."""
    from lm.config.load import load_config
    from lm.config.schema import ConfigError
    from lm.objectives import objective_class

    try:
        cfg = load_config(None, args)
        objective_class(cfg).check_combinations(cfg)
    except ConfigError as e:
        return str(e)
    return None


def train_teacher(data: Path, out: Path) -> Path:
    from lm.config.load import load_config
    from lm.training.trainer import Trainer

    trainer = Trainer(load_config(None, [*BASE, f"data.dir={data}", f"train.out_dir={out}", "train.batch_size=4",
                                         "model.dropout=0.0"]))
    trainer.run()
    trainer.close()
    return out


def run_cell(cell, data: Path, inputs: dict, teacher: Path, out: Path, world_size: int = 1) -> dict:
    """Train 4 steps; again to step 2 and resumed; the losses, validation records and the final checkpoint."""
    from lm.training import checkpoint
    from lm.config.load import load_config
    from lm.training.trainer import Trainer

    def train(run_dir, stop=None, resume=False):
        trainer = Trainer(load_config(None, overrides(cell, data, inputs, teacher, run_dir, world_size)), resume=resume)
        trainer.run(stop_at_step=stop)
        trainer.prefetcher.close()  # the process group stays for the next cell (torchrun)

    train(out / "full")
    train(out / "resumed", stop=2)
    train(out / "resumed", resume=True)
    result = {}
    for name in ("full", "resumed"):
        records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        result[name] = {"losses": {r["step"]: r["loss"] for r in records if "loss" in r},
                        "val": [r for r in records if "val_loss" in r]}
    result["checkpoint"] = str(checkpoint.find_resumable(out / "full"))
    return result


def main(argv):
    """torchrun entry: every runnable cell on this world; rank 0 writes OUT/results.json."""
    data, out = Path(argv[0]), Path(argv[1])
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    inputs = write_inputs(out / "inputs")
    teacher = Path(argv[2])
    results = {}
    for cell in CELLS:
        if refusal(cell, overrides(cell, data, inputs, teacher, out / "x", world_size)) is None:
            results[cell_id(cell)] = run_cell(cell, data, inputs, teacher, out / cell_id(cell), world_size)
    if int(os.environ.get("RANK", 0)) == 0:
        (out / "results.json").write_text(json.dumps(results))
    from lm.training.parallel import close_world

    close_world()


if __name__ == "__main__":
    main(sys.argv[1:])
