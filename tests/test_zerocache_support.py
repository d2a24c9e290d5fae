"""Shared pieces of the ZeROCache tests: a tiny Llama, fixed batches, and two ways to train it.

`reference_run` is the single-process truth (torch.optim.AdamW with the trainer's parameter
groups, and torch's gradient clipping, on the whole global batch); `zerocache_run` trains the same
model under a ZeROCache layout on the calling rank of a process group. Both see the same
sequences in the same microbatches, so their losses and weights must agree to float32 rounding.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from angelptm.config import ModelConfig
from angelptm.distributed.parallelize import apply_activation_checkpointing
from angelptm.models.llama import build_llama
from angelptm.zerocache.optimizer import parameter_groups
from angelptm.zerocache import ZeROCacheOptimizer

TINY = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=259, max_seq_len=32)
HYPER = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
CLIP = 1.0
SMALL_PAGES = 0.03  # MB: the tiny model spans ~20 pages, so every path crosses page boundaries


def tiny_model(dtype: torch.dtype = torch.float32, seed: int = 0, **changes) -> torch.nn.Module:
    model = build_llama(ModelConfig(**{**vars(TINY), **changes}), "cpu")
    model.init_weights(seed)
    return model.to(dtype)


def batches(steps: int, rows: int, seed: int = 0) -> torch.Tensor:
    """(steps, rows, seq + 1) token ids: each step's global batch."""
    return torch.randint(0, TINY.vocab_size, (steps, rows, 33), generator=torch.Generator().manual_seed(seed))


def loss_of(model: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
    logits = model(rows[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), rows[:, 1:].flatten())


def microbatches(step_rows: torch.Tensor, dp: int, rank: int, accum: int) -> list[torch.Tensor]:
    """Rank `rank`'s microbatches of one global batch (rank-major, as the trainer splits it)."""
    return list(step_rows.chunk(dp)[rank].chunk(accum))


def reference_run(data: torch.Tensor, dp: int, accum: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = tiny_model()
    opt = torch.optim.AdamW(parameter_groups(model, HYPER["weight_decay"]), **HYPER)
    losses = []
    for step_rows in data:
        total = 0.0
        for rank in range(dp):
            for rows in microbatches(step_rows, dp, rank, accum):
                loss = loss_of(model, rows)
                (loss / (dp * accum)).backward()
                total += loss.item() / (dp * accum)
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def train_steps(model, opt: ZeROCacheOptimizer, data: torch.Tensor, accum: int, sync: str = "last") -> list[float]:
    """Train on this rank's share of `data`; return each step's loss averaged over the dp group.

    `sync`: "last" runs all but the last microbatch under no_sync(); "every" never uses it;
    "after" runs every microbatch under it and calls reduce_gradients() (a pipeline runner's way).
    """
    dp, rank = opt.dp, opt.rank
    losses = []
    for step_rows in data:
        total = torch.zeros(())
        for i, rows in enumerate(microbatches(step_rows, dp, rank, accum)):
            with opt.no_sync(sync == "after" or (sync == "last" and i < accum - 1)):
                loss = loss_of(model, rows)
                (loss / accum).backward()
            total += loss.detach() / accum
        if sync == "after":
            opt.reduce_gradients()
        opt.clip_grad_norm_(CLIP)
        opt.step()
        opt.zero_grad()
        dist.all_reduce(total, group=opt.group)
        losses.append(total.item() / dp)
    return losses


def full_weights(model, opt: ZeROCacheOptimizer) -> dict[str, torch.Tensor]:
    with opt.gathered_parameters():
        return {n: p.detach().clone() for n, p in model.named_parameters()}


def zerocache_run(data: torch.Tensor, accum: int, sync: str = "last", checkpointing: str = "none", **layout):
    """(losses, full weights) of training under `layout` (ZeROCacheOptimizer keywords), with the
    blocks' activations recomputed in backward when `checkpointing` says so."""
    model = tiny_model()
    apply_activation_checkpointing(model, checkpointing)
    with ZeROCacheOptimizer(model, None, **HYPER, page_mb=SMALL_PAGES, **layout) as opt:
        losses = train_steps(model, opt, data, accum, sync)
        return losses, full_weights(model, opt)


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest ||a - b|| / ||b|| over the tensors of two weight dicts."""
    assert a.keys() == b.keys()
    return max(((a[k].float() - b[k].float()).norm() / b[k].float().norm()).item() for k in a)


def loss_difference(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))
