"""Our GPT <-> Hugging Face directories, which transformers, lm-eval-harness and vLLM read: GPT-2's block as
`GPT2LMHeadModel`, Llama's (RMSNorm, RoPE, SwiGLU, any n_kv_head; lm/interop/hf_llama.py) as `LlamaForCausalLM`.
For GPT-2 the parameter names already match; HF's `Conv1D` stores matmul weights as (in, out), so those
are transposed, and HF GPT-2 always has biases, so a bias-free model exports zeros.
"""
from __future__ import annotations

from pathlib import Path

import torch

from data_prep import DataError
from lm.interop import hf_llama
from lm.training.checkpoint import CheckpointError
from lm.config.schema import ModelConfig, head_size, mlp_hidden_size
from lm.files import field, read_json, read_safetensors, safetensors_header

ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new"}  # ours -> HF's activation_function


def family(cfg: ModelConfig) -> str:
    """"gpt2" or "llama": the HF format that represents this block exactly; else a one-line refusal."""
    gpt2 = dict(norm="layernorm", position="learned", mlp="gelu", qk_norm=False)
    if all(getattr(cfg, k) == v for k, v in gpt2.items()) and (cfg.n_kv_head or cfg.n_head) == cfg.n_head \
            and mlp_hidden_size(cfg) == 4 * cfg.n_embd and head_size(cfg) * cfg.n_head == cfg.n_embd:
        return "gpt2"
    if all(getattr(cfg, k) == v for k, v in hf_llama.LLAMA_BLOCK.items()):
        return "llama"
    options = ", ".join(f"model.{k} = {getattr(cfg, k)!r}" for k in ("norm", "position", "mlp", "qk_norm"))
    raise CheckpointError(f"{options}: no Hugging Face format holds this block; GPT-2's takes layernorm, learned, "
                          "gelu; Llama's rmsnorm, rope, swiglu; neither qk_norm (export --format safetensors instead)")


def hf_config(cfg: ModelConfig, eos_id: int) -> dict:
    if family(cfg) == "llama":
        return hf_llama.llama_config(cfg, eos_id)
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
        "activation_function": ACTIVATIONS[cfg.activation], "layer_norm_epsilon": cfg.norm_eps,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02, "scale_attn_weights": True, "use_cache": True,
        "bos_token_id": eos_id, "eos_token_id": eos_id, "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": "float32",
    }


def unrolled(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with model.share_layers = 1: layer i holds the weights of shared block i // K, so a standard
    directory (n_layer blocks) holds it. The tensors are the model's own (no copy)."""
    import dataclasses

    from lm.model.gpt import GPT

    K = model.cfg.share_layers
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("transformer.h."):
            _, _, block, rest = key.split(".", 3)
            for layer in range(int(block) * K, (int(block) + 1) * K):
                state[f"transformer.h.{layer}.{rest}"] = value
        else:
            state[key] = value
    with torch.device("meta"):
        flat = GPT(dataclasses.replace(model.cfg, share_layers=1))
    flat.load_state_dict(state, assign=True)  # wte and lm_head get the one tensor: still tied
    return flat.eval()


def _is_conv1d(model: torch.nn.Module, key: str) -> bool:
    """HF stores every Linear but the head as a transposed Conv1D."""
    module = model.get_submodule(key.rsplit(".", 1)[0])
    return isinstance(module, torch.nn.Linear) and key.endswith(".weight") and key != "lm_head.weight"


def to_hf_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """HF tensors (contiguous; a tied head omitted: it is the embedding) from our model."""
    if family(model.cfg) == "llama":
        return _to_llama_state(model)
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding):
            state[f"{name}.weight"] = module.weight
        elif name == "lm_head":
            if not model.cfg.tie_embeddings:
                state["lm_head.weight"] = module.weight
        elif isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm)):
            w = module.weight
            state[f"{name}.weight"] = w.t() if isinstance(module, torch.nn.Linear) else w
            state[f"{name}.bias"] = module.bias if module.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def _to_llama_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    cfg, state = model.cfg, {}
    head = head_size(cfg)
    kv = (cfg.n_kv_head or cfg.n_head) * head
    for key, value in model.state_dict().items():
        if key == "lm_head.weight":
            if not cfg.tie_embeddings:
                state[key] = value
            continue
        names = hf_llama.hf_name(key)
        if isinstance(names, list):  # c_attn: q, k, v stacked by rows
            for name, part in zip(names, value.split([cfg.n_head * head, kv, kv], dim=0)):
                state[name] = part
        else:
            state[names] = value
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


