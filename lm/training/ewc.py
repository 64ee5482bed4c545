"""Elastic weight consolidation (Kirkpatrick et al. 2017) with a diagonal Fisher.

The penalty (lambda/2) sum_i F_i (theta_i - theta*_i)^2 enters as its gradient lambda F (theta - theta*),
added to each gradient after the reduction and before clipping. F and theta* have the parameters' own
layout: DTensors sharded like them under FSDP (so every op is local to the shard and no rank holds a
full copy), plain tensors in one process. F is the mean over samples of each sample's squared gradient,
normalized to mean 1 so lambda is unit-free; F and the penalty are the same on any mesh.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F_

from lm.data.batches import SampleStream

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
    """The diagonal Fisher at the current weights: the mean over the first
    N = batches * world * batch_size samples of `stream` of g_s^2, g_s the gradient of sample s's mean token
    loss (on its data labels, or on labels drawn from the model), normalized to mean 1.

    Every rank runs every sample, one at a time, so the estimate is the same on any mesh (`rank` is unused):
    under FSDP/HSDP the gradient reduction averages identical gradients, leaving each rank its shard of g_s
    to square locally. Splitting the samples across ranks would need each rank's own unsharded gradient,
    which FSDP2 keeps only internally; the price is world times the compute of a split, and one gradient
    reduction per sample. One code path for every mesh: in one process torch.func's vmap(grad) was only ~1.5x
    faster at the forgetting bench's size on 2 CPU cores, and it does not run on FSDP's DTensors."""
    params = _params(model)
    device = next(iter(params.values())).device
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the deterministic model
    for s in range(batches * world * batch_size):
        x, y = stream.batch(s, 1, device)
        with autocast():
            logits, _ = model(x)
        if labels == "model":
            y = _sample_labels(logits.detach(), s, seed)
        F_.cross_entropy(logits[0].float(), y[0]).backward()
        for name, p in params.items():
            fisher[name].add_(p.grad.float().square())
        model.zero_grad(set_to_none=True)
    model.train(was_training)
    # (1/N is dropped: the normalization to mean 1 would cancel it)
    total = _shard_sum(sum(_local_sum(f) for f in fisher.values()), params)
    mean = total.item() / sum(f.numel() for f in fisher.values())  # global sizes, also for DTensors
    return {name: f / mean for name, f in fisher.items()}


def _local_sum(t: torch.Tensor) -> torch.Tensor:
    return (t.to_local() if hasattr(t, "to_local") else t).double().sum()


def _shard_sum(value: torch.Tensor, params: dict[str, torch.nn.Parameter]) -> torch.Tensor:
    """The sum of per-rank shard sums over the ranks that hold one copy of the model: the "shard" mesh
    dimension. HSDP replicas hold identical shards; summing over the whole world would count each once per
    replica."""
    mesh = getattr(next(iter(params.values())), "device_mesh", None)
    if mesh is None:  # one process: the local sum is the whole
        return value
    value = value.clone()
    dist.all_reduce(value, group=mesh.get_group("shard"))
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
        return 0.5 * self.lam * _shard_sum(penalty, params).item()


def fisher_array(path: Path) -> dict[str, np.ndarray]:
    """The saved Fisher as numpy arrays (tests, analysis)."""
    state = torch.load(path, weights_only=True)
    return {k.split("/", 1)[1]: v.numpy() for k, v in state.items() if k.startswith("fisher/")}
