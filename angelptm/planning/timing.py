"""FLOPs, communication bytes per dimension and an estimated step time for one layout.

Each piece of work is timed against the resource that bounds it (roofline, Williams et al.
2009): GEMMs and attention against peak FLOP/s times a sustained fraction, elementwise passes
against HBM bandwidth, collectives against the link they cross with ring-algorithm volumes
(Thakur et al. 2005: all-gather and reduce-scatter move (n-1)/n of the data per rank,
all-reduce twice that). What overlaps with what is listed in `OVERLAP` and printed with every plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from angelptm.config import Config
from angelptm.planning.hardware import Hardware
from angelptm.planning.layout import Layout, stage_layers
from angelptm.planning.model import Implementation, ModelShape, dtype_bytes, per_rank
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


@dataclass
class Comm:
    """Bytes one rank sends per step, by parallel dimension."""

    tp: float
    cp: float
    pp: float
    dp: float


@dataclass
class Timing:
    """Seconds per step by component, and the throughput they give."""

    gemm: float
    attention: float
    elementwise: float
    recompute: float
    tp_comm: float
    cp_comm: float
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


@dataclass(frozen=True)
class Group:
    """A communicator of `size` ranks spaced `stride` apart in the rank order (tp innermost).

    Inside a node rings run on NVLink. Across nodes each node's k members of the group drive k
    network cards in parallel rings (NCCL's channels), so the group gets k cards' worth of
    bandwidth, capped by NVLink. Every ring step also pays a fixed latency.
    """

    size: int
    bandwidth: float  # bytes/s
    latency: float  # s per ring step

    @classmethod
    def of(cls, hw: Hardware, size: int, stride: int) -> "Group":
        if size * stride <= hw.gpus_per_node:
            gbps, latency_us = hw.intra_node_gbps, hw.intra_node_latency_us
        else:
            per_node = max(1, hw.gpus_per_node // stride)
            gbps, latency_us = min(hw.intra_node_gbps, per_node * hw.inter_node_gbps), hw.inter_node_latency_us
        return cls(size, gbps * hw.link_efficiency * 1e9, latency_us * 1e-6)

    def gather(self, full_bytes: float, calls: float = 1) -> float:
        """Seconds for all-gathers or reduce-scatters of tensors totalling `full_bytes` (ring:
        (n-1)/n of the data and n-1 steps per call)."""
        if self.size <= 1:
            return 0.0
        return (self.size - 1) / self.size * full_bytes / self.bandwidth + calls * (self.size - 1) * self.latency

    def all_reduce(self, full_bytes: float, calls: float = 1) -> float:
        """Seconds for all-reduces: twice a ring's volume, with a tree's 2·log2(n) steps of
        latency (NCCL picks the tree at scale)."""
        if self.size <= 1:
            return 0.0
        volume = 2 * (self.size - 1) / self.size * full_bytes
        return volume / self.bandwidth + calls * 2 * math.log2(self.size) * self.latency

    def send(self, nbytes: float, calls: float = 1) -> float:
        """Seconds for point-to-point transfers."""
        return nbytes / self.bandwidth + calls * self.latency


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
    tp_bytes: float
    cp_bytes: float


def _microbatch(m: ModelShape, lay: Layout, cfg: Config, hw: Hardware, impl: Implementation, stage: str) -> _Micro:
    ab = dtype_bytes(cfg)
    seq = cfg.train.seq_len
    tokens = lay.micro_batch * seq / lay.cp
    f = m.split_factors(lay.tp, lay.sequence_parallel)
    fp8 = cfg.precision.fp8.enabled
    dense = hw.peak_flops("float32" if ab == 4 else "bfloat16") * hw.matmul_efficiency
    layer_peak = hw.peak_flops("float8") * hw.matmul_efficiency if fp8 else dense
    hbm = hw.hbm_gbps * hw.hbm_efficiency * 1e9
    h, fd, kv = m.dim, m.ffn_dim, m.kv_dim

    # GEMMs: one forward product per weight; backward has two (input and weight gradients).
    gemm_flops = 2 * tokens * per_rank(m.layer_gemm_weights, f)
    gemm = gemm_flops / layer_peak
    # Attention over heads of this rank: flash skips the masked half; unfused computes every score.
    if impl.attention == "flash":
        attn_peak = hw.peak_flops("float32" if ab == 4 else "bfloat16") * hw.attention_efficiency
        attn_fwd = 4 * tokens * seq * h * f["tp"] * 0.5 / attn_peak
        attn_bwd = 2.5 * attn_fwd  # 5 matmuls against the forward's 2 (Dao 2023, Alg. 2)
        score_bytes = 0.0
    else:
        attn_fwd = 4 * tokens * seq * h * f["tp"] / dense
        attn_bwd = 2 * attn_fwd
        # scores written, softmax read+written, dropout read+written+mask, probabilities read by AV
        per_score = 4 * ab + (2 * ab + 1 if impl.dropout else 0)
        score_bytes = tokens * m.n_heads * f["tp"] * seq * per_score
    # Elementwise passes, each reading its inputs and writing its outputs once.
    seq_elems = 2 * 2 * h + 2 * 3 * h  # two norms (in, out), two residual adds (2 in, 1 out)
    if m.arch == "llama":
        tp_elems = 2 * (h * f["tp"] + kv * f["kv"]) + 3 * fd * f["tp"]  # RoPE on q, k; SwiGLU
    else:
        tp_elems = 2 * fd * f["tp"]  # GELU
    elem_bytes = tokens * (seq_elems * f["seq"] + tp_elems) * ab
    if impl.dropout:
        elem_bytes += tokens * 2 * h * f["seq"]  # residual dropout masks
    if fp8:
        # Casting each GEMM input (forward) and output gradient (backward) to 1-byte FP8.
        elem_bytes += tokens * (3 * h * f["seq"] + h * f["tp"] + fd * f["tp"]) * (ab + 1)
    elem_fwd = (elem_bytes + score_bytes) / hbm
    elem_bwd = 2 * elem_fwd  # backward reads the saved tensors and the incoming gradient, writes one

    # Tensor parallelism, per layer and pass: 2 all-gathers + 2 reduce-scatters of the layer's
    # activation with sequence parallelism, 2 all-reduces without (the same volume).
    tp = Group.of(hw, lay.tp, 1)
    boundary = tokens * h * ab
    tp_pass = 4 * (lay.tp - 1) / lay.tp * boundary
    tp_fwd = 4 * tp.gather(boundary) if lay.sequence_parallel else 2 * tp.all_reduce(boundary)
    regathered = lay.sequence_parallel and not impl.keeps_gathered_input
    regather = 2 * (lay.tp - 1) / lay.tp * boundary if regathered else 0.0

    # Context parallelism.
    cp = Group.of(hw, lay.cp, lay.tp)
    cp_fwd_bytes = cp_bwd_bytes = 0.0
    cp_fwd = cp_bwd = 0.0
    if lay.cp > 1:
        if lay.cp_mode == "ring":
            chunk = 2 * tokens * kv * f["kv"] * ab  # this rank's K and V, passed round the ring
            cp_fwd_bytes, cp_bwd_bytes = (lay.cp - 1) * chunk, 2 * (lay.cp - 1) * chunk  # + their gradients
            cp_fwd = max(0.0, cp.send(cp_fwd_bytes, lay.cp - 1) - attn_fwd)
            cp_bwd = max(0.0, cp.send(cp_bwd_bytes, lay.cp - 1) - attn_bwd)
        else:
            # All-to-alls of q, k, v before attention and of its output after: (n-1)/n of each
            # moves. Key/value heads that do not divide by cp are first repeated to the query heads.
            kv_rank = kv * f["kv"] if m.kv_heads_per_rank(lay.tp) % lay.cp == 0 else h * f["tp"]
            qkvo = tokens * (2 * h * f["tp"] + 2 * kv_rank) * ab
            cp_fwd_bytes = cp_bwd_bytes = (lay.cp - 1) / lay.cp * qkvo
            cp_fwd = cp_bwd = cp.gather(qkvo, calls=4)

    layer_fwd = gemm + attn_fwd + elem_fwd + tp_fwd + cp_fwd
    if lay.checkpointing == "full":
        recompute = layer_fwd
        recompute_tp, recompute_cp = tp_pass, cp_fwd_bytes
    elif lay.checkpointing == "selective":
        recompute = attn_fwd + score_bytes / hbm
        recompute_tp = recompute_cp = 0.0
    else:
        recompute = recompute_tp = recompute_cp = 0.0
    layer_bwd = gemm + attn_bwd + elem_bwd + tp_fwd + cp_bwd + recompute

    n = stage_layers(m, lay)
    fwd, bwd, wgt = n * layer_fwd, n * layer_bwd, n * gemm
    tp_bytes = n * (2 * tp_pass + regather + recompute_tp)
    head = loss = embed_tp = 0.0
    if stage == "last" or lay.pp == 1:
        # Output head (vocab-parallel; FP8 skips it by default) and the loss's passes over the logits.
        vocab = m.vocab_size * f["vocab"]
        head = 2 * tokens * h * vocab / dense
        loss = tokens * vocab * (ab + 3 * 4) / hbm  # logits, fp32 log-probs, their gradient
        fwd, bwd, wgt = fwd + head + loss, bwd + head + loss, wgt + head
    if (stage == "first" or lay.pp == 1) and lay.tp > 1:
        # Vocab-parallel embedding: its output is summed over tp in forward, its gradient in backward.
        embed_tp = tp.all_reduce(boundary)
        fwd, bwd = fwd + embed_tp, bwd + embed_tp
        tp_bytes += 2 * 2 * (lay.tp - 1) / lay.tp * boundary
    return _Micro(
        forward=fwd, backward=bwd, weight=wgt,
        gemm=n * 3 * gemm + 3 * head, attention=n * (attn_fwd + attn_bwd),
        elementwise=n * (elem_fwd + elem_bwd) + 2 * loss, recompute=n * recompute,
        tp_comm=n * 2 * tp_fwd + 2 * embed_tp, cp_comm=n * (cp_fwd + cp_bwd),
        tp_bytes=tp_bytes, cp_bytes=n * (cp_fwd_bytes + cp_bwd_bytes + recompute_cp),
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
    d = lay.dp * lay.cp
    pb = dtype_bytes(cfg)
    grads, params = zb.total_numel * (impl.grad_bytes or pb), zb.total_numel * pb
    if cfg.precision.fp8.enabled and cfg.precision.fp8.fp8_all_gather and lay.zero_stage == 3:
        fp8_weights = stage_layers(m, lay) * per_rank(m.layer_gemm_weights, m.split_factors(lay.tp, False))
        params -= fp8_weights * (pb - 1)  # FP8-eligible pages travel in 1 byte with their scales
    dp = Group.of(hw, d, lay.tp)
    pages = zb.pages.count if impl.paged else math.ceil(params / (cfg.zero.page_mb * 2**20))
    backward = micro.backward + micro.weight
    dp_exposed, dp_bytes = 0.0, 0.0
    if d > 1:
        rs, ag = (d - 1) / d * grads, (d - 1) / d * params
        reduce_scatter, all_gather = dp.gather(grads, pages), dp.gather(params, pages)
        if lay.zero_stage == 0:
            dp_bytes = 2 * rs
            dp_exposed = max(0.0, dp.all_reduce(grads, pages) - backward)
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
    model_flops = m.flops_per_token(seq) * step_tokens
    recompute_per_token = 0.0
    if lay.checkpointing == "full":
        recompute_per_token = 2 * sum(n for _, n in m.layer_gemm_weights) + 4 * m.dim * seq
    elif lay.checkpointing == "selective":
        recompute_per_token = 4 * m.dim * seq
    hardware_flops = model_flops + m.n_layers * recompute_per_token * step_tokens
    world = lay.world_size
    peak = hw.peak_flops("float32" if ab == 4 else "bfloat16")
    t = Timing(
        gemm=mbs * micro.gemm, attention=mbs * micro.attention, elementwise=mbs * micro.elementwise,
        recompute=mbs * micro.recompute, tp_comm=mbs * micro.tp_comm, cp_comm=mbs * micro.cp_comm,
        pp_comm=mbs * pp_time_mb, bubble=bubble, dp_exposed=dp_exposed, optimizer=optimizer, step=step,
        tokens_per_s=step_tokens / step, model_flops=model_flops, hardware_flops=hardware_flops,
        model_tflops_per_gpu=model_flops / step / world / 1e12,
        hardware_tflops_per_gpu=hardware_flops / step / world / 1e12,
        mfu=model_flops / step / world / peak, hfu=hardware_flops / step / world / peak,
    )
    comm = Comm(tp=mbs * micro.tp_bytes, cp=mbs * micro.cp_bytes, pp=mbs * pp_bytes_mb, dp=dp_bytes)
    return t, comm
