"""A layout (the degrees and knobs the planner varies) and the rules that make one impossible.

The rules are the engine's own (DESIGN.md; the 4D engine and ZeROCache issues): each broken
rule becomes one line naming the degree and the fix, so an impossible layout is reported, never
raised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from angelptm.config import Config
from angelptm.planning.hardware import Hardware
from angelptm.planning.model import ModelShape


@dataclass(frozen=True)
class Layout:
    dp: int
    tp: int
    pp: int
    cp: int
    virtual_stages: int  # model chunks per pipeline rank; 1 unless the schedule is interleaved
    schedule: str  # gpipe | 1f1b | interleaved | zero_bubble
    sequence_parallel: bool
    cp_mode: str  # ring | ulysses
    zero_stage: int
    micro_batch: int
    checkpointing: str  # none | full | selective
    ep: int = 1  # expert parallelism, carved from the dp·cp data ranks

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    def microbatches(self, global_batch: int) -> int:
        """Microbatches per pipeline per step: global_batch / (micro_batch · dp) (DESIGN.md)."""
        return global_batch // (self.micro_batch * self.dp)

    def describe(self) -> str:
        sched = self.schedule + (f"x{self.virtual_stages}" if self.virtual_stages > 1 else "")
        return (
            f"dp={self.dp} tp={self.tp} pp={self.pp} cp={self.cp} zero={self.zero_stage} "
            f"mb={self.micro_batch} ac={self.checkpointing} sched={sched}"
            + (f" ep={self.ep}" if self.ep > 1 else "")
            + ("" if self.sequence_parallel or self.tp == 1 else " no-sp")
            + (f" cp_mode={self.cp_mode}" if self.cp > 1 else "")
        )


def stage_layers(m: ModelShape, lay: Layout) -> int:
    """Layers on the busiest pipeline rank: the layer list cut into pp·v chunks as evenly as it goes."""
    return math.ceil(m.n_layers / (lay.pp * lay.virtual_stages)) * lay.virtual_stages


def stage_units(m: ModelShape, lay: Layout, stage: str) -> tuple[str, ...]:
    """Units outside the blocks on the `stage` ("first" or "last") pipeline rank. A tied head
    shares the embedding's weight unless the pipeline puts it on another rank, which then holds
    its own copy."""
    if lay.pp == 1:
        return ("embedding", "norm") if m.tied else ("embedding", "norm", "output")
    return ("embedding",) if stage == "first" else ("norm", "output")


def rank_params(m: ModelShape, lay: Layout, stage: str) -> int:
    """Parameters one rank of `stage` holds after tensor and pipeline splitting."""
    embedding, block, norm, output = m.unit_params(lay.tp)
    outside = {"embedding": embedding, "norm": norm, "output": output}
    dense, moe = m.layer_kinds(stage_layers(m, lay))
    moe_blocks = moe * sum(n for n, _ in m.moe_block_params(lay.tp, lay.ep)) if moe else 0
    return dense * sum(block) + moe_blocks + sum(sum(outside[u]) for u in stage_units(m, lay, stage))


def layout_from_config(cfg: Config, world_size: int) -> tuple[Layout, list[str]]:
    """The layout `cfg` asks for on `world_size` GPUs, and why its degrees cannot fill the world."""
    p = cfg.parallel
    model_parallel = p.tp * p.pp * p.cp
    problems = []
    if p.dp == "auto":
        if world_size % model_parallel:
            problems.append(
                f"world size {world_size} is not a multiple of tp·pp·cp = {model_parallel}; "
                "change parallel.tp, parallel.pp or parallel.cp"
            )
        dp = max(1, world_size // model_parallel)
    else:
        dp = p.dp
        if dp * model_parallel != world_size:
            problems.append(
                f"parallel.dp·tp·pp·cp = {dp * model_parallel} differs from world size {world_size}; "
                "set parallel.dp=auto"
            )
    virtual = p.pp_virtual_stages if p.pp_schedule == "interleaved" else 1
    layout = Layout(
        dp=dp, tp=p.tp, pp=p.pp, cp=p.cp, virtual_stages=virtual, schedule=p.pp_schedule,
        sequence_parallel=p.sequence_parallel, cp_mode=p.cp_mode, zero_stage=cfg.zero.stage,
        micro_batch=cfg.train.micro_batch, checkpointing=cfg.train.activation_checkpointing, ep=p.ep,
    )
    return layout, problems


def layout_problems(m: ModelShape, lay: Layout, cfg: Config, hw: Hardware) -> list[str]:
    """Every rule `lay` breaks, one line each; empty when the engine can run it."""
    out = []
    seq = cfg.train.seq_len
    if lay.tp > hw.gpus_per_node:
        out.append(f"tp={lay.tp} exceeds GPUs per node {hw.gpus_per_node}; keep tensor parallelism inside a node")
    if m.n_heads % lay.tp:
        out.append(f"model.n_heads={m.n_heads} is not divisible by tp={lay.tp}; pick tp dividing n_heads")
    if m.n_kv_heads % lay.tp and lay.tp % m.n_kv_heads:
        out.append(f"model.n_kv_heads={m.n_kv_heads} and tp={lay.tp}: one must divide the other")
    if m.ffn_dim % lay.tp:
        out.append(f"model.ffn_dim={m.ffn_dim} is not divisible by tp={lay.tp}; pick tp dividing ffn_dim")
    if lay.cp > 1 and lay.cp_mode == "ring" and seq % (2 * lay.cp):
        out.append(f"train.seq_len={seq} is not divisible by 2·cp={2 * lay.cp} (load-balanced ring); "
                   "change cp or seq_len")
    if lay.cp > 1 and lay.cp_mode == "ulysses":
        if (m.n_heads // lay.tp) % lay.cp:
            out.append(f"Ulysses needs heads per tp rank ({m.n_heads // lay.tp}) divisible by cp={lay.cp}; "
                       "use cp_mode=ring")
        if seq % lay.cp:
            out.append(f"train.seq_len={seq} is not divisible by cp={lay.cp}")
    chunks = lay.pp * lay.virtual_stages
    if chunks > m.n_layers:
        out.append(f"pp·virtual stages = {chunks} exceeds model.n_layers={m.n_layers}; lower parallel.pp")
    per_step = lay.micro_batch * lay.dp
    if cfg.train.global_batch % per_step:
        out.append(
            f"train.global_batch={cfg.train.global_batch} is not a multiple of micro_batch·dp = {per_step}; "
            "change train.global_batch or train.micro_batch"
        )
    elif lay.schedule == "interleaved" and lay.microbatches(cfg.train.global_batch) % lay.pp:
        out.append(
            f"interleaved 1F1B needs microbatches ({lay.microbatches(cfg.train.global_batch)}) "
            f"to be a multiple of pp={lay.pp}; change train.global_batch"
        )
    out += _expert_problems(m, lay)
    if cfg.precision.fp8.enabled and hw.peak_flops("float8") <= 0:
        out.append(f"{hw.name} has no FP8 tensor cores; set precision.fp8.enabled=false")
    if "nvme" in (cfg.zero.offload_optimizer, cfg.zero.offload_params) and hw.nvme_gbps <= 0:
        out.append(f"{hw.name} profile has no NVMe tier (nvme_gbps=0); offload to cpu instead")
    return out



def _expert_problems(m: ModelShape, lay: Layout) -> list[str]:
    """The rules of expert parallelism (DESIGN.md, "MoE") and of the MoE blocks the engine builds."""
    out = []
    data = lay.dp * lay.cp
    if lay.ep > 1 and not m.n_experts:
        out.append(f"ep={lay.ep} splits experts, and this model has none; set parallel.ep=1")
    elif m.n_experts % lay.ep:
        out.append(f"ep={lay.ep} does not divide model.moe.n_experts={m.n_experts}; pick ep dividing n_experts")
    if data % lay.ep:
        out.append(f"ep={lay.ep} does not divide dp·cp = {data} (expert-parallel ranks are carved from the "
                   "data ranks); pick ep dividing dp·cp")
    return out
