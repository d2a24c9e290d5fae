"""The planner on mixture-of-experts models: its tables against a real angelptm MoE model, its
ZeRO state against ZeROCache's expert pools, memory and all-to-all volume per expert-parallel
degree against their formulas, and the search's choice of ep.
"""

import dataclasses
import json

import pytest
import torch
from torch import nn

from angelptm.cli import main as angelptm_main
from angelptm.config import config_from_dict, load_config
from angelptm.models.llama import build_llama, flops_per_token, num_params
from angelptm.plan import plan, render, search
from angelptm.planning.hardware import BUILTIN, load_hardware
from angelptm.planning.layout import Layout, layout_problems, rank_params
from angelptm.planning.model import ANGELPTM, model_shape
from angelptm.planning.search import candidate_layouts
from angelptm.planning.zero import zero_bytes
from angelptm.zerocache.pages import build_pages, find_units
from angelptm.zerocache.placement import plan_placement, slab_bytes

from conftest import REPO

MIXTRAL = REPO / "configs" / "mixtral8x7b_64gpu.yaml"
TINY_MOE = {"dim": 64, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 192, "vocab_size": 259,
            "max_seq_len": 64, "moe": {"n_experts": 4, "top_k": 2, "expert_ffn_dim": 96}}
VARIANTS = [
    TINY_MOE,
    {**TINY_MOE, "tie_embeddings": True,
     "moe": {"n_experts": 8, "top_k": 1, "expert_ffn_dim": 32, "n_shared_experts": 2, "first_dense_layers": 1,
             "router": "sigmoid", "balance": "aux_free"}},
]


def _cfg(model, **sections):
    train = {"seq_len": 64, "global_batch": 8, "micro_batch": 2, **sections.pop("train", {})}
    return config_from_dict({"model": model, "train": train, **sections})


def _layout(**kw):
    base = dict(dp=1, tp=1, pp=1, cp=1, virtual_stages=1, schedule="1f1b", sequence_parallel=True,
                cp_mode="ring", zero_stage=0, micro_batch=2, checkpointing="none")
    return Layout(**{**base, **kw})


def _mixtral(*overrides):
    return load_config(MIXTRAL, list(overrides))


# ---------------------------------------------------------------------------------------------
# Tables against the real model


@pytest.mark.parametrize("source", ["mixtral", "tiny", "tiny_variant"])
def test_tables_equal_a_real_moe_model(source):
    cfg = _mixtral() if source == "mixtral" else _cfg(VARIANTS[source == "tiny_variant"])
    md, moe = cfg.model, cfg.model.moe
    model = build_llama(md, device="meta")
    params = dict(model.named_parameters())
    m = model_shape(md)
    # Total: every expert; active: of each stacked expert weight the top_k experts a token uses.
    routed = {n: p.numel() for n, p in params.items() if ".experts.w" in n}
    assert m.num_params == sum(p.numel() for p in params.values()) == num_params(md)
    active = sum(p.numel() for p in params.values()) - sum(routed.values()) * (moe.n_experts - moe.top_k) // moe.n_experts
    assert m.active_params == active == num_params(md, active=True)
    # FLOPs: 6 per matmul weight a token passes through (not norms, not the embedding lookup,
    # unless tied to the head), and the attention scores.
    matmul = sum(p.numel() for n, p in params.items()
                 if p.dim() >= 2 and not n.startswith("tok_embeddings")) - sum(routed.values()) * (
        moe.n_experts - moe.top_k) // moe.n_experts
    if md.tie_embeddings:
        matmul += md.vocab_size * md.dim
    seq = cfg.train.seq_len
    expected = 6 * matmul + 12 * md.n_layers * md.dim * seq
    assert m.flops_per_token(seq) == expected == flops_per_token(md, seq)
    if source == "mixtral":  # the published sizes: 46.7B parameters, 12.9B active
        assert round(m.num_params / 1e9, 1) == 46.7 and round(m.active_params / 1e9, 1) == 12.9


