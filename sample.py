"""Write text from a trained model: `python sample.py RUN_DIR_OR_CHECKPOINT [--prompt TEXT] ...`."""
from __future__ import annotations

import argparse
import sys

import torch

from data_prep import DataError, load_tokenizer
from lm import checkpoint
from lm.generate import generate
from lm.model import GPT


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("path", help="a run directory (its newest checkpoint) or a checkpoint directory")
    p.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=200, help="0 disables")
    p.add_argument("--top-p", type=float, default=1.0, help="1 disables")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    args = p.parse_args(argv)
    try:
        ckpt = checkpoint.resolve(args.path)
        cfg = checkpoint.load_config(ckpt)
        tokenizer = load_tokenizer(ckpt)
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                              else "cpu" if args.device == "auto" else args.device)
        model = GPT(cfg.model)
        checkpoint.load_model(ckpt, model)
        model.to(device)
        prompt = tokenizer.encode(args.prompt) if args.prompt else [tokenizer.eos_id]
    except (checkpoint.CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    generator = torch.Generator(device=device).manual_seed(args.seed)
    samples = generate(model, prompt, args.max_new_tokens, num_samples=args.num_samples,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       eos_id=tokenizer.eos_id, generator=generator)
    for i, ids in enumerate(samples):
        text = tokenizer.decode([t for t in ids if t != tokenizer.eos_id])
        if args.num_samples > 1:
            print(f"---------- sample {i + 1}")
        print(args.prompt + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
