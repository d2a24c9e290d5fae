"""Every ZeRO stage × tier reproduces torch.optim.AdamW in one process (fp32, 20 steps, < 1e-5).

All layouts of one dp degree train in turn inside one pair of processes (one process group), so
the whole matrix costs one spawn.
"""

import pytest

from angelptm.distributed.spawn import run_distributed
from test_zerocache_support import batches, loss_difference, reference_run, relative_difference, zerocache_run

STEPS = 20
TOLERANCE = 1e-5

# (stage, offload_optimizer, offload_params, device_budget_gb, accum, sync, activation checkpointing);
# sync as in train_steps
LAYOUTS = [
    (0, "none", "none", None, 2, "last", "none"),
    (0, "cpu", "none", None, 2, "every", "none"),  # reduce after every microbatch: still the exact mean
    (0, "nvme", "none", None, 1, "last", "none"),
    (1, "none", "none", None, 2, "after", "none"),  # all microbatches local, one reduction at the end
    (1, "cpu", "none", None, 2, "every", "none"),
    (1, "nvme", "none", None, 1, "last", "none"),
    (2, "none", "none", None, 2, "last", "none"),
    (2, "cpu", "none", None, 1, "last", "none"),
    (2, "nvme", "none", None, 2, "after", "none"),
    (3, "none", "none", None, 2, "last", "none"),
    (3, "cpu", "none", None, 1, "last", "none"),
    (3, "nvme", "none", None, 1, "last", "none"),
    (3, "none", "cpu", None, 1, "last", "none"),
    (3, "cpu", "cpu", None, 2, "last", "none"),
    (3, "nvme", "cpu", None, 2, "after", "none"),
    (3, "cpu", "cpu", 0.0025, 2, "last", "none"),  # a budget: pages split between device and host
    (3, "none", "cpu", None, 2, "last", "full"),  # blocks recomputed in backward: gathered again
    (2, "cpu", "none", None, 1, "last", "selective"),
]


def _train_layouts(dp: int, nvme_dir: str, layouts: list) -> list:
    data = batches(STEPS, 8)
    out = []
    for stage, offload_optimizer, offload_params, budget, accum, sync, checkpointing in layouts:
        losses, weights = zerocache_run(
            data, accum, sync, checkpointing, stage=stage, offload_optimizer=offload_optimizer,
            offload_params=offload_params, nvme_dir=nvme_dir, device_budget_gb=budget)
        out.append((losses, weights))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("dp", [2, 1])
def test_every_stage_and_tier_matches_single_process_adamw(dp, tmp_path):
    layouts = LAYOUTS if dp == 2 else [layout for layout in LAYOUTS if layout[0] in (0, 3)]
    results = run_distributed(_train_layouts, dp, dp, str(tmp_path), layouts)[0]
    references = {accum: reference_run(batches(STEPS, 8), dp, accum) for accum in (1, 2)}
    for layout, (losses, weights) in zip(layouts, results):
        ref_losses, ref_weights = references[layout[4]]
        assert loss_difference(losses, ref_losses) < TOLERANCE, layout
        assert relative_difference(weights, ref_weights) < TOLERANCE, layout
