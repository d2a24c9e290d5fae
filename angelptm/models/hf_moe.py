"""The experts of Hugging Face MoE checkpoints (Mixtral, Qwen3-MoE, Hunyuan MoE) in angelptm's terms:
config.json's expert keys read into `model.moe` and written back, and the names of the expert weights
on both sides (`angelptm.models.hf` moves the tensors).

Where each family keeps an MoE layer, within `model.layers.<i>.`:

    mixtral         block_sparse_moe.gate, block_sparse_moe.experts.<e>.{w1, w3, w2}; experts in
                    every layer, intermediate_size wide
    qwen3_moe       mlp.gate, mlp.experts.<e>.{gate, up, down}_proj; the layers of mlp_only_layers
                    keep a dense MLP intermediate_size wide, experts are moe_intermediate_size wide
    hunyuan_v1_moe  mlp.gate.wg, mlp.experts.<e>.{gate, up, down}_proj and one shared expert
                    mlp.shared_mlp.{gate, up, down}_proj, all intermediate_size wide; every layer

That per-expert form is what save_pretrained writes and every transformers version reads; we stack
each kind into one (n_experts, ...) parameter of `GroupedExperts`. transformers 5 fuses the experts
on load into 3-D `mlp.experts.gate_up_proj` (gate rows, then up) and `mlp.experts.down_proj` (and
renames Mixtral's block_sparse_moe to mlp); a checkpoint written in that fused form imports too
(`per_expert_form`). Export writes the per-expert form.

The routers are softmax over the experts, top k, the k gates renormalised to sum to 1 (Mixtral and
Hunyuan always, Qwen3-MoE with norm_topk_prob). Ours renormalises when k > 1 and keeps the raw
probability of a single expert, so a config.json that asks for the other one (norm_topk_prob false
with k > 1, renormalisation with k = 1) is refused in one line, as are dense layers other than the
first few (our `model.moe.first_dense_layers`). Where no family expresses an MoE model (a sigmoid
router, a selection bias, shared experts or dense layers the family of its attention lacks), its
export is refused the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from angelptm.config import ModelConfig
from angelptm.errors import UserError
from angelptm.models.hf_families import Family
from angelptm.models.llama import is_moe_layer

# Our GroupedExperts' stacked weights, in the order of an expert's (gate, up, down) projections.
_OUR_EXPERT_WEIGHTS = ("w1", "w3", "w2")
# Our shared experts (one dense SwiGLU), weight by weight, and the Hugging Face MLP names they take.
_SHARED_NAMES = (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2"))
_FUSED_BLOCK = "mlp"  # transformers 5's name of the MoE module in memory, for every family


@dataclass(frozen=True)
class ExpertLayout:
    """How one family writes an MoE layer and what its config.json calls the expert settings."""

    block: str  # the MoE module within a layer, as save_pretrained writes it
    router: str  # the router's linear layer within the block
    expert_weights: tuple[str, str, str]  # an expert's gate, up and down projections
    # config.json's names of a setting, the first the one export writes (transformers reads any of them)
    n_experts_keys: tuple[str, ...]
    top_k_keys: tuple[str, ...]
    expert_width_key: str  # the key giving an expert's hidden width
    norm_topk_key: str = ""  # the key saying whether the top-k gates are renormalised; "": always
    shared_expert: str = ""  # the shared expert's module within the block (as wide as an expert); "": none
    dense_layers_key: str = ""  # the key listing the layers without experts; "": experts in every layer


LAYOUTS = {
    "mixtral": ExpertLayout("block_sparse_moe", "gate", ("w1", "w3", "w2"), ("num_local_experts", "num_experts"),
                            ("num_experts_per_tok",), "intermediate_size"),
    # transformers 5 writes num_local_experts, the Hub's checkpoints (and transformers 4) num_experts
    "qwen3_moe": ExpertLayout("mlp", "gate", ("gate_proj", "up_proj", "down_proj"),
                              ("num_experts", "num_local_experts"), ("num_experts_per_tok",), "moe_intermediate_size",
                              norm_topk_key="norm_topk_prob", dense_layers_key="mlp_only_layers"),
    "hunyuan_v1_moe": ExpertLayout("mlp", "gate.wg", ("gate_proj", "up_proj", "down_proj"),
                                   ("num_experts", "num_local_experts"), ("moe_topk", "num_experts_per_tok"),
                                   "intermediate_size", shared_expert="shared_mlp"),
}


# ---------------------------------------------------------------------------------------------
# Config


def _one_value(hf: dict[str, Any], keys: tuple[str, ...]) -> tuple[str, int]:
    """The first of `keys` config.json has and its integer value; Hunyuan may give one per layer,
    which we accept when all are equal."""
    key = next((k for k in keys if k in hf), keys[0])
    value = hf.get(key)
    if isinstance(value, list) and value and len(set(value)) == 1:
        value = value[0]
    if isinstance(value, list):
        raise UserError(f"{key}={value} varies by layer; angelptm's model.moe has one value for every layer, "
                        f"import a model with a single {key}")
    if not isinstance(value, int) or isinstance(value, bool):
        raise UserError(f"{key}={value!r} is missing or not an integer; an MoE config.json needs an integer {key}")
    return key, value


def _check_gates(family: Family, top_k_key: str, top_k: int, renormalised: bool) -> None:
    """Refuse a router whose gates ours does not give: renormalised when k > 1, the raw probability when k = 1."""
    layout = LAYOUTS[family.model_type]
    if top_k > 1 and not renormalised:
        raise UserError(f"{layout.norm_topk_key}=false with {top_k_key}={top_k}: the model weights its "
                        f"experts by their raw router probabilities, angelptm's router renormalises the top {top_k} "
                        f"to sum to 1; import a model with {layout.norm_topk_key} true")
    if top_k == 1 and renormalised:
        how = f"{layout.norm_topk_key}=true" if layout.norm_topk_key else f"as {family.model_type} always has"
        raise UserError(f"{top_k_key}=1 with renormalised gates ({how}) gives the one expert weight 1, "
                        f"angelptm's router its softmax probability; import a model with {top_k_key} >= 2"
                        + (f" or {layout.norm_topk_key} false" if layout.norm_topk_key else ""))


def _first_dense_layers(hf: dict[str, Any], layout: ExpertLayout) -> int:
    """How many first layers keep a dense MLP; UserError where the dense layers are not the first ones."""
    step = hf.get("decoder_sparse_step", 1)
    if step != 1:
        raise UserError(f"decoder_sparse_step={step!r} puts experts in one layer of every {step}; angelptm's MoE "
                        "layers are all those after model.moe.first_dense_layers, import a model with "
                        "decoder_sparse_step 1")
    dense = (hf.get(layout.dense_layers_key) or []) if layout.dense_layers_key else []
    first = set(range(len(set(dense)))) if isinstance(dense, list) else None
    if first is None or set(dense) != first:
        raise UserError(f"{layout.dense_layers_key}={dense!r} are not the first layers; angelptm keeps a dense "
                        f"feed-forward only in the first model.moe.first_dense_layers layers, import a model whose "
                        f"{layout.dense_layers_key} are 0..N-1")
    return len(first)


def moe_from_hf(hf: dict[str, Any], family: Family) -> dict[str, Any]:
    """The `model.moe` section a family's config.json (defaults filled in) gives; UserError for routing
    our MoE layer does not compute."""
    layout = LAYOUTS[family.model_type]
    top_k_key, top_k = _one_value(hf, layout.top_k_keys)
    _check_gates(family, top_k_key, top_k, bool(hf.get(layout.norm_topk_key)) if layout.norm_topk_key else True)
    return {
        "n_experts": _one_value(hf, layout.n_experts_keys)[1],
        "top_k": top_k,
        "expert_ffn_dim": _one_value(hf, (layout.expert_width_key,))[1],
        "n_shared_experts": 1 if layout.shared_expert else 0,
        "first_dense_layers": _first_dense_layers(hf, layout),
        "router": "softmax",
    }


def hf_moe_config(cfg: ModelConfig, family: Family) -> dict[str, Any]:
    """The config.json keys of an MoE family that give `cfg.moe`; UserError where the family cannot
    express it. A capacity_factor is left behind: transformers' MoE layers are dropless."""
    moe, layout = cfg.moe, LAYOUTS[family.model_type]
    where = f"{family.model_type}, the MoE family of the model's attention options,"
    if moe.router != "softmax":
        raise UserError(f"model.moe.router={moe.router}: the MoE families angelptm exports ({', '.join(LAYOUTS)}) "
                        "route by softmax; export a model with model.moe.router softmax")
    if moe.balance == "aux_free":
        raise UserError("model.moe.balance=aux_free adds a learnt per-expert bias to the expert choice, which no "
                        f"Hugging Face family angelptm exports ({', '.join(LAYOUTS)}) has; export a model trained "
                        "with balance aux_loss")
    shared = 1 if layout.shared_expert else 0
    if moe.n_shared_experts != shared:
        has = "one shared expert, as wide as a routed one" if shared else "no shared expert"
        raise UserError(f"model.moe.n_shared_experts={moe.n_shared_experts}: {where} has {has}; no Hugging Face "
                        f"family angelptm exports computes this model, export one with n_shared_experts={shared}")
    if moe.first_dense_layers and not layout.dense_layers_key:
        raise UserError(f"model.moe.first_dense_layers={moe.first_dense_layers}: {where} has experts in every "
                        "layer; no Hugging Face family angelptm exports computes this model, export one with "
                        "first_dense_layers=0")
    renormalised = moe.top_k > 1
    if not layout.norm_topk_key and not renormalised:
        raise UserError(f"model.moe.top_k=1: {where} gives a single expert weight 1 where angelptm gives it its "
                        "router probability; no Hugging Face family angelptm exports computes this model, export "
                        "one with top_k >= 2")
    keys: dict[str, Any] = {layout.n_experts_keys[0]: moe.n_experts, layout.top_k_keys[0]: moe.top_k,
                            layout.expert_width_key: moe.expert_ffn_dim}
    if layout.norm_topk_key:
        keys[layout.norm_topk_key] = renormalised
    if layout.dense_layers_key:
        keys |= {layout.dense_layers_key: list(range(moe.first_dense_layers)), "decoder_sparse_step": 1}
    return keys


