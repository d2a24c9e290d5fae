"""Expert-parallel all-to-all bytes per step per rank: the comm accounting against the theory.

Trains an MoE model with the real Trainer on local gloo processes at ep = dp = 2 and 4 and, for the
last step, compares on every rank the bytes `angelptm.distributed.collectives` counted for the
"ep" group with two predictions:

  theory (routing)   from the routing counts this step really had (read by a hook on every
                     expert-parallel layer, each microbatch): per layer and microbatch, rank r sends
                     the rows of its token copies bound for other ranks' experts (dispatch, and
                     again in backward as the gradients of the combine) and the rows other ranks
                     sent it (combine, and again in backward for the dispatch), each row dim ·
                     bytes, plus the exchange of per-expert counts (int64). Goal: within 2%.
  theory (balanced)  the same with perfectly balanced routing: tokens · top_k · dim · bytes ·
                     (ep-1)/ep per direction, four directions (forward and backward of dispatch
                     and combine), plus the counts; the routing ratio shows the imbalance.

    python benchmarks/moe_all_to_all.py [--ep 2 4] [--steps 3]

Prints a table and writes benchmarks/results/moe_all_to_all.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from angelptm.config import config_from_dict
from angelptm.distributed.spawn import run_distributed

COUNT_BYTES = 8  # the per-expert counts travel as int64

JOB = {
    "model": {"dim": 256, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 512, "vocab_size": 259,
              "max_seq_len": 128,
              "moe": {"n_experts": 8, "top_k": 2, "expert_ffn_dim": 256, "n_shared_experts": 1}},
    "data": {"source": "synthetic"},
    "optim": {"warmup_steps": 1},
    "train": {"global_batch": 8, "micro_batch": 2, "seq_len": 128, "log_every": 1, "ckpt_every": 0,
              "resume": "never", "sample_tokens": 0},
}


def _measure(job: dict, ep: int, steps: int, output_dir: str) -> dict:
    """On every rank: train `steps` steps at dp = ep; this rank's ep bytes in the last step and
    the routing counts of every expert-parallel layer call of that step on every rank."""
    from angelptm.distributed.expert_parallel import expert_parallel_modules
    from angelptm.train.trainer import Trainer

    cfg = config_from_dict(job, [f"parallel.dp={ep}", f"parallel.ep={ep}", f"train.steps={steps}",
                                 f"train.output_dir={output_dir}"])
    trainer = Trainer(cfg)
    calls: list[dict] = []

    def record(module, args):
        x, tokens_per_expert = args[0], args[1]
        calls.append({"counts": tokens_per_expert.tolist(), "row_bytes": x.shape[1] * x.element_size()})

    modules = expert_parallel_modules(trainer.model)
    for module in modules:
        module.register_forward_pre_hook(record)
    for _ in range(steps):
        calls.clear()
        stats = trainer.train_step()
        trainer.step += 1
    measured = stats["comm_bytes"].get("ep", 0)
    every_rank = [None] * dist.get_world_size()
    dist.all_gather_object(every_rank, calls)
    dist.destroy_process_group()
    return {"measured": measured, "calls": every_rank, "rank": modules[0].ep.rank}


def theory(calls_by_rank: list[list[dict]], rank: int, ep: int, top_k: int) -> tuple[int, int]:
    """(bytes from the real routing counts, bytes under balanced routing) that `rank` sends in a step."""
    routed = balanced = 0
    for i, call in enumerate(calls_by_rank[rank]):
        n_experts = len(call["counts"])
        local = n_experts // ep
        sends = [[sum(calls_by_rank[src][i]["counts"][dst * local:(dst + 1) * local]) for dst in range(ep)]
                 for src in range(ep)]
        to_others = sum(sends[rank]) - sends[rank][rank]
        from_others = sum(sends[src][rank] for src in range(ep)) - sends[rank][rank]
        counts = COUNT_BYTES * local * (ep - 1)
        routed += 2 * (to_others + from_others) * call["row_bytes"] + counts
        tokens = sum(call["counts"]) // top_k
        balanced += 4 * tokens * top_k * call["row_bytes"] * (ep - 1) // ep + counts
    return routed, balanced


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ep", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    top_k = JOB["model"]["moe"]["top_k"]
    rows = []
    for ep in args.ep:
        with tempfile.TemporaryDirectory() as out:
            per_rank = run_distributed(_measure, ep, JOB, ep, args.steps, out, init_group=False, threads=1)
        calls = per_rank[0]["calls"]  # by global rank, which is the ep rank here (dp = ep)
        for r in per_rank:
            routed, balanced = theory(calls, r["rank"], ep, top_k)
            rows.append({"layout": f"dp={ep},ep={ep}", "rank": r["rank"], "measured_bytes": r["measured"],
                         "theory_routing_bytes": routed, "theory_balanced_bytes": balanced,
                         "measured_over_theory": r["measured"] / routed,
                         "measured_over_balanced": r["measured"] / balanced})
    print(f"{'layout':<12} {'rank':>4} {'measured':>12} {'theory':>12} {'balanced':>12} {'meas/theory':>12} "
          f"{'meas/balanced':>14}")
    for row in rows:
        print(f"{row['layout']:<12} {row['rank']:>4} {row['measured_bytes']:>12,} {row['theory_routing_bytes']:>12,} "
              f"{row['theory_balanced_bytes']:>12,} {row['measured_over_theory']:>12.4f} "
              f"{row['measured_over_balanced']:>14.4f}")
    worst = max(abs(row["measured_over_theory"] - 1) for row in rows)
    print(f"largest difference from the routing theory: {worst:.2%} (goal: within 2%)")
    path = Path(__file__).resolve().parent / "results" / "moe_all_to_all.json"
    path.write_text(json.dumps({
        "benchmark": "moe_all_to_all",
        "steps": args.steps,
        "dtype": "float32",
        "torch": torch.__version__,
        "model": JOB["model"],
        "train": {k: JOB["train"][k] for k in ("global_batch", "micro_batch", "seq_len")},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "backend": "gloo"},
        "goals": {"measured_over_theory": 1.0},
        "tolerance": 0.02,
        "rows": rows,
    }, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
