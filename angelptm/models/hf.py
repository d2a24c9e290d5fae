"""Conversion between angelptm checkpoints and Hugging Face checkpoints (config.json + safetensors)
of the Llama-family decoders in `angelptm.models.hf_families` (Llama, Mistral, Qwen2, Qwen3, Hunyuan
dense, and the MoE Mixtral, Qwen3-MoE and Hunyuan MoE).

Our Llama already keeps Hugging Face's weight layout (rotate-half RoPE, the same projection
shapes), so converting weights is a rename in each direction, except that the experts of an MoE
layer, one tensor per expert there, are one stacked tensor per kind here (`angelptm.models.hf_moe`
names them). What needs care is the config:
a Hugging Face model that uses a feature our model cannot compute (a RoPE type we lack, MLP
biases, another activation) is refused with one line instead of being imported into a model that
computes something else. Neither direction writes anything until every input has been checked, and each
writes its output folder under a temporary name and renames it when complete.

transformers is not imported here: `config.json` is plain JSON and the weights are safetensors,
so angelptm reads and writes both without depending on it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from angelptm.config import Config, ModelConfig, TrainConfig, config_from_dict
from angelptm.data.tokenizers import TOKENIZER_JSON, load_tokenizer, tokenizer_files
from angelptm.errors import UserError
from angelptm.finetune.lora import load_merged_model, read_adapters, write_peft_adapter
from angelptm.models.hf_families import (
    attention_name_pairs,
    family_for,
    family_of,
    hf_family_config,
    hf_rope_config,
    options_from_hf,
    with_defaults,
)
from angelptm.models.hf_moe import expert_groups, hf_moe_config, layer_name_pairs, moe_from_hf, per_expert_form
from angelptm.models.llama import build_llama, is_moe_layer
from angelptm.dcp_safe import read_metadata_file
from angelptm.train.checkpoint import (
    OWN_TOKENIZER,
    fsync_tree,
    checkpoint_config,
    resolve_checkpoint,
    save_model_checkpoint,
)

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
# Hugging Face's own default shard size; one file below it, numbered shards above it.
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30

# Per-layer weights: Hugging Face module path -> ours (each gets ".weight").
_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
# The dense feed-forward's weights, in the layers without experts.
_MLP_NAMES = {"mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3", "mlp.down_proj": "feed_forward.w2"}
_HF_EMBEDDING, _OUR_EMBEDDING = "model.embed_tokens.weight", "tok_embeddings.weight"
_HF_HEAD, _OUR_HEAD = "lm_head.weight", "output.weight"
# Older checkpoints store RoPE's inverse frequencies as a buffer; we recompute them from rope_theta.
_IGNORED_HF_SUFFIX = "rotary_emb.inv_freq"

_REQUIRED_INT_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


# ---------------------------------------------------------------------------------------------
# Config


def config_from_hf(hf_config: dict[str, Any]) -> ModelConfig:
    """Our model section for a Hugging Face `config.json` (as a dict); UserError if we cannot represent it."""
    if not isinstance(hf_config, dict):
        raise UserError("the file is not a JSON object; pass a Hugging Face model's config.json")
    family = family_of(hf_config)
    hf_config = with_defaults(hf_config, family)
    for key in _REQUIRED_INT_KEYS:
        value = hf_config.get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise UserError(f"{key}={value!r} is missing or not an integer; a Llama config.json needs an integer {key}")
    if hf_config.get("mlp_bias"):
        raise UserError("the model uses mlp_bias=true, which angelptm's Llama does not have; "
                        "import a model without MLP biases (mlp_bias false)")
    activation = hf_config.get("hidden_act", "silu")
    if activation != "silu":
        raise UserError(
            f"the model uses hidden_act={activation}; angelptm's Llama uses SwiGLU (silu), "
            "import a model with hidden_act silu"
        )
    dim, n_heads = hf_config["hidden_size"], hf_config["num_attention_heads"]
    head_dim = hf_config.get("head_dim")
    if head_dim is not None and (not isinstance(head_dim, int) or isinstance(head_dim, bool)):
        raise UserError(f"head_dim={head_dim!r} is not an integer; fix config.json or drop head_dim")
    if head_dim is not None and head_dim * n_heads == dim:
        head_dim = None  # the width hidden_size / num_attention_heads gives: our default, kept null
    section = {
        "arch": "llama",
        "dim": dim,
        "n_layers": hf_config["num_hidden_layers"],
        "n_heads": n_heads,
        "n_kv_heads": hf_config.get("num_key_value_heads") or n_heads,
        "head_dim": head_dim,
        "ffn_dim": hf_config["intermediate_size"],
        "vocab_size": hf_config["vocab_size"],
        "max_seq_len": hf_config.get("max_position_embeddings", 2048),
        "norm_eps": hf_config.get("rms_norm_eps", 1e-6),
        # LlamaConfig's default, which transformers applies when the key is absent.
        "tie_embeddings": bool(hf_config.get("tie_word_embeddings", False)),
        **options_from_hf(hf_config, family, head_dim or dim // n_heads),
    }
    if family.moe:
        section["moe"] = moe_from_hf(hf_config, family)
    return _run_config(section).model


def _run_config(model_section: dict[str, Any]) -> Config:
    """The default run config with this model section (validated).

    The default train.seq_len is shortened when the model's context is shorter, so that a
    small imported model still gives a valid config.
    """
    seq_len = min(TrainConfig().seq_len, model_section["max_seq_len"])
    return config_from_dict({"model": model_section, "train": {"seq_len": seq_len}})


def hf_config_from(model_cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A `config.json` for the family (`hf_families.family_for`) that computes what our model computes."""
    dtype_name = str(dtype).removeprefix("torch.")
    family = family_for(model_cfg)
    return {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "hidden_size": model_cfg.dim,
        "intermediate_size": model_cfg.ffn_dim,
        "num_hidden_layers": model_cfg.n_layers,
        "num_attention_heads": model_cfg.n_heads,
        "num_key_value_heads": model_cfg.n_kv_heads,
        # Always written: Qwen3's config class defaults an absent head_dim to 128, not hidden / heads.
        "head_dim": model_cfg.resolved_head_dim,
        "vocab_size": model_cfg.vocab_size,
        "max_position_embeddings": model_cfg.max_seq_len,
        **hf_rope_config(model_cfg),
        "rms_norm_eps": model_cfg.norm_eps,
        "tie_word_embeddings": model_cfg.tie_embeddings,
        "hidden_act": "silu",
        **hf_family_config(model_cfg, family),
        **(hf_moe_config(model_cfg, family) if family.moe else {}),
        # transformers before 4.56 reads torch_dtype, later versions read dtype.
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
    }


