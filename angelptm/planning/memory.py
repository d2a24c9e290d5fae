"""Memory per rank by kind (parameters, gradients, optimizer state, activations, FP8 and communication
buffers) and by tier (device, pinned host, NVMe), for the first and the last pipeline stage.

Parameters, gradients and optimizer state follow ZeROCache (`angelptm.planning.zero`), routed
experts n_experts / ep to a rank;
activations follow the tables of `angelptm.planning.model` and the pipeline schedule's
microbatches in flight. Under LoRA the activations are planned as full fine-tuning's: the
adapters' rank-wide outputs are left out, and so are LoRA dropout's masks and dropped inputs
(two input-sized tensors per target), which `finetune.lora.dropout > 0` adds.
"""

from __future__ import annotations

from dataclasses import dataclass

from angelptm.config import Config
from angelptm.planning.hardware import Hardware
from angelptm.planning.layout import Layout, stage_layers
from angelptm.planning.model import (
    Implementation, ModelShape, bytes_per_token, dtype_bytes, embed_saved, head_saved, layer_saved,
)
from angelptm.planning.zero import ZeroBytes, zero_bytes

GIB = 1024**3
# The caching allocator rounds blocks up and fragments: reserve this fraction of the tensors' peak
# on top (an assumption; it is the usual gap between torch.cuda.max_memory_reserved and
# max_memory_allocated in long LLM runs).
ALLOCATOR_SLACK = 0.05


@dataclass
class Memory:
    """Bytes one rank holds at its peak, on the pipeline stage (first or last) that holds most."""

    stage: str
    params: float
    grads: float
    optimizer: float
    activations: float
    fp8_buffers: float
    comm_buffers: float
    reserved: float
    device_total: float
    device_capacity: float
    host: float  # pinned host memory of this rank (offloaded pages)
    host_per_node: float
    host_capacity_per_node: float
    nvme: float
    fits: bool


def layer_activation_bytes(m: ModelShape, lay: Layout, cfg: Config, impl: Implementation,
                           moe: bool = False) -> tuple[float, float]:
    """(kept, transient) bytes of one layer (`moe`: an MoE block) for one microbatch on one rank.

    full recomputation keeps only the layer's input and rebuilds the rest during its backward
    (the transient); selective drops the attention core (Korthikanti et al. 2022, Sec. 5).
    """
    ab = dtype_bytes(cfg)
    tokens = lay.micro_batch * cfg.train.seq_len / lay.cp
    saved = layer_saved(m, cfg.train.seq_len, ab, impl, moe)
    everything = bytes_per_token(saved, m, lay.tp, lay.sequence_parallel) * tokens
    if lay.checkpointing == "full":
        return m.dim * ab * m.split_factors(lay.tp, lay.sequence_parallel)["seq"] * tokens, everything
    if lay.checkpointing == "selective":
        return bytes_per_token(saved, m, lay.tp, lay.sequence_parallel, keep_core=False) * tokens, 0.0
    return everything, 0.0


def inflight(lay: Layout, microbatches: int, stage: str) -> int:
    """Microbatch-chunks whose activations a rank of `stage` holds at once.

    GPipe holds every microbatch; 1F1B and ZB-H1 at most pp on the first stage and one on the
    last; interleaved 1F1B warms up with 2(pp-1) + (v-1)·pp chunks on the first rank and
    (v-1)·pp on the last (Narayanan et al. 2021, Sec. 2.2; Megatron-LM's schedule).
    """
    p, v = lay.pp, lay.virtual_stages
    if p == 1:
        return 1
    if lay.schedule == "gpipe":
        return microbatches
    if lay.schedule == "interleaved":
        warmup = (v - 1) * p + (2 * (p - 1) if stage == "first" else 0)
        return min(microbatches * v, warmup + 1)
    return min(microbatches, p) if stage == "first" else 1


