"""Pipeline bubble: each rank's idle fraction per schedule, measured from timestamps, beside theory.

Method. Four gloo processes run the real pipeline runtime (pp=4) over synthetic stages of equal
cost: every forward, input-gradient and weight-gradient pass lasts a fixed wall-clock time (one
unit; a full backward is the last two back to back; with v virtual stages each chunk's passes
last 1/v unit, so every schedule does the same work per rank). How a pass spends its time:

  wait (default)  holds the time with the core free, spinning only its last 2 ms to end on time.
                  Ranks may then outnumber cores (4 ranks on 2 shared cores here) and every pass
                  still lasts exactly its length, so the idle time measured is the schedule's and
                  the runtime's (waiting for peers, communication, Python between actions).
  compute         multiplies small matrices until the time is up. Needs a free core per rank:
                  with fewer, passes that overlap in time stretch while they wait for a core.

Each step starts after a barrier; the runner records host timestamps around every compute
action. A rank's idle fraction is 1 - (its compute time) / (last compute end on any rank -
first step start on any rank). All schedules run in the same processes, alternating step by
step, after a short warm-up round. Runtime overhead is about a millisecond per action on a
loaded 2-core machine, hence the long default unit.

Theory for equal stages: (p-1)/(m+p-1) for GPipe and 1F1B, (p-1)/(v·m+p-1) for interleaved
(its bubble relative to compute, (p-1)/m, divided by v), (p-1)/(3m+p-1) for ZB-H1 (a bubble of
(p-1)·(F + I - W) = (p-1)·F beside 3m·F of compute, a third of 1F1B's).

    python benchmarks/pipeline_bubble.py [--unit-ms 300] [--repeats 2] [--passes wait|compute]

Prints a table and writes benchmarks/results/pipeline_bubble.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from angelptm.distributed import ParallelDims, group_of, init
from angelptm.distributed.pipeline import PipelineRunner, build_schedule, theoretical_idle_fraction
from angelptm.distributed.pipeline.split_backward import weight_grad
from angelptm.distributed.spawn import run_distributed

PP = 4
MICROBATCHES = (8, 16)
SCHEDULES = (("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zero_bubble", 1))
SHAPE = (1, 32, 64)  # hidden states passed between stages: small, so compute dominates
GOAL_VS_THEORY = 1.15
GOAL_ZB_VS_1F1B = 0.45


def compute_for(seconds: float) -> None:
    """Compute (small matmuls) until `seconds` of wall-clock time have passed."""
    deadline = time.perf_counter() + seconds
    a = torch.full((32, 32), 1.0 / 32)
    while time.perf_counter() < deadline:
        a = a @ a


def wait_for(seconds: float) -> None:
    """Hold for `seconds` with the core free, then spin the last 2 ms so the pass ends on time."""
    deadline = time.perf_counter() + seconds
    time.sleep(max(0.0, seconds - 0.002))
    while time.perf_counter() < deadline:
        pass


PASSES = {"wait": wait_for, "compute": compute_for}


class _TimedPasses(torch.autograd.Function):
    """y = x·w whose forward, input-gradient and weight-gradient passes each last `stage.seconds`."""

    @staticmethod
    def forward(ctx, x, weight, stage):
        stage.hold(stage.seconds)
        ctx.save_for_backward(x, weight)
        ctx.stage = stage
        return x * weight

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stage = ctx.stage
        stage.hold(stage.seconds)

        def weight_pass() -> torch.Tensor:
            stage.hold(stage.seconds)
            return (grad_out * x).sum().reshape(1)

        # Postponed under zero-bubble, run at once otherwise.
        return grad_out * weight, weight_grad(weight, weight_pass), None


class TimedStage(nn.Module):
    def __init__(self, seconds: float, hold):
        super().__init__()
        self.seconds, self.hold = seconds, hold
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _TimedPasses.apply(x, self.weight, self)


def _mean_output(y: torch.Tensor, _target: torch.Tensor) -> torch.Tensor:
    return y.mean()


def _rank(microbatches: int, unit_s: float, repeats: int, passes: str) -> dict[str, list]:
    """On each rank: run every schedule `repeats` times, alternating, after a short warm-up; return timestamps."""
    group = group_of(init(ParallelDims(pp=PP)), "pp")
    runners, stages = {}, []
    for name, v in SCHEDULES:
        chunks = [TimedStage(unit_s / v, PASSES[passes]) for _ in range(v)]
        stages += chunks
        actions = build_schedule(name, PP, microbatches, v)[group.rank]
        runners[name] = PipelineRunner(chunks, actions, group, _mean_output, SHAPE)
    inputs = [torch.ones(SHAPE) for _ in range(microbatches)]
    targets = [torch.zeros(()) for _ in range(microbatches)]
    record: dict[str, list] = {name: [] for name in runners}
    full = {stage: stage.seconds for stage in stages}
    for round_ in range(repeats + 1):
        for stage in stages:  # the warm-up round only needs every code path once: make it short
            stage.seconds = full[stage] if round_ else 1e-3
        for name, runner in runners.items():
            dist.barrier(group=group.pg)
            start = time.perf_counter()
            runner.step(inputs, targets)
            if round_ > 0:
                record[name].append((start, [(s, e) for _, s, e in runner.timeline]))
    return record


def _idle_fractions(per_rank: list[tuple[float, list]]) -> list[float]:
    """One step's idle fraction per rank; host clocks (CLOCK_MONOTONIC) are shared on one machine."""
    start = min(s for s, _ in per_rank)
    end = max(spans[-1][1] for _, spans in per_rank)
    return [1.0 - sum(e - s for s, e in spans) / (end - start) for _, spans in per_rank]


