"""Train a GPT: `python train.py CONFIG [section.key=value ...] [--resume]`.

Also `torchrun --nproc_per_node=1 train.py CONFIG`; `python train.py CONFIG --plan [--world-size N ...]` prints
the memory / speed plan (lm/training/plan.py) and trains nothing. Mistakes in the config, the data or a checkpoint end
with a one-line `error: ...` and exit code 2; nothing already on disk is overwritten.
"""
from __future__ import annotations

import argparse
import os
import sys

from data_prep import DataError
from lm.training.checkpoint import CheckpointError
from lm.config.load import load_config
from lm.config.schema import ConfigError

USER_ERRORS = (ConfigError, DataError, CheckpointError)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="TOML config file, e.g. configs/quickstart.toml")
    parser.add_argument("overrides", nargs="*", default=[], help="section.key=value, e.g. train.max_steps=100")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in train.out_dir")
    parser.add_argument("--resume-from-last-good", action="store_true",
                        help="like --resume, but when the newest checkpoint is damaged continue from the newest "
                             "intact one (named on the console)")
    plan = parser.add_argument_group("planning (no training, no data, no GPU needed)")
    plan.add_argument("--plan", action="store_true",
                      help="print parameters, FLOPs/token, per-GPU memory, the largest micro-batch that fits and "
                           "step time / tokens per day at --mfu, then exit (rank 0 prints)")
    plan.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)),
                      help="GPUs to plan for (default: $WORLD_SIZE or 1)")
    plan.add_argument("--gpu", default="H100", help="a device name of lm.training.metrics.PEAK_FLOPS (default H100)")
    plan.add_argument("--gpu-memory", default="80GB", help="memory per GPU, e.g. 80GB, 141GB, 96GiB (default 80GB)")
    plan.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilization (default 0.4)")
    plan.add_argument("--micro-batch", type=int, default=None,
                      help="sequences per GPU per forward (default: train.batch_size)")
    plan.add_argument("--json", action="store_true", help="print the plan as one JSON object instead of the table")
    plan.add_argument("--plan-json", metavar="PATH", help="also write the plan as JSON to PATH")
    # flags may come anywhere among the overrides: `train.py CFG a.b=1 --resume c.d=2`
    args = parser.parse_intermixed_args(argv)
    if args.plan:
        return print_plan(args)
    from lm.training.trainer import Trainer, TrainingError  # after argument parsing, so --help is instant

    try:
        cfg = load_config(args.config, args.overrides)
        resume = args.resume or args.resume_from_last_good
        if resume and (done := finished_already(cfg, args.resume_from_last_good)):
            if os.environ.get("RANK", "0") == "0":
                print(done)
            return 0
        trainer = Trainer(cfg, resume=args.resume or args.resume_from_last_good, last_good=args.resume_from_last_good)
        try:
            result = trainer.run()
        finally:
            trainer.close()
    except USER_ERRORS + (TrainingError,) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":
        print(done_line(result))
    return 0


def done_line(result: dict) -> str:
    """The closing line: the last validation says at which step it was measured when that is not the
    last step (a run stopped by Ctrl-C or SIGTERM between evaluations)."""
    parts = [f"done: step {result['step']}"]
    val, at = result["val_loss"], result.get("val_step")
    if val is not None:
        when = "" if at == result["step"] else f" (at step {at})" if at is not None else " (before this run)"
        parts.append(f"val loss {val:.4f}{when}")
        if result.get("val_bpb") is not None:
            parts.append(f"val bits/byte {result['val_bpb']:.4f}")
    parts.append(f"skipped steps {result['skipped']}")
    return ", ".join(parts)


def finished_already(cfg, last_good: bool) -> str | None:
    """`--resume` of a run whose newest checkpoint is at train.max_steps: what to say instead of training."""
    from pathlib import Path

    from lm.training import checkpoint

    ckpt = checkpoint.find_resumable(Path(cfg.train.out_dir), last_good)
    if ckpt is None:
        return None
    step = checkpoint.load_info(ckpt)["step"]
    if step < cfg.train.max_steps:
        return None
    return (f"{cfg.train.out_dir} is finished: its newest checkpoint {ckpt.name} is at step {step} and "
            f"train.max_steps = {cfg.train.max_steps}; nothing to train (raise train.max_steps to go on)")


def print_plan(args) -> int:
    import json

    from lm.training.plan import format_plan, parse_memory, plan

    try:
        cfg = load_config(args.config, args.overrides)
        result = plan(cfg, world_size=args.world_size, micro_batch=args.micro_batch, gpu=args.gpu,
                      gpu_memory=parse_memory(args.gpu_memory), mfu=args.mfu)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") != "0":  # under torchrun every rank would print the same plan
        return 0
    record = {"config": args.config, **result.to_dict()}
    print(json.dumps(record, indent=2) if args.json else format_plan(result, args.config))
    if args.plan_json:
        with open(args.plan_json, "w") as f:
            json.dump(record, f, indent=2)
    return 0


if __name__ == "__main__":
    code = main()
    if "WORLD_SIZE" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ:
        # Everything is saved, flushed and the process group destroyed by now. Skip the interpreter's
        # teardown: gloo objects still referenced (by the device mesh) are freed during finalization,
        # which can abort a run that ended well (SIGABRT, "terminate called without an active exception";
        # seen once in 20 SIGTERM trials on CI, cf. pytorch/pytorch#179291).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
