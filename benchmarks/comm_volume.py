"""Communication per step and activation memory per rank, measured against the analytic model.

Part 1, communication: trains a model for a few steps under each layout with the real Trainer on
local gloo processes, and prints the bytes one rank sent in the last step per mesh dimension (as
counted by `angelptm.distributed.collectives` at every call, from the real tensor sizes) beside
the volume the formulas below predict from the config alone. Goal: within 5%.

Part 2, activation memory: one forward pass of a sequence of `--act-seq` tokens at cp = 1, 2, 4
(ring attention), counting the bytes of every tensor saved for backward on rank 0 (parameters
excluded, shared storage counted once): the activation memory a rank holds at its peak, just
before backward. Goal: falls as ~1/cp.

    python benchmarks/comm_volume.py                      # both parts, default layouts
    python benchmarks/comm_volume.py --layout tp=2,cp=2   # one layout (repeatable)

Prints two tables and writes benchmarks/results/comm_volume.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from angelptm.config import Config, config_from_dict
from angelptm.distributed.parity import TINY_JOB, run_layouts
from angelptm.distributed.spawn import run_distributed

LAYOUTS = ["tp=2", "tp=2,sequence_parallel=false", "tp=4", "cp=2", "cp=2,cp_mode=ulysses", "cp=4",
           "dp=2,tp=2", "tp=2,cp=2", "dp=2,tp=2,cp=2"]
COMM_JOB = {**TINY_JOB, "model": {**TINY_JOB["model"], "max_seq_len": 128},
            "train": {**TINY_JOB["train"], "steps": 2, "seq_len": 128, "global_batch": 8, "micro_batch": 2}}
FLOAT = 4  # bytes: the jobs here train in float32


def parse_layout(text: str) -> dict:
    return dict(part.split("=") for part in text.split(",") if part)


# ---------------------------------------------------------------------------------------------
# The analytic model: what each parallel dimension must send per step, from the config alone


def _all_reduce(p: int, nbytes: float) -> float:
    return 2 * (p - 1) / p * nbytes


def _gather_or_scatter(p: int, nbytes: float) -> float:
    return (p - 1) / p * nbytes


def local_parameters(cfg: Config, tp: int) -> int:
    """Parameters one tp rank holds (vocabulary padded to a multiple of tp)."""
    m = cfg.model
    hd = m.resolved_head_dim
    kv_rows = m.n_kv_heads // tp * hd if m.n_kv_heads >= tp else hd
    block = (2 * m.n_heads // tp * hd + 2 * kv_rows + 3 * m.ffn_dim // tp) * m.dim + 2 * m.dim
    vocab_rows = -(-m.vocab_size // tp)
    return m.n_layers * block + m.dim + vocab_rows * m.dim * (1 if m.tie_embeddings else 2)


def analytic_bytes(cfg: Config, dp: int, tp: int, cp: int) -> dict[str, float]:
    """Bytes one rank sends per optimizer step, per mesh dimension (bus bytes, as the counters use)."""
    m, t, p = cfg.model, cfg.train, cfg.parallel
    micro = cfg.grad_accum_steps(dp)
    hd = m.resolved_head_dim
    tokens = t.micro_batch * t.seq_len // cp  # per microbatch on this rank, before sequence parallelism
    hidden = tokens * m.dim * FLOAT
    out: dict[str, float] = {}
    if tp > 1:
        # Per layer two blocks, each entering and leaving the tp region in forward and backward: 8
        # gather/scatter (SP) or 4 all-reduce (no SP) -- the same volume. Embedding and head: one each way.
        regions = (2 * m.n_layers * 4 + 2 + 2) * _gather_or_scatter(tp, hidden)
        loss = _all_reduce(tp, 3 * tokens * FLOAT)  # row max, then sum of exponentials and target logit
        partial = 0
        if p.sequence_parallel:
            partial += (2 * m.n_layers + 1) * m.dim  # norm gradients, seen per sequence shard
        if m.n_kv_heads < tp:
            partial += 2 * m.n_layers * m.n_kv_heads * hd * m.dim  # shared kv heads, summed in a full-size buffer
        out["tp"] = micro * (regions + loss) + _all_reduce(tp, partial * FLOAT) + _all_reduce(tp, FLOAT)
    if cp > 1:
        q_heads = m.n_heads // tp
        kv_heads = m.n_kv_heads // tp if m.n_kv_heads >= tp else 1
        if p.cp_mode == "ring":
            kv = 2 * t.micro_batch * kv_heads * (t.seq_len // cp) * hd
            # forward: cp-1 K/V blocks; backward: cp-1 K/V blocks and cp float32 K/V gradients
            per_layer = 2 * (cp - 1) * kv * FLOAT + cp * kv * 4
        else:
            kv_heads = kv_heads if kv_heads % cp == 0 else q_heads
            head_rows = t.micro_batch * (t.seq_len // cp) * hd
            per_layer = 2 * _gather_or_scatter(cp, (2 * q_heads + 2 * kv_heads) * head_rows * FLOAT)
        out["cp"] = micro * m.n_layers * per_layer
    if dp * cp > 1:
        out["dp_cp"] = _all_reduce(dp * cp, local_parameters(cfg, tp) * FLOAT) + _all_reduce(dp * cp, FLOAT)
    return out


def comm_table(layouts: list[str]) -> list[dict]:
    by_world: dict[int, list[tuple[str, dict]]] = {}
    for text in layouts:
        layout = parse_layout(text)
        world = int(layout.get("dp", 1)) * int(layout.get("tp", 1)) * int(layout.get("cp", 1))
        by_world.setdefault(world, []).append((text, layout))
    rows = []
    for world, entries in sorted(by_world.items()):
        runs = run_layouts([layout for _, layout in entries], world, COMM_JOB, ["train.log_every=2"])
        for (text, layout), run in zip(entries, runs):
            cfg = config_from_dict(COMM_JOB, [f"parallel.{k}={v}" for k, v in layout.items()])
            dims = {d: int(layout.get(d, 1)) for d in ("dp", "tp", "cp")}
            predicted = analytic_bytes(cfg, **dims)
            for dim in sorted(set(predicted) | set(run.comm_bytes)):
                measured, analytic = run.comm_bytes.get(dim, 0), predicted.get(dim, 0)
                rows.append({"layout": text, "dim": dim, "measured_bytes": measured, "analytic_bytes": round(analytic),
                             "diff": abs(measured - analytic) / analytic if analytic else float(measured != 0)})
    return rows


# ---------------------------------------------------------------------------------------------
# Activation memory


def _saved_activation_bytes(raw: dict, cp: int) -> int:
    """Bytes saved for backward by one forward pass (and the loss) on this rank."""
    from angelptm.distributed import init, materialize, parallelize
    from angelptm.distributed.collectives import group_of
    from angelptm.distributed.context_parallel import shard_sequence
    from angelptm.distributed.mesh import ParallelDims
    from angelptm.distributed.tensor_parallel import (
        vocab_parallel_cross_entropy,
        vocab_slice,
    )
    from angelptm.models.llama import build_llama

    cfg = config_from_dict(raw, [f"parallel.cp={cp}"])
    mesh = init(ParallelDims(cp=cp))
    model = materialize(parallelize(build_llama(cfg.model, "meta"), mesh, cfg), torch.device("cpu"), 0)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    rows = torch.randint(0, cfg.model.vocab_size, (1, cfg.train.seq_len + 1), generator=torch.Generator().manual_seed(0))
    cp_group, tp_group = group_of(mesh, "cp"), group_of(mesh, "tp")
    tokens, targets = (shard_sequence(x, cp_group, cfg.parallel.cp_mode) for x in (rows[:, :-1], rows[:, 1:]))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = vocab_parallel_cross_entropy(model(tokens), targets, tp_group, *vocab_slice(model)).mean()
    del loss
    return sum(seen.values())


def activation_table(seq_len: int) -> list[dict]:
    raw = {"model": {"dim": 256, "n_layers": 2, "n_heads": 8, "n_kv_heads": 4, "ffn_dim": 768,
                     "max_seq_len": seq_len},
           "train": {"seq_len": seq_len, "micro_batch": 1, "global_batch": 1}}
    rows = []
    for cp in (1, 2, 4):
        nbytes = run_distributed(_saved_activation_bytes, cp, raw, cp)[0]
        rows.append({"cp": cp, "seq_len": seq_len, "activation_bytes": nbytes})
    for row in rows:
        row["ratio_to_cp1"] = row["activation_bytes"] / rows[0]["activation_bytes"]
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", action="append", help="e.g. tp=2,cp=2,cp_mode=ulysses (repeatable)")
    parser.add_argument("--act-seq", type=int, default=4096, help="sequence length of the activation table")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "comm_volume.json"))
    args = parser.parse_args(argv)

    start = time.perf_counter()
    comm = comm_table(args.layout or LAYOUTS)
    print(f"\nCommunication per step, rank 0 (model dim {COMM_JOB['model']['dim']}, {COMM_JOB['model']['n_layers']} "
          f"layers, seq {COMM_JOB['train']['seq_len']}, global batch {COMM_JOB['train']['global_batch']}, "
          f"micro batch {COMM_JOB['train']['micro_batch']}, float32)")
    print(f"{'layout':<30} {'dim':<6} {'measured B':>12} {'analytic B':>12} {'diff':>7}")
    for r in comm:
        print(f"{r['layout']:<30} {r['dim']:<6} {r['measured_bytes']:>12,} {r['analytic_bytes']:>12,} {r['diff']:>7.2%}")
    acts = activation_table(args.act_seq)
    print(f"\nActivation bytes saved for backward per rank (dim 256, 2 layers, seq {args.act_seq}, ring attention)")
    print(f"{'cp':>3} {'bytes':>14} {'vs cp=1':>8}")
    for r in acts:
        print(f"{r['cp']:>3} {r['activation_bytes']:>14,} {r['ratio_to_cp1']:>8.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"comm": comm, "activations": acts, "torch": torch.__version__,
                               "wall_s": round(time.perf_counter() - start, 1)}, indent=1))
    print(f"\nwrote {out}")
    worst = max(r["diff"] for r in comm)
    return 0 if worst <= 0.05 else 1


if __name__ == "__main__":
    sys.exit(main())
