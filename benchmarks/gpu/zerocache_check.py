"""ZeROCache section of the GPU suite: ZeROCacheOptimizer's device code paths trained against torch AdamW.

A small Llama trains a few steps under each layout of LAYOUTS in a process group of one (NCCL on
the GPU, gloo in the dry run), alternating step by step with the same model (same weights, same
batches) trained by torch.optim.AdamW (fused: the kernel ZeROCache runs, and the fast baseline a
GPU training loop would use) with the same hyper-parameters and parameter groups, both clipped to
the same norm. In one process every layout computes what AdamW computes, so the losses must agree
at every step: within 1e-5 relative in fp32; within 1e-3 for the FP8 model (bf16 autocast, as the
trainer runs FP8). ZeROCache sums the squares of the gradient norm page by page, torch tensor by
tensor, so the clipped updates can differ in the last bit; in fp32 that stays far below 1e-5, but
it can move an FP8 weight code (on CPU, without clipping, both FP8 runs agree bit for bit). The
collectives still run at a world size of one, so the NCCL calls, the CUDA side-stream copies to
and from pinned host memory and the NVMe I/O all take their device paths.

Each run records both loss curves and their largest relative gap, step times (first step left
out: it allocates the pages and sets up cuBLAS and NCCL) and ZeROCache's memory ledger after the
last step (the bytes it holds per tier: parameters, gradients, optimizer state and buffers, not
activations).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fp8_e2e import make_model
from harness import OutOfTime, median, ratio_stats, time_ms

from angelptm.config import ModelConfig
from angelptm.distributed.mesh import init_process_group
from angelptm.fp8 import convert_to_float8, update_float8_scales
from angelptm.models.llama import num_params
from angelptm.zerocache import ZeROCacheOptimizer
from angelptm.zerocache.optimizer import parameter_groups

ZEROCACHE_SIZES = {
    "full": dict(llama=ModelConfig(dim=512, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=1536, vocab_size=8192,
                                   max_seq_len=256),
                 batch=4, seq=256, steps=10, page_mb=4.0),
    # Pages of 30 KB: the tiny model spans dozens, so every path crosses page boundaries.
    "dry": dict(llama=ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, vocab_size=259,
                                  max_seq_len=32),
                batch=2, seq=32, steps=6, page_mb=0.03),
}
HYPER = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
CLIP = 1.0
TOLERANCE = {"fp32": 1e-5, "fp8": 1e-3}
# ZeROCacheOptimizer keywords per run; the run with fp8_all_gather converts the model to FP8 first.
LAYOUTS = {
    "stage 0": dict(stage=0),
    "stage 3": dict(stage=3),
    "stage 3, cpu offload": dict(stage=3, offload_optimizer="cpu", offload_params="cpu"),
    "stage 1, nvme": dict(stage=1, offload_optimizer="nvme"),
    "stage 3, fp8 gather": dict(stage=3, fp8_all_gather=True),
}
FP8_RECIPE = "tensorwise"
MIN_LEFT_S = 5.0  # a run is not started, and a started run stops stepping, with less left than this


def make_step(model, opt, batches: torch.Tensor, losses: list, fp8: bool):
    """One training step per call on the next batch; appends the loss (on the device). A
    ZeROCacheOptimizer clips with its own norm (over its pages), torch AdamW with torch's."""
    autocast = torch.autocast(batches.device.type, dtype=torch.bfloat16) if fp8 else nullcontext()
    zerocache = isinstance(opt, ZeROCacheOptimizer)

    def step():
        batch = batches[len(losses)]
        with autocast:
            logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        if zerocache:
            opt.clip_grad_norm_(CLIP)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_float8_scales(model)  # what the trainer calls after every step (a no-op without FP8)
        losses.append(loss.detach())
    return step


