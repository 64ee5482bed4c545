"""The optimizers (AdamW, SGD, RMSprop, Muon), all with weight decay on matrices only, and the learning-rate
schedules.

Every optimizer is one torch.optim.Optimizer whose param_groups' "lr" the trainer sets to the schedule's value
each step; its state is ordinary per-parameter tensors (sharded like the parameters under FSDP), which
lm/training/checkpoint.py saves and restores through torch.distributed.checkpoint.
"""
from __future__ import annotations

import math

import torch

from lm.config.schema import OptimConfig

# optim.momentum = -1 takes these: SGD's common 0.9, torch's RMSprop default (none), Muon's reference 0.95
DEFAULT_MOMENTUM = {"adamw": 0.0, "sgd": 0.9, "rmsprop": 0.0, "muon": 0.95}

# Keller Jordan's quintic Newton-Schulz coefficients (github.com/KellerJordan/Muon): chosen for the largest
# slope at 0, so that 5 iterations bring every singular value of a normalized matrix into about [0.7, 1.2]
# instead of converging to exactly 1.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def momentum(cfg: OptimConfig) -> float:
    """optim.momentum resolved: -1 is the optimizer's usual value."""
    return DEFAULT_MOMENTUM[cfg.name] if cfg.momentum < 0 else cfg.momentum


def muon_matrices(model: torch.nn.Module) -> dict[str, list[int] | None]:
    """The hidden matrices Muon updates, by name: the 2-D weights inside the blocks (transformer.h.*). Each
    maps to the row sizes of its parts, each orthogonalized on its own: the fused c_attn stacks the q, k and
    v projections (as modded-nanogpt splits its fused QKV), the others are one part (None). The embedding
    (tied to the head), position embedding, norms and biases are not here: AdamW updates them."""
    def parts(name: str) -> list[int] | None:
        if not name.endswith("attn.c_attn.weight"):
            return None
        attn = model.get_submodule(name.removesuffix(".c_attn.weight"))  # its heads say where q, k, v end
        return [attn.n_head * attn.head_dim, attn.n_kv_head * attn.head_dim, attn.n_kv_head * attn.head_dim]

    return {name: parts(name) for name, p in model.named_parameters()
            if name.startswith("transformer.h.") and p.dim() >= 2 and p.requires_grad}


def layer_scale(name: str, n_blocks: int, decay: float) -> float:
    """optim.layer_decay's lr factor of parameter `name` (BEiT's layer-wise decay): block i of n gets
    decay^(n - i), the embeddings (and the tied LM head) decay^(n + 1), the final norm and the task heads 1."""
    if name.startswith("transformer.h."):
        return decay ** (n_blocks - int(name.split(".")[2]))
    if name.startswith(("transformer.wte.", "transformer.wpe.")):
        return decay ** (n_blocks + 1)
    return 1.0


