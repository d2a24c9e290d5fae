"""Communication per optimizer step of each ZeRO stage, measured on the wire, against theory.

Trains a small Llama for a few steps on `dp` local gloo processes per stage and measures, for one
step (forward, backward, gradient clipping, update), the bytes each rank wrote to its sockets, read
from `/proc/self/io` (`wchar`: every byte handed to write/send system calls; nothing else writes
during the step). Theory, for N parameters of b bytes and a ring/direct algorithm on dp ranks:

    stage 0   all-reduce of the gradients                     2·N·b·(dp-1)/dp
    stage 1   reduce-scatter + all-gather of the parameters   2·N·b·(dp-1)/dp
    stage 2   the same (one microbatch per step)              2·N·b·(dp-1)/dp
    stage 3   all-gather forward + backward + reduce-scatter  (3·N - K)·b·(dp-1)/dp
              (K: the parameters that forward keeps gathered for backward, see gather.py)
    3+fp8     stage 3 of the model in FP8 (tensorwise) with fp8_all_gather: the F weights of the
              FP8 layers gathered as 1-byte codes   (2·(N-F)·b + 2·F·1 + N·b - K·b)·(dp-1)/dp

N is the model's parameter count; ZeROCache's pages pad it by a fraction of a percent (reported).
Goal: measured within 5% of theory.

    python benchmarks/zerocache_comm.py            # dp 2 and 4
    python benchmarks/zerocache_comm.py --dp 2

Prints a table and writes benchmarks/results/zerocache_comm.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from angelptm.config import ModelConfig
from angelptm.distributed.spawn import run_distributed
from angelptm.fp8 import Float8Linear, convert_to_float8
from angelptm.models.llama import build_llama, num_params
from angelptm.zerocache import ZeROCacheOptimizer

MODEL = ModelConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=768, vocab_size=259, max_seq_len=128)
THEORY_FACTOR = {0: 2, 1: 2, 2: 2, 3: 3}
PAGE_MB = 1.0
STAGES = [0, 1, 2, 3, "3+fp8"]


def build_model(stage) -> torch.nn.Module:
    model = build_llama(MODEL, "cpu")
    model.init_weights(0)
    return convert_to_float8(model, "tensorwise") if stage == "3+fp8" else model


def theory_bytes(stage, dp: int, kept: int) -> float:
    """`kept`: the parameters (K) that stage 3 keeps gathered from forward into backward."""
    n = num_params(MODEL)
    share = (dp - 1) / dp
    if stage != "3+fp8":
        return (THEORY_FACTOR[stage] * n - kept) * 4 * share
    f = sum(m.weight.numel() for m in build_model(stage).modules() if isinstance(m, Float8Linear))
    return (2 * (n - f) * 4 + 2 * f + n * 4 - kept * 4) * share


def kept_for_backward(opt: ZeROCacheOptimizer) -> int:
    """Parameters in the full-precision pages that forward keeps gathered for backward."""
    gatherer = opt._gatherer
    if gatherer is None:
        return 0
    fp8 = gatherer.fp8
    return sum(slot.numel for index in gatherer._kept_for_backward if fp8 is None or index not in fp8
               for slot in opt._buffers[index].page.slots)


def socket_bytes_written() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar"))


def _measure(stages: list[int], steps: int) -> list[dict]:
    out = []
    rows = torch.randint(0, MODEL.vocab_size, (2, 129), generator=torch.Generator().manual_seed(dist.get_rank()))
    for stage in stages:
        model = build_model(stage)
        fp8 = stage == "3+fp8"
        with ZeROCacheOptimizer(model, None, stage=3 if fp8 else stage, page_mb=PAGE_MB, fp8_all_gather=fp8) as opt:
            for _ in range(steps):
                # Stages 1-2 send the step's parameter gathers as soon as the step ends and finish
                # them in the next forward: the window holds one step's gathers, all sent.
                opt._settle_params()
                dist.barrier()
                before = socket_bytes_written()
                logits = model(rows[:, :-1])
                F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten()).backward()
                opt.clip_grad_norm_(1.0)
                opt.step()
                opt.zero_grad()
                opt._settle_params()
                wire = socket_bytes_written() - before
                counted = sum(opt.comm_bytes.values())
            padded = sum(b.page.numel for b in opt._buffers)
            kept = kept_for_backward(opt)
        out.append({"stage": stage, "wire_bytes": wire, "counted_bytes": counted, "padded_numel": padded,
                    "kept_numel": kept})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--steps", type=int, default=3, help="the last step is measured")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "zerocache_comm.json"))
    args = parser.parse_args()
    n = num_params(MODEL)
    rows = []
    print(f"{'dp':>3} {'stage':>5} {'theory MB':>10} {'wire MB':>9} {'wire/theory':>11} {'counted/theory':>14} "
          f"{'padding':>8}")
    for dp in args.dp:
        per_rank = run_distributed(_measure, dp, STAGES, args.steps)
        for stage_results in zip(*per_rank):
            stage = stage_results[0]["stage"]
            theory = theory_bytes(stage, dp, stage_results[0]["kept_numel"])
            wire = max(r["wire_bytes"] for r in stage_results)
            counted = max(r["counted_bytes"] for r in stage_results)
            padding = stage_results[0]["padded_numel"] / n - 1
            rows.append({"dp": dp, "stage": stage, "theory_bytes": theory, "wire_bytes_max_rank": wire,
                         "wire_bytes_per_rank": [r["wire_bytes"] for r in stage_results],
                         "counted_bytes": counted, "wire_over_theory": wire / theory,
                         "counted_over_theory": counted / theory, "page_padding": padding,
                         "kept_for_backward_params": stage_results[0]["kept_numel"]})
            print(f"{dp:>3} {stage:>5} {theory / 1e6:>10.2f} {wire / 1e6:>9.2f} {wire / theory:>11.3f} "
                  f"{counted / theory:>14.3f} {padding:>8.2%}")
    meta = {"params": n, "bytes_per_param": 4, "page_mb": PAGE_MB, "steps": args.steps,
            "measure": "/proc/self/io wchar delta over one optimizer step, gloo on local processes"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