# ---------------------------------------------------------------------------------------------
# Weights


def _name_pairs(model_cfg: ModelConfig) -> list[tuple[str, str]]:
    """(Hugging Face name, our name) of every weight but the stacked experts (`_expert_groups`), the
    output head last."""
    pairs = [(_HF_EMBEDDING, _OUR_EMBEDDING)]
    extra = attention_name_pairs(model_cfg)
    for i in range(model_cfg.n_layers):
        dense = {} if is_moe_layer(model_cfg, i) else _MLP_NAMES
        pairs += [(f"model.layers.{i}.{hf}.weight", f"layers.{i}.{ours}.weight")
                  for hf, ours in (_LAYER_NAMES | dense).items()]
        pairs += [(f"model.layers.{i}.{hf}", f"layers.{i}.{ours}") for hf, ours in extra]
        if not dense:
            pairs += layer_name_pairs(family_for(model_cfg), i)
    return pairs + [("model.norm.weight", "norm.weight"), (_HF_HEAD, _OUR_HEAD)]


def _expert_groups(model_cfg: ModelConfig) -> list[tuple[str, list[str]]]:
    """(our stacked expert weight, the Hugging Face weights of its experts) of every MoE layer."""
    return expert_groups(model_cfg, family_for(model_cfg)) if model_cfg.moe.n_experts else []


