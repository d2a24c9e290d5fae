"""Data wait per step under the demo: how long each step waited for its batch, against its step time.

    python benchmarks/data_wait.py [--steps 40]

Runs the demo job (the stdlib corpus, byte tokenizer, one process) for `--steps` steps and reads
`data_wait_s` and `step_time_s` from metrics.jsonl. Beside it, the time one step's batch takes to
load in place (sampling, memory-map reads, building the rows): what every step would wait without
the background prefetch. Goal: the wait under 1% of the step time. Writes benchmarks/results/data_wait.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from angelptm.config import config_from_dict
from angelptm.train.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config_from_dict({"train": {"steps": args.steps, "log_every": 1, "ckpt_every": 0, "sample_tokens": 0,
                                          "resume": "never", "output_dir": str(Path(tmp) / "run")},
                                "optim": {"warmup_steps": min(20, args.steps)}})
        trainer = Trainer(cfg)
        trainer.fit()
        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
        load_s = []
        for step in range(10):
            start = time.perf_counter()
            trainer.host_rows(trainer.sampler, step)
            load_s.append(time.perf_counter() - start)
    steady = records[1:]  # the first step has nothing prefetched
    wait = statistics.median(r["data_wait_s"] for r in steady)
    step = statistics.median(r["step_time_s"] for r in steady)
    load = statistics.median(load_s)
    result = {"steps": args.steps, "median_data_wait_s": wait, "median_step_time_s": step,
              "wait_fraction_of_step": wait / step, "max_wait_fraction": max(r["data_wait_s"] / r["step_time_s"]
                                                                            for r in steady),
              "median_in_place_load_s": load, "in_place_load_fraction_of_step": load / step}
    print(f"demo, {args.steps} steps: median step {step * 1e3:.1f} ms, waited for data {wait * 1e6:.0f} µs "
          f"({wait / step:.3%} of the step, worst {result['max_wait_fraction']:.3%}); loading a batch in place "
          f"takes {load * 1e3:.2f} ms ({load / step:.2%} of the step)")
    out = Path(__file__).resolve().parent / "results" / "data_wait.json"
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
