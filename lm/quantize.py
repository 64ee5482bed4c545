"""Quantized checkpoints for storage and serving: `python -m lm.quantize RUN --bits 8|4 OUT`.

The command; the format is lm/compress/quantize.py.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from data_prep import DataError, load_tokenizer
from lm.compress.quantize import QUANT_KEY, check_group_size, quantized_state, stored_state
from lm.config.load import to_toml
from lm.files import check_destination, output_dir, save_safetensors
from lm.interop.export import load
from lm.training import checkpoint


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Write a weight-only int8 or int4 copy of a checkpoint, for storage "
                                            "and serving (sample.py and lm.eval read it)")
    p.add_argument("path", help="a run directory (its newest checkpoint) or a checkpoint directory")
    p.add_argument("--bits", type=int, choices=(8, 4), required=True)
    p.add_argument("--group-size", type=int, default=64, help="int4: input columns per scale (even, at most the narrowest matrix's columns)")
    p.add_argument("out", type=Path, help="output directory (must not exist or be empty)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    args = p.parse_args(argv)
    try:
        if args.group_size < 2 or args.group_size % 2:
            raise DataError(f"--group-size {args.group_size}: must be an even number >= 2")
        check_destination(args.out, args.force, keep=[args.path])
        ckpt, model = load(args.path)
        if args.bits == 4:
            check_group_size(model, args.group_size)
        cfg = checkpoint.load_config(ckpt)
        stored = quantized_state(model, args.bits, args.group_size)
        with output_dir(args.out, args.force) as out:
            save_safetensors(stored, out / "model.safetensors",
                             metadata={"format": "pt", QUANT_KEY: f"int{args.bits}",
                                       "group_size": str(args.group_size), "lmforge_config": to_toml(cfg)})
            (out / "config.toml").write_text(to_toml(cfg))
            tokenizer = load_tokenizer(ckpt)
            shutil.copyfile(ckpt / tokenizer.file_name, out / tokenizer.file_name)
    except (checkpoint.CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fp32 = 4 * sum(v.numel() for v in stored_state(model).values())
    size = (args.out / "model.safetensors").stat().st_size
    print(f"wrote {args.out} (int{args.bits}) from {ckpt}: {size / 1e6:.2f} MB of weights, "
          f"{fp32 / size:.2f}x smaller than fp32 ({fp32 / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
