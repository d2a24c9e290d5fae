"""The planner under LoRA (`finetune.lora.rank > 0`): frozen base weights in pages without gradients or
optimizer state, adapters split over tp with gradients and AdamW state, against ZeROCache's own pages
for the real model and against the bytes a real run allocates (single process, dp 2 at ZeRO-2, tp 2);
frozen weights cost no weight-gradient GEMM; and a Llama-3-8B example beside full fine-tuning."""

import pytest
import torch
import torch.distributed as dist

from angelptm.config import config_from_dict
from angelptm.distributed.collectives import Group
from angelptm.distributed.spawn import run_distributed
from angelptm.distributed.tensor_parallel import apply_tensor_parallel
from angelptm.finetune import lora
from angelptm.models.llama import build_llama
from angelptm.planning.adapters import adapter_params
from angelptm.planning.hardware import resolve_hardware
from angelptm.planning.layout import layout_from_config
from angelptm.planning.memory import memory
from angelptm.planning.model import ANGELPTM, model_shape
from angelptm.planning.timing import timing
from angelptm.planning.zero import zero_bytes
from angelptm.train.trainer import Trainer
from angelptm.zerocache.pages import build_pages, find_units
from angelptm.zerocache.placement import plan_placement, slab_bytes

from conftest import tiny_sections

TINY = {"dim": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 192, "vocab_size": 259, "max_seq_len": 64}
ALL_TARGETS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]
LLAMA3_8B = {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "ffn_dim": 14336, "vocab_size": 128256,
             "max_seq_len": 8192, "rope_theta": 500000.0}


def _cfg(model=TINY, rank=8, targets=ALL_TARGETS, **sections):
    train = {"seq_len": 64, "global_batch": 8, "micro_batch": 2, **sections.pop("train", {})}
    return config_from_dict({"model": model, "train": train, "finetune": {"lora": {"rank": rank, "targets": targets}},
                             **sections})


def _zero(cfg, world_size):
    lay, problems = layout_from_config(cfg, world_size)
    assert not problems
    return zero_bytes(model_shape(cfg.model), lay, cfg, ANGELPTM, cfg.model.n_layers, "first")


def _meta_lora_model(cfg, tp: int):
    """Rank 0's LoRA model of `cfg` after tensor parallelism, on the meta device, in the run's dtype."""
    model = build_llama(cfg.model, device="meta").to(getattr(torch, cfg.precision.dtype))
    if tp > 1:
        apply_tensor_parallel(model, Group("tp", None, 0, tp), sequence_parallel=True)
    lora.apply_lora(model, cfg.finetune.lora, tp)
    return model


