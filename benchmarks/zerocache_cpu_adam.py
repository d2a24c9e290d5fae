"""CPU AdamW step: ZeROCache's host-tier update against DeepSpeedCPUAdam and torch's fused AdamW.

For each model size the same AdamW step (fp32, 28 bytes of memory traffic per parameter) runs
under each optimizer, alternating round by round:

- zerocache@zerocache:  what ZeROCache runs for host-tier optimizer state, on its own memory:
                        page by page (32 MB pages), `zerocache.adamw.adamw_` over the page's slab
                        (master, exp_avg, exp_avg_sq laid out as `buffers.PageBuffers` does, in
                        `tiers.host_empty` memory) and the page's gradient staging buffer;
- torch_fused@torch:    `torch.optim.AdamW(fused=True).step()` on four whole tensors from torch's
                        allocator;
- deepspeed@torch:      `DeepSpeedCPUAdam.step()` on the same four tensors.

These give the "as deployed" ratios. To separate the kernel from the memory layout, DeepSpeed's
kernel (its `adam_update` op) also runs page by page on ZeROCache's memory
(deepspeed_kernel@zerocache), and ZeROCache's paged update on torch's tensors (zerocache@torch).
Sizes whose two memory sets do not fit in memory together switch between the sets `--phases`
times (rounds alternate the optimizers within each), so that both sample the same stretch of a
machine whose speed drifts; their as-deployed ratios pair rounds of neighbouring phases.

Roofline: AdamW reads p, g, m, v and writes p, m, v: 28 bytes per parameter. The bandwidth comes
from the same run: a copy (8 bytes counted per element, as asked) and an in-place add (12 bytes,
a read-modify-write like AdamW's, without the copy's hidden write-allocate reads).

    python benchmarks/zerocache_cpu_adam.py                       # 100M, 300M and 1B parameters
    python benchmarks/zerocache_cpu_adam.py --sizes 100M --rounds 5

Prints a table and writes benchmarks/results/zerocache_cpu_adam.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import psutil
import torch

from angelptm.zerocache.adamw import adamw_
from angelptm.zerocache.buffers import slab_numel, slab_segments
from angelptm.zerocache.tiers import host_empty

HYPER = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
PAGE_NUMEL = 32 * 2**20 // 4
BANDWIDTH_NUMEL = 2**28  # 1 GiB per buffer: far beyond every cache
ADAMW_BYTES = 28


def parse_size(text: str) -> int:
    scale = {"K": 10**3, "M": 10**6, "B": 10**9}[text[-1].upper()]
    return int(float(text[:-1]) * scale)


def fill(p, g, m, v) -> None:
    for t in (p, g, m):
        t.normal_()
    v.normal_().square_()


def zerocache_memory(numel: int) -> dict:
    """The paged update and DeepSpeed's kernel over ZeROCache's host-tier layout."""
    from deepspeed.ops.op_builder import CPUAdamBuilder

    pages = []  # [master, grad, exp_avg, exp_avg_sq] of each page
    for start in range(0, numel, PAGE_NUMEL):
        own = min(PAGE_NUMEL, numel - start)
        exp_avg, exp_avg_sq, master = slab_segments(host_empty(slab_numel(own, True), torch.float32, False), own)
        pages.append([master, host_empty(own, torch.float32, False), exp_avg, exp_avg_sq])
        fill(*pages[-1])
    step = torch.zeros(())
    ds_op = CPUAdamBuilder().load(verbose=False)
    ds_op.create_adam(1, HYPER["lr"], *HYPER["betas"], HYPER["eps"], HYPER["weight_decay"], True, False)
    ds_step = [0]

    def zerocache() -> None:
        step.add_(1)
        for p, g, m, v in pages:
            adamw_([p], [g], [m], [v], step, **HYPER)

    def deepspeed_kernel() -> None:
        ds_step[0] += 1
        for p, g, m, v in pages:
            ds_op.adam_update(1, ds_step[0], HYPER["lr"], *HYPER["betas"], HYPER["eps"], HYPER["weight_decay"],
                              True, p, g, m, v)

    return {"zerocache": zerocache, "deepspeed_kernel": deepspeed_kernel}


def torch_memory(numel: int) -> dict:
    """torch's fused AdamW, DeepSpeedCPUAdam and the paged update over four whole torch tensors."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    p, g, m, v = (torch.empty(numel) for _ in range(4))
    fill(p, g, m, v)
    param = torch.nn.Parameter(p, requires_grad=True)
    param.grad = g
    fused = torch.optim.AdamW([param], fused=True, **HYPER)
    fused.state[param] = {"step": torch.zeros(()), "exp_avg": m, "exp_avg_sq": v}
    ds = DeepSpeedCPUAdam([param], adamw_mode=True, **HYPER)
    ds.state[param] = {"step": 0, "exp_avg": m, "exp_avg_sq": v}
    step = torch.zeros(())

    def zerocache() -> None:
        step.add_(1)
        for i in range(0, numel, PAGE_NUMEL):
            page = slice(i, i + PAGE_NUMEL)
            adamw_([p[page]], [g[page]], [m[page]], [v[page]], step, **HYPER)

    return {"torch_fused": fused.step, "deepspeed": ds.step, "zerocache": zerocache}


