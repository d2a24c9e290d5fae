"""CPU AdamW step: ZeROCache's host-tier update against DeepSpeedCPUAdam and torch's fused AdamW.

For each model size the same AdamW step (fp32, 28 bytes of memory traffic per parameter at the
least) runs under each optimizer, alternating round by round:

- zerocache@zerocache:  what ZeROCache runs for host-tier optimizer state, on its own memory:
                        page by page (32 MB pages), `zerocache.adamw.adamw_` over the page's slab
                        (master, exp_avg, exp_avg_sq laid out as `buffers.PageBuffers` does, in
                        `tiers.host_empty` memory) and the page's gradient staging buffer;
- torch_fused@torch:    `torch.optim.AdamW(fused=True).step()` on four whole tensors from torch's
                        allocator;
- deepspeed@torch:      `DeepSpeedCPUAdam.step()` on the same four tensors.

These give the "as deployed" ratios. To separate the kernel from the memory layout, DeepSpeed's
kernel (its `adam_update` op) also runs page by page on ZeROCache's memory
(deepspeed_kernel@zerocache), and ZeROCache's paged update on torch's tensors
(zerocache@torch). Sizes whose two memory sets do not fit in memory together switch between the
sets `--phases` times (rounds alternate the optimizers within each), so that both sample the
same stretch of a machine whose speed drifts; their as-deployed ratios pair rounds of
neighbouring phases.

Scaled gradients: in training the gradients are divided by a scale every step (the dp average
and the clipping coefficient; fp16's loss scale too). Each optimizer also runs that step as it
deploys it ("_scaled" runs): ZeROCache passes `grad_scale` to the update, which divides inside
its one pass; torch's fused kernel divides inside too but writes the divided gradients back
(32 bytes per parameter); DeepSpeed's ZeRO-Offload multiplies the fp32 gradient partition by
1/scale in its own pass first (`unscale_and_clip_grads`, whenever clipping or loss scaling is
on), then steps. torch_fused_kernel_scaled@zerocache, torch's fused kernel with the scale page
by page on ZeROCache's memory, is what ZeROCache ran before its compiled kernel. The scale is
1.0: a multiply or divide costs the same whatever its normal operands, and the gradients keep
their values however often the runs that write them back run.

Roofline: AdamW reads p, g, m, v and writes p, m, v: 28 bytes per parameter. The bandwidth comes
from the same run: a copy (8 bytes counted per element, as asked) and an in-place add (12 bytes,
a read-modify-write like AdamW's, without the copy's hidden write-allocate reads). The
stream@memory runs measure it for AdamW's own access pattern: a pass that reads p, g, m, v once
and writes p, m, v once with next to no arithmetic, compiled by inductor as ZeROCache's kernel
is. Their ratio to DeepSpeed shows how much headroom the memory leaves any AdamW kernel.

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
SCALE = torch.tensor(1.0)


def parse_size(text: str) -> int:
    scale = {"K": 10**3, "M": 10**6, "B": 10**9}[text[-1].upper()]
    return int(float(text[:-1]) * scale)


def fill(p, g, m, v) -> None:
    for t in (p, g, m):
        t.normal_()
    v.normal_().square_()


def _stream(p, g, m, v) -> None:
    p.add_(g)
    m.add_(g)
    v.addcmul_(g, g)  # keeps v >= 0 for the AdamW runs that share it


stream = torch.compile(_stream, dynamic=True, fullgraph=True, options={"cpp.dynamic_threads": True})


def zerocache_memory(numel: int) -> dict:
    """The paged update, DeepSpeed's and torch's kernels and the stream over ZeROCache's layout."""
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

    def zerocache(grad_scale=None) -> None:
        step.add_(1)
        for p, g, m, v in pages:
            adamw_([p], [g], [m], [v], step, grad_scale=grad_scale, **HYPER)

    def deepspeed_kernel(scaled=False) -> None:
        if scaled:  # DeepSpeed scales its whole gradient partition, then steps
            for _, g, _, _ in pages:
                g.mul_(1.0 / SCALE)
        ds_step[0] += 1
        for p, g, m, v in pages:
            ds_op.adam_update(1, ds_step[0], HYPER["lr"], *HYPER["betas"], HYPER["eps"], HYPER["weight_decay"],
                              True, p, g, m, v)

    def torch_fused_kernel_scaled() -> None:
        step.add_(1)
        b1, b2 = HYPER["betas"]
        for p, g, m, v in pages:
            torch._fused_adamw_([p], [g], [m], [v], [], [step], lr=HYPER["lr"], beta1=b1, beta2=b2,
                                weight_decay=HYPER["weight_decay"], eps=HYPER["eps"], amsgrad=False,
                                maximize=False, grad_scale=SCALE, found_inf=None)

    def stream_pages() -> None:
        for page in pages:
            stream(*page)

    return {"zerocache": zerocache, "zerocache_scaled": lambda: zerocache(SCALE),
            "deepspeed_kernel": deepspeed_kernel, "deepspeed_kernel_scaled": lambda: deepspeed_kernel(True),
            "torch_fused_kernel_scaled": torch_fused_kernel_scaled,
            "stream": stream_pages}


