"""The Hugging Face decoder families angelptm converts, and what each one's config.json means in our options.

All of them are our one Llama-family decoder with options (`angelptm.models.llama`), the MoE ones
with `model.moe` experts in place of the dense feed-forward (`angelptm.models.hf_moe`):

    llama              attention_bias: q/k/v and o biases; rope_scaling llama3, linear, dynamic
    mistral            sliding_window (null: plain Llama)
    qwen2              q/k/v biases always, no o bias
    qwen3              a per-head RMSNorm of q and k before RoPE (q_norm, k_norm); attention_bias;
                       head_dim apart from hidden_size / heads (128 where config.json omits it)
    hunyuan_v1_dense   a per-head RMSNorm of q and k after RoPE (query_layernorm, key_layernorm);
                       attention_bias; its NTK-alpha RoPE, a fixed stretch of the base
    mixtral            Mistral's attention, experts in every layer
    qwen3_moe          Qwen3's attention, experts in the layers after its mlp_only_layers
    hunyuan_v1_moe     Hunyuan dense's attention, experts and one shared expert in every layer

Qwen2-MoE is refused: its shared expert's output is scaled by a per-token sigmoid gate, which our MoE
layer does not compute.

`options_from_hf` reads a config.json into the model-section keys these options are, refusing in
one line a feature our model cannot compute; `family_for` picks the family an export is written
as, from the options alone (a Mistral model without a window exports as the Llama it equals, an MoE
model as the MoE family of its attention).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from angelptm.config import ModelConfig
from angelptm.errors import UserError


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str
    qk_norm: str = "none"  # where its per-head q/k norm sits: none, before_rope, after_rope
    qk_norm_names: tuple[str, str] = ("", "")  # Hugging Face module names of the q and k norms
    qkv_bias: Optional[bool] = None  # fixed by the architecture; None: config.json's attention_bias
    o_bias: Optional[bool] = None
    sliding_window: bool = False  # whether config.json's sliding_window is in force
    ntk_alpha_rope: bool = False  # whether rope type dynamic with an alpha is Hunyuan's fixed stretch of the base
    moe: bool = False  # whether its layers hold experts (`angelptm.models.hf_moe` reads and writes them)
    defaults: tuple[tuple[str, Any], ...] = ()  # the config class's values for keys config.json may omit


FAMILIES = {family.model_type: family for family in (
    Family("llama", "LlamaForCausalLM"),
    Family("mistral", "MistralForCausalLM", qkv_bias=False, o_bias=False, sliding_window=True,
           defaults=(("sliding_window", 4096),)),
    Family("qwen2", "Qwen2ForCausalLM", qkv_bias=True, o_bias=False),
    Family("qwen3", "Qwen3ForCausalLM", qk_norm="before_rope", qk_norm_names=("self_attn.q_norm", "self_attn.k_norm"),
           defaults=(("head_dim", 128),)),
    Family("hunyuan_v1_dense", "HunYuanDenseV1ForCausalLM", qk_norm="after_rope",
           qk_norm_names=("self_attn.query_layernorm", "self_attn.key_layernorm"), ntk_alpha_rope=True,
           defaults=(("rms_norm_eps", 1e-5),)),
    Family("mixtral", "MixtralForCausalLM", qkv_bias=False, o_bias=False, sliding_window=True, moe=True,
           defaults=(("rms_norm_eps", 1e-5), ("rope_theta", 1e6))),
    Family("qwen3_moe", "Qwen3MoeForCausalLM", qk_norm="before_rope",
           qk_norm_names=("self_attn.q_norm", "self_attn.k_norm"), moe=True,
           defaults=(("norm_topk_prob", False), ("decoder_sparse_step", 1))),
    Family("hunyuan_v1_moe", "HunYuanMoEV1ForCausalLM", qk_norm="after_rope",
           qk_norm_names=("self_attn.query_layernorm", "self_attn.key_layernorm"), ntk_alpha_rope=True, moe=True,
           defaults=(("rms_norm_eps", 1e-5),)),
)}
# The MoE family whose attention is each dense family's: where an MoE model with its options exports.
_MOE_FAMILY_OF = {"llama": "mixtral", "mistral": "mixtral", "qwen3": "qwen3_moe", "hunyuan_v1_dense": "hunyuan_v1_moe"}
# Families transformers has that we recognise and refuse, with the reason.
_REFUSED = {
    "qwen2_moe": "its shared expert's output is scaled by a per-token sigmoid gate (shared_expert_gate), which "
                 "angelptm's MoE layer does not compute; import a Mixtral, Qwen3-MoE or Hunyuan MoE model",
}


def family_of(hf: dict[str, Any]) -> Family:
    """The family of a config.json, or UserError naming its model_type."""
    if hf.get("model_type") in _REFUSED:
        raise UserError(f"model_type={hf['model_type']} is not imported: {_REFUSED[hf['model_type']]}")
    family = FAMILIES.get(hf.get("model_type"))
    if family is None:
        raise UserError(
            f"model_type={hf.get('model_type')} (architectures {hf.get('architectures')}) is not a family angelptm "
            f"converts; it imports {', '.join(FAMILIES)}"
        )
    return family


def with_defaults(hf: dict[str, Any], family: Family) -> dict[str, Any]:
    """config.json with the family's defaults filled in where it leaves a key out."""
    return dict(family.defaults) | hf


