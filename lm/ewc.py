"""Elastic weight consolidation (Kirkpatrick et al. 2017) with a diagonal Fisher.

The penalty (lambda/2) sum_i F_i (theta_i - theta*_i)^2 enters as its gradient lambda F (theta - theta*),
added to each gradient after the reduction and before clipping. F and theta* have the parameters' own
layout: DTensors sharded like them under FSDP (so every op is local to the shard and no rank holds a
full copy), plain tensors in one process. F is normalized to mean 1 so lambda is unit-free.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F_

from lm.data import SampleStream

EWC_FILE = "ewc.pt"  # in the run dir: theta* and F, what a resumed run or a later online-EWC run needs


def _params(model) -> dict[str, torch.nn.Parameter]:
    return dict(model.named_parameters())  # the tied head appears once


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _like(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """`full` laid out like parameter `p`: each rank keeps only its own shard of the (mmapped) file."""
    full = full.to(device=p.device, dtype=torch.float32)
    if hasattr(p, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
    return full.clone()


def _sample_labels(logits: torch.Tensor, first: int, seed: int) -> torch.Tensor:
    """Labels drawn from the model's own distribution (Gumbel-max), with noise that depends only on the
    global sample index: the same labels on any number of ranks."""
    labels = []
    for row, sample_logits in enumerate(logits.float()):
        g = torch.Generator().manual_seed(seed * 1_000_003 + first + row)
        u = torch.rand(sample_logits.shape, generator=g).clamp_(1e-20, 1.0).to(logits.device)
        labels.append((sample_logits - torch.log(-torch.log(u))).argmax(-1))
    return torch.stack(labels)


def estimate_fisher(model, stream: SampleStream, batches: int, batch_size: int, rank: int, world: int,
                    labels: str, seed: int, autocast) -> dict[str, torch.Tensor]:
    """Mean over `batches` global batches of the squared gradient of the batch loss, normalized to mean 1.

    A global batch is world * batch_size samples, rank r taking its slice (like training), so after the
    gradient reduction every rank holds its shard of the same gradient a single process computes."""
    params = _params(model)
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the deterministic model
    for b in range(batches):
        first = b * world * batch_size + rank * batch_size
        x, y = stream.batch(first, batch_size, next(iter(params.values())).device)
        with autocast():
            logits, _ = model(x)
        if labels == "model":
            y = _sample_labels(logits.detach(), first, seed)
        # the global mean loss: FSDP averages gradients over ranks, so the local loss is the rank's mean
        loss = F_.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        for name, p in params.items():
            fisher[name].add_(p.grad.float().square())
        model.zero_grad(set_to_none=True)
    model.train(was_training)
    total = sum(_local_sum(f) for f in fisher.values())
    count = sum(f.numel() for f in fisher.values())  # global sizes, also for DTensors
    mean = _all_sum(total).item() / count
    return {name: f / mean for name, f in fisher.items()}


def _local_sum(t: torch.Tensor) -> torch.Tensor:
    return (t.to_local() if hasattr(t, "to_local") else t).double().sum()


def _all_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
    return value


class EWC:
    def __init__(self, anchor: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor], lam: float):
        self.anchor, self.fisher, self.lam = anchor, fisher, lam

    @classmethod
    def start(cls, model, fisher: dict[str, torch.Tensor], lam: float, prior: str = "", gamma: float = 1.0):
        """Anchor at the model's current weights; online EWC adds gamma times an earlier run's Fisher."""
        params = _params(model)
        if prior:
            old = torch.load(prior, weights_only=True, mmap=True)
            fisher = {n: gamma * _like(old[f"fisher/{n}"], params[n]) + f for n, f in fisher.items()}
        anchor = {n: p.detach().float().clone() for n, p in params.items()}
        return cls(anchor, fisher, lam)

    @classmethod
    def load(cls, path: Path, model, lam: float):
        params = _params(model)
        state = torch.load(path, weights_only=True, mmap=True)
        return cls({n: _like(state[f"anchor/{n}"], p) for n, p in params.items()},
                   {n: _like(state[f"fisher/{n}"], p) for n, p in params.items()}, lam)

    def save(self, path: Path, main: bool):
        """Collective: gathers one tensor at a time; the main rank writes."""
        state = {}
        for kind, tensors in (("anchor", self.anchor), ("fisher", self.fisher)):
            for name, t in tensors.items():
                full = _full(t)
                if main:
                    state[f"{kind}/{name}"] = full.cpu()
        if main:
            tmp = Path(path).with_suffix(".tmp")
            torch.save(state, tmp)
            tmp.replace(path)

    @torch.no_grad()
    def add_gradient(self, model) -> float:
        """grad += lambda F (theta - theta*) on every parameter that trains; returns the penalty value."""
        params = _params(model)
        penalty = torch.zeros((), dtype=torch.float64, device=next(iter(params.values())).device)
        for name, p in params.items():
            if p.grad is None:
                continue
            diff = p.float() - self.anchor[name]
            p.grad.add_((self.lam * self.fisher[name] * diff).to(p.grad.dtype))
            penalty += _local_sum(self.fisher[name] * diff * diff)
        return 0.5 * self.lam * _all_sum(penalty).item()


def fisher_array(path: Path) -> dict[str, np.ndarray]:
    """The saved Fisher as numpy arrays (tests, analysis)."""
    state = torch.load(path, weights_only=True)
    return {k.split("/", 1)[1]: v.numpy() for k, v in state.items() if k.startswith("fisher/")}
