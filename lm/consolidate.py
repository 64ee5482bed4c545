"""`python -m lm.consolidate CHECKPOINT OUT_DIR`: one `model.safetensors` plus the config (JSON and TOML)
and the tokenizer, from a sharded checkpoint saved by any number of ranks. The same as
`python -m lm.export CHECKPOINT --format safetensors OUT_DIR`; the result loads in sample.py and init.from."""
import sys

from lm.export import main

if __name__ == "__main__":
    if len(sys.argv) != 3:
        print("error: usage: python -m lm.consolidate CHECKPOINT OUT_DIR (a new directory)", file=sys.stderr)
        sys.exit(2)
    sys.exit(main([sys.argv[1], sys.argv[2], "--format", "safetensors"]))