def _checked(hf_name: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> torch.Tensor:
    if tuple(tensor.shape) != expected:
        raise UserError(
            f"{hf_name} has shape {tuple(tensor.shape)} but config.json implies {expected}; "
            "the weights do not belong to this config.json"
        )
    return tensor


def _missing(hf_name: str) -> UserError:
    why = " (its model_type and attention_bias call for biases)" if hf_name.endswith(".bias") else ""
    return UserError(
        f"the Hugging Face weights lack {hf_name}; the safetensors files do not match config.json{why} "
        "(re-save the model with save_pretrained)"
    )


def state_from_hf(hf_state: dict[str, torch.Tensor], model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our model state from Hugging Face weights, dtypes kept; UserError on a missing, misshapen or extra tensor.

    With tied embeddings the output head is the embedding (Hugging Face usually omits lm_head). An
    MoE model's experts may also come fused, as transformers 5 holds them (`hf_moe.per_expert_form`).
    """
    expected = {name: tuple(t.shape) for name, t in build_llama(model_cfg, "meta").state_dict().items()}
    if model_cfg.moe.n_experts:
        hf_state = per_expert_form(hf_state, family_for(model_cfg))
    state: dict[str, torch.Tensor] = {}
    for hf_name, our_name in _name_pairs(model_cfg):
        if our_name == _OUR_HEAD and model_cfg.tie_embeddings:
            state[our_name] = state[_OUR_EMBEDDING]
            continue
        if hf_name not in hf_state:
            raise _missing(hf_name)
        state[our_name] = _checked(hf_name, hf_state[hf_name], expected[our_name])
    groups = _expert_groups(model_cfg)
    for our_name, hf_names in groups:
        for hf_name in hf_names:
            if hf_name not in hf_state:
                raise _missing(hf_name)
            _checked(hf_name, hf_state[hf_name], expected[our_name][1:])
        state[our_name] = torch.stack([hf_state[hf_name] for hf_name in hf_names])
    known = {hf for hf, _ in _name_pairs(model_cfg)} | {hf for _, names in groups for hf in names}
    extra = sorted(n for n in hf_state if n not in known and not n.endswith(_IGNORED_HF_SUFFIX))
    if extra:
        raise UserError(
            f"the Hugging Face weights hold tensors angelptm's Llama has no place for ({len(extra)} in all, "
            f"first {extra[0]}); config.json does not describe these weights"
        )
    return state


def state_to_hf(our_state: dict[str, torch.Tensor], model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face weights from our model state; with tied embeddings lm_head is left out, as transformers does.
    Stacked experts are written one tensor per expert (views of ours), as save_pretrained writes them."""
    hf_state = {
        hf_name: our_state[our_name]
        for hf_name, our_name in _name_pairs(model_cfg)
        if not (our_name == _OUR_HEAD and model_cfg.tie_embeddings)
    }
    for our_name, hf_names in _expert_groups(model_cfg):
        hf_state.update(zip(hf_names, our_state[our_name].unbind(0)))
    return hf_state


# ---------------------------------------------------------------------------------------------
# Reading and writing folders


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path} is not readable JSON ({type(e).__name__}); restore the {what}") from None


def _hf_weight_files(hf_dir: Path) -> list[Path]:
    """The safetensors files of a Hugging Face folder: one file, or the shards its index names."""
    if (hf_dir / HF_WEIGHTS).is_file():
        return [hf_dir / HF_WEIGHTS]
    if (hf_dir / HF_INDEX).is_file():
        index = _read_json(hf_dir / HF_INDEX, "shard index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{hf_dir / HF_INDEX} has no weight_map; re-save the model with save_pretrained")
        files = [hf_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UserError(f"{hf_dir} lacks the shard {missing[0]} its index names; copy the complete model folder")
        return files
    raise UserError(
        f"{hf_dir} holds no {HF_WEIGHTS} or {HF_INDEX}; angelptm reads safetensors only, "
        "re-save the model with save_pretrained(..., safe_serialization=True)"
    )


def _read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    state[name] = f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise UserError(f"{path} is not a readable safetensors file ({e}); restore it from the source") from None
    return state


@contextmanager
def _located(path: Path) -> Iterator[None]:
    """Prefix the UserErrors raised inside with the file or folder they are about."""
    try:
        yield
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def _check_new_folder(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"output folder {out_dir} already exists and is not empty; pass a new folder or delete it")


def import_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Convert a Hugging Face folder (a family of `hf_families`) into an angelptm model-only checkpoint at `out_dir`.

    The checkpoint's run config is the defaults with the model section from config.json, so it
    can be trained further or exported again. The tokenizer files, where the folder has a
    tokenizer.json, are kept in the checkpoint's `tokenizer/` and named by its `data.tokenizer`.
    Returns the checkpoint folder.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if not hf_dir.is_dir():
        raise UserError(f"Hugging Face model folder {hf_dir} does not exist; pass the folder holding config.json")
    config_path = hf_dir / HF_CONFIG
    if not config_path.is_file():
        raise UserError(f"{hf_dir} has no {HF_CONFIG}; pass a folder written by save_pretrained")
    _check_new_folder(out_dir)
    raw_config = _read_json(config_path, "model's config.json")
    with _located(config_path):
        model_cfg = config_from_hf(raw_config)
    hf_state = _read_safetensors(_hf_weight_files(hf_dir))
    with _located(hf_dir):
        state = state_from_hf(hf_state, model_cfg)
    cfg, files = _run_config(dataclasses.asdict(model_cfg)), {}
    if (hf_dir / TOKENIZER_JSON).is_file():
        tokenizer = load_tokenizer(str(hf_dir), "the model's tokenizer")
        if tokenizer.vocab_size > model_cfg.vocab_size:
            raise UserError(f"{hf_dir}: the tokenizer has {tokenizer.vocab_size} ids but config.json's vocab_size is "
                            f"{model_cfg.vocab_size}; pair the model with its own tokenizer")
        files = {f"{OWN_TOKENIZER}/{name}": data for name, data in tokenizer_files(tokenizer).items()}
        # As given: `angelptm train imported/config.yaml` from the same folder finds it; readers of
        # the checkpoint itself (export-hf, generate, init_from) take its own copy wherever it moved.
        cfg.data.tokenizer = str(out_dir / OWN_TOKENIZER)
    return save_model_checkpoint(out_dir, cfg, state, files)


def _stored_dtypes(ckpt_dir: Path) -> dict[str, torch.dtype]:
    """The dtype each model tensor has in the checkpoint's files (the loaded model is float32)."""
    metadata = read_metadata_file(ckpt_dir / "state" / ".metadata")
    prefix = "model."
    return {
        key[len(prefix):]: entry.properties.dtype
        for key, entry in metadata.state_dict_metadata.items()
        if key.startswith(prefix)
    }


def _shards(hf_state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Split the weights, in order, into groups of at most `max_shard_bytes` (a larger tensor sits alone)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in hf_state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def _write_weights(folder: Path, hf_state: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    shards = _shards(hf_state, max_shard_bytes)
    metadata = {"format": "pt"}  # transformers checks that the file holds PyTorch tensors
    if len(shards) == 1:
        save_file(shards[0], str(folder / HF_WEIGHTS), metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in hf_state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / HF_INDEX).write_text(json.dumps(index, indent=2))


def export_hf(
    ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    adapter: bool = False,
) -> Path:
    """Write an angelptm checkpoint (model-only or a trainer's step_<N>) as a Hugging Face folder of the
    family that computes what the model computes (`hf_families.family_for`: Qwen3 for q/k norm before RoPE, ...).

    The files of the checkpoint's `data.tokenizer` go beside the weights (none for bytes), so
    `AutoTokenizer.from_pretrained(out_dir)` loads too. Weights keep the dtype the checkpoint stores them in. Above `max_shard_bytes` they are split
    into numbered shards with an index, as save_pretrained does. LoRA adapters (`finetune.lora`) are
    merged into their base weights; with `adapter`, the folder holds them alone, as PEFT saves them
    (`angelptm.finetune.lora`). Returns `out_dir`.
    """
    ckpt_dir, out_dir = resolve_checkpoint(Path(ckpt_dir)), Path(out_dir)  # a run's output_dir: its newest
    _check_new_folder(out_dir)
    saved = checkpoint_config(ckpt_dir).model
    if saved.arch != "llama":
        raise UserError(f"checkpoint {ckpt_dir} holds a model.arch={saved.arch} model; only llama models export to Hugging Face")
    dtypes = _stored_dtypes(ckpt_dir)
    hf_config = hf_config_from(saved, dtypes[_OUR_EMBEDDING])  # refuses a model no family computes, before loading it
    cfg, model = load_merged_model(ckpt_dir, "cpu")
    tokenizer = load_tokenizer(cfg.data.tokenizer, f"{ckpt_dir}'s data.tokenizer")
    if cfg.model.tie_embeddings:  # the head is the embedding, stored once under the embedding's name
        dtypes[_OUR_HEAD] = dtypes[_OUR_EMBEDDING]
    our_state = {name: t.detach().to(dtypes[name]).contiguous() for name, t in model.state_dict().items()}
    hf_state = state_to_hf(our_state, cfg.model)
    tmp = out_dir.with_name(f".tmp_{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if adapter:
            hf_names = {ours: hf for hf, ours in _name_pairs(cfg.model)}
            write_peft_adapter(tmp, read_adapters(ckpt_dir), cfg.finetune.lora, hf_names, ckpt_dir)
        else:
            (tmp / HF_CONFIG).write_text(json.dumps(hf_config, indent=2))
            _write_weights(tmp, hf_state, max_shard_bytes)
        for name, data in tokenizer_files(tokenizer).items():  # none for the byte tokenizer
            (tmp / name).write_bytes(data)
        fsync_tree(tmp)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
