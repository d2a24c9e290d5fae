"""Training throughput and memory per rank: ZeROCache stages 0-3 against DDP, FSDP2 and DeepSpeed ZeRO.

A small Llama trains on 2 local gloo processes (one thread each) under every system:

    zerocache-0..3   ZeROCacheOptimizer at that stage, everything on the device tier
    ddp              DistributedDataParallel (gradient_as_bucket_view) + torch AdamW (fused)
    fsdp2            fully_shard on every block and the root + torch AdamW (fused)
    deepspeed-1..3   deepspeed.initialize with ZeRO at that stage (fp32, AdamW)
    local            no data parallelism: each rank trains its own copy with torch AdamW (fused)
                     and talks to no one. No data-parallel engine's step is faster, beyond the part
                     of the AdamW step a sharded one skips (a few ms here), so local / deepspeed-k
                     bounds what any engine can gain over DeepSpeed here (the "ceiling" ratios).

Throughput: all systems are built in the same pair of processes and take turns, a few steps each,
for several rounds (the order reversed every other round); tokens/s is the global batch over the
median step time. Ratios are per round (adjacent turns), reported as min/median/max.

Memory: each system then runs alone in a fresh pair of processes, which report the growth of their
peak resident memory (ru_maxrss) over building the system and training, and the bytes of every
tensor alive after a step (parameters, gradients, optimizer state and any buffers the system
keeps). ZeROCache also reports its ledger (peak bytes per kind). For stage 3 the ledger is held
against the bound 16·N/dp + the pages in flight.

    python benchmarks/zerocache_train.py --rounds 12
    python benchmarks/zerocache_train.py --rounds 12 --micro-batch 1 \
        --out benchmarks/results/zerocache_train_mb1.json
    python benchmarks/zerocache_train.py --model medium --micro-batch 1 \
        --out benchmarks/results/zerocache_train_medium_mb1.json
    python benchmarks/zerocache_train.py --systems zerocache-3 fsdp2 deepspeed-3 --rounds 3

Three workloads are recorded. On the small model (3.3M parameters): 4 sequences per rank per step,
where the model's compute takes most of a step, and 1, where the engine's own work (communication,
optimizer, bookkeeping) weighs more. On the medium model (25M parameters), 1 sequence per rank: the
engine's work per token is about 8x the small model's, as when a large model trains on few tokens per rank.

Prints two tables and writes benchmarks/results/zerocache_train.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import resource
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from angelptm.config import ModelConfig, ZeroConfig
from angelptm.distributed.spawn import run_distributed
from angelptm.models.llama import build_llama, num_params
from angelptm.zerocache import ZeROCacheOptimizer

VOCAB = 259  # bytes and the tokenizer's specials
MODELS = {
    "small": ModelConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=768, vocab_size=VOCAB, max_seq_len=128),
    "medium": ModelConfig(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1536, vocab_size=VOCAB,
                          max_seq_len=128),
}
MICRO_BATCH, SEQ = 4, 128  # the default workload; --micro-batch 1 leaves compute a smaller share
HYPER = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
PAGE_MB = ZeroConfig().page_mb  # the default
SYSTEMS = ["zerocache-0", "zerocache-1", "zerocache-2", "zerocache-3", "ddp", "fsdp2",
           "deepspeed-1", "deepspeed-2", "deepspeed-3", "local"]


def _loss(model, rows: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(rows[:, :-1]).flatten(0, 1), rows[:, 1:].flatten())


def build(system: str, config: ModelConfig, micro_batch: int) -> tuple[Callable[[torch.Tensor], None], object]:
    """(one training step on a batch, the optimizer-like object) for `system` training `config`."""
    model = build_llama(config, "cpu")
    model.init_weights(0)
    if system.startswith("zerocache"):
        opt = ZeROCacheOptimizer(model, None, **HYPER, stage=int(system[-1]), page_mb=PAGE_MB)

        def step(rows):
            _loss(model, rows).backward()
            opt.step()
            opt.zero_grad()
        return step, opt
    if system == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, gradient_as_bucket_view=True)
    elif system == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for block in model.layers.values():
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    if system in ("ddp", "fsdp2", "local"):
        opt = torch.optim.AdamW(model.parameters(), **HYPER, fused=True)

        def step(rows):
            _loss(model, rows).backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
        return step, opt
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    deepspeed.init_distributed(dist_backend="gloo")
    ds_config = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": int(system[-1])},
                 "optimizer": {"type": "AdamW", "params": {**HYPER, "betas": list(HYPER["betas"])}}}
    engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)

    def step(rows):
        engine.backward(_loss(engine, rows))
        engine.step()
    return step, engine


def _rows(step: int, micro_batch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * step + dist.get_rank())
    return torch.randint(0, VOCAB, (micro_batch, SEQ + 1), generator=gen)


def _throughput(systems: list[str], config: ModelConfig, rounds: int, steps: int, micro_batch: int) -> dict:
    steppers = {s: build(s, config, micro_batch)[0] for s in systems}
    for s in systems:  # warm-up
        steppers[s](_rows(0, micro_batch))
    times = {s: [] for s in systems}
    for r in range(rounds):
        for s in (systems if r % 2 == 0 else systems[::-1]):
            dist.barrier()
            start = time.perf_counter()
            for i in range(steps):
                steppers[s](_rows(i, micro_batch))
            dist.barrier()
            times[s].append((time.perf_counter() - start) / steps)
    return times


def _tensor_bytes() -> int:
    seen, total = set(), 0
    for obj in gc.get_objects():
        # Plain tensors and parameters only: subclasses (DTensor) wrap a plain local tensor found here too.
        if type(obj) in (torch.Tensor, torch.nn.Parameter) and not obj.is_meta:
            storage = obj.untyped_storage()
            if storage.data_ptr() and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def _memory(system: str, config: ModelConfig, steps: int, micro_batch: int) -> dict:
    gc.collect()
    tensors_before, rss_before = _tensor_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step, opt = build(system, config, micro_batch)
    for i in range(steps):
        step(_rows(i, micro_batch))
    gc.collect()
    out = {"tensor_bytes": _tensor_bytes() - tensors_before,
           "peak_rss_growth_bytes": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024}
    if isinstance(opt, ZeROCacheOptimizer):
        out["ledger"] = opt.memory_ledger()["device"]  # bytes now, and peaks during the last step
    if isinstance(opt, ZeROCacheOptimizer) and opt.stage == 3:
        # Beyond the shards, the step's peaks hold the gathered pages and the gradient buckets.
        shards = sum(b.param_shard.untyped_storage().nbytes() for b in opt._buffers)
        grad_shards = sum(b.grad_shard.untyped_storage().nbytes() for b in opt._buffers)
        ledger = out["ledger"]
        out["in_flight_bytes"] = (ledger["peak_params"] - shards) + (ledger["peak_grads"] - grad_shards)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", nargs="+", default=SYSTEMS)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=3, help="steps per turn")
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--micro-batch", type=int, default=MICRO_BATCH, help="sequences per rank per step")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "zerocache_train.json"))
    args = parser.parse_args()
    dp = 2
    config = MODELS[args.model]
    n = num_params(config)
    tokens = dp * args.micro_batch * SEQ
    times = run_distributed(_throughput, dp, args.systems, config, args.rounds, args.steps, args.micro_batch)[0]
    throughput = {s: tokens / statistics.median(t) for s, t in times.items()}

    def ratio(a: str, b: str) -> dict:
        per_round = [tb / ta for ta, tb in zip(times[a], times[b])]
        return {"min": min(per_round), "median": statistics.median(per_round), "max": max(per_round)}

    ratios = {}
    for stage in (1, 2, 3):
        if f"zerocache-{stage}" in times and f"deepspeed-{stage}" in times:
            ratios[f"zerocache-{stage} / deepspeed-{stage}"] = ratio(f"zerocache-{stage}", f"deepspeed-{stage}")
    for a, b in (("zerocache-3", "fsdp2"), ("zerocache-0", "ddp")):
        if a in times and b in times:
            ratios[f"{a} / {b}"] = ratio(a, b)
    for stage in (1, 2, 3):
        if "local" in times and f"deepspeed-{stage}" in times:
            ratios[f"ceiling: local / deepspeed-{stage}"] = ratio("local", f"deepspeed-{stage}")
    memory = {s: run_distributed(_memory, dp, s, config, 3, args.micro_batch)[0] for s in args.systems}

    print(f"{'system':>12} {'tokens/s':>9} {'tensor MB':>10} {'peak RSS +MB':>12}")
    for s in args.systems:
        print(f"{s:>12} {throughput[s]:>9.0f} {memory[s]['tensor_bytes'] / 1e6:>10.1f} "
              f"{memory[s]['peak_rss_growth_bytes'] / 1e6:>12.1f}")
    for name, r in ratios.items():
        print(f"{name:>28}: {r['median']:.2f} (min {r['min']:.2f}, max {r['max']:.2f})")
    bound = None
    if "zerocache-3" in memory:
        m3 = memory["zerocache-3"]
        ledger = m3["ledger"]
        held = ledger["peak_params"] + ledger["peak_grads"] + ledger["peak_optimizer"]
        bound = {"held_bytes": held, "bound_bytes": 16 * n / dp + m3["in_flight_bytes"],
                 "in_flight_bytes": m3["in_flight_bytes"]}
        bound["ratio"] = held / bound["bound_bytes"]
        print(f"stage 3 params+grads+optimizer peak {held / 1e6:.2f} MB vs 16·N/dp + in flight "
              f"{bound['bound_bytes'] / 1e6:.2f} MB: {bound['ratio']:.3f}")
    meta = {"model_name": args.model, "model": vars(config), "params": n, "dp": dp,
            "micro_batch": args.micro_batch, "seq": SEQ, "threads_per_rank": 1, "page_mb": PAGE_MB, "rounds": args.rounds, "steps_per_turn": args.steps,
            "load_average": os.getloadavg(), "torch": torch.__version__}
    result = {"meta": meta, "tokens_per_s": throughput, "step_times_s": times, "ratios": ratios,
              "memory": memory, "stage3_bound": bound}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, default=float))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