@pytest.mark.parametrize("targets", [ALL_TARGETS, ["wq", "wv"], ["wo", "w2"]])
@pytest.mark.parametrize("tp", [1, 2])
def test_adapter_sizes_equal_the_real_adapters(tp, targets):
    cfg = _cfg(targets=targets, parallel={"tp": tp})
    model = _meta_lora_model(cfg, tp)
    real = tuple(p.numel() for n, p in model.layers["0"].named_parameters() if lora.is_adapter(n))
    assert adapter_params(model_shape(cfg.model), cfg, tp) == real


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("dp,tp", [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize("dtype,page_mb,targets", [("bfloat16", 0.0625, ALL_TARGETS), ("float32", 0.03, ["wq", "wv"]),
                                                   ("bfloat16", 32.0, ALL_TARGETS)])
def test_zero_state_equals_zerocache_pages_of_the_lora_model(stage, dp, tp, dtype, page_mb, targets):
    cfg = _cfg(targets=targets, precision={"dtype": dtype}, zero={"stage": stage, "page_mb": page_mb},
               parallel={"tp": tp})
    model = _meta_lora_model(cfg, tp)
    units = find_units(model)
    pages = build_pages(model, units, page_mb, dp)
    placement = plan_placement(pages, units, stage, dp, offload_optimizer="none", offload_params="none",
                               device_budget_gb=None, prefetch_pages=2, max_in_flight=2)
    z = _zero(cfg, dp * tp)
    trainable = [p for p in pages if not p.frozen]
    assert {slot.name for p in trainable for slot in p.slots} == {n for n, _ in model.named_parameters()
                                                                   if lora.is_adapter(n)}
    assert (z.pages.total, z.pages.count) == (sum(p.numel for p in pages), len(pages))
    assert z.trainable_numel == sum(p.numel for p in trainable)
    assert z.params_device + z.grads + z.in_flight == placement.fixed_device_bytes
    own = [p.numel if stage == 0 else p.numel // dp for p in pages]
    assert z.optimizer_device == sum(slab_bytes(p, n, "device", "device") for p, n in zip(pages, own)) > 0
    assert z.own_numel == sum(n for p, n in zip(pages, own) if not p.frozen)


# ---------------------------------------------------------------------------------------------
# Against the bytes a real run allocates


def _allocated_and_planned(raw: dict, world_size: int) -> dict:
    """This rank's ZeROCache ledger after construction (device params, grads, optimizer) beside the
    planner's figures for the same config and world."""
    trainer = Trainer(config_from_dict(raw))
    ledger = trainer.optimizer.memory_ledger()["device"]
    z = _zero(trainer.cfg, world_size)
    dist.destroy_process_group()
    return {"allocated": (ledger["params"], ledger["grads"], ledger["optimizer"]),
            "planned": (z.params_device, z.grads, z.optimizer_device)}


def _real_job(tmp_path, **sections) -> dict:
    raw = tiny_sections(tmp_path, **sections)
    raw["finetune"] = {"lora": {"rank": 4, "targets": ALL_TARGETS}}
    raw["zero"] = {"page_mb": 0.0625, **raw.get("zero", {})}
    raw["train"].update(steps=1, resume="never", micro_batch=4)
    return raw


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_planned_bytes_equal_a_real_single_process_run(tmp_path, one_thread, stage):
    found, = run_distributed(_allocated_and_planned, 1, _real_job(tmp_path, zero={"stage": stage}), 1,
                             init_group=False)
    print(f"1 process, stage {stage}: (params, grads, optimizer) bytes {found}")
    assert found["allocated"] == tuple(int(b) for b in found["planned"]), found


@pytest.mark.slow
@pytest.mark.parametrize("parallel,stage", [({"dp": 2}, 2), ({"tp": 2}, 2), ({"dp": 2}, 3)])
def test_planned_bytes_equal_a_real_two_rank_run(tmp_path, parallel, stage):
    for found in run_distributed(_allocated_and_planned, 2,
                                 _real_job(tmp_path, zero={"stage": stage}, parallel=parallel), 2, init_group=False):
        print(f"{parallel} stage {stage}: (params, grads, optimizer) bytes {found}")
        assert found["allocated"] == tuple(int(b) for b in found["planned"]), (parallel, found)


# ---------------------------------------------------------------------------------------------
# FLOPs and the full-size example


def test_frozen_weights_cost_no_weight_gradient_gemm():
    sections = dict(precision={"dtype": "bfloat16"}, train={"seq_len": 4096, "global_batch": 64, "micro_batch": 1})
    cfg = _cfg(LLAMA3_8B, rank=16, targets=["wq", "wk", "wv", "wo"], **sections)
    full = _cfg(LLAMA3_8B, rank=0, **sections)
    hw = resolve_hardware("h100")
    results = {}
    for name, c in (("lora", cfg), ("full", full)):
        lay, _ = layout_from_config(c, 8)
        m = model_shape(c.model)
        _, z = memory(m, lay, c, hw, ANGELPTM)
        results[name] = timing(m, lay, c, hw, ANGELPTM, z)[0]
    m = model_shape(cfg.model)
    frozen = m.gemm_weights_per_token + m.vocab_size * m.dim
    adapter = sum(adapter_params(m, cfg, 1)) * m.n_layers
    step_tokens = cfg.train.global_batch * cfg.train.seq_len
    assert results["full"].model_flops - results["lora"].model_flops == pytest.approx(
        (2 * frozen - 6 * adapter) * step_tokens)
    assert results["lora"].gemm < 0.7 * results["full"].gemm  # 2 of the 3 GEMMs per frozen weight
    assert results["lora"].step < results["full"].step


def test_llama3_8b_lora_on_8_gpus_against_full_fine_tuning():
    hw = resolve_hardware("h100")
    rows = {}
    for name, rank in (("full fine-tuning", 0), ("LoRA r16 wq wk wv wo", 16)):
        cfg = _cfg(LLAMA3_8B, rank=rank, targets=["wq", "wk", "wv", "wo"], precision={"dtype": "bfloat16"},
                   zero={"stage": 1}, train={"seq_len": 8192, "global_batch": 32, "micro_batch": 1,
                                             "activation_checkpointing": "full"})
        lay, _ = layout_from_config(cfg, 8)
        mem, z = memory(model_shape(cfg.model), lay, cfg, hw, ANGELPTM)
        rows[name] = mem, z
        print(f"{name:22s} dp8 zero1: params {mem.params / 2**30:6.2f} GiB  grads {mem.grads / 2**30:6.2f}  "
              f"optimizer {mem.optimizer / 2**30:6.2f}  activations {mem.activations / 2**30:6.2f}  "
              f"total {mem.device_total / 2**30:6.2f} GiB per GPU; trainable {z.trainable_numel / 1e6:.1f} M")
    (full, full_z), (lora_mem, lora_z) = rows.values()
    # The frozen bf16 base stays whole on every rank below stage 3, the adapters beside it.
    assert full.params < lora_mem.params < 1.01 * full.params
    assert lora_z.trainable_numel == pytest.approx(32 * 16 * (2 * 4096 + 2 * (4096 + 1024) + 2 * 4096), rel=0.01)
    assert lora_mem.grads < full.grads / 100 and lora_mem.optimizer < full.optimizer / 100
