"""`model.head_dim` set apart from dim / n_heads, as Qwen3 (0.6B: hidden 1024, 16 heads of 128) sets it:
the projections, q/k norms and RoPE tables take its width, a random such Qwen3 built with transformers
imports with logits within 1e-5 of transformers' (fp32) and exports back unchanged, tp 2 and Ulysses
reproduce the single process, and the counts and the planner's tables equal the real model's."""

import json

import pytest
import torch
import yaml
from transformers import Qwen3Config

from angelptm.config import config_from_dict, load_config, save_config
from angelptm.distributed.parity import TINY_JOB, compare, run_layouts
from angelptm.errors import ConfigError
from angelptm.models.hf import config_from_hf, export_hf, hf_config_from, import_hf
from angelptm.models.llama import build_llama, flops_per_token, num_params
from angelptm.planning.model import model_shape
from angelptm.train.checkpoint import load_model
from conftest import one_line
from test_hf_architectures import TOLERANCE, angelptm_logits, max_difference, save_hf_model, transformers_logits

HEAD_DIM = 32  # twice hidden_size / num_attention_heads = 64 / 4
MODEL = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": HEAD_DIM, "ffn_dim": 96,
         "vocab_size": 300, "max_seq_len": 64}


def _model_cfg(**changes):
    return config_from_dict({"model": {**MODEL, **changes}, "train": {"seq_len": 32}}).model


def test_the_model_takes_head_dim_widths():
    cfg = _model_cfg(qk_norm="before_rope")
    attention = build_llama(cfg, "meta").layers["0"].attention
    shapes = {name: tuple(p.shape) for name, p in attention.named_parameters()}
    assert shapes == {"wq.weight": (4 * HEAD_DIM, 64), "wk.weight": (2 * HEAD_DIM, 64), "wv.weight": (2 * HEAD_DIM, 64),
                      "wo.weight": (64, 4 * HEAD_DIM), "q_norm.weight": (HEAD_DIM,), "k_norm.weight": (HEAD_DIM,)}


def test_qwen3_with_wider_heads_matches_transformers_and_exports_back(tmp_path, one_thread):
    hf_dir = save_hf_model(tmp_path / "hf", Qwen3Config, {"head_dim": HEAD_DIM})
    reference = transformers_logits(hf_dir)

    ckpt = import_hf(hf_dir, tmp_path / "imported")
    cfg, model = load_model(ckpt)
    assert cfg.model.head_dim == HEAD_DIM
    difference = max_difference(angelptm_logits(ckpt), reference)
    print(f"max |logit difference| vs transformers: {difference:.2e}")
    assert difference < TOLERANCE

    out = export_hf(ckpt, tmp_path / "exported")
    assert json.loads((out / "config.json").read_text())["head_dim"] == HEAD_DIM
    assert max_difference(transformers_logits(out), reference) < TOLERANCE
    again_cfg, again = load_model(import_hf(out, tmp_path / "reimported"))
    assert again_cfg.model == cfg.model
    assert again.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())


def test_head_dim_of_hidden_over_heads_imports_as_null():
    """A config.json that spells out the default width (transformers writes head_dim always) imports as
    today's model section, and the export writes that width back."""
    cfg = _model_cfg(head_dim=None)
    hf = hf_config_from(cfg)
    assert hf["head_dim"] == 16
    assert config_from_hf(hf) == cfg  # head_dim null, as cfg's


def test_a_config_yaml_without_head_dim_loads_equal(tmp_path):
    """Checkpoints written before model.head_dim existed: their config.yaml lacks the key."""
    cfg = config_from_dict({"model": {k: v for k, v in MODEL.items() if k != "head_dim"}, "train": {"seq_len": 32}})
    save_config(cfg, tmp_path / "config.yaml")
    raw = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert raw["model"].pop("head_dim") is None
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(raw))
    assert load_config(tmp_path / "old.yaml") == cfg
    assert cfg.model.resolved_head_dim == 16


def test_head_dim_frees_dim_from_dividing_by_n_heads():
    assert _model_cfg(dim=60, n_heads=3, n_kv_heads=1).resolved_head_dim == HEAD_DIM
    with pytest.raises(ConfigError, match="set model.head_dim"):
        _model_cfg(dim=60, n_heads=8, head_dim=None)


@pytest.mark.parametrize("head_dim, expected", [(15, "model.head_dim=15 must be even"),
                                                (0, "model.head_dim=0 must be positive"),
                                                (-4, "model.head_dim=-4 must be positive")])
def test_bad_head_dim_is_refused_in_one_line(head_dim, expected):
    with pytest.raises(ConfigError) as excinfo:
        _model_cfg(head_dim=head_dim)
    assert expected in one_line(str(excinfo.value))


@pytest.mark.parametrize("changes", [{}, {"qk_norm": "before_rope", "qkv_bias": True}, {"tie_embeddings": True}])
def test_counts_equal_the_real_model(changes):
    cfg = _model_cfg(**changes)
    params = dict(build_llama(cfg, "meta").named_parameters())
    assert num_params(cfg) == sum(p.numel() for p in params.values())
    # FLOPs: 6 per matmul weight (the embedding lookup apart unless tied to the head), and the attention
    # scores and values over n_heads · head_dim = 128 query columns, not dim = 64.
    matmul = sum(p.numel() for n, p in params.items() if p.dim() >= 2 and not n.startswith("tok_embeddings"))
    matmul += cfg.vocab_size * cfg.dim if cfg.tie_embeddings else 0
    expected = 6 * matmul + 12 * cfg.n_layers * 4 * HEAD_DIM * 32
    assert flops_per_token(cfg, 32) == expected
    if not changes:  # the planner's tables leave biases and q/k norms out
        assert model_shape(cfg).num_params == num_params(cfg) and model_shape(cfg).flops_per_token(32) == expected


# Qwen3's options with wider heads; one kv head, so at tp 2 the kv projections are copies on both ranks.
WIDE_JOB = {**TINY_JOB, "model": {**TINY_JOB["model"], "n_kv_heads": 1, "head_dim": HEAD_DIM, "qk_norm": "before_rope"},
            "train": {**TINY_JOB["train"], "steps": 6}}


@pytest.mark.slow
def test_heads_split_over_tp_and_ulysses_match_single_process():
    """tp 2 splits wq/wk/wv/wo by heads of head_dim rows; Ulysses trades heads for the sequence."""
    reference, = run_layouts([{}], 1, WIDE_JOB)
    layouts = [{"tp": 2}, {"cp": 2, "cp_mode": "ulysses"}]
    for parallel, layout in zip(layouts, run_layouts(layouts, 2, WIDE_JOB)):
        loss_diff, weight_diff = compare(layout, reference)
        print(f"{parallel} vs single process: loss {loss_diff:.2e}, weights {weight_diff:.2e}")
        assert abs(layout.losses[0] - reference.losses[0]) / reference.losses[0] < 1e-6  # the first forward
        assert loss_diff < 1e-4 and weight_diff < 1e-4, (parallel, loss_diff, weight_diff)
    assert reference.weights["layers.0.attention.wo.weight"].shape == (64, 4 * HEAD_DIM)
