"""The layouts `angelptm plan --search` tries: every valid combination of degrees and knobs.

tp runs over powers of two up to the GPUs of a node, cp over powers of two the sequence allows,
pp over the divisors left that the layers allow, dp takes the rest; then microbatch sizes up to
16 that divide the batch, ZeRO stages, activation checkpointing and pipeline schedules (1F1B,
ZB-H1, interleaved with 2 virtual stages), always with sequence parallelism and ring attention
(Ulysses is priced when a config asks for it); for an MoE model also every expert-parallel degree
that divides both n_experts and dp·cp. GPipe is left out: it has 1F1B's bubble with more
activations in flight, so it never wins. Checkpointing
comes as a group ordered none, selective, full: each saves memory by recomputing more, so the
first of a group that fits is the fastest of it and the search prices no further.
"""

from __future__ import annotations

from typing import Iterator

from angelptm.config import Config
from angelptm.planning.hardware import Hardware
from angelptm.planning.layout import Layout
from angelptm.planning.model import ModelShape

CHECKPOINTING = ("none", "selective", "full")
MAX_MICRO_BATCH = 16


def _powers_of_two(limit: int) -> list[int]:
    out, x = [], 1
    while x <= limit:
        out.append(x)
        x *= 2
    return out


def _schedules(pp: int, n_layers: int, microbatches: int) -> list[tuple[str, int]]:
    if pp == 1:
        return [("1f1b", 1)]
    out = [("1f1b", 1), ("zero_bubble", 1)]
    if microbatches % pp == 0 and n_layers >= 2 * pp:
        out.append(("interleaved", 2))
    return out


def _expert_degrees(m: ModelShape, data_ranks: int) -> list[int]:
    """ep that divide n_experts and the dp·cp data ranks they are carved from; 1 for a dense model."""
    return [ep for ep in range(1, m.n_experts + 1) if m.n_experts % ep == 0 and data_ranks % ep == 0] or [1]


def candidate_layouts(m: ModelShape, cfg: Config, hw: Hardware, world_size: int) -> Iterator[tuple[Layout, ...]]:
    """Groups of layouts that differ only in checkpointing, least recomputation first."""
    seq, batch = cfg.train.seq_len, cfg.train.global_batch
    for tp in _powers_of_two(hw.gpus_per_node):
        if world_size % tp or m.n_heads % tp or m.ffn_dim % tp or (m.n_kv_heads % tp and tp % m.n_kv_heads):
            continue
        for cp in _powers_of_two(world_size // tp):
            if (world_size // tp) % cp or (cp > 1 and seq % (2 * cp)):
                continue
            rest = world_size // (tp * cp)
            for pp in (d for d in range(1, min(rest, m.n_layers) + 1) if rest % d == 0):
                dp = rest // pp
                if batch % dp:
                    continue
                for mb in _powers_of_two(min(MAX_MICRO_BATCH, batch // dp)):
                    if batch % (mb * dp):
                        continue
                    for schedule, virtual in _schedules(pp, m.n_layers, batch // (mb * dp)):
                        for stage in range(4) if dp > 1 else (0,):
                            for ep in _expert_degrees(m, dp * cp):
                                yield tuple(
                                    Layout(
                                        dp=dp, tp=tp, pp=pp, cp=cp, virtual_stages=virtual, schedule=schedule,
                                        sequence_parallel=True, cp_mode="ring", zero_stage=stage,
                                        micro_batch=mb, checkpointing=ac, ep=ep,
                                    )
                                    for ac in CHECKPOINTING
                                )
