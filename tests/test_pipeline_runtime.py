"""The pipeline runtime on real gloo processes: parity with one process, and activation memory per schedule.

Parity: the same tiny Llama, the same microbatches and torch AdamW for 20 fp32 steps, run as a
pipeline of N processes and as the plain model in this process; every step's loss and the final
full weights must agree. Memory: the floating-point tensors saved for backward on stage 0 are
counted while they are alive.
"""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from angelptm.config import ModelConfig
from angelptm.distributed import ParallelDims, group_of, init, materialize
from angelptm.distributed.collectives import comm_bytes
from angelptm.distributed.pipeline import PipelineRunner, build_schedule, merge_stages, split_model
from angelptm.distributed.spawn import run_distributed
from angelptm.models.llama import build_llama

MODEL = ModelConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=32)
MICRO_BATCH, SEQ, STEPS, SEED = 2, 32, 20, 0


def _microbatches(step: int, m: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Arithmetic sequences mod 64 with random starts and strides: learnable, so the loss moves."""
    gen = torch.Generator().manual_seed(1000 + step)
    start, stride = (torch.randint(0, 64, (m, MICRO_BATCH, 1), generator=gen) for _ in range(2))
    rows = (start + stride * torch.arange(SEQ + 1)) % 64
    return list(rows[:, :, :-1]), list(rows[:, :, 1:])


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _adamw(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=3e-3, weight_decay=0.1)


def _single_process(m: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    torch.set_num_threads(1)
    model = materialize(build_llama(MODEL), torch.device("cpu"), SEED)
    opt = _adamw(model.parameters())
    losses = []
    for step in range(STEPS):
        inputs, targets = _microbatches(step, m)
        total = 0.0
        for x, y in zip(inputs, targets):
            loss = _loss(model(x), y)
            (loss / m).backward()
            total += loss.item()
        losses.append(total / m)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _pipeline_rank(schedule: str, m: int, virtual_stages: int):
    pp = dist.get_world_size()
    mesh = init(ParallelDims(pp=pp))
    group = group_of(mesh, "pp")
    chunks = [materialize(c, torch.device("cpu"), SEED)
              for c in split_model(build_llama(MODEL), group.rank, pp, virtual_stages, SEQ)]
    runner = PipelineRunner(chunks, build_schedule(schedule, pp, m, virtual_stages)[group.rank], group,
                            _loss, (MICRO_BATCH, SEQ, MODEL.dim))
    model = merge_stages(chunks)  # this rank's parameters under the full model's names
    opt = _adamw(model.parameters())
    losses = []
    for step in range(STEPS):
        losses.append(runner.step(*_microbatches(step, m)))
        opt.step()
        opt.zero_grad(set_to_none=True)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return losses, weights, comm_bytes().get("pp", 0)


PARITY = [  # (schedule, pp, microbatches, virtual stages)
    ("1f1b", 2, 4, 1),
    ("1f1b", 4, 8, 1),
    ("interleaved", 2, 4, 2),
    ("zero_bubble", 2, 4, 1),
]


@pytest.mark.slow
@pytest.mark.parametrize("schedule,pp,m,v", PARITY, ids=[f"{s}-pp{p}-v{v}" for s, p, _, v in PARITY])
def test_pipeline_matches_single_process(schedule, pp, m, v):
    ref_losses, ref_weights = _single_process(m)
    ranks = run_distributed(_pipeline_rank, pp, schedule, m, v)
    for rank_losses, _, _ in ranks:  # every rank reports the same loss
        assert rank_losses == ranks[-1][0]
    for step, (ours, ref) in enumerate(zip(ranks[0][0], ref_losses)):
        assert abs(ours - ref) / abs(ref) < 1e-4, f"step {step}: {ours} vs {ref}"
    merged = {k: w for _, weights, _ in ranks for k, w in weights.items()}
    assert merged.keys() == ref_weights.keys()
    for name, ref in ref_weights.items():
        torch.testing.assert_close(merged[name], ref, rtol=1e-4, atol=1e-5, msg=name)
    # Each hidden state crosses each stage boundary once per microbatch, its gradient once back.
    boundary = MICRO_BATCH * SEQ * MODEL.dim * 4 * m * STEPS
    assert sum(sent for _, _, sent in ranks) == 2 * (pp * v - 1) * boundary


# ---------------------------------------------------------------------------------------------
# Activation memory on stage 0


class _LiveSavedActivations:
    """Counts distinct floating-point non-parameter tensors saved for backward that are still alive."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self.seen: dict[int, weakref.finalize] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point() and not isinstance(t, nn.Parameter) and id(t) not in self.seen:
            self.live += 1
            self.peak = max(self.peak, self.live)
            self.seen[id(t)] = weakref.finalize(t, self._gone, id(t))
        return t

    def _gone(self, key: int) -> None:
        self.live -= 1
        del self.seen[key]

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def _stage0_peaks(schedules: tuple[str, ...], m: int) -> tuple[dict[str, int], int]:
    """(peak live saved activations on stage 0 during a step, per schedule; those of one forward)."""
    pp = dist.get_world_size()
    group = group_of(init(ParallelDims(pp=pp)), "pp")
    chunks = [materialize(c, torch.device("cpu"), SEED) for c in split_model(build_llama(MODEL), group.rank, pp)]
    inputs, targets = _microbatches(0, m)
    peaks = {}
    for schedule in schedules:
        runner = PipelineRunner(chunks, build_schedule(schedule, pp, m)[group.rank], group, _loss,
                                (MICRO_BATCH, SEQ, MODEL.dim))
        counter = _LiveSavedActivations()
        with counter.hooks():
            runner.step(inputs, targets)
        peaks[schedule] = counter.peak
    one = _LiveSavedActivations()
    if group.rank == 0:  # stage 0 takes token ids
        with one.hooks():
            chunks[0](inputs[0])  # its output, and what it saved for backward, are freed at once
    return peaks, one.peak


@pytest.mark.slow
def test_stage0_holds_pp_microbatches_under_1f1b_and_all_under_gpipe():
    pp, m = 4, 8
    (peaks, per_microbatch), *_ = run_distributed(_stage0_peaks, pp, ("1f1b", "gpipe"), m)
    assert per_microbatch > 0
    assert peaks["1f1b"] == pp * per_microbatch
    assert peaks["gpipe"] == m * per_microbatch