MEMORIES: dict[str, Callable[[int], dict]] = {"zerocache": zerocache_memory, "torch": torch_memory}


def bandwidth(rounds: int) -> dict:
    a, b = torch.empty(BANDWIDTH_NUMEL).normal_(), torch.empty(BANDWIDTH_NUMEL).normal_()
    times = {"copy": [], "add": []}
    for _ in range(rounds + 1):
        for name, fn in (("copy", lambda: a.copy_(b)), ("add", lambda: a.add_(b))):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    per_element = {"copy": 8, "add": 12}
    return {name: BANDWIDTH_NUMEL * per_element[name] / statistics.median(t[1:]) for name, t in times.items()}


def time_rounds(sets: dict, rounds: int) -> dict:
    """{"optimizer@memory": [seconds per round]}; every optimizer on every memory each round."""
    runs = {f"{name}@{memory}": fn for memory, fns in sets.items() for name, fn in fns.items()}
    times = {key: [] for key in runs}
    for fn in runs.values():  # warm-up: first touches, thread pools, JIT-loaded extension
        fn()
    for r in range(rounds):
        for key in (list(runs) if r % 2 == 0 else list(reversed(runs))):
            start = time.perf_counter()
            runs[key]()
            times[key].append(time.perf_counter() - start)
    return times


def summarise(numel: int, times: dict, bw: dict) -> dict:
    def ratio(ours: str, other: str) -> dict:
        per_round = [t_other / t_ours for t_ours, t_other in zip(times[ours], times[other])]
        return {"min": min(per_round), "median": statistics.median(per_round), "max": max(per_round)}

    rate = {key: numel / statistics.median(t) for key, t in times.items()}
    roofline = {name: value / ADAMW_BYTES for name, value in bw.items()}
    return {
        "params": numel,
        "params_per_s": rate,
        "ratios": {
            "as deployed: zerocache / deepspeed": ratio("zerocache@zerocache", "deepspeed@torch"),
            "as deployed: zerocache / torch_fused": ratio("zerocache@zerocache", "torch_fused@torch"),
            "zerocache memory: zerocache / deepspeed kernel": ratio("zerocache@zerocache",
                                                                     "deepspeed_kernel@zerocache"),
            "torch memory: zerocache / torch_fused": ratio("zerocache@torch", "torch_fused@torch"),
            "torch memory: torch_fused / deepspeed": ratio("torch_fused@torch", "deepspeed@torch"),
        },
        "bandwidth_GBps": {k: v / 1e9 for k, v in bw.items()},
        "roofline_params_per_s": roofline,
        "zerocache_fraction_of_roofline": {k: rate["zerocache@zerocache"] / v for k, v in roofline.items()},
    }


def run_size(numel: int, rounds: int, phases: int) -> dict:
    together = psutil.virtual_memory().available > 2 * 16 * numel * 1.15
    bw = bandwidth(rounds)
    if together:
        times = time_rounds({memory: build(numel) for memory, build in MEMORIES.items()}, rounds)
    else:  # one memory at a time, switching `phases` times so that both sample the same stretch
        times = {}
        for phase in range(phases):
            order = list(MEMORIES) if phase % 2 == 0 else list(reversed(MEMORIES))
            for memory in order:
                for key, t in time_rounds({memory: MEMORIES[memory](numel)}, rounds // phases).items():
                    times.setdefault(key, []).extend(t)
                gc.collect()
    return {**summarise(numel, times, bw), "memories_alternated": together,
            "phases": 1 if together else phases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["100M", "300M", "1B"])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--phases", type=int, default=4,
                        help="switches between the two memories for sizes that do not fit both at once")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "zerocache_cpu_adam.json"))
    args = parser.parse_args()
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    results = {}
    for text in args.sizes:
        results[text] = run_size(parse_size(text), args.rounds, args.phases)
        gc.collect()
        rates = results[text]["params_per_s"]
        print(f"{text}: G params/s " + ", ".join(f"{k} {v / 1e9:.3f}" for k, v in rates.items()))

    def fmt(r: dict) -> str:
        return f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})"

    names = list(next(iter(results.values()))["ratios"])
    print(f"{'size':>5} {'ours G/s':>8}  " + "  ".join(f"{n:>24.24}" for n in names) + "  % roofline copy/add")
    for text, r in results.items():
        roof = r["zerocache_fraction_of_roofline"]
        print(f"{text:>5} {r['params_per_s']['zerocache@zerocache'] / 1e9:>8.3f}  "
              + "  ".join(f"{fmt(r['ratios'][n]):>24}" for n in names)
              + f"  {roof['copy']:.0%} / {roof['add']:.0%}")
    meta = {"threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
            "torch": torch.__version__, "page_numel": PAGE_NUMEL, "rounds": args.rounds,
            "ratio_columns": names}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "sizes": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
