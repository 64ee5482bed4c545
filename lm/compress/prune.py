"""Pruning: `python -m lm.prune RUN --method magnitude|heads|neurons --sparsity S OUT`.

magnitude: unstructured; the S smallest |w| of the blocks' matrices (embeddings and the tied head stay
    whole) are zeroed, over all of them (--scope global) or per matrix (--scope layer). OUT holds the weights
    and `masks.safetensors`; a run started with `init.from = "OUT"` keeps the masks (saved in its run
    directory, so resume keeps them too) and re-applies them after every optimizer step.
heads / neurons: structured; in every block, the fraction S of attention heads (or MLP neurons) that matter
    least is removed, so the model really shrinks: fewer heads (model.n_head, model.head_dim keeps their
    size) or a narrower MLP (model.mlp_hidden), written into OUT's config.toml, so OUT loads, trains
    (init.from), samples and exports like any run. Importance is the first-order Taylor estimate of the
    loss change when a unit is removed (Michel et al. 2019 for heads, Molchanov et al. 2017 for neurons):
    |sum over tokens of activation x gradient| through a gate of 1 on each unit, over --batches batches
    of the run's validation data. Every block keeps the same number of units, each its own choice.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch

from data_prep import DataError, TokenReader, load_tokenizer
from lm.training import checkpoint
from lm.config.load import to_toml
from lm.config.schema import ModelConfig, head_size
from lm.files import save_safetensors
from lm.model.gpt import GPT
from lm.compress.quantize import stored_state


MASKS_FILE = "masks.safetensors"


# ---- magnitude ----------------------------------------------------------------------------------------
def prunable(model: GPT) -> dict[str, torch.Tensor]:
    """The matrices magnitude pruning may zero: every 2-D weight inside the blocks."""
    return {name: p for name, p in model.named_parameters() if name.startswith("transformer.h.") and p.dim() == 2}


def magnitude_masks(model: GPT, sparsity: float, scope: str) -> dict[str, torch.Tensor]:
    """name -> bool mask (True: kept) zeroing the `sparsity` smallest |w|, globally or per matrix."""
    weights = prunable(model)
    if scope == "global":
        everything = torch.cat([w.detach().abs().flatten() for w in weights.values()])
        k = int(sparsity * everything.numel())
        threshold = everything.kthvalue(k).values if k else everything.new_tensor(-1.0)
        return {name: w.detach().abs() > threshold for name, w in weights.items()}
    masks = {}
    for name, w in weights.items():
        k = int(sparsity * w.numel())
        threshold = w.detach().abs().flatten().kthvalue(k).values if k else w.new_tensor(-1.0)
        masks[name] = w.detach().abs() > threshold
    return masks


class Masks:
    """Fixed zeros through fine-tuning: applied after every optimizer step (and once at the start)."""

    def __init__(self, masks: dict[str, torch.Tensor]):
        self.masks, self._placed = masks, None

    @classmethod
    def load(cls, path: Path) -> "Masks":
        from lm.files import expect_tensor, read_safetensors

        try:
            masks, _ = read_safetensors(path)
            return cls({k: expect_tensor(masks, k, path, dtypes=(torch.uint8, torch.bool)).bool() for k in masks})
        except DataError as e:
            raise checkpoint.CheckpointError(f"{e} (pruning masks)") from None

    def save(self, path: Path):
        save_safetensors({k: v.to(torch.uint8).contiguous() for k, v in self.masks.items()}, path, {"format": "pt"})

    @torch.no_grad()
    def apply(self, model: torch.nn.Module):
        if self._placed is None:  # each mask laid out like its parameter (this rank's shard under FSDP)
            from lm.training.parallel import shard_like

            params = dict(model.named_parameters())
            missing = [name for name in self.masks if name not in params]
            if missing:
                raise checkpoint.CheckpointError(f"pruning mask for '{missing[0]}', which this model does not have")
            self._placed = [(params[name], shard_like(mask.to(params[name].dtype), params[name]))
                            for name, mask in self.masks.items()]
        for param, mask in self._placed:
            param.mul_(mask)


# ---- structured: importance, then a smaller model ---------------------------------------------------
def _gate_hooks(model: GPT, kind: str) -> tuple[list[torch.Tensor], list]:
    """A gate of ones (requires grad) on each unit of each block: heads act on attention's output before
    its projection, neurons on the MLP's hidden activation before its projection."""
    gates, handles = [], []
    for block in model.transformer.h:
        if kind == "heads":
            attn = block.attn
            gate = torch.ones(attn.n_head, requires_grad=True)
            expand = (lambda g, size=attn.head_dim: g.repeat_interleave(size))
            module = attn.c_proj
        else:
            module = block.mlp.c_proj
            gate = torch.ones(module.in_features, requires_grad=True)
            expand = (lambda g: g)
        handles.append(module.register_forward_pre_hook(
            lambda mod, args, g=gate, e=expand: (args[0] * e(g).to(args[0].dtype),)))
        gates.append(gate)
    return gates, handles


