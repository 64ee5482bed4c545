"""Processes and parallelism: the torchrun environment, FSDP2 sharding, activation checkpointing.

One code path for 1..N processes: under torchrun (WORLD_SIZE set) the model is built on the meta device,
each block and then the root are sharded with `fully_shard`, and each rank materializes only its shard,
initialized exactly like the single-process model of the same seed. A plain `python train.py` run is the
world of one, with no process group and no sharding.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lm.config.schema import Config


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def init_world(device_name: str) -> World:
    """Join the torchrun process group when launched by torchrun (NCCL on GPUs, gloo on CPU)."""
    size = int(os.environ.get("WORLD_SIZE", 1))
    world = World(int(os.environ.get("RANK", 0)), size, int(os.environ.get("LOCAL_RANK", 0)))
    # Under torchrun, even with one process: the same FSDP path as on N GPUs (mixed-precision policy,
    # sharded checkpoints), so a 1-GPU run measures what a cluster run does.
    launched = size > 1 or "TORCHELASTIC_RUN_ID" in os.environ
    if launched and not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_name != "cpu"
        if use_cuda:
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return world


def close_world():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    """Wait for every rank; nothing to wait for in one process."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shard_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`full` laid out like `param`: under FSDP a DTensor holding this rank's slice (each rank reads the
    whole tensor and keeps its part, no communication); in one process `full` itself."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    return full


def mean_across_ranks(value: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.AVG if value.is_cuda else dist.ReduceOp.SUM)
        if not value.is_cuda:  # gloo has no AVG
            value /= dist.get_world_size()
    return value


def apply_activation_checkpointing(model: torch.nn.Module, mode: str, every: int):
    """"none", "full" (every block) or "every" (every `every`-th block): those blocks recompute their
    activations in backward instead of storing them (GPT.forward reads `model.checkpointed`)."""
    n = model.cfg.n_layer  # layers, i.e. uses of a block (several share one under model.share_layers)
    model.checkpointed = set() if mode == "none" else {i for i in range(n) if mode == "full" or i % every == 0}


def device_mesh(cfg: Config, device: torch.device):
    """1-D mesh (FSDP over every rank), or 2-D (replicate, shard) for HSDP: parallel.replicas groups, each
    sharding the model over world / replicas ranks (e.g. one group per node), gradients all-reduced across."""
    from torch.distributed.device_mesh import init_device_mesh

    world, replicas = dist.get_world_size(), cfg.parallel.replicas
    if world % replicas:
        raise ValueError(f"parallel.replicas = {replicas} does not divide the world size {world}")
    if replicas == 1:
        return init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    return init_device_mesh(device.type, (replicas, world // replicas), mesh_dim_names=("replicate", "shard"))


def shard(model: torch.nn.Module, cfg: Config, device: torch.device, mesh=None):
    """FSDP2 on each block, then the root (embeddings, final norm, tied head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    param_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16,
                   "float32": torch.float32}[resolved_dtype(cfg, device)]
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    kwargs = dict(mp_policy=mp, reshard_after_forward=cfg.parallel.reshard_after_forward)
    if mesh is not None:
        kwargs["mesh"] = mesh
    for block in model.transformer.h:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)


def resolved_dtype(cfg: Config, device: torch.device) -> str:
    """"auto" is bf16 where the device supports it (CUDA), else fp32."""
    if cfg.train.dtype != "auto":
        return cfg.train.dtype
    return "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"


def build_model(cfg: Config, world: World, device: torch.device):
    """The model on `device`: built whole in one process, or on the meta device and materialized shard
    by shard under torchrun. Returns the model with activation checkpointing and optional compile."""
    from lm.model.gpt import GPT

    if not world.distributed:
        model = _with_task_head(GPT(cfg.model, seed=cfg.train.seed), cfg).to(device)
        apply_activation_checkpointing(model, cfg.parallel.activation_checkpointing, cfg.parallel.ac_every)
        _compile(model, cfg)
        return model
    with torch.device("meta"):
        model = _with_task_head(GPT(cfg.model, seed=cfg.train.seed), cfg)
    apply_activation_checkpointing(model, cfg.parallel.activation_checkpointing, cfg.parallel.ac_every)
    _compile(model, cfg)
    shard(model, cfg, device, device_mesh(cfg, device))
    model.to_empty(device=device)
    model.init_weights(cfg.train.seed)
    return model


def _with_task_head(model, cfg: Config):
    """train.task = "classify": the classification head (lm/model/classifier.py) joins the model before it is placed
    or sharded (FSDP2's root unit holds it), initialized like every parameter, by name and seed."""
    if cfg.train.task == "classify":
        from lm.model.classifier import attach_head

        attach_head(model, cfg)
    return model


def _compile(model, cfg: Config):
    """torch.compile in place, so parameter names (and checkpoints) stay the same: each block (one graph
    reused n_layer times, quick to compile) or the whole model (embeddings, head and loss fused too)."""
    if cfg.parallel.compile == "blocks":
        for block in model.transformer.h:
            block.compile()
    elif cfg.parallel.compile == "model":
        model.compile()
