"""The planner's memory arithmetic against real angelptm models, textbook formulas and Korthikanti et al.

Parameter counts and per-rank shards are checked against a Llama built on the meta device, ZeRO
state against ZeROCache's own pages and placement for that model, activations against the
tensors autograd really saves on CPU and against the closed forms of "Reducing Activation
Recomputation in Large Transformer Models" (Korthikanti et al. 2022, Sec. 4).
"""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from angelptm.config import config_from_dict
from angelptm.models.llama import build_llama, num_params
from angelptm.planning.layout import Layout, rank_params
from angelptm.planning.memory import activation_bytes, layer_activation_bytes
from angelptm.planning.model import ANGELPTM, MEGATRON_2021, model_shape
from angelptm.planning.zero import zero_bytes
from angelptm.zerocache.pages import build_pages, find_units
from angelptm.zerocache.placement import plan_placement, slab_bytes

TINY = {"dim": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 192, "vocab_size": 259,
        "max_seq_len": 64}
# MoE blocks (angelptm.models.moe): routed experts only; then a dense first layer, shared experts,
# top-1 sigmoid routing with auxiliary-loss-free balancing and the router z-loss.
MOE = {**TINY, "n_layers": 3, "moe": {"n_experts": 4, "top_k": 2, "expert_ffn_dim": 96}}
MOE_SHARED = {**TINY, "n_layers": 3, "moe": {"n_experts": 8, "top_k": 1, "expert_ffn_dim": 32, "n_shared_experts": 1,
                                              "first_dense_layers": 1, "router": "sigmoid", "balance": "aux_free",
                                              "z_loss_coef": 0.001}}
# Heads wider than dim / n_heads (Qwen3's shape): q and the attention output are 128 wide, not 64.
HEAD_DIM = {**TINY, "head_dim": 32}


def _cfg(model, **sections):
    train = {"seq_len": model.get("max_seq_len", 64), "global_batch": 8, "micro_batch": 2, **sections.pop("train", {})}
    return config_from_dict({"model": model, "train": train, **sections})


def _layout(**kw):
    base = dict(dp=1, tp=1, pp=1, cp=1, virtual_stages=1, schedule="1f1b", sequence_parallel=True,
                cp_mode="ring", zero_stage=0, micro_batch=2, checkpointing="none")
    return Layout(**{**base, **kw})


# ---------------------------------------------------------------------------------------------
# Parameters


@pytest.mark.parametrize("model", [
    TINY,
    {**TINY, "n_kv_heads": 4, "tie_embeddings": True},
    HEAD_DIM,
    {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "ffn_dim": 14336, "vocab_size": 128256,
     "max_seq_len": 8192},
    MOE,
    MOE_SHARED,
    {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "ffn_dim": 14336, "vocab_size": 32000,  # Mixtral 8x7B
     "max_seq_len": 4096, "moe": {"n_experts": 8, "top_k": 2}},
])
def test_param_count_equals_meta_model(model):
    cfg = _cfg(model)
    params = dict(build_llama(cfg.model, device="meta").named_parameters())
    real = sum(p.numel() for p in params.values())
    shape = model_shape(cfg.model)
    assert shape.num_params == real == num_params(cfg.model)
    # Of an MoE model, a token passes through top_k of the n_experts in each stacked expert weight.
    moe = cfg.model.moe
    idle = sum(p.numel() for n, p in params.items() if ".experts.w" in n) * (moe.n_experts - moe.top_k) // max(1, moe.n_experts)
    assert shape.active_params == real - idle == num_params(cfg.model, active=True)