def importance(model: GPT, batches: list[tuple[torch.Tensor, torch.Tensor]], kind: str) -> list[torch.Tensor]:
    """Per block, |dL/dgate| summed over batches for each head or neuron."""
    gates, handles = _gate_hooks(model, kind)
    scores = [torch.zeros_like(g) for g in gates]
    model.eval()
    try:
        for x, y in batches:
            for g in gates:
                g.grad = None
            model(x, y)[1].backward()
            for score, g in zip(scores, gates):
                score += g.grad.abs()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    return scores


def keep_top(scores: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Per block, the sorted indices of the units kept: the same count everywhere, at least one."""
    total = scores[0].numel()
    kept = max(1, total - int(round(sparsity * total)))
    return [score.topk(kept).indices.sort().values for score in scores]


def prune_heads(model: GPT, keep: list[torch.Tensor]) -> GPT:
    """A model with only the kept query heads of each block (key/value heads with them: MHA only)."""
    cfg = model.cfg
    if (cfg.n_kv_head or cfg.n_head) != cfg.n_head:
        raise checkpoint.CheckpointError("--method heads: grouped-query attention (model.n_kv_head < n_head) "
                                         "shares key/value heads across queries; prune --method neurons instead")
    D = head_size(cfg)
    new_cfg = dataclasses.replace(cfg, n_head=len(keep[0]), n_kv_head=0, head_dim=D)
    state = dict(model.state_dict())
    for i, idx in enumerate(keep):
        rows = torch.cat([(h * D + torch.arange(D)) for h in idx.tolist()])
        inner = cfg.n_head * D
        p = f"transformer.h.{i}.attn"
        qkv_rows = torch.cat([rows, inner + rows, 2 * inner + rows])
        state[f"{p}.c_attn.weight"] = state[f"{p}.c_attn.weight"][qkv_rows]
        if f"{p}.c_attn.bias" in state:
            state[f"{p}.c_attn.bias"] = state[f"{p}.c_attn.bias"][qkv_rows]
        state[f"{p}.c_proj.weight"] = state[f"{p}.c_proj.weight"][:, rows]
    return _rebuilt(new_cfg, state)


def prune_neurons(model: GPT, keep: list[torch.Tensor]) -> GPT:
    """A model whose MLPs keep only the given hidden units."""
    new_cfg = dataclasses.replace(model.cfg, mlp_hidden=len(keep[0]))
    state = dict(model.state_dict())
    for i, idx in enumerate(keep):
        p = f"transformer.h.{i}.mlp"
        for name in ("c_fc", "gate_proj", "up_proj"):
            for kind in ("weight", "bias"):
                if f"{p}.{name}.{kind}" in state:
                    state[f"{p}.{name}.{kind}"] = state[f"{p}.{name}.{kind}"][idx]
        state[f"{p}.c_proj.weight"] = state[f"{p}.c_proj.weight"][:, idx]
    return _rebuilt(new_cfg, state)


def _rebuilt(cfg: ModelConfig, state: dict) -> GPT:
    with torch.device("meta"):
        model = GPT(cfg)
    model.load_state_dict({k: v.contiguous().clone() for k, v in state.items()}, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight  # assign replaced both: tie them again
    return model.eval()


def validation_batches(ckpt: Path, data: str | None, count: int, batch_size: int, block: int):
    """`count` batches of the validation split of `data` (default: the data the run was trained on)."""
    from lm.data.batches import SampleStream
    from lm.training.evaluation import VAL_SEED

    directory = Path(data or checkpoint.load_config(ckpt).data.dir)
    if not (directory / "meta.json").is_file():
        raise DataError(f"{directory}: no prepared data for the importance scores; pass --data DIR")
    stream = SampleStream(TokenReader(directory, "val"), block, VAL_SEED, f"{directory} val split")
    return [stream.batch(i * batch_size, batch_size, torch.device("cpu")) for i in range(count)]


# ---- the command --------------------------------------------------------------------------------------
def write(out: Path, ckpt: Path, model: GPT, masks: Masks | None):
    cfg = checkpoint.load_config(ckpt)
    cfg.model = dataclasses.replace(model.cfg, attention=cfg.model.attention, layernorm=cfg.model.layernorm)
    state = {k: v.contiguous() for k, v in stored_state(model).items()}
    save_safetensors(state, out / "model.safetensors", metadata={"format": "pt", "lmforge_config": to_toml(cfg)})
    (out / "config.toml").write_text(to_toml(cfg))
    tokenizer = load_tokenizer(ckpt)
    shutil.copyfile(ckpt / tokenizer.file_name, out / tokenizer.file_name)
    if masks is not None:
        masks.save(out / MASKS_FILE)
