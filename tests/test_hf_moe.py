"""Hugging Face MoE families (Mixtral, Qwen3-MoE, Hunyuan MoE): each tiny random model, built and saved
with transformers, imports into angelptm with logits within 1e-5 of transformers' (fp32), exports back
into a folder transformers loads, with no key missing or left over, to the same logits and the very
same tensors; routing our MoE layer does not compute is refused in one line, both ways."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    HunYuanMoEV1Config,
    MixtralConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

from angelptm.errors import UserError
from angelptm.models.hf import export_hf, import_hf
from angelptm.train.checkpoint import load_model
from conftest import one_line
from test_hf_architectures import (
    assert_export_refused,
    TOKENS,
    TOLERANCE,
    angelptm_logits,
    edit,
    max_difference,
    save_hf_model,
    transformers_logits,
)

QWEN3_MOE = {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": True}

# name -> (config class, its extra arguments, the model.moe settings the import must give)
MOE_ARCHITECTURES = {
    "mixtral": (MixtralConfig, {"num_local_experts": 4, "num_experts_per_tok": 2},
                {"n_experts": 4, "top_k": 2, "expert_ffn_dim": 96, "n_shared_experts": 0}),
    "mixtral window": (MixtralConfig, {"num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": 8},
                       {"n_experts": 8, "top_k": 2}),
    "qwen3_moe": (Qwen3MoeConfig, QWEN3_MOE,
                  {"n_experts": 8, "top_k": 2, "expert_ffn_dim": 32, "first_dense_layers": 0}),
    "qwen3_moe first dense layers": (Qwen3MoeConfig, QWEN3_MOE | {"num_hidden_layers": 3, "mlp_only_layers": [0],
                                                                  "attention_bias": True},
                                     {"first_dense_layers": 1}),
    "qwen3_moe top-1": (Qwen3MoeConfig, QWEN3_MOE | {"num_experts_per_tok": 1, "norm_topk_prob": False},
                        {"top_k": 1}),
    "hunyuan_v1_moe shared expert": (HunYuanMoEV1Config, {"num_experts": 4, "moe_topk": 2},
                                     {"n_experts": 4, "top_k": 2, "expert_ffn_dim": 96, "n_shared_experts": 1}),
}


def import_and_check(hf_dir: Path, out: Path, settings: dict) -> Path:
    """Import `hf_dir` (as the CLI does), check its model.moe settings and its logits against transformers'."""
    ckpt = import_hf(hf_dir, out)
    moe = dataclasses.asdict(load_model(ckpt)[0].model.moe)
    assert {key: moe[key] for key in settings} == settings
    assert max_difference(angelptm_logits(ckpt), transformers_logits(hf_dir)) < TOLERANCE
    return ckpt