@pytest.mark.parametrize("ep", [1, 2, 4])
@pytest.mark.parametrize("model", VARIANTS)
def test_rank_params_hold_n_experts_over_ep(model, ep):
    cfg = _cfg(model)
    real = sum(p.numel() // (ep if ".experts.w" in n else 1) for n, p in build_llama(cfg.model, "meta").named_parameters())
    assert rank_params(model_shape(cfg.model), _layout(dp=4, ep=ep), "first") == real


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("model", VARIANTS)
def test_rank_params_under_tp_equal_the_tensor_parallel_model(model, tp):
    # The router and the routed experts whole on every tp rank, the shared experts split.
    from angelptm.distributed.collectives import Group
    from angelptm.distributed.tensor_parallel import apply_tensor_parallel

    cfg = _cfg({**model, "ffn_dim": 256})
    real = build_llama(cfg.model, "meta")
    apply_tensor_parallel(real, Group("tp", None, 0, tp), sequence_parallel=True)
    assert rank_params(model_shape(cfg.model), _layout(tp=tp), "first") == sum(p.numel() for p in real.parameters())


def _expert_parallel_meta_model(cfg, ep):
    """The plain model as expert parallelism leaves it on one rank: n_experts / ep experts in each
    stacked weight (angelptm.distributed.expert_parallel slices dim 0)."""
    model = build_llama(cfg.model, device="meta").to(getattr(torch, cfg.precision.dtype))
    experts = []
    for module in model.modules():
        if type(module).__name__ == "GroupedExperts":
            for name in ("w1", "w2", "w3"):
                full = getattr(module, name)
                local = nn.Parameter(torch.empty(full.shape[0] // ep, *full.shape[1:], dtype=full.dtype, device="meta"))
                setattr(module, name, local)
                experts.append(local)
    return model, frozenset(id(p) for p in experts) if ep > 1 else frozenset()


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("ep", [1, 2, 4])
@pytest.mark.parametrize("page_mb", [0.0625, 32.0])
def test_zero_state_equals_zerocache_expert_pools(stage, ep, page_mb):
    cfg = _cfg(VARIANTS[1], precision={"dtype": "bfloat16"}, zero={"stage": stage, "page_mb": page_mb})
    dp = 4
    model, expert_ids = _expert_parallel_meta_model(cfg, ep)
    units = find_units(model)
    pages = build_pages(model, units, page_mb, dp, expert_params=expert_ids, expert_dp=dp // ep)
    z = cfg.zero
    placement = plan_placement(pages, units, stage, dp, offload_optimizer=z.offload_optimizer,
                               offload_params=z.offload_params, device_budget_gb=None,
                               prefetch_pages=z.prefetch_pages, max_in_flight=max(2, z.prefetch_pages))
    planned = zero_bytes(model_shape(cfg.model), _layout(dp=dp, ep=ep, zero_stage=stage), cfg, ANGELPTM,
                         cfg.model.n_layers, "first")
    assert (planned.pages.total, planned.pages.count) == (sum(p.numel for p in pages), len(pages))
    assert planned.expert_numel == sum(p.numel for p in pages if p.expert)
    assert planned.params_device + planned.grads + planned.in_flight == placement.fixed_device_bytes
    own = [p.numel if stage == 0 else p.numel // p.shards for p in pages]
    assert planned.own_numel == sum(own)
    assert planned.optimizer_device == sum(slab_bytes(p, n, "device", "device") for p, n in zip(pages, own))


# ---------------------------------------------------------------------------------------------
# Memory and all-to-all volume per ep


@pytest.mark.parametrize("ep", [1, 2, 4, 8])
def test_memory_per_rank_follows_the_expert_sharding_rule(ep):
    cfg = _mixtral()
    m = model_shape(cfg.model)
    experts = m.moe_layers * m.n_experts * 3 * m.dim * m.expert_ffn_dim
    dense = m.num_params - experts
    d = 64  # dp·cp: dense weights shard over all 64, experts (n_experts / ep per rank) over 64 / ep

    def state(stage):
        return zero_bytes(m, _layout(dp=d, ep=ep, zero_stage=stage, micro_batch=1), cfg, ANGELPTM, m.n_layers, "first")

    whole = dense + experts / ep  # parameters one rank holds before ZeRO shards them
    own = dense / d + experts / ep / (d // ep)  # = (dense + experts) / 64, whatever ep
    assert state(1).params_device == pytest.approx(2 * whole, rel=2e-3)  # bf16 weights, pages padded
    assert state(1).optimizer_device == pytest.approx(12 * own, rel=2e-3)  # fp32 master, m, v
    assert state(3).params_device == pytest.approx(2 * own, rel=2e-3)
    assert own == pytest.approx(m.num_params / d)
    # The plan's device total falls as ep rises for stages that keep whole weights.
    if ep > 1:
        lower = plan(_mixtral(f"parallel.ep={ep}", "zero.stage=1", "train.activation_checkpointing=full"), 64, "h100")
        higher = plan(_mixtral(f"parallel.ep={ep // 2}", "zero.stage=1", "train.activation_checkpointing=full"), 64, "h100")
        assert lower.memory.params < higher.memory.params and lower.memory.optimizer == pytest.approx(higher.memory.optimizer, rel=2e-3)


@pytest.mark.parametrize("ep,checkpointing,per_layer", [(8, "none", 4), (4, "none", 4), (2, "full", 6), (1, "none", 0)])
def test_all_to_all_bytes_per_rank_equal_the_formula(ep, checkpointing, per_layer):
    cfg = _mixtral(f"parallel.ep={ep}", f"train.activation_checkpointing={checkpointing}")
    result = plan(cfg, 64, "h100")
    assert result.valid, result.reasons
    md, t = cfg.model, cfg.train
    microbatches = t.global_batch // (t.micro_batch * 64)
    tokens = t.micro_batch * t.seq_len
    # 4 all-to-alls per MoE block and microbatch (dispatch and combine, forward and backward), 2 more
    # when full recomputation reruns the forward; each sends (ep-1)/ep of tokens·top_k·dim·2 bytes.
    expected = microbatches * md.n_layers * per_layer * tokens * md.moe.top_k * md.dim * 2 * (ep - 1) / ep
    assert result.comm.ep == pytest.approx(expected, rel=1e-12)
    assert (result.timing.ep_comm > 0) == (ep > 1)
    parts = ("gemm", "attention", "elementwise", "recompute", "tp_comm", "cp_comm", "ep_comm", "pp_comm",
             "bubble", "dp_exposed", "optimizer")
    assert result.timing.step == pytest.approx(sum(getattr(result.timing, p) for p in parts))


def test_all_to_all_crossing_nodes_runs_on_the_network(tmp_path):
    four_per_node = tmp_path / "h100x4.yaml"
    four_per_node.write_text("base: h100\nname: H100-4\ngpus_per_node: 4\n")
    cfg = _mixtral("parallel.ep=8")
    inside, across = plan(cfg, 64, "h100"), plan(cfg, 64, str(four_per_node))
    assert inside.comm.ep == across.comm.ep
    # NVLink (450 GB/s) inside a node against one 50 GB/s network card per GPU.
    assert across.timing.ep_comm > 5 * inside.timing.ep_comm


def test_expert_gemms_run_at_the_grouped_gemm_efficiency():
    cfg = _mixtral()
    slower = dataclasses.replace(BUILTIN["h100"], grouped_gemm_efficiency=BUILTIN["h100"].grouped_gemm_efficiency / 2)
    base, halved = plan(cfg, 64, "h100"), plan(cfg, 64, slower)
    m = model_shape(cfg.model)
    routed_share = m.routed_gemm_weights * m.moe_layers / m.gemm_weights_per_token
    assert halved.timing.gemm > base.timing.gemm * (1 + 0.9 * routed_share)


# ---------------------------------------------------------------------------------------------
# Search


def test_search_chooses_expert_parallelism_for_mixtral_on_64_gpus():
    cfg = _mixtral()
    ranked = search(cfg, 64, "h100", top=10_000)
    best = ranked[0]
    assert best.fits and best.layout.ep > 1
    without = [p for p in ranked if p.layout.ep == 1]
    assert without and all(p.timing.tokens_per_s < best.timing.tokens_per_s for p in without)
    for p in ranked:  # never a layout whose ep does not divide dp·cp or n_experts
        assert (p.layout.dp * p.layout.cp) % p.layout.ep == 0 and 8 % p.layout.ep == 0
    # The preset is that choice.
    assert plan(cfg, 64, "h100").layout == best.layout


def test_candidates_divide_experts_and_data_ranks():
    cfg = _mixtral()
    m = model_shape(cfg.model)
    for world in (24, 64):
        eps = set()
        for group in candidate_layouts(m, cfg, BUILTIN["h100"], world):
            lay = group[0]
            assert (lay.dp * lay.cp) % lay.ep == 0 and m.n_experts % lay.ep == 0
            eps.add(lay.ep)
        assert eps == {1, 2, 4, 8}
    dense = load_config(REPO / "configs" / "llama7b_8gpu.yaml")
    assert {g[0].ep for g in candidate_layouts(model_shape(dense.model), dense, BUILTIN["h100"], 8)} == {1}


def test_impossible_expert_layouts_are_reported():
    cfg = _mixtral()
    m = model_shape(cfg.model)
    hw = BUILTIN["h100"]
    assert any("does not divide model.moe.n_experts=8" in r for r in layout_problems(m, _layout(dp=12, ep=3), cfg, hw))
    assert any("does not divide dp·cp = 4" in r for r in layout_problems(m, _layout(dp=4, ep=8), cfg, hw))
    assert not layout_problems(m, _layout(dp=4, tp=2, pp=2, ep=4), cfg, hw)  # MoE composes with tp and pp
    result = plan(cfg, 4, "h100")  # dp auto = 4 under the config's ep=8
    assert not result.valid and "INVALID" in render(result, cfg)
    dense = load_config(REPO / "configs" / "llama7b_8gpu.yaml")
    assert any("has none" in r for r in layout_problems(model_shape(dense.model), _layout(dp=8, ep=2), dense, hw))


# ---------------------------------------------------------------------------------------------
# Command line


def test_cli_prints_the_expert_layout_and_all_to_all(capsys):
    assert angelptm_main(["plan", str(MIXTRAL), "--world-size", "64"]) == 0
    out = capsys.readouterr().out
    for needle in ("ep=8", "experts   8 routed (top 2", "12.88B parameters active", "all-to-all per GPU",
                   "ep comm", "TFLOP/s per GPU", "MFU", "verdict     fits"):
        assert needle in out
    assert angelptm_main(["plan", str(MIXTRAL), "--world-size", "64", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["layout"]["ep"] == 8 and doc["comm"]["ep"] > 0


@pytest.mark.parametrize("args,needle", [
    (["--set", "parallel.ep=3"], "parallel.ep=3"),
    (["--set", "parallel.tp=2", "--set", "model.moe.capacity_factor=1.25"], "model.moe.capacity_factor=1.25"),
    (["--set", "model.arch=gpt"], "model.arch=llama"),
    (["--gpu", "BAD_PROFILE"], "grouped_gemm_efficiency"),
])
def test_bad_input_is_one_line(capsys, tmp_path, args, needle):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: h100\ngrouped_gemm_efficiency: 1.5\n")
    args = [str(bad) if a == "BAD_PROFILE" else a for a in args]
    assert angelptm_main(["plan", str(MIXTRAL), "--world-size", "64", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and needle in err, err


def test_hardware_profile_gives_grouped_gemm_efficiency(tmp_path):
    path = tmp_path / "hw.yaml"
    path.write_text("base: h100\ngrouped_gemm_efficiency: 0.4\n")
    assert load_hardware(path).grouped_gemm_efficiency == 0.4
    assert all(0 < hw.grouped_gemm_efficiency < hw.matmul_efficiency for hw in BUILTIN.values())