def train_layout(layout: dict, device: torch.device, sizes: dict, batches: torch.Tensor, nvme_dir: Path,
                 deadline) -> dict:
    fp8 = layout.get("fp8_all_gather", False)
    models = [make_model(sizes["llama"], device) for _ in range(2)]
    if fp8:
        models = [convert_to_float8(m, FP8_RECIPE) for m in models]
    losses = {"zerocache": [], "torch": []}
    times = {"zerocache": [], "torch": []}
    reference = torch.optim.AdamW(parameter_groups(models[1], HYPER["weight_decay"]), **HYPER, fused=True)
    with ZeROCacheOptimizer(models[0], None, **HYPER, page_mb=sizes["page_mb"], nvme_dir=str(nvme_dir),
                            **layout) as opt:
        steps = {"zerocache": make_step(models[0], opt, batches, losses["zerocache"], fp8),
                 "torch": make_step(models[1], reference, batches, losses["torch"], fp8)}
        for i in range(sizes["steps"]):
            for name, step in steps.items():
                times[name].append(time_ms(step, device, 1))
            if i >= 1 and deadline.left() < MIN_LEFT_S:  # two steps at least: one is timed
                break
        ledger = opt.memory_ledger()
    # FP8 layers take their weight from the FP8 all-gather, or the run did not test it.
    gathered = sum(getattr(m, "weight_source", None) is not None for m in models[0].modules())
    curves = {name: torch.stack(vals).tolist() for name, vals in losses.items()}
    gap = max(abs(z - t) / abs(t) for z, t in zip(curves["zerocache"], curves["torch"]))
    tolerance = TOLERANCE["fp8" if fp8 else "fp32"]
    timed = {name: ms[1:] for name, ms in times.items()}
    return {"layout": layout, "model": f"fp8 {FP8_RECIPE}, bf16 autocast" if fp8 else "fp32",
            "steps": len(curves["torch"]), "loss": curves, "max_rel_loss_gap": gap, "tolerance": tolerance,
            "matched": math.isfinite(gap) and gap <= tolerance,
            "zerocache_step_ms": median(timed["zerocache"]), "torch_step_ms": median(timed["torch"]),
            "step_time_ratio": ratio_stats(timed["zerocache"], timed["torch"]), "ledger": ledger,
            "fp8_gathered_layers": gathered}


def run_zerocache(out: dict, deadline, device: torch.device, sizes: dict, nvme_dir: Path, guarded, save,
                  free) -> None:
    cfg = sizes["llama"]
    out.update(model=asdict(cfg), params=num_params(cfg), batch=sizes["batch"], seq=sizes["seq"],
               page_mb=sizes["page_mb"], hyper=HYPER, clip=CLIP,
               note=("ZeROCacheOptimizer vs torch.optim.AdamW on the same model and batches, steps alternating; "
                     "step_time_ratio = ZeROCache ms / torch ms (min/median/max over steps, the first left out); "
                     "ledger: ZeROCache's bytes per tier and kind after the last step, with that step's peaks"))
    gen = torch.Generator(device=device).manual_seed(0)
    batches = torch.randint(cfg.vocab_size, (sizes["steps"], sizes["batch"], sizes["seq"] + 1), device=device,
                            generator=gen)
    out["runs"], out["errors"] = {}, {}
    # ZeROCache shards over the default group when given no mesh: make it a group of one here,
    # on the backend the device needs (auto would pick NCCL for a dry run on a GPU machine).
    created = not dist.is_initialized()
    init_process_group("nccl" if device.type == "cuda" else "gloo")
    out["backend"] = dist.get_backend()
    try:
        for name, layout in LAYOUTS.items():
            if deadline.left() < MIN_LEFT_S:
                raise OutOfTime(name)
            row = guarded(lambda: train_layout(layout, device, sizes, batches, nvme_dir, deadline),
                          out["errors"], name)
            if row is not None:
                out["runs"][name] = row
            free()
            save()
    finally:
        if created:
            dist.destroy_process_group()
