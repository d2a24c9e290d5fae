"""Use angelptm's pieces in your own training loop, fed by your own data iterator.

    python examples/train_custom_loop.py --steps 200
    torchrun --nproc_per_node 2 examples/train_custom_loop.py --zero-stage 3

The data here is a stream of sums ("417+86=503"), a stand-in for whatever your iterator yields:
each item is a global batch of token ids of shape (global_batch, seq_len + 1).
"""

from __future__ import annotations

import argparse
import random
from typing import Iterator

import torch
import torch.nn.functional as F

import angelptm as ap
from angelptm.data import ByteTokenizer
from angelptm.models.llama import build_llama


def sums_batches(global_batch: int, seq_len: int, seed: int) -> Iterator[torch.Tensor]:
    """Your data: an endless iterator of (global_batch, seq_len + 1) token-id batches."""
    tok, rng = ByteTokenizer(), random.Random(seed)
    while True:
        rows = []
        for _ in range(global_batch):
            ids: list[int] = []
            while len(ids) < seq_len + 1:
                a, b = rng.randrange(1000), rng.randrange(1000)
                ids += tok.encode(f"{a}+{b}={a + b}\n", bos=False, eos=False)
            rows.append(ids[: seq_len + 1])
        yield torch.tensor(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--zero-stage", type=int, default=1, choices=range(4))
    args = parser.parse_args()

    cfg = ap.load_config(overrides=["model.dim=128", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2",
                                    "model.ffn_dim=384", "model.max_seq_len=64", "train.seq_len=64"])
    mesh = ap.distributed.init()  # a process group of one here; under torchrun, data parallelism over the world
    model = ap.distributed.parallelize(build_llama(cfg.model, "meta"), mesh, cfg)
    ap.distributed.materialize(model, torch.device("cpu"), seed=0)
    optimizer = ap.zerocache.ZeROCacheOptimizer(model, mesh, lr=3e-3, weight_decay=0.0, stage=args.zero_stage)
    dp, rank = mesh["dp"].size(), mesh["dp"].get_local_rank()

    batches = sums_batches(global_batch=16, seq_len=cfg.train.seq_len, seed=0)
    for step, batch in zip(range(1, args.steps + 1), batches):
        rows = batch.chunk(dp)[rank]  # this rank's share of the global batch
        logits = model(rows[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten())
        loss.backward()  # ZeROCache averages the gradients over the data-parallel ranks
        optimizer.clip_grad_norm_(1.0)
        optimizer.step()
        optimizer.zero_grad()
        if step % 20 == 0 and rank == 0:
            print(f"step {step:4d}  loss {loss.item():.3f}")

    from angelptm.generate import generate_text

    with optimizer.gathered_parameters():  # stage 3 keeps parameters sharded outside forward/backward
        if rank == 0:
            print(generate_text(model, "123+456=", max_new_tokens=8, context=cfg.train.seq_len, temperature=0))


if __name__ == "__main__":
    main()