def _shard_numel(name: str, shape: tuple, cfg, tp: int) -> int:
    """Elements of a parameter one tensor-parallel rank holds, by the engine's sharding rules."""
    numel = math.prod(shape)
    if name.endswith(("wq.weight", "w1.weight", "w3.weight")):
        return numel // tp  # column-parallel: output rows split
    if name.endswith(("wk.weight", "wv.weight")):
        heads = cfg.n_kv_heads // tp if cfg.n_kv_heads % tp == 0 else 1  # else one replicated head
        return heads * cfg.resolved_head_dim * cfg.dim
    if name.endswith(("wo.weight", "w2.weight")):
        return numel // tp  # row-parallel: input columns split
    if name in ("tok_embeddings.weight", "output.weight"):
        return math.ceil(cfg.vocab_size / tp) * cfg.dim  # vocab padded to a multiple of tp
    return numel  # norms: replicated


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (4, 1), (2, 2), (1, 4), (4, 2)])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("model", [TINY, HEAD_DIM])
def test_rank_params_equal_real_shards(tp, pp, tied, model):
    cfg = _cfg({**model, "n_layers": 8, "tie_embeddings": tied})
    model = build_llama(cfg.model, device="meta")
    per_stage = cfg.model.n_layers // pp
    stages = {"first": range(per_stage), "last": range(cfg.model.n_layers - per_stage, cfg.model.n_layers)}
    lay = _layout(tp=tp, pp=pp)
    shape = model_shape(cfg.model)
    for stage, layers in stages.items():
        expected = 0
        # remove_duplicate=False: with pp > 1 the last stage keeps its own copy of a tied weight.
        params = model.named_parameters(remove_duplicate=pp == 1)
        for name, p in params:
            if name.startswith("layers."):
                keep = int(name.split(".")[1]) in layers
            elif name == "tok_embeddings.weight":
                keep = stage == "first" or pp == 1
            else:  # norm, output
                keep = stage == "last" or pp == 1
            if keep:
                expected += _shard_numel(name, tuple(p.shape), cfg.model, tp)
        assert rank_params(shape, lay, stage) == expected, (stage, tp, pp)


def _zerocache(cfg, shards):
    """The pages and placement ZeROCache itself builds for the plain model of `cfg`."""
    model = build_llama(cfg.model, device="meta").to(getattr(torch, cfg.precision.dtype))
    units = find_units(model)
    pages = build_pages(model, units, cfg.zero.page_mb, shards)
    z = cfg.zero
    placement = plan_placement(pages, units, z.stage, shards, offload_optimizer=z.offload_optimizer,
                               offload_params=z.offload_params, device_budget_gb=z.device_budget_gb,
                               prefetch_pages=z.prefetch_pages, max_in_flight=max(2, z.prefetch_pages))
    return pages, placement


def _zero(cfg, **layout):
    lay = _layout(**layout)
    return zero_bytes(model_shape(cfg.model), lay, cfg, ANGELPTM, cfg.model.n_layers, "first")


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("dp,cp", [(1, 1), (2, 1), (3, 1), (8, 1), (2, 2)])
@pytest.mark.parametrize("dtype,page_mb,tied", [("bfloat16", 0.0625, False), ("float32", 0.03, True),
                                               ("bfloat16", 32.0, False)])