def layer_decay_groups(groups: list[dict], model: torch.nn.Module, decay: float) -> list[dict]:
    """Each group split by layer_scale, each part with its "lr_scale" (the trainer sets lr x lr_scale);
    unchanged when decay is 1."""
    if decay == 1.0:
        return groups
    names = {id(p): n for n, p in model.named_parameters()}
    n_blocks = len(model.transformer.h)
    out = []
    for group in groups:
        parts: dict[float, list] = {}
        for p in group["params"]:
            parts.setdefault(layer_scale(names[id(p)], n_blocks, decay), []).append(p)
        out += [{**group, "params": params, "lr_scale": scale} for scale, params in sorted(parts.items())]
    return out


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """optim.name's optimizer. Weight decay on 2-D weights (matmuls, embeddings) only, never on biases or norm
    gains, whose scale is not noise: decoupled (p -= lr * wd * p) in AdamW and Muon, torch's L2 term added
    to the gradient in SGD and RMSprop."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # the tied head appears once
    # The fused kernel (one pass over all tensors) on GPUs, and on a CPU for plain tensors: 5x faster than
    # the per-tensor loop there (0.4 vs 2.1 ms a step for the shakespeare_char model). FSDP's DTensors on a
    # CPU keep the per-tensor loop.
    sharded = any(hasattr(p, "device_mesh") for _, p in named)
    fused = device.type == "cuda" or not sharded
    mu = momentum(cfg)
    if cfg.name == "muon":
        hidden = muon_matrices(model)
        layouts = sorted({tuple(s or ()) for s in hidden.values()})  # () : one part; all c_attn share one
        groups = [{"params": [p for n, p in named if n in hidden and tuple(hidden[n] or ()) == layout],
                   "weight_decay": cfg.weight_decay, "muon": True, "splits": list(layout) or None}
                  for layout in layouts]
        groups += [
            {"params": [p for n, p in named if n not in hidden and p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for n, p in named if p.dim() < 2], "weight_decay": 0.0},
        ]
        groups = layer_decay_groups([g for g in groups if g["params"]], model, cfg.layer_decay)
        return Muon(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                    momentum=mu, nesterov=cfg.nesterov, ns_steps=cfg.ns_steps,
                    lr_ratio=(cfg.muon_lr or cfg.lr) / cfg.lr, fused=fused)
    groups = [
        {"params": [p for _, p in named if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = layer_decay_groups([g for g in groups if g["params"]], model, cfg.layer_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=mu, nesterov=cfg.nesterov and mu > 0)
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=cfg.lr, alpha=cfg.beta2, eps=cfg.eps, momentum=mu)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """About U V^T for g = U S V^T (the orthogonal factor, every singular value made ~1): g / ||g||_F, then
    `steps` quintic iterations X <- a X + (b A + c A^2) X with A = X X^T, on the wide orientation (a tall
    matrix is transposed, so A is the smaller Gram matrix). In bf16 on GPUs, as in Muon's reference (the
    iteration tolerates it); in fp32 elsewhere (fp64 stays fp64). Returns g's dtype."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float64 if g.dtype == torch.float64 else torch.float32)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return (x.T if tall else x).to(g.dtype)