def _spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unit-ms", type=float, default=300.0, help="duration of one forward pass")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--passes", choices=sorted(PASSES), default="wait",
                        help="wait: hold each pass with the core free (ranks may outnumber cores); "
                             "compute: run matmuls through it (needs a free core per rank)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "pipeline_bubble.json"))
    args = parser.parse_args()

    rows = []
    for m in MICROBATCHES:
        ranks = run_distributed(_rank, PP, m, args.unit_ms / 1000, args.repeats, args.passes)
        by_schedule = {}
        for name, v in SCHEDULES:
            steps = [_idle_fractions([ranks[r][name][i] for r in range(PP)]) for i in range(args.repeats)]
            mean_idle = [statistics.fmean(step) for step in steps]
            by_schedule[name] = mean_idle
            theory = theoretical_idle_fraction(name, PP, m, v)
            rows.append({
                "schedule": name, "pp": PP, "microbatches": m, "virtual_stages": v,
                "theory": theory,
                "measured": _spread(mean_idle),
                "per_rank_median": [statistics.median(step[r] for step in steps) for r in range(PP)],
                "measured_over_theory": statistics.median(mean_idle) / theory,
            })
        zb_vs_1f1b = [z / o for z, o in zip(by_schedule["zero_bubble"], by_schedule["1f1b"])]
        for row in rows:
            if row["microbatches"] == m and row["schedule"] == "zero_bubble":
                row["zero_bubble_over_1f1b"] = _spread(zb_vs_1f1b)

    print(f"pp={PP}, unit {args.unit_ms:g} ms, passes={args.passes}, {args.repeats} steps each, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus; idle fraction = 1 - compute / step")
    print(f"{'schedule':<12} {'m':>3} {'v':>2} {'theory':>7} {'measured (min/med/max)':>24} "
          f"{'meas/theory':>11}  per-rank (median)")
    for row in rows:
        spread = row["measured"]
        print(f"{row['schedule']:<12} {row['microbatches']:>3} {row['virtual_stages']:>2} {row['theory']:>7.3f} "
              f"{spread['min']:>8.3f}{spread['median']:>8.3f}{spread['max']:>8.3f} "
              f"{row['measured_over_theory']:>11.2f}  {' '.join(f'{x:.3f}' for x in row['per_rank_median'])}")
    within = all(row["measured_over_theory"] <= GOAL_VS_THEORY for row in rows)
    zb = [row["zero_bubble_over_1f1b"]["median"] for row in rows if "zero_bubble_over_1f1b" in row]
    print(f"goal measured <= {GOAL_VS_THEORY}x theory: {'met' if within else 'MISSED'}; "
          f"ZB-H1 / 1F1B (median, same run): {', '.join(f'{x:.2f}' for x in zb)} "
          f"(goal <= {GOAL_ZB_VS_1F1B}: {'met' if all(x <= GOAL_ZB_VS_1F1B for x in zb) else 'MISSED'})")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "pipeline_bubble",
        "unit_ms": args.unit_ms,
        "repeats": args.repeats,
        "passes": args.passes,
        "machine": {"cpus": os.cpu_count(), "load_average_1min": os.getloadavg()[0],
                    "platform": platform.platform(), "torch": torch.__version__},
        "rows": rows,
    }, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