def test_zero_state_equals_zerocache(stage, dp, cp, dtype, page_mb, tied):
    cfg = _cfg({**TINY, "tie_embeddings": tied}, precision={"dtype": dtype},
               zero={"stage": stage, "page_mb": page_mb})
    shards = dp * cp  # ZeROCache shards over the data group: dp and cp together
    pages, placement = _zerocache(cfg, shards)
    z = _zero(cfg, dp=dp, cp=cp, zero_stage=stage)
    assert (z.pages.total, z.pages.count) == (sum(p.numel for p in pages), len(pages))
    assert z.pages.params == sum(p.numel() for p in build_llama(cfg.model, device="meta").parameters())
    assert z.params_device + z.grads + z.in_flight == placement.fixed_device_bytes
    own = [p.numel if stage == 0 else p.numel // shards for p in pages]
    assert z.optimizer_device == sum(slab_bytes(p, n, "device", "device") for p, n in zip(pages, own))


@pytest.mark.parametrize("offload_params", ["none", "cpu"])
@pytest.mark.parametrize("offload_optimizer", ["cpu", "nvme"])
def test_offloaded_zero_state_equals_zerocache(offload_params, offload_optimizer):
    cfg = _cfg(TINY, precision={"dtype": "bfloat16"},
               zero={"stage": 3, "page_mb": 0.0625, "offload_params": offload_params,
                     "offload_optimizer": offload_optimizer, "nvme_dir": "/nvme"})
    pages, placement = _zerocache(cfg, 4)
    z = _zero(cfg, dp=4, zero_stage=3)
    own = [p.numel // 4 for p in pages]
    param_tier, state_tier = placement.param_tiers[0], placement.state_tiers[0]
    assert z.params_device + z.grads + z.in_flight == placement.fixed_device_bytes
    assert z.params_host == (sum(own) * 2 if param_tier == "host" else 0)
    off = sum(slab_bytes(p, n, param_tier, state_tier) for p, n in zip(pages, own))
    assert (z.optimizer_host, z.optimizer_nvme) == ((off, 0) if state_tier == "host" else (0, off))
    assert z.optimizer_device == 0


def test_device_budget_splits_optimizer_state_like_zerocache():
    zero = {"stage": 1, "page_mb": 0.0625, "offload_optimizer": "cpu"}
    pages, placement = _zerocache(_cfg(TINY, precision={"dtype": "bfloat16"}, zero=zero), 2)
    own = [p.numel // 2 for p in pages]
    slabs = [slab_bytes(p, n, "device", "device") for p, n in zip(pages, own)]
    # A budget with room for half the optimizer state beside what the device must keep.
    cfg = _cfg(TINY, precision={"dtype": "bfloat16"},
               zero={**zero, "device_budget_gb": (placement.fixed_device_bytes + sum(slabs) / 2) / 1e9})
    _, placed = _zerocache(cfg, 2)
    kept = sum(b for b, tier in zip(slabs, placed.state_tiers) if tier == "device")
    z = _zero(cfg, dp=2, zero_stage=1)
    assert z.optimizer_device == pytest.approx(kept, abs=max(slabs))  # ZeROCache keeps whole pages
    assert z.optimizer_device + z.optimizer_host == pytest.approx(sum(slabs))
    # A budget below what the device must keep is reported, as ZeROCache refuses it.
    tight = _cfg(TINY, precision={"dtype": "bfloat16"}, zero={**zero, "device_budget_gb": 1e-6})
    assert "below" in _zero(tight, dp=2, zero_stage=1).problems[0]


SEVEN_B = {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 32, "ffn_dim": 11008, "vocab_size": 32000,
           "max_seq_len": 4096}


@pytest.mark.parametrize("dp", [1, 8, 64])
def test_textbook_bytes_per_parameter(dp):
    bf16 = _cfg(SEVEN_B, precision={"dtype": "bfloat16"})
    fp32 = _cfg(SEVEN_B, precision={"dtype": "float32"})
    m = model_shape(bf16.model)
    flat = dataclasses.replace(ANGELPTM, paged=False)

    def per_param(cfg, stage, impl=ANGELPTM):
        z = zero_bytes(m, _layout(dp=dp, zero_stage=stage), cfg, impl, m.n_layers, "first")
        return (z.params_device + z.grads + z.optimizer_device) / m.num_params

    # Mixed-precision Adam, 2 (bf16 weights) + 2 (bf16 grads) + 12 (fp32 master, m, v), and the
    # ZeRO stages' partitions of it (Rajbhandari et al. 2020, "ZeRO", Sec. 3.1 and Fig. 1).
    assert per_param(bf16, 0, flat) == pytest.approx(16, rel=1e-3)
    assert per_param(bf16, 1, flat) == pytest.approx(4 + 12 / dp, rel=1e-3)
    assert per_param(bf16, 2, flat) == pytest.approx(2 + 14 / dp, rel=1e-3)
    assert per_param(bf16, 3, flat) == pytest.approx(16 / dp, rel=1e-3)
    assert per_param(fp32, 0, flat) == pytest.approx(16, rel=1e-3)  # 4 + 4 + 8 (m, v): no master copy
    # Megatron-LM's distributed optimizer, bf16 params with fp32 grads: 6 + 12/d (Megatron-LM docs).
    assert per_param(bf16, 1, MEGATRON_2021) == pytest.approx(6 + 12 / dp, rel=1e-3)
    # ZeROCache's pages: the same, except that stage 1 keeps the reduced gradient shard beside
    # the bucket (2/d more); page padding stays well under 1%.
    assert per_param(bf16, 0) == pytest.approx(16, rel=5e-3)
    assert per_param(bf16, 1) == pytest.approx(4 + 14 / dp, rel=5e-3)
    assert per_param(bf16, 2) == pytest.approx(2 + 14 / dp, rel=5e-3)
    assert per_param(bf16, 3) == pytest.approx(16 / dp, rel=5e-3)


# ---------------------------------------------------------------------------------------------
# Activations against Korthikanti et al. 2022


def _gpt(s=2048, h=6144, a=64, layers=48):
    return _cfg({"arch": "gpt", "dim": h, "n_layers": layers, "n_heads": a, "n_kv_heads": a, "ffn_dim": 4 * h,
                 "vocab_size": 51200, "max_seq_len": s}, precision={"dtype": "bfloat16"},
                train={"seq_len": s, "global_batch": 64, "micro_batch": 4})


@pytest.mark.parametrize("t", [1, 2, 8])
def test_layer_activations_match_korthikanti(t):
    cfg = _gpt()
    m = model_shape(cfg.model)
    s, b, h, a = 2048, 4, m.dim, m.n_heads
    sbh = s * b * h

    def kept(**kw):
        return layer_activation_bytes(m, _layout(tp=t, micro_batch=b, **kw), cfg, MEGATRON_2021)[0]

    def ln_stats(seq_sharded):  # LayerNorm's fp32 mean and rstd, which the paper leaves out
        return 2 * 2 * 4 * s * b / (t if seq_sharded else 1)

    # Table 2 of the paper, row by row.
    assert kept(sequence_parallel=False) == pytest.approx(sbh * (10 + 24 / t + 5 * a * s / (h * t)) + ln_stats(False))
    assert kept(sequence_parallel=True) == pytest.approx(sbh / t * (34 + 5 * a * s / h) + ln_stats(True))
    assert kept(sequence_parallel=True, checkpointing="selective") == pytest.approx(sbh / t * 34 + ln_stats(True))
    assert kept(sequence_parallel=False, checkpointing="full") == pytest.approx(2 * sbh)
    assert kept(sequence_parallel=True, checkpointing="full") == pytest.approx(2 * sbh / t)
    if t == 1:  # no parallelism: sbh(34 + 5as/h) (Sec. 4.1, Eq. 1)
        assert kept(sequence_parallel=False) == pytest.approx(sbh * (34 + 5 * a * s / h) + ln_stats(False))


@pytest.mark.parametrize("schedule,virtual", [("1f1b", 1), ("interleaved", 2), ("interleaved", 4)])
def test_first_stage_holds_korthikanti_share_of_the_layers(schedule, virtual):
    # The first stage holds activations of L·(1 + (p-1)/(p·v)) layers (Sec. 4.2.3): L for 1F1B.
    cfg = _gpt(layers=48)
    m = model_shape(cfg.model)
    p = 4
    lay = _layout(tp=8, pp=p, virtual_stages=virtual, schedule=schedule, micro_batch=4)
    per_layer = layer_activation_bytes(m, lay, cfg, MEGATRON_2021)[0]
    factor = 1 + (p - 1) / (p * virtual) if schedule == "interleaved" else 1
    # The embedding's dropout mask and the token ids ride along with each microbatch in flight.
    in_flight = factor * p * virtual if schedule == "interleaved" else p
    extras = in_flight * 4 * 2048 * (m.dim / 8 + 8)
    assert activation_bytes(m, lay, cfg, MEGATRON_2021, "first")[0] == pytest.approx(48 * factor * per_layer + extras)


# ---------------------------------------------------------------------------------------------
# Activations against what autograd saves on a real angelptm Llama


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("model", [TINY, {**TINY, "n_kv_heads": 4, "ffn_dim": 256}, HEAD_DIM, MOE, MOE_SHARED])
def test_activation_bytes_match_saved_tensors(dtype, model):
    cfg = _cfg(model, precision={"dtype": dtype})
    torch.manual_seed(0)
    llama = build_llama(cfg.model, device="cpu")
    llama.init_weights(0)
    llama.to(getattr(torch, dtype))
    weights = {p.untyped_storage().data_ptr() for p in llama.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch, cfg.train.seq_len))
    targets = torch.randint(0, cfg.model.vocab_size, tokens.shape)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = llama(tokens)
        F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    measured = sum(saved.values())

    predicted = activation_bytes(model_shape(cfg.model), _layout(micro_batch=cfg.train.micro_batch), cfg,
                                 ANGELPTM, "first")[0]
    assert predicted == pytest.approx(measured, rel=0.10)
    # Closer than the bound: only RoPE's fp32 cos/sin tables and the loss's scalar are left out,
    # and per MoE block its tensors of n_experts elements: the grouped GEMM's int32 group offsets,
    # the balancing loss's fp32 fractions, in bf16 the router's fp32 copy of its (n_experts, dim)
    # weight; and each routing loss's fp32 token count, which divides its sum.
    rope_tables = 2 * cfg.train.seq_len * cfg.model.resolved_head_dim * 4
    moe = cfg.model.moe
    balancing = moe.balance == "aux_loss" and moe.aux_loss_coef > 0
    losses = balancing + (moe.z_loss_coef > 0)
    per_moe_block = moe.n_experts * 4 * (1 + balancing + (cfg.model.dim if dtype != "float32" else 0)) + 4 * losses
    assert predicted + rope_tables + 4 + model_shape(cfg.model).moe_layers * per_moe_block == measured
