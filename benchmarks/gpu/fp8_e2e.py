"""End-to-end section of the GPU suite: a Llama trained a few steps in bf16 autocast and, per recipe,
the same model with FP8 linear layers, from the same weights on the same batches; eagerly, and
(the compiled section) with both models' blocks compiled as `train.compile` does.

Both models get fp32 master weights, fused AdamW and bf16 autocast; the FP8 one skips the output
head. Steps alternate between the two and are timed one by one. Batches come from a small fixed
pool, cycled, so a model can learn something in a dozen steps: both loss curves are recorded,
and an FP8 model whose loss falls much less than the bf16 one's (a stale FP8 weight, say) is
flagged as not learning.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import nn

from harness import OutOfTime, median, ratio_stats, time_ms

from angelptm.config import ModelConfig
from angelptm.distributed.parallelize import apply_compile
from angelptm.fp8 import convert_to_float8, update_float8_scales
from angelptm.models.llama import build_llama, flops_per_token, num_params

H100_BF16_DENSE_PEAK = 989e12
# An FP8 model learns when its loss falls by at least this share of the bf16 model's fall.
LEARNING_SHARE = 0.8

E2E_SIZES = {
    "full": dict(llama=ModelConfig(dim=2048, n_layers=16, n_heads=16, n_kv_heads=8, ffn_dim=8192, vocab_size=32000,
                                   max_seq_len=2048),
                 batch=4, seq=2048, pool=2, warmup=3, steps=8, lr=1e-4),
    "dry": dict(llama=ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, vocab_size=259,
                                  max_seq_len=64),
                batch=2, seq=32, pool=2, warmup=2, steps=6, lr=3e-3),
}


def make_model(cfg: ModelConfig, device: torch.device, seed: int = 0) -> nn.Module:
    """The same weights for the same seed: initialised on the device from a seeded generator."""
    model = build_llama(cfg, "meta").to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02, generator=gen)
    return model


def make_step(model: nn.Module, batches: torch.Tensor, lr: float, losses: list, fp8: bool):
    """One training step per call on the next batch of the pool; appends the loss (on the device)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    calls = [0]

    def step():
        batch = batches[calls[0] % len(batches)]
        calls[0] += 1
        with torch.autocast(batch.device.type, dtype=torch.bfloat16):
            logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if fp8:
            update_float8_scales(model)
        losses.append(loss.detach())
    return step


def train_pair(recipe: str, device: torch.device, sizes: dict, batches: torch.Tensor, deadline,
               compiled: bool = False) -> dict:
    cfg = sizes["llama"]
    losses = {"bf16": [], "fp8": []}
    models = {"bf16": make_model(cfg, device), "fp8": convert_to_float8(make_model(cfg, device), recipe)}
    if compiled:
        for model in models.values():
            apply_compile(model)
    steps = {name: make_step(model, batches, sizes["lr"], losses[name], fp8=name == "fp8")
             for name, model in models.items()}
    times = {"bf16": [], "fp8": []}
    for i in range(sizes["warmup"] + sizes["steps"]):
        for name, step in steps.items():
            ms = time_ms(step, device, 1)
            if i >= sizes["warmup"]:
                times[name].append(ms)
        if deadline.left() < 5 and times["fp8"]:
            break
    curves = {name: [float(v) for v in torch.stack(vals).tolist()] for name, vals in losses.items()}
    drop = {name: (c[0] - c[-1]) / c[0] for name, c in curves.items()}
    row = {"loss": curves, "loss_drop": drop,
           "fp8_learns": drop["bf16"] > 0 and drop["fp8"] >= LEARNING_SHARE * drop["bf16"],
           "max_rel_loss_gap": max(abs(f - b) / b for f, b in zip(curves["fp8"], curves["bf16"])),
           "speedup": ratio_stats(times["bf16"], times["fp8"])}
    tokens = batches.shape[1] * (batches.shape[2] - 1)
    fpt = flops_per_token(cfg, batches.shape[2] - 1)
    for name in ("bf16", "fp8"):
        tps = tokens / (median(times[name]) / 1e3)
        row[f"{name}_step_ms"] = median(times[name])
        row[f"{name}_tokens_per_s"] = tps
        row[f"{name}_mfu"] = tps * fpt / H100_BF16_DENSE_PEAK if device.type == "cuda" else None
    return row


def run_e2e(out: dict, deadline, device: torch.device, sizes: dict, recipes, guarded, save, free,
            compiled: bool = False) -> None:
    cfg = sizes["llama"]
    batch, seq = sizes["batch"], sizes["seq"]
    out.update(model=asdict(cfg), params=num_params(cfg), batch=batch, seq=seq, lr=sizes["lr"],
               steps=sizes["warmup"] + sizes["steps"],
               note=(f"fp32 master weights, fused AdamW, bf16 autocast, {'compiled blocks' if compiled else 'eager'}; "
                     "FP8 skips the output head; "
                     f"{sizes['pool']} fixed batches cycled; loss curves cover warm-up steps too; an FP8 model "
                     f"'learns' when its loss falls by >= {LEARNING_SHARE:.0%} of the bf16 model's fall"))
    gen = torch.Generator(device=device).manual_seed(0)
    batches = torch.randint(cfg.vocab_size, (sizes["pool"], batch, seq + 1), device=device, generator=gen)
    out["recipes"], out["errors"] = {}, {}
    for recipe in recipes:
        if deadline.left() < 20:
            raise OutOfTime(recipe)
        row = guarded(lambda: train_pair(recipe, device, sizes, batches, deadline, compiled), out["errors"], recipe)
        if row is not None:
            out["recipes"][recipe] = row
        free()
        save()