def activation_bytes(m: ModelShape, lay: Layout, cfg: Config, impl: Implementation, stage: str) -> tuple[float, float]:
    """(saved for backward, transient workspace) activation bytes at the peak of a rank of `stage`."""
    ab = dtype_bytes(cfg)
    tokens = lay.micro_batch * cfg.train.seq_len / lay.cp
    kept, transient = layer_activation_bytes(m, lay, cfg, impl)
    chunks = inflight(lay, lay.microbatches(cfg.train.global_batch), stage)
    saved = chunks * stage_layers(m, lay) / lay.virtual_stages * kept
    moe = m.layer_kinds(stage_layers(m, lay))[1]
    if moe:  # MoE blocks keep what theirs keep instead
        moe_kept, moe_transient = layer_activation_bytes(m, lay, cfg, impl, moe=True)
        saved += chunks * moe / lay.virtual_stages * (moe_kept - kept)
        transient = max(transient, moe_transient)
    extras = 0.0
    if stage == "first" or lay.pp == 1:
        extras += bytes_per_token(embed_saved(m, impl), m, lay.tp, lay.sequence_parallel)
    if stage == "last" or lay.pp == 1:
        extras += bytes_per_token(head_saved(m, ab, impl), m, lay.tp, lay.sequence_parallel)
        # The loss's workspace: logits in the compute dtype and the gradient of the fp32 log-probs.
        vocab = m.vocab_size * m.split_factors(lay.tp, lay.sequence_parallel)["vocab"]
        transient += tokens * vocab * (ab + 4)
    held = chunks if stage == "first" and lay.pp > 1 else 1
    return saved + held * extras * tokens, transient


def buffer_bytes(m: ModelShape, lay: Layout, cfg: Config) -> tuple[float, float]:
    """(FP8 weight copies, tp/cp/pp/ep communication buffers) on one rank; ZeRO's pages in flight
    come with its state."""
    ab = dtype_bytes(cfg)
    tokens = lay.micro_batch * cfg.train.seq_len / lay.cp
    factors = m.split_factors(lay.tp, lay.sequence_parallel)
    comm = 0.0
    if lay.tp > 1 and lay.sequence_parallel:
        comm += tokens * m.dim * ab  # the all-gathered sequence before a column-parallel linear
    if lay.cp > 1:
        kv = 2 * m.kv_dim * factors["kv"] * tokens * ab
        comm += 2 * kv if lay.cp_mode == "ring" else kv + 2 * tokens * m.q_dim * factors["tp"] * ab
    if lay.pp > 1:
        comm += 2 * tokens * m.dim * factors["seq"] * ab  # send and receive of a stage boundary
    if lay.ep > 1:
        comm += 2 * tokens * m.top_k * m.dim * ab  # one all-to-all's rows sent and received
    fp8 = 0.0
    if cfg.precision.fp8.enabled and lay.zero_stage < 3:
        # Row- and column-major FP8 copies of each layer weight, cast once per step (1 byte each).
        fp8 = 2.0 * sum(m.rank_gemm_weights(lay.tp, lay.ep, stage_layers(m, lay)))
    return fp8, comm


def memory(m: ModelShape, lay: Layout, cfg: Config, hw: Hardware, impl: Implementation) -> tuple[Memory, ZeroBytes]:
    """Peak bytes per rank over the first and last pipeline stages, by kind and tier, and the
    ZeRO state of the stage that holds most."""
    best = None
    for stage in ("first", "last") if lay.pp > 1 else ("first",):
        z = zero_bytes(m, lay, cfg, impl, stage_layers(m, lay), stage)
        acts = sum(activation_bytes(m, lay, cfg, impl, stage))
        fp8, comm = buffer_bytes(m, lay, cfg)
        comm += z.in_flight
        tensors = z.params_device + z.grads + z.optimizer_device + acts + fp8 + comm
        reserved = hw.reserved_gib * GIB + ALLOCATOR_SLACK * tensors
        host = z.params_host + z.optimizer_host
        mem = Memory(
            stage=stage, params=z.params_device, grads=z.grads, optimizer=z.optimizer_device,
            activations=acts, fp8_buffers=fp8, comm_buffers=comm, reserved=reserved,
            device_total=tensors + reserved, device_capacity=hw.memory_gib * GIB, host=host,
            host_per_node=host * min(hw.gpus_per_node, lay.world_size),
            host_capacity_per_node=hw.host_memory_gib * GIB, nvme=z.optimizer_nvme, fits=False,
        )
        mem.fits = (mem.device_total <= mem.device_capacity and mem.host_per_node <= mem.host_capacity_per_node
                    and not z.problems)
        if best is None or mem.device_total > best[0].device_total:
            best = mem, z
    return best
