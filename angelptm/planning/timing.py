"""FLOPs, communication bytes per dimension and an estimated step time for one layout.

Each piece of work is timed against the resource that bounds it (roofline, Williams et al.
2009): GEMMs and attention against peak FLOP/s times a sustained fraction, elementwise passes
against HBM bandwidth, collectives against the link they cross (`angelptm.planning.links`).
One layer's work is `angelptm.planning.layer_time`'s; this module adds the layers of the busiest
pipeline rank, the pipeline's bubble, data parallelism and the optimizer step. What overlaps
with what is listed in `OVERLAP` (and `MOE_OVERLAP`) and printed with every plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from angelptm.config import Config
from angelptm.planning import adapters
from angelptm.planning.adapters import lora_rank
from angelptm.planning.hardware import Hardware
from angelptm.planning.layer_time import layer_time
from angelptm.planning.layout import Layout, stage_layers
from angelptm.planning.links import Group
from angelptm.planning.model import Implementation, ModelShape, dtype_bytes
from angelptm.planning.zero import ZeroBytes

OVERLAP = (
    "tensor-parallel collectives run between the GEMMs they feed (not overlapped); where an "
    "implementation re-gathers sequence-parallel inputs in backward, that hides under weight-gradient GEMMs",
    "ring attention overlaps each K/V exchange with the current block; Ulysses all-to-alls are exposed",
    "pipeline sends and receives are on the critical path; bubbles follow the schedule's formula",
    "dp: stage 0/1 reduce gradients during the last microbatch's backward and stage 1-2 gather "
    "parameters during the first forward; stage 2 reduce-scatters and stage 3 gathers page by page "
    "during each microbatch's compute",
    "the optimizer step is not overlapped with compute; host and NVMe tiers overlap their copies "
    "with the CPU step",
)
MOE_OVERLAP = (
    "ep: each MoE block's dispatch all-to-all overlaps the shared experts' forward, and its reverse "
    "their backward; the combine all-to-alls are exposed; routing is balanced (every rank receives "
    "as many token copies as it sends)",
)


@dataclass
class Comm:
    """Bytes one rank sends per step, by parallel dimension."""

    tp: float
    cp: float
    pp: float
    dp: float
    ep: float  # the all-to-alls of MoE blocks' dispatch and combine


@dataclass
class Timing:
    """Seconds per step by component, and the throughput they give."""

    gemm: float
    attention: float
    elementwise: float
    recompute: float
    tp_comm: float
    cp_comm: float
    ep_comm: float  # expert-parallel all-to-alls left exposed
    pp_comm: float
    bubble: float
    dp_exposed: float
    optimizer: float
    step: float
    tokens_per_s: float
    model_flops: float  # per step, all ranks
    hardware_flops: float  # model FLOPs plus recomputation
    model_tflops_per_gpu: float
    hardware_tflops_per_gpu: float
    mfu: float
    hfu: float


@dataclass
class _Micro:
    """One microbatch through the busiest stage on one rank: F, B (input grads), W (weight grads)."""

    forward: float
    backward: float
    weight: float
    gemm: float
    attention: float
    elementwise: float
    recompute: float
    tp_comm: float
    cp_comm: float
    ep_comm: float
    tp_bytes: float
    cp_bytes: float
    ep_bytes: float


def _microbatch(m: ModelShape, lay: Layout, cfg: Config, hw: Hardware, impl: Implementation, stage: str) -> _Micro:
    ab = dtype_bytes(cfg)
    tokens = lay.micro_batch * cfg.train.seq_len / lay.cp
    f = m.split_factors(lay.tp, lay.sequence_parallel)
    dense = hw.peak_flops("float32" if ab == 4 else "bfloat16") * hw.matmul_efficiency
    hbm = hw.hbm_gbps * hw.hbm_efficiency * 1e9
    h = m.dim
    dense_layers, moe_layers = m.layer_kinds(stage_layers(m, lay))
    kinds = [(dense_layers, layer_time(m, lay, cfg, hw, impl, moe=False))] if dense_layers else []
    if moe_layers:
        kinds.append((moe_layers, layer_time(m, lay, cfg, hw, impl, moe=True)))

    fwd, bwd = sum(n * t.forward for n, t in kinds), sum(n * t.backward for n, t in kinds)
    wgt = sum(n * t.weight_gemm for n, t in kinds)
    head_trainable = not lora_rank(cfg)  # LoRA freezes the head: its weight gradient is not computed
    tp_bytes = sum(n * t.tp_bytes for n, t in kinds)
    head = loss = embed_tp = 0.0
    if stage == "last" or lay.pp == 1:
        # Output head (vocab-parallel; FP8 skips it by default) and the loss's passes over the logits.
        vocab = m.vocab_size * f["vocab"]
        head = 2 * tokens * h * vocab / dense
        loss = tokens * vocab * (ab + 3 * 4) / hbm  # logits, fp32 log-probs, their gradient
        fwd, bwd, wgt = fwd + head + loss, bwd + head + loss, wgt + head_trainable * head
    if (stage == "first" or lay.pp == 1) and lay.tp > 1:
        # Vocab-parallel embedding: its output is summed over tp in forward, its gradient in backward.
        boundary = tokens * h * ab
        embed_tp = Group.of(hw, lay.tp, 1).all_reduce(boundary)
        fwd, bwd = fwd + embed_tp, bwd + embed_tp
        tp_bytes += 2 * 2 * (lay.tp - 1) / lay.tp * boundary
    return _Micro(
        forward=fwd, backward=bwd, weight=wgt,
        gemm=sum(n * (2 * t.gemm + t.weight_gemm) for n, t in kinds) + (2 + head_trainable) * head,
        attention=sum(n * (t.attn_fwd + t.attn_bwd) for n, t in kinds),
        elementwise=sum(n * (t.elem_fwd + t.elem_bwd) for n, t in kinds) + 2 * loss,
        recompute=sum(n * t.recompute for n, t in kinds),
        tp_comm=sum(n * 2 * t.tp_fwd for n, t in kinds) + 2 * embed_tp,
        cp_comm=sum(n * (t.cp_fwd + t.cp_bwd) for n, t in kinds),
        ep_comm=sum(n * (t.ep_fwd + t.ep_bwd) for n, t in kinds),
        tp_bytes=tp_bytes, cp_bytes=sum(n * t.cp_bytes for n, t in kinds),
        ep_bytes=sum(n * t.ep_bytes for n, t in kinds),
    )


def _optimizer_seconds(zb: ZeroBytes, cfg: Config, hw: Hardware, impl: Implementation) -> float:
    """AdamW over this rank's own elements: on device against HBM, on host against host memory
    and PCIe, with NVMe reads and writes of the state beside."""
    pb = dtype_bytes(cfg)
    gb = impl.grad_bytes or pb
    states = 8 if pb == 4 else 12  # exp_avg, exp_avg_sq (+ fp32 master)
    touched = gb + 2 * states + pb  # read grad and states, write states and the parameter
    on_device = zb.own_numel * zb.optimizer_on_device
    device = on_device * touched / (hw.hbm_gbps * hw.hbm_efficiency * 1e9)
    off = zb.own_numel - on_device
    if off <= 0:
        return device
    share = hw.gpus_per_node  # the node's host memory, PCIe switches and drives serve all its GPUs
    cpu = off * touched / (hw.host_memory_gbps * hw.hbm_efficiency * 1e9 / share)  # same sustained fraction as HBM
    pcie = off * max(gb, pb) / (hw.host_link_gbps * hw.link_efficiency * 1e9)
    nvme = 0.0
    if cfg.zero.offload_optimizer == "nvme":
        nvme = off * 2 * states / (hw.nvme_gbps * 1e9 / share)  # read and write back the states
    return device + max(cpu, pcie, nvme)


def timing(m: ModelShape, lay: Layout, cfg: Config, hw: Hardware, impl: Implementation,
           zb: ZeroBytes) -> tuple[Timing, Comm]:
    """Step time and per-rank communication of `lay`, whose ZeRO state the memory plan put as `zb`."""
    ab = dtype_bytes(cfg)
    seq = cfg.train.seq_len
    tokens = lay.micro_batch * seq / lay.cp
    mbs = lay.microbatches(cfg.train.global_batch)
    stages = ("first", "last") if lay.pp > 1 else ("first",)
    micro = max((_microbatch(m, lay, cfg, hw, impl, s) for s in stages),
                key=lambda x: x.forward + x.backward + x.weight)

    # Pipeline: point-to-point at every chunk boundary, forward activations and backward gradients.
    f = m.split_factors(lay.tp, lay.sequence_parallel)
    pp_bytes_mb = pp_time_mb = 0.0
    if lay.pp > 1:
        pp_bytes_mb = 2 * lay.virtual_stages * tokens * m.dim * f["seq"] * ab
        pp_time_mb = Group.of(hw, lay.pp, lay.dp * lay.cp * lay.tp).send(pp_bytes_mb, 2 * lay.virtual_stages)
    per_mb = micro.forward + micro.backward + micro.weight + pp_time_mb
    if lay.pp == 1:
        bubble = 0.0
    elif lay.schedule == "zero_bubble":
        # ZB-H1 (Qi et al. 2024, Sec. 3): weight gradients fill the cool-down, bubble (p-1)(F+B-W).
        bubble = (lay.pp - 1) * max(0.0, micro.forward + micro.backward - micro.weight + pp_time_mb)
    else:
        # GPipe and 1F1B: (p-1) microbatch times; interleaving divides by v (Narayanan et al. 2021, Sec. 2.2).
        bubble = (lay.pp - 1) * per_mb / lay.virtual_stages

    # Data parallelism over the data group (dp·cp ranks: context-parallel ranks hold the same
    # weights and see other tokens), per ZeRO stage, one collective per page; volumes per rank.
    # Under expert parallelism the routed experts' pages go over their own group, the dp·cp / ep
    # ranks (ep·tp apart) that hold the same experts, one after the other pool.
    d = lay.dp * lay.cp
    pb = dtype_bytes(cfg)
    fp8_gather = cfg.precision.fp8.enabled and cfg.precision.fp8.fp8_all_gather and lay.zero_stage == 3
    plain_fp8, expert_fp8 = m.rank_gemm_weights(lay.tp, lay.ep, stage_layers(m, lay))

    def pool(numel: float, trainable: float, fp8_numel: float, group: Group,
             pages: int) -> tuple[float, float, Group, int]:
        # Gradients of the trainable pages are reduced; stage 3 gathers every page, stages 1-2
        # publish the updated (trainable) ones.
        grads, params = trainable * (impl.grad_bytes or pb), (numel if lay.zero_stage == 3 else trainable) * pb
        if fp8_gather:
            params -= fp8_numel * (pb - 1)  # FP8-eligible pages travel in 1 byte with their scales
        calls = pages if impl.paged else math.ceil(params / (cfg.zero.page_mb * 2**20))
        return grads, params, group, calls

    if not zb.expert_numel:  # experts, if any, share the dense pages
        pools = [pool(zb.total_numel, zb.trainable_numel, plain_fp8 + expert_fp8, Group.of(hw, d, lay.tp),
                      zb.pages.count)]
    else:
        expert_trainable = 0.0 if lora_rank(cfg) else zb.expert_numel  # LoRA leaves the experts frozen
        pools = [pool(zb.total_numel - zb.expert_numel, zb.trainable_numel - expert_trainable, plain_fp8,
                      Group.of(hw, d, lay.tp), zb.pages.count - zb.pages.expert_count),
                 pool(zb.expert_numel, expert_trainable, expert_fp8, Group.of(hw, d // lay.ep, lay.tp * lay.ep),
                      zb.pages.expert_count)]
    params = sum(p for _, p, _, _ in pools)
    backward = micro.backward + micro.weight
    dp_exposed, dp_bytes = 0.0, 0.0
    if d > 1:
        rs = sum((g.size - 1) / g.size * grads for grads, _, g, _ in pools)
        ag = sum((g.size - 1) / g.size * p for _, p, g, _ in pools)
        reduce_scatter = sum(g.gather(grads, calls) for grads, _, g, calls in pools)
        all_gather = sum(g.gather(p, calls) for _, p, g, calls in pools)
        if lay.zero_stage == 0:
            dp_bytes = 2 * rs
            all_reduce = sum(g.all_reduce(grads, calls) for grads, _, g, calls in pools)
            dp_exposed = max(0.0, all_reduce - backward)
        elif lay.zero_stage == 1:
            dp_bytes = rs + ag
            dp_exposed = max(0.0, reduce_scatter - backward) + max(0.0, all_gather - micro.forward)
        elif lay.zero_stage == 2:
            dp_bytes = mbs * rs + ag
            dp_exposed = mbs * max(0.0, reduce_scatter - backward) + max(0.0, all_gather - micro.forward)
        else:
            dp_bytes = mbs * (2 * ag + rs)
            fetch = 0.0
            if zb.params_host > 0:  # the host's share of the shards comes up before each gather
                fetch = zb.params_host / (hw.host_link_gbps * hw.link_efficiency * 1e9)
            dp_exposed = mbs * (max(0.0, all_gather + fetch - micro.forward)
                                + max(0.0, all_gather + fetch + reduce_scatter - backward))

    optimizer = _optimizer_seconds(zb, cfg, hw, impl)
    if cfg.precision.fp8.enabled:
        optimizer += params * (1 + 2 / pb) / (hw.hbm_gbps * hw.hbm_efficiency * 1e9)  # weights cast to FP8 once

    step = mbs * per_mb + bubble + dp_exposed + optimizer
    step_tokens = cfg.train.global_batch * seq
    model_flops = adapters.flops_per_token(m, cfg, seq) * step_tokens
    recompute_per_token = 0.0  # all layers: full recomputes their forward GEMMs, both attention's scores
    if lay.checkpointing == "full":
        recompute_gemm = m.gemm_weights_per_token + m.n_layers * adapters.adapter_full_numel(m, cfg)
        recompute_per_token = 2 * recompute_gemm + m.n_layers * 4 * m.q_dim * seq
    elif lay.checkpointing == "selective":
        recompute_per_token = m.n_layers * 4 * m.q_dim * seq
    hardware_flops = model_flops + recompute_per_token * step_tokens
    world = lay.world_size
    peak = hw.peak_flops("float32" if ab == 4 else "bfloat16")
    t = Timing(
        gemm=mbs * micro.gemm, attention=mbs * micro.attention, elementwise=mbs * micro.elementwise,
        recompute=mbs * micro.recompute, tp_comm=mbs * micro.tp_comm, cp_comm=mbs * micro.cp_comm,
        ep_comm=mbs * micro.ep_comm, pp_comm=mbs * pp_time_mb, bubble=bubble, dp_exposed=dp_exposed, optimizer=optimizer, step=step,
        tokens_per_s=step_tokens / step, model_flops=model_flops, hardware_flops=hardware_flops,
        model_tflops_per_gpu=model_flops / step / world / 1e12,
        hardware_tflops_per_gpu=hardware_flops / step / world / 1e12,
        mfu=model_flops / step / world / peak, hfu=hardware_flops / step / world / peak,
    )
    comm = Comm(tp=mbs * micro.tp_bytes, cp=mbs * micro.cp_bytes, pp=mbs * pp_bytes_mb, dp=dp_bytes,
                ep=mbs * micro.ep_bytes)
    return t, comm