@pytest.mark.parametrize("name", list(MOE_ARCHITECTURES))
def test_import_and_export_match_transformers(tmp_path, one_thread, name):
    config_class, extra, settings = MOE_ARCHITECTURES[name]
    hf_dir = save_hf_model(tmp_path / "hf", config_class, extra)
    reference = transformers_logits(hf_dir)
    ckpt = import_and_check(hf_dir, tmp_path / "imported", settings)

    out = export_hf(ckpt, tmp_path / "exported")
    assert json.loads((out / "config.json").read_text())["model_type"] == config_class.model_type
    exported, loading = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", output_loading_info=True)
    assert not any(loading[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")), loading
    with torch.no_grad():
        assert max_difference(exported.eval()(TOKENS).logits, reference) < TOLERANCE
    original, written = load_file(hf_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert written.keys() == original.keys()
    assert all(torch.equal(written[key], original[key]) for key in original)


@pytest.mark.parametrize("name", ["mixtral", "hunyuan_v1_moe shared expert"])
def test_fused_experts_import_too(tmp_path, one_thread, name):
    """The 3-D gate_up_proj / down_proj tensors transformers 5 holds in memory (Mixtral's block renamed
    mlp), written as they are, import to the same model."""
    config_class, extra, settings = MOE_ARCHITECTURES[name]
    hf_dir = save_hf_model(tmp_path / "hf", config_class, extra)
    fused = AutoModelForCausalLM.from_pretrained(hf_dir).state_dict()
    assert any(key.endswith("mlp.experts.gate_up_proj") for key in fused)
    save_file({key: t.contiguous() for key, t in fused.items()}, hf_dir / "model.safetensors",
              metadata={"format": "pt"})
    import_and_check(hf_dir, tmp_path / "imported", settings)


def test_the_parity_depends_on_which_expert_is_which(tmp_path, one_thread):
    """The logit parity proves the expert mapping: the same weights with two experts swapped are far off."""
    config_class, extra, _ = MOE_ARCHITECTURES["qwen3_moe"]
    hf_dir = save_hf_model(tmp_path / "hf", config_class, extra)
    cfg, model = load_model(import_hf(hf_dir, tmp_path / "imported"))
    with torch.no_grad():
        for weight in ("w1", "w2", "w3"):
            stacked = model.get_parameter(f"layers.0.feed_forward.experts.{weight}")
            stacked.copy_(stacked[[1, 0, *range(2, cfg.model.moe.n_experts)]])
        assert max_difference(model.eval()(TOKENS), transformers_logits(hf_dir)) > 1e-3


# case -> (config class, its extra arguments, how config.json is spoilt, what the refusal names)
REFUSED_IMPORTS = {
    "qwen2_moe's gated shared expert": (Qwen2MoeConfig, {"num_experts": 4, "num_experts_per_tok": 2,
                                                         "moe_intermediate_size": 32,
                                                         "shared_expert_intermediate_size": 48}, edit(),
                                        "shared_expert_gate"),
    "raw top-k gates": (Qwen3MoeConfig, QWEN3_MOE, edit(norm_topk_prob=False), "norm_topk_prob=false"),
    "a renormalised single expert": (MixtralConfig, {"num_local_experts": 4}, edit(num_experts_per_tok=1),
                                     "num_experts_per_tok=1"),
    "experts every other layer": (Qwen3MoeConfig, QWEN3_MOE, edit(decoder_sparse_step=2), "decoder_sparse_step=2"),
    "a dense layer after experts": (Qwen3MoeConfig, QWEN3_MOE, edit(mlp_only_layers=[1]), "mlp_only_layers=[1]"),
    "top-k varying by layer": (HunYuanMoEV1Config, {"num_experts": 4, "moe_topk": 2}, edit(moe_topk=[2, 3]),
                               "moe_topk=[2, 3] varies by layer"),
}


@pytest.mark.parametrize("case", list(REFUSED_IMPORTS))
def test_routing_we_cannot_compute_is_refused_on_import(tmp_path, case):
    config_class, extra, spoil, expected = REFUSED_IMPORTS[case]
    hf_dir = save_hf_model(tmp_path / "hf", config_class, extra)
    spoil(hf_dir)
    with pytest.raises(UserError) as excinfo:
        import_hf(hf_dir, tmp_path / "out")
    assert expected in one_line(str(excinfo.value))
    assert not (tmp_path / "out").exists()


def test_a_uniform_per_layer_top_k_imports(tmp_path, one_thread):
    """Hunyuan-A13B's config.json gives moe_topk once per layer, all equal."""
    hf_dir = save_hf_model(tmp_path / "hf", HunYuanMoEV1Config, {"num_experts": 4, "moe_topk": 2})
    edit(moe_topk=[2, 2])(hf_dir)
    import_and_check(hf_dir, tmp_path / "imported", {"top_k": 2})


# case -> (model and model.moe settings, what the refusal names); a model without q/k norm exports as Mixtral
REFUSED_EXPORTS = {
    "sigmoid router": ({}, {"router": "sigmoid"}, "model.moe.router=sigmoid"),
    "selection bias": ({}, {"balance": "aux_free"}, "model.moe.balance=aux_free"),
    "mixtral with a shared expert": ({}, {"n_shared_experts": 1}, "model.moe.n_shared_experts=1"),
    "mixtral with a dense layer": ({}, {"first_dense_layers": 1}, "model.moe.first_dense_layers=1"),
    "mixtral with one expert a token": ({}, {"top_k": 1}, "model.moe.top_k=1"),
    "hunyuan without its shared expert": ({"qk_norm": "after_rope"}, {}, "model.moe.n_shared_experts=0"),
    "qwen2 attention": ({"qkv_bias": True}, {}, "no Hugging Face MoE family"),
}


@pytest.mark.parametrize("case", list(REFUSED_EXPORTS))
def test_moe_models_no_family_computes_are_refused_on_export(tmp_path, case):
    model, moe, expected = REFUSED_EXPORTS[case]
    assert_export_refused(tmp_path, {"dim": 64, "n_layers": 2, "n_heads": 4, "ffn_dim": 96, **model,
                                     "moe": {"n_experts": 4, "expert_ffn_dim": 32, **moe}}, expected)
