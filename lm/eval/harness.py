"""lm-evaluation-harness model "lmforge": the harness's tasks on our checkpoints.

    python -m lm.eval.harness --model lmforge --model_args run=RUN[,stride=S,dtype=bfloat16] \
        --tasks hellaswag [--device cpu] [--batch_size 8] [--include_path MY_TASKS/] ...

takes every flag of the `lm_eval` command (it is that command, with this model registered first: the harness
finds models only among the modules it has imported). In Python, `import lm.eval.harness` registers the model
for `lm_eval.simple_evaluate(model="lmforge", model_args="run=RUN", ...)`.

Requests are scored as `python -m lm.eval` scores its tasks (lm/eval/scoring.py): the context after an
EOS (the document start, as in training), the harness's context/continuation split, left truncation to the
context length; perplexity windows advance by `stride` (default half the context). generate_until uses
lm.model.generate (greedy unless the task samples). Needs `pip install lm-eval`; nothing else in lmforge imports it.
"""
from __future__ import annotations

import sys

import torch

from data_prep import DataError, load_tokenizer
from lm.eval.scoring import continuation, default_stride, encode_pair, rolling, score
from lm.model.generate import generate

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:  # main() says so in one line; importing this module stays harmless
    LM, register_model = object, None


def _number(name: str, value, low: int, high: int | None = None) -> int:
    """A whole-number model argument (lm-eval passes them as text) within [low, high]."""
    try:
        number = int(str(value))
    except ValueError:
        raise DataError(f"lmforge: {name}={value!r}: expected a whole number") from None
    if number < low or (high is not None and number > high):
        raise DataError(f"lmforge: {name}={number}: must be >= {low}" + (f" and <= {high}" if high else ""))
    return number


class LMForge(LM):
    """`run`: a run, checkpoint or exported directory; `device` (default: CUDA if present), `batch_size`
    (windows per forward), `stride` (perplexity windows), `dtype` (float32 or bfloat16)."""

    def __init__(self, run=None, device=None, batch_size=8, max_batch_size=None, stride=0, dtype="float32",
                 max_gen_toks=256, seed=1234):
        super().__init__()
        from lm.interop.export import load

        if not run:
            raise DataError("lmforge: no run given; pass --model_args run=RUN (a run, checkpoint or exported "
                            "directory)")
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype not in ("float32", "bfloat16"):
            raise DataError(f"lmforge: dtype={dtype!r}; choose float32 or bfloat16")
        ckpt, model = load(str(run), self._device)
        self.model = model.to(device=self._device, dtype=getattr(torch, dtype))
        self.tokenizer = load_tokenizer(ckpt)
        self.block_size = self.model.cfg.block_size
        auto = str(batch_size).startswith("auto")  # lm-eval's "auto[:N]" batch search: 8 here
        self.batch_size = 8 if auto else _number("batch_size", batch_size, 1)
        self.stride = _number("stride", stride, 0, self.block_size) or default_stride(self.block_size)
        self.max_gen_toks, self.seed = _number("max_gen_toks", max_gen_toks, 1), _number("seed", seed, 0)
        self.checkpoint = ckpt

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self.block_size

    @property
    def tokenizer_name(self) -> str:
        return f"lmforge:{self.checkpoint}"

    def tok_encode(self, text: str, **kwargs) -> list[int]:
        return self.tokenizer.encode(text)

    def tok_decode(self, ids, **kwargs) -> str:
        return self.tokenizer.decode([i for i in ids if i != self.eot_token_id])

    def _score(self, requests):
        return score(self.model, requests, self.batch_size, self._device)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        windows = []
        for req in requests:
            context, cont = req.args
            ctx, cont_ids = encode_pair(self.tokenizer, context, cont)
            windows.append(continuation(self.eot_token_id, ctx, cont_ids, self.block_size))
        out = self._score(windows)
        results = [(float(ll), bool(greedy)) for ll, _, greedy in out.tolist()]
        for req, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", req.args, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for n, req in enumerate(requests):
            parts = rolling(self.eot_token_id, self.tok_encode(req.args[0]), self.block_size, self.stride)
            windows += parts
            owner += [n] * len(parts)
        out = self._score(windows)
        totals = [0.0] * len(requests)
        for n, ll in zip(owner, out[:, 0].tolist()):
            totals[n] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, when the task's do_sample says so) continuations, cut at the first `until`
        string; requests with the same settings run as one batch of up to batch_size prompts."""
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(dict(req.args[1] or {}).items())), []).append(i)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1] or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            top_k, top_p = int(kwargs.pop("top_k", 0) or 0), float(kwargs.pop("top_p", 1.0) or 1.0)
            generator = torch.Generator(device=self._device).manual_seed(self.seed)
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                prompts = [[self.eot_token_id] + self.tok_encode(requests[i].args[0]) for i in batch]

                def stop(row, tokens, until=until):
                    return any(u in self.tok_decode(tokens) for u in until)

                outputs = generate(self.model, prompts, max_new, temperature=temperature, top_k=top_k,
                                   top_p=top_p, eos_id=self.eot_token_id, stop=stop if until else None,
                                   generator=generator)
                for i, tokens in zip(batch, outputs):
                    text = self.tok_decode(tokens)
                    for u in until:
                        text = text.split(u)[0]
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results


if register_model is not None and __name__ != "__main__":  # (run as a script, main() imports this module)
    # lm-eval imports its own models only into an empty registry: registering ours first would hide them
    import lm_eval.models  # noqa: F401

    register_model("lmforge")(LMForge)


def main(argv=None) -> int:
    """The `lm_eval` command line, with "lmforge" registered."""
    if register_model is None:
        print("error: lm-evaluation-harness is not installed (pip install lm-eval)", file=sys.stderr)
        return 2
    from lm_eval.__main__ import cli_evaluate

    import lm.eval.harness  # noqa: F401  registers "lmforge" (this file may be running as __main__)
    from lm.training.checkpoint import CheckpointError

    argv = list(sys.argv[1:] if argv is None else argv)
    flags = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    lmforge = "--model=lmforge" in argv or any(a == "--model" and b == "lmforge" for a, b in zip(argv, argv[1:]))
    if lmforge and "--model_args" not in flags:  # checked before lm-eval spends ~20 s indexing its tasks
        print("error: --model lmforge needs --model_args run=RUN (a run, checkpoint or exported directory)",
              file=sys.stderr)
        return 2
    sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    except (CheckpointError, DataError) as e:  # the run given in --model_args
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:  # lm-eval's own models import their extras late (hf: accelerate)
        print(f"error: the model needs {e.name}, which is not installed (pip install {e.name})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
