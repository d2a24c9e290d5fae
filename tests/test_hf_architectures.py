"""Hugging Face families beyond plain Llama: each tiny random model, built and saved with transformers,
imports into angelptm with logits within 1e-5 of transformers' (fp32), exports back into a folder
transformers loads with the same logits; the options survive tensor parallelism; what we cannot
compute is refused in one line."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    HunYuanDenseV1Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from angelptm.config import config_from_dict
from angelptm.distributed.parity import TINY_JOB, compare, run_layouts
from angelptm.errors import ConfigError, UserError
from angelptm.generate import generate_ids
from angelptm.models.hf import config_from_hf, export_hf, import_hf
from angelptm.models.llama import build_llama
from angelptm.train.checkpoint import load_model, save_model_checkpoint
from conftest import one_line
from test_hf import randomize  # every parameter random, biases too; norm weights near one

SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             intermediate_size=96, vocab_size=300, max_position_embeddings=128)
TOKENS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
TOLERANCE = 1e-5
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

# name -> (config class, its extra arguments, the model-section options the import must give)
ARCHITECTURES = {
    "llama3 rope": (LlamaConfig, {"rope_parameters": LLAMA3_ROPE}, {"rope_scaling": {"type": "llama3"}}),
    "linear rope": (LlamaConfig, {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}},
                    {"rope_scaling": {"type": "linear", "factor": 4.0}}),
    "dynamic rope": (LlamaConfig, {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}},
                     {"rope_scaling": {"type": "dynamic", "factor": 4.0}}),
    "llama attention_bias": (LlamaConfig, {"attention_bias": True}, {"qkv_bias": True, "o_bias": True}),
    "qwen2 tied": (Qwen2Config, {"tie_word_embeddings": True}, {"qkv_bias": True, "o_bias": False}),
    "qwen3": (Qwen3Config, {}, {"qk_norm": "before_rope"}),
    "qwen3 attention_bias": (Qwen3Config, {"attention_bias": True}, {"qk_norm": "before_rope", "qkv_bias": True}),
    "mistral window": (MistralConfig, {"sliding_window": 8}, {"sliding_window": 8}),  # shorter than TOKENS
    "hunyuan dense": (HunYuanDenseV1Config, {"attention_bias": True}, {"qk_norm": "after_rope", "o_bias": True}),
    "hunyuan ntk alpha": (HunYuanDenseV1Config,
                          {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "alpha": 50.0,
                                               "factor": 1.0}},
                          {"qk_norm": "after_rope", "rope_theta": 10000.0 * 50.0 ** (16 / 14)}),
}


def save_hf_model(folder: Path, config_class, extra: dict) -> Path:
    model = AutoModelForCausalLM.from_config(config_class(**SIZES | extra))
    randomize(model, seed=1)
    model.save_pretrained(folder)
    return folder


@torch.no_grad()
def transformers_logits(folder: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    return model(TOKENS).logits


@torch.no_grad()
def angelptm_logits(ckpt: Path) -> torch.Tensor:
    return load_model(ckpt)[1].eval()(TOKENS)


def max_difference(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return (ours - reference).abs().max().item()


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_import_and_export_match_transformers(tmp_path, one_thread, name):
    config_class, extra, options = ARCHITECTURES[name]
    hf_dir = save_hf_model(tmp_path / "hf", config_class, extra)
    reference = transformers_logits(hf_dir)

    ckpt = import_hf(hf_dir, tmp_path / "imported")
    model_cfg = load_model(ckpt)[0].model
    for key, value in options.items():
        got = getattr(model_cfg, key)
        got = {k: dataclasses.asdict(got)[k] for k in value} if isinstance(value, dict) else got
        assert got == (pytest.approx(value) if isinstance(value, float) else value), key
    assert max_difference(angelptm_logits(ckpt), reference) < TOLERANCE

    out = export_hf(ckpt, tmp_path / "exported")
    assert json.loads((out / "config.json").read_text())["model_type"] == config_class.model_type
    assert max_difference(transformers_logits(out), reference) < TOLERANCE


@pytest.mark.parametrize("name", ["mistral window", "qwen3", "hunyuan dense"])
def test_greedy_generation_matches_transformers(tmp_path, one_thread, name):
    """25 tokens, past Mistral's window of 8: transformers' cached decoding and our recomputed window agree."""
    config_class, extra, _ = ARCHITECTURES[name]
    hf_dir = save_hf_model(tmp_path / "hf", config_class, extra)
    prompt = TOKENS[0, :5]
    reference = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    expected = reference.generate(prompt[None], max_new_tokens=20, min_new_tokens=20, do_sample=False)[0]
    cfg, model = load_model(import_hf(hf_dir, tmp_path / "imported"))
    assert generate_ids(model, prompt.tolist(), 20, cfg.model.max_seq_len, temperature=0) == expected.tolist()


# name -> the options that, set back to plain Llama's, must move the logits away from transformers'
WITHOUT = {
    "llama3 rope": {"rope_scaling": None},
    "linear rope": {"rope_scaling": None},
    "llama attention_bias": {"qkv_bias": False, "o_bias": False},
    "qwen3": {"qk_norm": "none"},
    "hunyuan dense": {"qk_norm": "before_rope"},  # Hunyuan normalises after RoPE, Qwen3 before
    "mistral window": {"sliding_window": None},
    "hunyuan ntk alpha": {"rope_theta": 10000.0},
}


@pytest.mark.parametrize("name", list(WITHOUT))
def test_each_option_changes_the_logits(tmp_path, one_thread, name):
    """The parity above proves something only where the option matters on these tokens: the same weights
    without it give logits far from transformers'."""
    config_class, extra, _ = ARCHITECTURES[name]
    hf_dir = save_hf_model(tmp_path / "hf", config_class, extra)
    cfg, model = load_model(import_hf(hf_dir, tmp_path / "imported"))
    without = build_llama(dataclasses.replace(cfg.model, **WITHOUT[name]), "cpu")
    kept = without.state_dict().keys()
    without.load_state_dict({k: v for k, v in model.state_dict().items() if k in kept})
    with torch.no_grad():
        assert max_difference(without.eval()(TOKENS), transformers_logits(hf_dir)) > 1e-3


