"""Layout parity: train under a layout on N local processes and compare with the single-process run.

`run_layout` launches the real `Trainer` on N gloo processes (CPU, float32) and returns the loss
of every step, the loss each rank reported at the last step, the full final weights (read from the
run's last checkpoint into one plain model) and the communication bytes of the last step; `compare` gives the
largest relative difference of the losses and of the weights against a reference run. The
project's rule is that any layout reproduces the single-process loss curve to a relative 1e-4
per step over 20 steps; use this when adding a layout or changing a parallel layer:

    reference = run_layout(world_size=1)
    result = run_layout({"tp": 2, "cp": 2}, world_size=4)
    loss_diff, weight_diff = compare(result, reference)

`python -m angelptm.distributed.parity` prints the table for the standard layouts.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from angelptm.config import config_from_dict
from angelptm.distributed.spawn import run_distributed
from angelptm.train.checkpoint import load_model

# A model small enough for 8 processes on 2 cores, yet with every feature the layouts must split:
# grouped-query attention (kv heads replicated at tp 4), a vocabulary that tp 2 and 4 must pad,
# and a layer for each of 4 pipeline stages.
TINY_JOB: dict[str, Any] = {
    "model": {"dim": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 128, "vocab_size": 259,
              "max_seq_len": 64},
    "optim": {"warmup_steps": 5},
    "data": {"source": "synthetic"},
    "train": {"steps": 20, "global_batch": 4, "micro_batch": 2, "seq_len": 32, "log_every": 1,
              "ckpt_every": 0, "resume": "never", "sample_tokens": 0},
}


# The layouts every change must keep in parity, by world size.
STANDARD_LAYOUTS: dict[int, list[dict]] = {
    2: [{"tp": 2}, {"tp": 2, "sequence_parallel": False}, {"cp": 2}, {"cp": 2, "cp_mode": "ulysses"},
        {"pp": 2}, {"pp": 2, "pp_schedule": "interleaved", "pp_virtual_stages": 2},
        {"pp": 2, "pp_schedule": "zero_bubble"}, {"pp": 2, "pp_schedule": "gpipe"}],
    4: [{"tp": 4}, {"cp": 4}, {"dp": 2, "tp": 2}, {"tp": 2, "cp": 2},
        {"pp": 4}, {"pp": 2, "tp": 2}, {"pp": 2, "dp": 2}, {"pp": 2, "cp": 2}],
    8: [{"dp": 2, "tp": 2, "cp": 2}, {"dp": 2, "tp": 2, "pp": 2}],
}


@dataclass
class LayoutRun:
    losses: list[float]  # the loss of every step, as logged by rank 0
    grad_norms: list[float]  # the gradient norm of every step, before clipping, as logged by rank 0
    last_losses: list[float]  # the last step's loss as each rank reported it
    weights: dict[str, torch.Tensor]  # full final weights, read from the run's last checkpoint
    comm_bytes: dict[str, int]  # bytes rank 0 sent in the last step, per mesh dimension
    val_losses: list[float]  # the validation loss at each evaluated step (train.eval_every), as logged by rank 0
    records: list[dict]  # every step's metrics.jsonl record, as logged by rank 0


def _train_layouts(job: dict, layouts: list[list[str]], output_root: str) -> list[tuple]:
    """On every rank: train `job` once per layout in turn (one process group serves them all)."""
    from angelptm.train.trainer import Trainer  # the trainer imports this package

    results = []
    for i, settings in enumerate(layouts):
        trainer = Trainer(config_from_dict(job, settings + [f"train.output_dir={output_root}/{i}"]))
        record = trainer.fit()  # ends with a checkpoint: the full weights, whatever the layout
        results.append((record["loss"], record["comm_bytes"]))
    dist.destroy_process_group()
    return results


def run_layouts(layouts: list[dict], world_size: int, job: Optional[dict] = None,
                overrides: Optional[list[str]] = None) -> list[LayoutRun]:
    """Train `job` (default TINY_JOB) under each layout (a dict of parallel degrees) on `world_size` processes.

    The layouts run one after another in the same processes, which saves starting them each time.
    """
    settings = [[f"parallel.{key}={value}" for key, value in layout.items()] + list(overrides or [])
                for layout in layouts]
    with tempfile.TemporaryDirectory() as out:
        per_rank = run_distributed(_train_layouts, world_size, job or TINY_JOB, settings, out, init_group=False)
        runs = []
        for i in range(len(layouts)):
            lines = (Path(out) / str(i) / "metrics.jsonl").read_text().splitlines()
            records = [json.loads(line) for line in lines]
            results = [rank_results[i] for rank_results in per_rank]
            # Reading the final checkpoint into one plain model also checks that it reshards.
            _, model = load_model(Path(out) / str(i))
            weights = {name: p.detach() for name, p in model.named_parameters()}
            runs.append(LayoutRun([r["loss"] for r in records], [r["grad_norm"] for r in records],
                                  [loss for loss, _ in results], weights, results[0][1],
                                  [r["val_loss"] for r in records if "val_loss" in r], records))
    return runs


def run_layout(parallel: Optional[dict] = None, world_size: int = 1, job: Optional[dict] = None,
               overrides: Optional[list[str]] = None) -> LayoutRun:
    """Train `job` (default TINY_JOB) with `parallel` degrees on `world_size` processes."""
    return run_layouts([parallel or {}], world_size, job, overrides)[0]


def relative_difference(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """||ours - reference|| / ||reference||. Not the largest element's difference: under Adam, an
    element whose gradient sits near zero turns float32 summation-order noise (tp's partial sums,
    which differ with the CPU's kernels) into a visible drift of that one element, while a real fault
    (a missed reduction, a stale shard) moves whole tensors by about the learning rate per step (a relative 1e-2 and more here)."""
    return ((ours - reference).norm() / reference.norm()).item()


def compare(result: LayoutRun, reference: LayoutRun) -> tuple[float, float]:
    """(largest relative loss difference over the steps, largest relative weight difference over the tensors)."""
    if len(result.losses) != len(reference.losses):
        raise ValueError(f"{len(result.losses)} steps against {len(reference.losses)}")
    loss_diff = max(abs(a - b) / abs(b) for a, b in zip(result.losses, reference.losses))
    weight_diff = max(relative_difference(result.weights[name], ref) for name, ref in reference.weights.items())
    return loss_diff, weight_diff


def main() -> None:
    reference = run_layout(world_size=1)
    rows = []
    for world, layouts in STANDARD_LAYOUTS.items():
        for layout, result in zip(layouts, run_layouts(layouts, world)):
            rows.append((",".join(f"{k}={v}" for k, v in layout.items()), world, *compare(result, reference)))
    print(f"\n{'layout':<32} {'ranks':>5} {'max rel loss diff':>18} {'max rel weight diff':>20}")
    for name, world, loss_diff, weight_diff in rows:
        print(f"{name:<32} {world:>5} {loss_diff:>18.2e} {weight_diff:>20.2e}")


if __name__ == "__main__":
    main()