def torch_memory(numel: int) -> dict:
    """torch's fused AdamW, DeepSpeedCPUAdam, the paged update and the stream over four whole
    torch tensors."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    p, g, m, v = (torch.empty(numel) for _ in range(4))
    fill(p, g, m, v)
    param = torch.nn.Parameter(p, requires_grad=True)
    param.grad = g
    fused, fused_scaled = (torch.optim.AdamW([param], fused=True, **HYPER) for _ in range(2))
    for opt in (fused, fused_scaled):
        opt.state[param] = {"step": torch.zeros(()), "exp_avg": m, "exp_avg_sq": v}
    fused_scaled.grad_scale = SCALE  # read by torch's fused step, as torch.amp.GradScaler sets it
    ds = DeepSpeedCPUAdam([param], adamw_mode=True, **HYPER)
    ds.state[param] = {"step": 0, "exp_avg": m, "exp_avg_sq": v}
    step = torch.zeros(())

    def deepspeed_scaled() -> None:
        g.mul_(1.0 / SCALE)
        ds.step()

    def zerocache(grad_scale=None) -> None:
        step.add_(1)
        for i in range(0, numel, PAGE_NUMEL):
            page = slice(i, i + PAGE_NUMEL)
            adamw_([p[page]], [g[page]], [m[page]], [v[page]], step, grad_scale=grad_scale, **HYPER)

    return {"torch_fused": fused.step, "torch_fused_scaled": fused_scaled.step,
            "deepspeed": ds.step, "deepspeed_scaled": deepspeed_scaled,
            "zerocache": zerocache, "zerocache_scaled": lambda: zerocache(SCALE),
            "stream": lambda: stream(p, g, m, v)}


MEMORIES: dict[str, Callable[[int], dict]] = {"zerocache": zerocache_memory, "torch": torch_memory}

# (name, ours, other): the ratio is other's time over ours', per round
RATIOS = [
    ("as deployed: zerocache / deepspeed", "zerocache@zerocache", "deepspeed@torch"),
    ("as deployed, scaled: zerocache / deepspeed", "zerocache_scaled@zerocache", "deepspeed_scaled@torch"),
    ("as deployed: zerocache / torch_fused", "zerocache@zerocache", "torch_fused@torch"),
    ("as deployed, scaled: zerocache / torch_fused", "zerocache_scaled@zerocache", "torch_fused_scaled@torch"),
    ("zerocache memory: zerocache / deepspeed kernel", "zerocache@zerocache", "deepspeed_kernel@zerocache"),
    ("zerocache memory, scaled: zerocache / deepspeed kernel", "zerocache_scaled@zerocache",
     "deepspeed_kernel_scaled@zerocache"),
    ("zerocache memory, scaled: zerocache / torch fused kernel", "zerocache_scaled@zerocache",
     "torch_fused_kernel_scaled@zerocache"),
    ("torch memory: zerocache / torch_fused", "zerocache@torch", "torch_fused@torch"),
    ("torch memory, scaled: zerocache / deepspeed", "zerocache_scaled@torch", "deepspeed_scaled@torch"),
    ("torch memory: torch_fused / deepspeed", "torch_fused@torch", "deepspeed@torch"),
    ("ceiling, zerocache memory: stream / deepspeed kernel", "stream@zerocache", "deepspeed_kernel@zerocache"),
    ("ceiling, torch memory: stream / deepspeed", "stream@torch", "deepspeed@torch"),
]


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
        "ratios": {name: ratio(ours, other) for name, ours, other in RATIOS},
        "bandwidth_GBps": {k: v / 1e9 for k, v in bw.items()},
        "roofline_params_per_s": roofline,
        "zerocache_fraction_of_roofline": {k: rate["zerocache@zerocache"] / v for k, v in roofline.items()},
    }


class OtherLoad:
    """Cores kept busy by other processes (and stolen by the hypervisor) while a size ran: the
    noise behind its min-max spread."""

    def __init__(self) -> None:
        self.start = time.perf_counter(), psutil.cpu_times(), psutil.Process().cpu_times()

    def result(self) -> dict:
        (wall0, cpu0, own0), cpu1, own1 = self.start, psutil.cpu_times(), psutil.Process().cpu_times()
        wall = time.perf_counter() - wall0
        busy = (sum(cpu1) - cpu1.idle - cpu1.iowait) - (sum(cpu0) - cpu0.idle - cpu0.iowait)
        own = (own1.user + own1.system) - (own0.user + own0.system)
        stolen = getattr(cpu1, "steal", 0.0) - getattr(cpu0, "steal", 0.0)
        return {"other_processes_cores": max(0.0, busy - own - stolen) / wall, "stolen_cores": stolen / wall}


def run_size(numel: int, rounds: int, phases: int) -> dict:
    together = psutil.virtual_memory().available > 2 * 16 * numel * 1.15
    load = OtherLoad()
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
            "phases": 1 if together else phases, "load": load.result()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["100M", "300M", "1B"])
    parser.add_argument("--rounds", type=int, default=12)
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

    names = [name for name, _, _ in RATIOS]
    width = max(map(len, names))
    print(f"{'median (min-max) per round':<{width}}  " + "  ".join(f"{text:>16}" for text in results))
    for name in names:
        print(f"{name:<{width}}  " + "  ".join(f"{fmt(r['ratios'][name]):>16}" for r in results.values()))
    for text, r in results.items():
        roof = r["zerocache_fraction_of_roofline"]
        print(f"{text}: zerocache {r['params_per_s']['zerocache@zerocache'] / 1e9:.3f} G params/s, "
              f"{roof['copy']:.0%} / {roof['add']:.0%} of the copy / add roofline; other processes "
              f"kept {r['load']['other_processes_cores']:.2f} cores busy, the hypervisor stole "
              f"{r['load']['stolen_cores']:.2f}")
    meta = {"threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
            "torch": torch.__version__, "page_numel": PAGE_NUMEL, "rounds": args.rounds,
            "scale": SCALE.item(), "ratio_columns": names}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "sizes": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