def _rope_type(spec: Optional[dict[str, Any]]) -> str:
    """transformers 5 names it rope_type, transformers 4 type (older) or rope_type."""
    return (spec or {}).get("rope_type", (spec or {}).get("type", "default"))


def _rope(hf: dict[str, Any], family: Family, head_dim: int) -> dict[str, Any]:
    """rope_theta and rope_scaling from transformers 4's rope_theta + rope_scaling or 5's rope_parameters."""
    scaling, params = hf.get("rope_scaling"), hf.get("rope_parameters")
    for key, value in (("rope_scaling", scaling), ("rope_parameters", params)):
        if value is not None and not isinstance(value, dict):
            raise UserError(f"{key}={value!r} is not a mapping; fix config.json")
    if scaling and params and _rope_type(scaling) != _rope_type(params):
        raise UserError(f"config.json gives rope_scaling (type {_rope_type(scaling)}) and rope_parameters (type "
                        f"{_rope_type(params)}), which disagree; keep the one the model was trained with")
    spec = params or scaling or {}
    rope_type = _rope_type(spec)
    theta = float(spec.get("rope_theta", hf.get("rope_theta", 10000.0)))
    partial = spec.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise UserError(f"the model uses partial_rotary_factor={partial}; angelptm rotates whole heads, "
                        "import a model with partial_rotary_factor 1")
    if rope_type == "default":
        return {"rope_theta": theta, "rope_scaling": None}
    if family.ntk_alpha_rope and rope_type == "dynamic" and spec.get("alpha"):
        # Hunyuan's NTK-alpha RoPE stretches the base once, whatever the sequence length.
        return {"rope_theta": theta * spec["alpha"] ** (head_dim / (head_dim - 2)), "rope_scaling": None}
    needs = {"linear": ("factor",), "dynamic": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor")}.get(rope_type)
    if needs is None:
        raise UserError(f"the model uses rope_type={rope_type}, which angelptm does not implement; import a model "
                        "with default, linear, dynamic or llama3 RoPE")
    missing = [key for key in needs if not isinstance(spec.get(key), (int, float))]
    if missing:
        raise UserError(f"rope_type={rope_type} needs a number {missing[0]}, which config.json's rope parameters lack")
    section = {"type": rope_type, **{key: float(spec[key]) for key in needs}}
    if rope_type == "llama3":  # transformers' default: the context the config gives
        section["original_max_position_embeddings"] = spec.get(
            "original_max_position_embeddings", hf.get("max_position_embeddings", 2048))
    return {"rope_theta": theta, "rope_scaling": section}


def _attention(hf: dict[str, Any], family: Family) -> dict[str, Any]:
    """The bias, q/k norm and window options of the family's attention."""
    attention_bias = bool(hf.get("attention_bias", False))
    qkv_bias = attention_bias if family.qkv_bias is None else family.qkv_bias
    o_bias = attention_bias if family.o_bias is None else family.o_bias
    window = hf.get("sliding_window") if family.sliding_window else None
    sliding_layers = hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or [])
    if sliding_layers and not family.sliding_window:
        raise UserError(f"the model uses sliding-window layers (use_sliding_window / layer_types) on some layers only, "
                        f"which angelptm's {family.model_type} import does not compute; import a model without them")
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window <= 0):
        raise UserError(f"sliding_window={window!r} is not a positive integer or null; fix config.json")
    return {"qkv_bias": qkv_bias, "o_bias": o_bias, "qk_norm": family.qk_norm, "sliding_window": window}