POSITIVE = (lambda v: v >= 1, "must be >= 1")
EPS = (lambda v: 0 < v < 1, "must be in (0, 1)")


def read_hf_config(directory: Path) -> ModelConfig:
    """Our model shape from a HF GPT-2 or Llama `config.json`, refusing what our architecture cannot represent
    (one line naming the file and field), and checked against the header of `model.safetensors` before
    anything is allocated."""
    path = directory / "config.json"
    try:
        hf = read_json(path, what="Hugging Face config.json")
        kind = field(hf, "model_type", path, types=(str,))
        if kind == "llama":
            cfg = hf_llama.read_llama_config(hf, path)
        elif kind == "gpt2":
            cfg = _read_gpt2_config(hf, path)
        else:
            raise DataError(f"{path}: model_type is {kind!r}; only 'gpt2' and 'llama' map onto our GPT")
        check_hf_header(directory, cfg)
    except DataError as e:
        raise CheckpointError(str(e)) from None
    return cfg


def _read_gpt2_config(hf: dict, path: Path) -> ModelConfig:
    act = {v: k for k, v in ACTIVATIONS.items()}.get(field(hf, "activation_function", path, (str,), default="gelu_new"))
    if act is None:
        raise DataError(f"{path}: activation_function {hf['activation_function']!r} is not gelu or gelu_new")
    n_embd, n_head = field(hf, "n_embd", path, check=POSITIVE), field(hf, "n_head", path, check=POSITIVE)
    if n_embd % n_head:
        raise DataError(f"{path}: n_embd = {n_embd} is not a multiple of n_head = {n_head}")
    checks = {"n_inner": (field(hf, "n_inner", path, (int, type(None)), default=None), (None, 4 * n_embd)),
              "scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx", False), (False,))}
    for key, (value, allowed) in checks.items():
        if value not in allowed:
            raise DataError(f"{path}: {key} = {value!r} is not supported (expected {allowed[-1]!r})")
    return ModelConfig(vocab_size=field(hf, "vocab_size", path, check=POSITIVE),
                       block_size=field(hf, "n_positions", path, check=POSITIVE),
                       n_layer=field(hf, "n_layer", path, check=POSITIVE), n_head=n_head, n_embd=n_embd,
                       dropout=0.0, bias=True, activation=act,
                       tie_embeddings=field(hf, "tie_word_embeddings", path, (bool,), default=True),
                       norm_eps=field(hf, "layer_norm_epsilon", path, (float,), EPS, default=1e-5))


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor a HF directory of shape `cfg` holds (GPT-2's without "transformer.")."""
    from lm.training.plan import param_shapes

    llama, out = family(cfg) == "llama", {}
    head, kv = head_size(cfg), (cfg.n_kv_head or cfg.n_head) * head_size(cfg)
    for key, shape in param_shapes(cfg):
        if not llama:
            conv1d = key.endswith(".weight") and len(shape) == 2 and key.startswith("transformer.h.")
            out[key.removeprefix("transformer.")] = shape[::-1] if conv1d else shape
        elif key == "lm_head.weight":
            out[key] = shape
        elif isinstance(names := hf_llama.hf_name(key), list):  # q, k, v stacked in our c_attn
            for name, rows in zip(names, (cfg.n_head * head, kv, kv)):
                out[name] = (rows, *shape[1:])
        else:
            out[names] = shape
    return out


INDEX = "model.safetensors.index.json"


def weight_files(directory: Path) -> tuple[Path, list[Path]]:
    """(what to name in messages, the files): `model.safetensors`, or the shards `model.safetensors.index.json`
    maps tensors to (transformers' layout for larger models, Llama 3 8B's)."""
    single, index = directory / "model.safetensors", directory / INDEX
    if single.is_file() or not index.is_file():
        return single, [single]  # (a missing file is named by the reader)
    weight_map = field(read_json(index), "weight_map", index, (dict,))
    names = sorted(set(weight_map.values()), key=str)
    for name in names:
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise DataError(f"{index}: weight_map names {name!r}, not a file beside it")
    return index, [directory / name for name in names]


def check_hf_header(directory: Path, cfg: ModelConfig):
    """Every tensor `config.json` implies is in the weights with its shape, read from the headers alone: a
    config promising more than the files hold is refused before a model is built."""
    path, paths = weight_files(directory)
    header = {k.removeprefix("transformer."): v for p in paths for k, v in safetensors_header(p).items()
              if k != "__metadata__"}
    if cfg.n_layer > len(header):  # each layer has tensors: checked before listing a billion names
        raise DataError(f"{path}: holds {len(header)} tensors, too few for the n_layer = {cfg.n_layer} blocks "
                        f"{directory / 'config.json'} gives")
    for name, shape in hf_shapes(cfg).items():
        if name not in header:
            raise DataError(f"{path}: has no tensor '{name}', which {directory / 'config.json'} implies")
        if tuple(header[name]["shape"]) != tuple(shape):
            raise DataError(f"{path}: tensor '{name}' has shape {tuple(header[name]['shape'])}, "
                            f"{directory / 'config.json'} implies {tuple(shape)}")


SHAPE = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "norm", "position", "mlp", "qk_norm",
         "share_layers", "tie_embeddings", "norm_eps")


