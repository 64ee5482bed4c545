"""Write text from a trained model: `python sample.py RUN_DIR_OR_CHECKPOINT [--prompt TEXT ...]`.

Reads a run directory (its newest checkpoint), a checkpoint directory, or an `lm.export --format
safetensors` directory. One sample streams to the terminal as it is generated; several print as they end.
"""
from __future__ import annotations

import argparse
import sys

import torch

from data_prep import DataError, load_tokenizer
from lm.training import checkpoint
from lm.interop.export import load
from lm.model.generate import check_sampling, generate, heal_prompt


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", help="a run directory (its newest checkpoint) or a checkpoint directory")
    p.add_argument("--prompt", action="append", default=None,
                   help="text to continue; repeat for a batch of prompts (default: start a new document)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=200, help="0 disables")
    p.add_argument("--top-p", type=float, default=1.0, help="1 disables")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 disables; 1.1-1.3 is typical")
    p.add_argument("--stop", action="append", default=[], help="end a sample at this text (repeatable)")
    p.add_argument("--at-limit", choices=("slide", "stop"), default="slide",
                   help="at the context length: slide the window, or stop")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--int8", action="store_true",
                   help="int8 Linear layers (dynamic quantization, CPU): faster than fp32 at batch 1")
    p.add_argument("--interactive", action="store_true", help="read prompts from the terminal in a loop")
    return p.parse_args(argv)


def check_args(args) -> torch.device:
    """Refuse settings with no meaning before anything loads; returns the device to sample on."""
    check_sampling(lambda name: "--" + name.replace("_", "-"), max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   repetition_penalty=args.repetition_penalty)
    if args.num_samples < 1:
        raise ValueError(f"--num-samples {args.num_samples}: must be >= 1")
    if "" in args.stop:
        raise ValueError("--stop '': an empty stop text would end every sample at its first token")
    if args.int8 and args.dtype != "float32":
        raise ValueError(f"--int8 computes in float32; it cannot be combined with --dtype {args.dtype}")
    if args.int8:  # PyTorch's quantized int8 kernels are CPU kernels
        if args.device not in ("auto", "cpu"):
            raise ValueError(f"--int8 runs on the CPU; it cannot be combined with --device {args.device}")
        return torch.device("cpu")
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)  # a device this torch build or machine lacks fails here
    except (RuntimeError, AssertionError) as e:  # torch says "not compiled with CUDA" by AssertionError
        raise ValueError(f"--device {args.device}: {str(e).splitlines()[0]}") from None
    return device


def load_model(args, device):
    ckpt, model = load(args.path, device)
    tokenizer = load_tokenizer(ckpt)
    if args.int8:
        from lm.compress.quantize import quantize_int8

        model = quantize_int8(model)
    return model.to(device=device, dtype=getattr(torch, args.dtype)), tokenizer, device


class Streamer:
    """Prints one row's text as its tokens arrive (holding back an incomplete UTF-8 character)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens, self.printed = tokenizer, [], 0

    def __call__(self, row: int, token: int):
        if token == self.tokenizer.eos_id:
            return
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[self.printed:])
            sys.stdout.flush()
            self.printed = len(text)


def run(model, tokenizer, device, args, prompts: list[str]):
    vocab = [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]
    ids, texts, allowed = [], [], []
    for p in prompts:
        healed, first, removed = heal_prompt(tokenizer.encode(p) if p else [tokenizer.eos_id], vocab)
        ids += [healed] * args.num_samples
        texts += [p[:len(p) - len(removed)]] * args.num_samples  # the first new token writes `removed` again
        allowed += [first] * args.num_samples

    def decode(tokens):
        return tokenizer.decode([t for t in tokens if t != tokenizer.eos_id])

    def stop(row, tokens):
        return any(s in decode(tokens) for s in args.stop)

    stream = len(ids) == 1 and not args.stop
    if stream:
        sys.stdout.write(texts[0])
    generator = torch.Generator(device=device).manual_seed(args.seed)
    cut = []  # rows the context limit ended (--at-limit stop): said on stderr, after the text
    outputs = generate(model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, repetition_penalty=args.repetition_penalty, eos_id=tokenizer.eos_id,
                       stop=stop if args.stop else None, at_limit=args.at_limit, generator=generator,
                       on_token=Streamer(tokenizer) if stream else None, on_limit=cut.append,
                       first_allowed=allowed)
    if stream:
        print()
        note_limit(model, cut)
        return
    for i, tokens in enumerate(outputs):
        text = decode(tokens)
        for s in args.stop:
            text = text.split(s)[0] if s in text else text
        if len(outputs) > 1:
            print(f"---------- sample {i + 1}")
        print(texts[i] + text)
    note_limit(model, cut)


def note_limit(model, rows: list[int]):
    sys.stdout.flush()  # the note follows the text it is about
    for row in rows:
        print(f"note: sample {row + 1} stopped at the context limit of {model.cfg.block_size} tokens "
              "(--at-limit stop)", file=sys.stderr)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        device = check_args(args)
        model, tokenizer, device = load_model(args, device)
        if not args.interactive:
            run(model, tokenizer, device, args, args.prompt or [""])
            return 0
        while True:
            try:
                prompt = input("\nprompt> ")
            except EOFError:
                return 0
            run(model, tokenizer, device, args, [prompt.replace("\\n", "\n")])
    except (checkpoint.CheckpointError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
