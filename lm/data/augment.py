"""Input augmentation for text (data.augment): noise on the tokens a model reads, never on those it predicts.

Each spec is "KIND:P", applied in this order with probability P per input position:
  swap:P   swap a token with its right neighbour (on character data: character swaps, typos)
  noise:P  replace a token by a uniformly random id (character/token noise)
  drop:P   replace a token by the EOS id (token dropout: the model must do without it)
Targets stay the clean next tokens. The draws come from a generator seeded by (train.seed, the batch's
first global sample index), so a batch is augmented the same way however often it is read: a resumed run
sees exactly the batches of the uninterrupted one.
"""
from __future__ import annotations

import torch

KINDS = ("swap", "noise", "drop")


def parse_augment(specs: list[str]) -> list[tuple[str, float]]:
    """[(kind, p)] from data.augment; ValueError naming the bad entry."""
    out = []
    for spec in specs:
        kind, _, p = str(spec).partition(":")
        try:
            prob = float(p)
        except ValueError:
            prob = -1.0
        if kind not in KINDS or not 0.0 < prob < 1.0:
            raise ValueError(f"'{spec}': expected KIND:P with KIND one of {', '.join(KINDS)} and 0 < P < 1")
        out.append((kind, prob))
    return out


class Augmenter:
    def __init__(self, specs: list[tuple[str, float]], vocab_size: int, eos_id: int, seed: int,
                 keep_documents: bool = False):
        """`keep_documents`: the model masks documents at EOS (data.document_mask, [sft]), so no EOS is moved
        or written and none is replaced: the documents the mask sees stay the data's."""
        self.specs, self.vocab_size, self.eos_id, self.seed = specs, vocab_size, eos_id, seed
        self.keep_documents = keep_documents

    def __call__(self, x: torch.Tensor, first_sample: int) -> torch.Tensor:
        """An augmented copy of the inputs x (B, T) of the batch starting at global sample `first_sample`.
        Each row draws from its own generator, seeded by its global sample index, so a sample is augmented
        the same way in any batch: on any number of ranks, with any grad_accum, and after a resume."""
        rows = [torch.Generator().manual_seed((self.seed * 1_000_003 + first_sample + i) % 2**63)
                for i in range(x.size(0))]
        out = x.cpu().clone()
        B, T = out.shape

        def draw(sample):  # one (B, T) draw, row i from generator i
            return torch.stack([sample(g) for g in rows])

        for kind, p in self.specs:
            hit = draw(lambda g: torch.rand(T, generator=g)) < p
            if self.keep_documents:
                hit &= out != self.eos_id
            if kind == "swap":
                hit[:, -1] = False  # the last position has no right neighbour
                if self.keep_documents:
                    hit[:, :-1] &= out[:, 1:] != self.eos_id  # never with an EOS on the right either
                hit[:, 1:] &= ~hit[:, :-1]  # a token swaps at most once
                left = out.clone()
                out[:, :-1] = torch.where(hit[:, :-1], left[:, 1:], out[:, :-1])
                out[:, 1:] = torch.where(hit[:, :-1], left[:, :-1], out[:, 1:])
            elif kind == "noise":
                if self.keep_documents:  # the ids but EOS, uniformly: EOS's draw moves to the last id
                    random_ids = draw(lambda g: torch.randint(0, self.vocab_size - 1, (T,), generator=g))
                    random_ids[random_ids == self.eos_id] = self.vocab_size - 1
                else:
                    random_ids = draw(lambda g: torch.randint(0, self.vocab_size, (T,), generator=g))
                out = torch.where(hit, random_ids, out)
            else:
                out = out.masked_fill(hit, self.eos_id)
        return out.to(x.device, non_blocking=True)