# ---------------------------------------------------------------------------------------------
# Weight names


def layer_name_pairs(family: Family, layer: int) -> list[tuple[str, str]]:
    """(Hugging Face, our) names of the one-to-one weights of MoE layer `layer`: router, shared expert."""
    layout = LAYOUTS[family.model_type]
    hf, ours = f"model.layers.{layer}.{layout.block}", f"layers.{layer}.feed_forward"
    pairs = [(f"{hf}.{layout.router}.weight", f"{ours}.router.weight")]
    if layout.shared_expert:
        pairs += [(f"{hf}.{layout.shared_expert}.{theirs}.weight", f"{ours}.shared_experts.{w}.weight")
                  for theirs, w in _SHARED_NAMES]
    return pairs


def expert_groups(cfg: ModelConfig, family: Family) -> list[tuple[str, list[str]]]:
    """(our stacked weight, the Hugging Face names of its experts in order) for every MoE layer."""
    layout, groups = LAYOUTS[family.model_type], []
    for layer in range(cfg.n_layers):
        if not is_moe_layer(cfg, layer):
            continue
        hf = f"model.layers.{layer}.{layout.block}.experts"
        for theirs, ours in zip(layout.expert_weights, _OUR_EXPERT_WEIGHTS):
            names = [f"{hf}.{e}.{theirs}.weight" for e in range(cfg.moe.n_experts)]
            groups.append((f"layers.{layer}.feed_forward.experts.{ours}", names))
    return groups


