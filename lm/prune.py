"""Pruning: `python -m lm.prune RUN --method magnitude|heads|neurons --sparsity S OUT`.

The command; the methods are lm/compress/prune.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_prep import DataError
from lm.compress.prune import (MASKS_FILE, Masks, importance, keep_top, magnitude_masks, prune_heads, prune_neurons,
                               validation_batches, write)
from lm.config.schema import head_size, mlp_hidden_size
from lm.files import check_destination, output_dir
from lm.interop.export import load
from lm.training import checkpoint


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", help="a run directory (its newest checkpoint) or a checkpoint directory")
    p.add_argument("out", type=Path, help="output directory (must not exist or be empty)")
    p.add_argument("--method", choices=("magnitude", "heads", "neurons"), required=True)
    p.add_argument("--sparsity", type=float, required=True, help="fraction removed, in [0, 1)")
    p.add_argument("--scope", choices=("global", "layer"), default="global", help="magnitude: one threshold or one per matrix")
    p.add_argument("--data", help="prepared data for importance (default: the run's data.dir)")
    p.add_argument("--batches", type=int, default=8, help="validation batches for importance")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    args = p.parse_intermixed_args(argv)
    try:
        if not 0.0 <= args.sparsity < 1.0:
            raise checkpoint.CheckpointError(f"--sparsity {args.sparsity}: must be in [0, 1)")
        for flag in ("batches", "batch_size"):
            if getattr(args, flag) < 1:
                raise DataError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
        check_destination(args.out, args.force, keep=[args.path])
        ckpt, model = load(args.path)
        if model.cfg.share_layers > 1 and args.method != "magnitude":
            raise checkpoint.CheckpointError("structured pruning of shared blocks (model.share_layers > 1) is not "
                                             "supported; use --method magnitude")
        before = model.num_params()
        masks = None
        if args.method == "magnitude":
            masks = Masks(magnitude_masks(model, args.sparsity, args.scope))
            masks.apply(model)
        else:
            batches = validation_batches(ckpt, args.data, args.batches, args.batch_size, model.cfg.block_size)
            keep = keep_top(importance(model, batches, args.method), args.sparsity)
            model = (prune_heads if args.method == "heads" else prune_neurons)(model, keep)
        with output_dir(args.out, args.force) as out:  # complete, or nothing
            write(out, ckpt, model, masks)
    except (checkpoint.CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if masks is not None:
        zeros = sum(int((~m).sum()) for m in masks.masks.values())
        print(f"wrote {args.out}: {zeros:,} of {before:,} parameters zeroed (masks in {MASKS_FILE})")
    else:
        m = model.cfg
        print(f"wrote {args.out}: {before:,} -> {model.num_params():,} parameters (n_head {m.n_head}, head_dim "
              f"{head_size(m)}, mlp_hidden {mlp_hidden_size(m)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
