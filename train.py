"""Train a GPT: `python train.py CONFIG [section.key=value ...] [--resume]`.

Also `torchrun --nproc_per_node=1 train.py CONFIG`. Mistakes in the config, the data or a checkpoint end
with a one-line `error: ...` and exit code 2; nothing already on disk is overwritten.
"""
from __future__ import annotations

import argparse
import os
import sys

from data_prep import DataError
from lm.checkpoint import CheckpointError
from lm.config import ConfigError, load_config

USER_ERRORS = (ConfigError, DataError, CheckpointError)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="TOML config file, e.g. configs/quickstart.toml")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.max_steps=100")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in train.out_dir")
    args = parser.parse_args(argv)
    from lm.trainer import Trainer, TrainingError  # after argument parsing, so --help is instant

    try:
        cfg = load_config(args.config, args.overrides)
        trainer = Trainer(cfg, resume=args.resume)
        try:
            result = trainer.run()
        finally:
            trainer.close()
    except USER_ERRORS + (TrainingError,) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":
        print(f"done: step {result['step']}, val loss {result['val_loss']}, val bits/byte {result['val_bpb']}, "
              f"skipped steps {result['skipped']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