def per_expert_form(hf_state: dict[str, torch.Tensor], family: Family) -> dict[str, torch.Tensor]:
    """The weights with transformers 5's fused expert tensors split into the per-expert ones
    save_pretrained writes (views, no copies); weights already in that form pass unchanged."""
    layout = LAYOUTS[family.model_type]
    gate, up, down = layout.expert_weights
    state: dict[str, torch.Tensor] = {}
    for name, tensor in hf_state.items():
        layer, fused, rest = name.partition(f".{_FUSED_BLOCK}.")
        saved = f"{layer}.{layout.block}"
        if fused and rest in ("experts.gate_up_proj", "experts.down_proj") and tensor.dim() == 3:
            if rest == "experts.gate_up_proj":  # (experts, 2 · hidden, dim): the gate rows, then the up rows
                kinds = tuple(zip((gate, up), tensor.chunk(2, dim=1)))
            else:
                kinds = ((down, tensor),)
            for kind, stacked in kinds:
                state.update({f"{saved}.experts.{e}.{kind}.weight": w for e, w in enumerate(stacked.unbind(0))})
        elif fused and rest == f"{layout.router}.weight":
            state[f"{saved}.{rest}"] = tensor  # Mixtral's router, renamed like its block
        else:
            state[name] = tensor
    return state
