"""The memory ledger equals the bytes actually held, counted from the pages, at every phase of a step."""

import os
from collections import Counter
from functools import partial

import pytest

from angelptm.distributed.spawn import run_distributed
from angelptm.zerocache import ZeROCacheOptimizer
from angelptm.zerocache.ledger import KINDS, TIERS
from test_zerocache_support import HYPER, SMALL_PAGES, batches, loss_of, microbatches, tiny_model


def held_bytes(opt: ZeROCacheOptimizer) -> dict:
    """What the optimizer holds, counted from its pages' tensors, staging pools and NVMe file."""
    held = Counter()
    for b in opt._buffers:
        held["device", "params"] += b.full.untyped_storage().nbytes()  # zero while released
        if b.param_shard is not None:
            held[b.param_tier, "params"] += b.param_shard.untyped_storage().nbytes()
        for grad in (b.grad_full, b.grad_shard):
            if grad is not None:
                held["device", "grads"] += grad.untyped_storage().nbytes()
        if b.slab is not None:
            held[b.state_tier, "optimizer"] += b.slab.untyped_storage().nbytes()
    for pool in (opt._offload.grads, opt._offload.slabs):
        held["host", "buffers"] += sum(t.untyped_storage().nbytes() for t in pool._free)
    if opt._nvme is not None:
        held["nvme", "optimizer"] += os.fstat(opt._nvme._fd).st_blocks * 512  # blocks on the disk
    return {(t, k): held[t, k] for t in TIERS for k in KINDS}


def ledger_now(opt: ZeROCacheOptimizer) -> dict:
    report = opt.memory_ledger()
    return {(t, k): report[t][k] for t in TIERS for k in KINDS}


def _record(opt: ZeROCacheOptimizer, seen: list, phase: str) -> None:
    seen.append((phase, ledger_now(opt), held_bytes(opt), opt.memory_ledger()["device"]["peak"]))


def _record_in_forward(record, module, args, output) -> None:
    record("inside forward")


def _check_phases(nvme_dir: str, layouts: list[dict]) -> list[list[tuple]]:
    """For each layout: (phase, ledger, counted, peak device bytes) at quiet points of two steps."""
    results = []
    for layout in layouts:
        model = tiny_model()
        opt = ZeROCacheOptimizer(model, None, **HYPER, page_mb=SMALL_PAGES, nvme_dir=nvme_dir, **layout)
        seen = []
        record = partial(_record, opt, seen)
        record("built")
        hook = model.layers["1"].feed_forward.register_forward_hook(partial(_record_in_forward, record))
        for step_rows in batches(2, 8):
            for rows in microbatches(step_rows, opt.dp, opt.rank, 1):
                loss = loss_of(model, rows)
                record("after forward")
                loss.backward()
            opt.clip_grad_norm_(1.0)  # waits for the reductions
            record("after backward")
            opt.step()
            record("after step")
            opt.zero_grad()
        hook.remove()
        opt.close()
        results.append(seen)
    return results


LAYOUTS = [
    dict(stage=0, offload_optimizer="cpu"),
    dict(stage=1, offload_optimizer="nvme"),
    dict(stage=2, offload_optimizer="none"),
    dict(stage=3, offload_optimizer="nvme", offload_params="cpu", device_budget_gb=0.0025),
]


@pytest.mark.slow
def test_ledger_equals_bytes_held(tmp_path):
    results = run_distributed(_check_phases, 2, str(tmp_path), LAYOUTS)
    for rank_results in results:
        for layout, seen in zip(LAYOUTS, rank_results):
            for phase, ledger, counted, _ in seen:
                assert ledger == counted, (layout, phase)
            # The peak a step reports is at least every total seen during that step.
            step_phases = [s for s in seen if s[0] != "built"]
            first_step, second_step = step_phases[: len(step_phases) // 2], step_phases[len(step_phases) // 2 :]
            for step in (first_step, second_step):
                device_totals = [sum(v for (t, _), v in s[1].items() if t == "device") for s in step]
                assert step[-1][3] >= max(device_totals), layout
            if layout["stage"] == 3:
                # Pages are gathered in forward (the last block's kept for backward), all freed by the end of backward.
                built, inside, after = (next(s for s in seen if s[0] == phase)[1]["device", "params"]
                                        for phase in ("built", "inside forward", "after backward"))
                assert inside > built and after == built
