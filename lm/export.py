"""Export a checkpoint: `python -m lm.export RUN_OR_CKPT --format hf|safetensors OUT_DIR`.

The command; what it writes is lm/interop/export.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_prep import DataError
from lm.files import check_destination, output_dir
from lm.interop.export import export_hf, export_safetensors, load
from lm.training import checkpoint


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", help="a run directory (its newest checkpoint) or a checkpoint directory")
    p.add_argument("out", type=Path, help="output directory (must not exist or be empty)")
    p.add_argument("--format", choices=("hf", "safetensors"), required=True)
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    args = p.parse_args(argv)
    try:
        check_destination(args.out, args.force, keep=[args.path])
        ckpt, model = load(args.path)
        with output_dir(args.out, args.force) as out:  # complete, or nothing (a full disk, a read-only directory)
            (export_hf if args.format == "hf" else export_safetensors)(ckpt, model, out)
    except (checkpoint.CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({args.format}) from {ckpt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