RESOLVED = {"n_kv_head": lambda m: m.n_kv_head or m.n_head, "mlp_hidden": mlp_hidden_size, "head_dim": head_size}


def hf_shape_keys(hf: ModelConfig) -> tuple[str, ...]:
    """The model keys a HF directory fixes (init.from takes them, lm/training/initialize.py)."""
    return SHAPE + (("activation",) if hf.mlp == "gelu" else ("rope_theta", "bias")) + tuple(RESOLVED)


def check_hf_shape(directory: Path, hf: ModelConfig, ours: ModelConfig):
    """The run's model must be the directory's: every differing key is named at once, with the value to set."""
    differ = []
    for key in hf_shape_keys(hf):
        a, b = (RESOLVED[key](m) if key in RESOLVED else getattr(m, key) for m in (hf, ours))
        if a != b:
            differ.append((key, a, b))
    if differ:
        gives = ", ".join(f"model.{k} = {_toml(a)}" for k, a, _ in differ)
        asks = ", ".join(f"{_toml(b)}" for _, _, b in differ)
        raise CheckpointError(f"hf:{directory}/config.json gives {gives}; the config asks for {asks}: set "
                              f"{'them' if len(differ) > 1 else 'it'} to the directory's")
    if hf.mlp == "gelu" and not ours.bias:
        raise CheckpointError(f"hf:{directory}: GPT-2 weights have biases; set model.bias = true")


def _toml(value) -> str:
    return str(value).lower() if isinstance(value, bool) else repr(value)


def load_hf_weights(directory: Path, model: torch.nn.Module):
    """Copy a HF GPT-2 or Llama `model.safetensors` (or its shards) into our model (shapes checked tensor by
    tensor)."""
    from lm.training.parallel import shard_like

    try:
        check_hf_header(directory, model.cfg)
        path, paths = weight_files(directory)
        hf = {k: v for p in paths for k, v in read_safetensors(p)[0].items()}
    except DataError as e:
        raise CheckpointError(str(e)) from None
    llama = family(model.cfg) == "llama"
    if not llama:
        hf = {k.removeprefix("transformer."): v for k, v in hf.items()}
    for key, target in model.state_dict().items():
        if key == "lm_head.weight" and model.cfg.tie_embeddings:
            continue
        if key == "lm_head.weight":
            names = key
        else:
            names = hf_llama.hf_name(key) if llama else key.removeprefix("transformer.")
        missing = [n for n in ([names] if isinstance(names, str) else names) if n not in hf]
        if missing:
            raise CheckpointError(f"{path}: has no tensor '{missing[0]}' (for our '{key}')")
        if isinstance(names, list):  # Llama's q, k, v: stacked into our c_attn
            src = torch.cat([hf[n] for n in names], dim=0)
        else:
            src = hf[names].t() if not llama and _is_conv1d(model, key) else hf[names]
        if src.shape != target.shape:
            raise CheckpointError(f"{path}: '{key}' has shape {tuple(src.shape)}, the model expects "
                                  f"{tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(shard_like(src.to(target.dtype), target))  # under FSDP: this rank's shard
