"""Logging overhead: TensorBoard + W&B (offline) against metrics.jsonl alone, on a tiny CPU model.

    python benchmarks/logging_overhead.py [--model tiny|demo] [--steps 40] [--repeats 7] [--log-every 1]

Trains the same job (`tiny`: a 2-layer, 64-wide Llama, batch 8 × 32 tokens; `demo`: the demo's
4.9M-parameter model, batch 8 × 256 tokens; synthetic data, one process, one torch thread) with
`train.loggers: [jsonl]` and with `[jsonl, tensorboard, wandb]` (`train.wandb.mode: offline`),
alternating, `--repeats` times each. On a machine shared with other jobs wall time
measures the neighbours as much as the run (a step of this job took 10-700 ms on 2 busy cores),
so the overhead is measured in CPU time, which they do not change:

- per step: the CPU time of the training process (every thread: the loop, the data prefetch, the
  loggers' writer thread) plus W&B's `wandb-core` helper process, from the first logged step after
  step 1 to the last (the loggers' start and W&B's finish are one-off costs, kept in `fit_cpu_s`);
- per record: the CPU time of each TensorBoard / W&B writer call on the writers' thread, and the
  wall time of each `MetricsLogger.log` call (jsonl, progress line, queueing for the writers:
  what a step waits for).

Goal: TensorBoard + W&B add under 1% to a step's CPU time, and their extra wait in `log` is under
1% of it too (the step's CPU time: a lower bound of its wall time on an idle machine). Step wall
times, whole-run times and their ratios are recorded too. Writes
benchmarks/results/logging_overhead[_demo][_log_everyN].json. The helper's CPU time is read from
/proc (Linux).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from angelptm.config import config_from_dict
from angelptm.train.trainer import Trainer

GOAL = 0.01  # what logging may add to a step, as a fraction of the step
MODELS = {  # model section, seq_len
    "tiny": (dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=259, max_seq_len=32), 32),
    "demo": ({}, 256),
}
SETTINGS = {
    "jsonl": {"loggers": ["jsonl"]},
    "jsonl+tensorboard+wandb": {"loggers": ["jsonl", "tensorboard", "wandb"],
                                "wandb": {"mode": "offline", "project": "logging-overhead"}},
}


def children_cpu_s() -> float:
    """CPU seconds used so far by this process's live child processes (W&B's helper)."""
    total, ticks = 0.0, os.sysconf("SC_CLK_TCK")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[1]) == os.getpid():
            total += (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
    return total


def cpu_s() -> float:
    """CPU seconds used so far by this process (all its threads) and its helper processes."""
    return time.process_time() + children_cpu_s()


def timed(log, wall: list[float], cpu: list[float], marks: dict[int, float] | None = None):
    """`log`, adding each call's wall seconds to `wall` and its thread's CPU seconds to `cpu`; the
    total CPU so far is noted in `marks` at the records of the steps it names."""
    def call(record):
        if marks is not None and record["step"] in marks:
            marks[record["step"]] = cpu_s()
        start, start_cpu = time.perf_counter(), time.thread_time()
        log(record)
        wall.append(time.perf_counter() - start)
        cpu.append(time.thread_time() - start_cpu)
    return call


def run_once(model: str, loggers: dict, steps: int, log_every: int, output_dir: Path) -> dict:
    section, seq_len = MODELS[model]
    cfg = config_from_dict({
        "model": section, "data": {"source": "synthetic"}, "optim": {"warmup_steps": 5},
        "train": dict(steps=steps, global_batch=8, micro_batch=8, seq_len=seq_len, log_every=log_every, ckpt_every=0,
                      sample_tokens=0, resume="never", output_dir=str(output_dir), **loggers)})
    start = time.perf_counter()
    trainer = Trainer(cfg)
    started = time.perf_counter()
    log_wall: list[float] = []
    writers_wall: list[float] = []
    writers_cpu: list[float] = []
    # The steady state: CPU from the first logged step after step 1 to the last, so neither the
    # loggers' start nor W&B's finish (one-off costs, in fit_cpu_s) counts as per-step work.
    first = max(2, log_every)
    marks = {first: 0.0, steps: 0.0}
    trainer.metrics.log = timed(trainer.metrics.log, log_wall, [], marks)
    for background in trainer.metrics.loggers:
        for writer in background.loggers:
            writer.log = timed(writer.log, writers_wall, writers_cpu)
    cpu_before = cpu_s()
    trainer.fit()  # closes the loggers too (W&B's finish)
    fit_cpu = cpu_s() - cpu_before
    whole = time.perf_counter() - start
    dist.destroy_process_group()
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {"whole_run_s": whole, "startup_s": started - start, "fit_cpu_s": fit_cpu,
            "cpu_s_per_step": (marks[steps] - marks[first]) / (steps - first),
            "median_step_time_s": statistics.median(r["step_time_s"] for r in records[1:]),  # step 1 warms up
            "median_log_call_s": statistics.median(log_wall[1:]),
            "writers_cpu_s_per_record": sum(writers_cpu) / len(log_wall)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--log-every", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("WANDB_SILENT", "true")
    torch.set_num_threads(1)  # one compute thread: CPU time is then the work, not idle threads spinning
    runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for name, loggers in SETTINGS.items():  # alternating, so drift in the machine's load hits both
                runs[name].append(run_once(args.model, loggers, args.steps, args.log_every,
                                           Path(tmp) / f"{name}-{repeat}"))
    medians = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}
    base, full = medians["jsonl"], medians["jsonl+tensorboard+wandb"]
    cpu_fraction = full["cpu_s_per_step"] / base["cpu_s_per_step"] - 1
    wait_fraction = (full["median_log_call_s"] - base["median_log_call_s"]) / args.log_every / base["cpu_s_per_step"]
    writers_fraction = full["writers_cpu_s_per_record"] / args.log_every / base["cpu_s_per_step"]
    result = {
        "config": {"model": args.model, "model_section": MODELS[args.model][0], "global_batch": 8,
                   "seq_len": MODELS[args.model][1], "steps": args.steps,
                   "log_every": args.log_every, "repeats": args.repeats, "device": "cpu", "torch_threads": 1,
                   "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "medians": medians,
        "runs": runs,
        "extra_cpu_fraction_of_step": cpu_fraction,
        "extra_wait_fraction_of_step": wait_fraction,
        "writers_cpu_fraction_of_step": writers_fraction,
        "ratio_step_wall_time": full["median_step_time_s"] / base["median_step_time_s"],
        "ratio_whole_run": full["whole_run_s"] / base["whole_run_s"],
        "extra_startup_s": full["startup_s"] - base["startup_s"],
        "goals": {"extra_cpu_fraction_of_step": GOAL, "extra_wait_fraction_of_step": GOAL,
                  "met": cpu_fraction < GOAL and wait_fraction < GOAL},
    }
    for name, m in medians.items():
        print(f"{name:>24}: {m['cpu_s_per_step'] * 1e3:.2f} ms CPU per step "
              f"(wall {m['median_step_time_s'] * 1e3:.1f} ms), "
              f"log call {m['median_log_call_s'] * 1e6:.0f} µs, writers {m['writers_cpu_s_per_record'] * 1e6:.0f} µs "
              f"CPU per record, start-up {m['startup_s']:.2f} s, whole run {m['whole_run_s']:.2f} s")
    print(f"tensorboard + wandb add {cpu_fraction:+.2%} CPU per step (goal < {GOAL:.0%}; their writer calls "
          f"{writers_fraction:.2%}) and {wait_fraction:+.3%} to the step's wait in log (goal < {GOAL:.0%}); "
          f"step wall time x{result['ratio_step_wall_time']:.2f}, whole run x{result['ratio_whole_run']:.2f} "
          f"({result['extra_startup_s']:+.2f} s start-up)")
    name = "logging_overhead" + ("" if args.model == "tiny" else f"_{args.model}") + (
        "" if args.log_every == 1 else f"_log_every{args.log_every}")
    out = Path(__file__).resolve().parent / "results" / f"{name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