def test_transformers_4_rope_scaling_reads_as_rope_parameters(tmp_path):
    """Llama 3.1's config.json on the Hub: top-level rope_theta and rope_scaling (type under either name)."""
    config_class, extra, _ = ARCHITECTURES["llama3 rope"]
    saved = json.loads((save_hf_model(tmp_path / "hf", config_class, extra) / "config.json").read_text())
    scaling = {k: v for k, v in saved["rope_parameters"].items() if k not in ("rope_theta", "rope_type")}
    legacy = {k: v for k, v in saved.items() if k != "rope_parameters"} | {"rope_theta": 500000.0}
    for type_key in ("rope_type", "type"):
        assert config_from_hf(legacy | {"rope_scaling": scaling | {type_key: "llama3"}}) == config_from_hf(saved)


# A model with every new option, small enough for 2 processes on 2 cores; one kv head, so at tp 2 the
# kv projections and their biases are copies on both ranks (the harder sharding case).
OPTIONS_JOB = {**TINY_JOB, "model": {**TINY_JOB["model"], "n_kv_heads": 1, "qkv_bias": True,
                                     "qk_norm": "before_rope", "sliding_window": 16,
                                     "rope_scaling": {"type": "llama3", "original_max_position_embeddings": 16}},
               "train": {**TINY_JOB["train"], "steps": 6}}


@pytest.mark.slow
def test_tensor_parallel_options_match_single_process():
    """Biases sliced with their weights and q/k norms summed over the heads of every rank: a tp 2 run
    (with and without sequence parallelism) gives the single-process losses and final weights."""
    reference, = run_layouts([{}], 1, OPTIONS_JOB)
    for layout in run_layouts([{"tp": 2}, {"tp": 2, "sequence_parallel": False}], 2, OPTIONS_JOB):
        loss_diff, weight_diff = compare(layout, reference)
        assert abs(layout.losses[0] - reference.losses[0]) / reference.losses[0] < 1e-6  # the first forward
        assert loss_diff < 1e-4 and weight_diff < 1e-4, (loss_diff, weight_diff)
    assert reference.weights["layers.0.attention.wk.bias"].abs().max() > 0  # the biases did train
    assert (reference.weights["layers.0.attention.q_norm.weight"] - 1).abs().max() > 0