def muon_direction(update: torch.Tensor, splits: list[int] | None, steps: int) -> torch.Tensor:
    """The step direction of one whole matrix: each part of rows orthogonalized, times 0.2 sqrt(max(rows,
    cols)) of that part. That scale gives the update the RMS of AdamW's (~0.2 per element), so AdamW's lr and
    weight decay carry over (Liu et al. 2025, "Muon is Scalable for LLM Training", arXiv:2502.16982, sec. 2.2),
    rather than Keller Jordan's max(1, rows/cols)**0.5 with its own lr ~0.02."""
    parts = update.split(splits) if splits else [update]
    return torch.cat([newton_schulz(part, steps) * (0.2 * math.sqrt(max(part.shape))) for part in parts])


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class Muon(torch.optim.AdamW):
    """Muon (Keller Jordan 2024) for the groups marked "muon", AdamW for the others, as one optimizer (as
    its authors use it: Muon for the hidden matrices only).

    Muon, per matrix W with gradient G: buf <- lerp(buf, G, 1 - momentum); the update U is lerp(G, buf,
    momentum) (Nesterov) or buf; W <- W (1 - lr wd) - lr muon_direction(U). Its lr is the group's "lr"
    times "lr_ratio" (optim.muon_lr / optim.lr): the schedule sets "lr" on every group each step and so
    scales both parts in proportion. Its state is "momentum_buffer", sharded like W, and "step".

    Under FSDP2, W, G and buf are DTensors holding this rank's rows (Shard(0)), and Newton-Schulz needs the
    whole matrix: each rank all-gathers the update (DTensor.full_tensor(): the matrix's size in fp32 per step,
    as much traffic as one fp32 all-gather of the weights), orthogonalizes the whole of it, and keeps its own
    rows (distribute_tensor without communication). Every rank thus repeats the same Newton-Schulz work; a
    round-robin of whole matrices over ranks would divide it, at the cost of a second collective."""

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float], eps: float, momentum: float,
                 nesterov: bool, ns_steps: int, lr_ratio: float, fused: bool | None = None):
        for group in groups:
            group.setdefault("muon", False)
            if group["muon"]:
                group.update(momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, lr_ratio=lr_ratio)
                group.setdefault("splits", None)
        super().__init__(groups, lr=lr, betas=betas, eps=eps, fused=fused)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["muon"]:
                self._muon_step(group)
        # AdamW's own step (its fused kernel on GPUs) over the other groups; the state is shared, keyed by
        # parameter, so the Muon groups are only hidden from it for the call
        groups = self.param_groups
        self.param_groups = [g for g in groups if not g["muon"]]
        try:
            super().step()
        finally:
            self.param_groups = groups
        return loss

    def _muon_step(self, group: dict):
        lr, beta = group["lr"] * group["lr_ratio"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:  # a step count too, as every AdamW state has (its loader asks)
                state["step"], state["momentum_buffer"] = torch.zeros((), dtype=torch.float32), torch.zeros_like(p)
            state["step"] += 1
            grad, buf = _local(p.grad), _local(state["momentum_buffer"])  # this rank's rows (all of them alone)
            buf.lerp_(grad, 1 - beta)
            update = grad.lerp(buf, beta) if group["nesterov"] else buf
            if hasattr(p, "device_mesh"):
                from torch.distributed.tensor import DTensor, distribute_tensor

                whole = DTensor.from_local(update, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                           stride=p.stride()).full_tensor()
                direction = distribute_tensor(muon_direction(whole, group["splits"], group["ns_steps"]),
                                              p.device_mesh, p.placements, src_data_rank=None).to_local()
            else:
                direction = muon_direction(update, group["splits"], group["ns_steps"])
            weight = _local(p)
            weight.mul_(1 - lr * group["weight_decay"])
            weight.add_(direction, alpha=-lr)


class LRSchedule:
    """Linear warmup to optim.lr, then the chosen shape down towards optim.min_lr:
    cosine | linear (to min_lr at the end of decay_steps) | wsd (stable, then a linear decay over the last
    wsd_decay_fraction) | constant | step (x step_gamma every step_every) | plateau (x plateau_factor after
    plateau_patience evaluations without a new best val loss). `rewarm_at` restarts it at that step; a
    rollback after non-finite steps may scale it down. Its state travels in checkpoints."""

    def __init__(self, cfg: OptimConfig, max_steps: int):
        self.cfg, self.max_steps = cfg, max_steps
        self.scale = 1.0  # rollback factor
        self.plateau_scale, self.best, self.stale_evals = 1.0, math.inf, 0

    def __call__(self, step: int) -> float:
        c = self.cfg
        start = c.rewarm_at if c.rewarm_at and step >= c.rewarm_at else 0
        step -= start
        if step < c.warmup_steps:
            return self.scale * c.lr * (step + 1) / (c.warmup_steps + 1)
        decay_steps = c.decay_steps or max(1, self.max_steps - start - c.warmup_steps)
        p = min(1.0, (step - c.warmup_steps) / decay_steps)
        if c.schedule == "cosine":
            lr = c.min_lr + 0.5 * (1.0 + math.cos(math.pi * p)) * (c.lr - c.min_lr)
        elif c.schedule == "linear":
            lr = c.lr - p * (c.lr - c.min_lr)
        elif c.schedule == "wsd":
            q = max(0.0, (p - (1 - c.wsd_decay_fraction)) / c.wsd_decay_fraction)
            lr = c.lr - q * (c.lr - c.min_lr)
        elif c.schedule == "step":
            lr = c.lr * c.step_gamma ** ((step - c.warmup_steps) // c.step_every)
        elif c.schedule == "plateau":
            lr = c.lr * self.plateau_scale
        else:
            lr = c.lr
        return self.scale * lr

    def observe_val_loss(self, loss: float):
        if loss < self.best:
            self.best, self.stale_evals = loss, 0
            return
        self.stale_evals += 1
        if self.cfg.schedule == "plateau" and self.stale_evals >= self.cfg.plateau_patience:
            self.plateau_scale *= self.cfg.plateau_factor
            self.stale_evals = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "plateau_scale": self.plateau_scale, "best": self.best,
                "stale_evals": self.stale_evals}

    def load_state_dict(self, state: dict):
        self.scale, self.plateau_scale = state["scale"], state["plateau_scale"]
        self.best, self.stale_evals = state["best"], state["stale_evals"]