def options_from_hf(hf: dict[str, Any], family: Family, head_dim: int) -> dict[str, Any]:
    """The model-section keys (RoPE, biases, q/k norm, window) a family's config.json sets."""
    return _rope(hf, family, head_dim) | _attention(hf, family)


def family_for(cfg: ModelConfig) -> Family:
    """The family that computes what a model with these options computes; UserError if none does."""
    same_bias = cfg.qkv_bias == cfg.o_bias
    if cfg.qk_norm != "none":
        family = FAMILIES["qwen3" if cfg.qk_norm == "before_rope" else "hunyuan_v1_dense"]
        ok = same_bias and cfg.sliding_window is None
    elif cfg.sliding_window is not None:
        family, ok = FAMILIES["mistral"], not (cfg.qkv_bias or cfg.o_bias)
    elif cfg.qkv_bias and not cfg.o_bias:
        family, ok = FAMILIES["qwen2"], True
    else:
        family, ok = FAMILIES["llama"], same_bias
    moe = cfg.moe.n_experts > 0
    if ok and moe:
        family = FAMILIES.get(_MOE_FAMILY_OF.get(family.model_type, ""))
        ok = family is not None and all(fixed is None or fixed == ours for fixed, ours in
                                        ((family.qkv_bias, cfg.qkv_bias), (family.o_bias, cfg.o_bias)))
    if not ok:
        options = {k: v for k, v in dataclasses.asdict(cfg).items()
                   if k in ("qkv_bias", "o_bias", "qk_norm", "sliding_window")}
        candidates = [f.model_type for f in FAMILIES.values() if f.moe == moe]
        raise UserError(f"no Hugging Face {'MoE ' if moe else ''}family computes model {options}; export a model "
                        f"whose options one of {', '.join(candidates)} has")
    return family


def hf_family_config(cfg: ModelConfig, family: Family) -> dict[str, Any]:
    """The config.json keys of `family` that give our options (those it has no key for are fixed by it)."""
    keys: dict[str, Any] = {"mlp_bias": False} if family.model_type == "llama" else {}
    if family.qkv_bias is None:
        keys["attention_bias"] = cfg.qkv_bias
    if family.sliding_window:
        keys["sliding_window"] = cfg.sliding_window
    if family.model_type in ("qwen2", "qwen3", "qwen3_moe"):
        keys["use_sliding_window"] = False
    return keys


def hf_rope_config(cfg: ModelConfig) -> dict[str, Any]:
    """rope_theta and, when scaled, rope_scaling: transformers 4 reads them and 5 converts them."""
    keys: dict[str, Any] = {"rope_theta": cfg.rope_theta}
    r = cfg.rope_scaling
    if r is not None:
        keys["rope_scaling"] = {"rope_type": r.type, "factor": r.factor}
        if r.type == "llama3":
            keys["rope_scaling"].update(low_freq_factor=r.low_freq_factor, high_freq_factor=r.high_freq_factor,
                                        original_max_position_embeddings=r.original_max_position_embeddings)
    return keys


def attention_name_pairs(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(Hugging Face, our) names, within a layer, of the biases and q/k norm weights the options add."""
    pairs = []
    if cfg.qkv_bias:
        pairs += [(f"self_attn.{x}_proj.bias", f"attention.w{x}.bias") for x in "qkv"]
    if cfg.o_bias:
        pairs.append(("self_attn.o_proj.bias", "attention.wo.bias"))
    if cfg.qk_norm != "none":
        q_name, k_name = family_for(cfg).qk_norm_names
        pairs += [(f"{q_name}.weight", "attention.q_norm.weight"), (f"{k_name}.weight", "attention.k_norm.weight")]
    return pairs