def edit(**changes):
    def spoil(folder: Path) -> None:
        path = folder / "config.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | changes))
    return spoil


REFUSED = {
    "unknown rope type": (LlamaConfig, edit(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}),
                          "rope_type=yarn"),
    "llama3 without its factors": (LlamaConfig, edit(rope_parameters={"rope_type": "llama3", "factor": 8.0}),
                                   "low_freq_factor"),
    "partial rotary": (LlamaConfig, edit(partial_rotary_factor=0.5), "partial_rotary_factor"),
    "qwen2 sliding layers": (Qwen2Config, edit(use_sliding_window=True, sliding_window=8, max_window_layers=1,
                                               layer_types=["full_attention", "sliding_attention"]),
                             "sliding-window"),
    "mlp bias": (LlamaConfig, edit(mlp_bias=True), "mlp_bias"),
    "another family": (LlamaConfig, edit(model_type="gemma"), "model_type=gemma"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_features_we_cannot_compute_are_refused_in_one_line(tmp_path, case):
    config_class, spoil, expected = REFUSED[case]
    hf_dir = save_hf_model(tmp_path / "hf", config_class, {})
    spoil(hf_dir)
    with pytest.raises(UserError) as excinfo:
        import_hf(hf_dir, tmp_path / "out")
    assert expected in one_line(str(excinfo.value))
    assert not (tmp_path / "out").exists()


def test_qwen3_without_head_dim_takes_its_default(tmp_path):
    """Qwen3Config's head_dim defaults to 128, not hidden_size / heads: a config.json without it imports so."""
    hf_dir = save_hf_model(tmp_path / "hf", Qwen3Config, {})
    raw = json.loads((hf_dir / "config.json").read_text())
    del raw["head_dim"]
    assert config_from_hf(raw).head_dim == 128


def assert_export_refused(tmp_path: Path, model: dict, expected: str) -> None:
    """A checkpoint of the `model` section exports to nothing, with a one-line error holding `expected`."""
    cfg = config_from_dict({"model": model, "train": {"seq_len": 32}})
    weights = build_llama(cfg.model, "cpu")
    weights.init_weights(seed=0)
    save_model_checkpoint(tmp_path / "ckpt", cfg, weights.state_dict())
    with pytest.raises(UserError) as excinfo:
        export_hf(tmp_path / "ckpt", tmp_path / "out")
    assert expected in one_line(str(excinfo.value))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_export_of_options_no_family_has_is_refused(tmp_path):
    assert_export_refused(tmp_path, {"dim": 64, "n_layers": 1, "n_heads": 4, "ffn_dim": 96, "o_bias": True}, "o_bias")


@pytest.mark.parametrize("sections, expected", [
    ({"model": {"o_bias": True}, "parallel": {"tp": 2}}, "model.o_bias"),
    ({"model": {"sliding_window": 16}, "parallel": {"cp": 2}, "train": {"seq_len": 32}}, "model.sliding_window"),
    ({"model": {"rope_scaling": {"type": "linear", "factor": 0.5}}}, "model.rope_scaling.factor"),
    ({"model": {"rope_scaling": {"low_freq_factor": 4.0, "high_freq_factor": 1.0}}}, "model.rope_scaling"),
    ({"model": {"qk_norm": "after"}}, "model.qk_norm"),
])
def test_option_layouts_we_cannot_compute_are_refused(sections, expected):
    raw = {"model": {"dim": 64, "n_layers": 2, "n_heads": 4, "ffn_dim": 96, "max_seq_len": 64},
           "train": {"seq_len": 64}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    with pytest.raises(ConfigError) as excinfo:
        config_from_dict(raw)
    assert expected in one_line(str(excinfo.value))


def test_a_window_covering_the_context_is_kept(tmp_path):
    """Mistral's default window (4096) is longer than this model's context: plain causal attention
    computes it, and the export writes the window back."""
    hf_dir = save_hf_model(tmp_path / "hf", MistralConfig, {"sliding_window": 4096})
    ckpt = import_hf(hf_dir, tmp_path / "imported")
    assert load_model(ckpt)[0].model.sliding_window == 4096
    exported = json.loads((export_hf(ckpt, tmp_path / "out") / "config.json").read_text())
    assert (exported["model_type"], exported["sliding_window"]) == ("mistral", 4096)
