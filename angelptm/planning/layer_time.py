"""One transformer layer's time for one microbatch on one rank: GEMMs, attention, elementwise passes,
and the tensor-, context- and expert-parallel collectives it waits for.

A dense layer and an MoE block share attention, norms and residuals. An MoE block's feed-forward
is the router (float32, `angelptm.models.moe.Router`), the routed experts as grouped GEMMs at the
hardware's grouped-GEMM efficiency, the shared experts as plain GEMMs, the passes that gather
token copies by expert and sum them back, and under expert parallelism four all-to-alls of the
token copies (dispatch and combine, forward and backward; DESIGN.md "MoE"). Routing is assumed
balanced: every rank receives the top_k copies of as many tokens as it sends.

Under LoRA the adapters add their (small) GEMMs, and of the weight-gradient GEMMs only theirs
remain: the frozen base weights still multiply the output gradient for the input gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

from angelptm.config import Config
from angelptm.planning.adapters import adapter_params, lora_rank
from angelptm.planning.hardware import Hardware
from angelptm.planning.layout import Layout
from angelptm.planning.links import Group
from angelptm.planning.model import Implementation, ModelShape, dtype_bytes, per_rank


@dataclass
class LayerTime:
    """Seconds of one layer and one microbatch (forward, backward with its recomputation, the
    forward GEMMs, of them those whose weight gradients backward computes) by component, and the
    bytes its collectives send."""

    forward: float
    backward: float
    gemm: float
    weight_gemm: float  # the weight-gradient GEMMs: as many FLOPs as the forward GEMMs of the trainable weights
    attn_fwd: float
    attn_bwd: float
    elem_fwd: float
    elem_bwd: float
    recompute: float
    tp_fwd: float
    cp_fwd: float
    cp_bwd: float
    ep_fwd: float
    ep_bwd: float
    tp_bytes: float
    cp_bytes: float
    ep_bytes: float


def all_to_all_bytes(m: ModelShape, lay: Layout, cfg: Config) -> float:
    """Bytes one all-to-all of an MoE block sends off each rank for one microbatch: the rank's
    tokens (its cp chunk, and its tp slice under sequence parallelism) · top_k copies · dim · bytes,
    of which (ep-1)/ep go to the other ep ranks."""
    tokens = lay.micro_batch * cfg.train.seq_len / lay.cp / (lay.tp if lay.sequence_parallel else 1)
    return (lay.ep - 1) / lay.ep * tokens * m.top_k * m.dim * dtype_bytes(cfg)


def layer_time(m: ModelShape, lay: Layout, cfg: Config, hw: Hardware, impl: Implementation, moe: bool) -> LayerTime:
    """One dense layer (`moe` False) or MoE block of `m` under `lay`."""
    ab = dtype_bytes(cfg)
    seq = cfg.train.seq_len
    tokens = lay.micro_batch * seq / lay.cp
    f = m.split_factors(lay.tp, lay.sequence_parallel)
    fp8 = cfg.precision.fp8.enabled
    dense = hw.peak_flops("float32" if ab == 4 else "bfloat16") * hw.matmul_efficiency
    layer_peak = hw.peak_flops("float8") * hw.matmul_efficiency if fp8 else dense
    hbm = hw.hbm_gbps * hw.hbm_efficiency * 1e9
    h, q, kv = m.dim, m.q_dim, m.kv_dim

    # GEMMs: one forward product per weight; backward has two (input and weight gradients).
    gemm_flops = 2 * tokens * per_rank(m.moe_gemm_weights if moe else m.layer_gemm_weights, f)
    gemm = gemm_flops / layer_peak
    adapters = 2 * tokens * sum(adapter_params(m, cfg, lay.tp)) / dense  # rank-wide: not worth FP8
    width = m.ffn_dim  # SwiGLU / GELU columns a token passes through
    shared_fwd = 0.0
    if moe:
        width = (m.top_k + m.n_shared_experts) * m.expert_ffn_dim
        shared_fwd = 2 * tokens * 3 * h * m.n_shared_experts * m.expert_ffn_dim * f["tp"] / layer_peak
        grouped_peak = hw.peak_flops("float8" if fp8 else "float32" if ab == 4 else "bfloat16")
        # The router and the routed experts are whole on every tp rank, which routes its own tokens:
        # its sequence slice under sequence parallelism, all of them without.
        routed = 2 * tokens * f["seq"] * m.routed_gemm_weights / (grouped_peak * hw.grouped_gemm_efficiency)
        router = 2 * tokens * f["seq"] * m.router_weights / (hw.peak_flops("float32") * hw.matmul_efficiency)
        gemm += routed + router
    weight_gemm = adapters if lora_rank(cfg) else gemm
    gemm += adapters
    # Attention over heads of this rank: flash skips the masked half; unfused computes every score.
    if impl.attention == "flash":
        attn_peak = hw.peak_flops("float32" if ab == 4 else "bfloat16") * hw.attention_efficiency
        attn_fwd = 4 * tokens * seq * q * f["tp"] * 0.5 / attn_peak
        attn_bwd = 2.5 * attn_fwd  # 5 matmuls against the forward's 2 (Dao 2023, Alg. 2)
        score_bytes = 0.0
    else:
        attn_fwd = 4 * tokens * seq * q * f["tp"] / dense
        attn_bwd = 2 * attn_fwd
        # scores written, softmax read+written, dropout read+written+mask, probabilities read by AV
        per_score = 4 * ab + (2 * ab + 1 if impl.dropout else 0)
        score_bytes = tokens * m.n_heads * f["tp"] * seq * per_score
    # Elementwise passes, each reading its inputs and writing its outputs once.
    seq_elems = 2 * 2 * h + 2 * 3 * h  # two norms (in, out), two residual adds (2 in, 1 out)
    if m.arch == "llama":
        tp_elems = 2 * (q * f["tp"] + kv * f["kv"]) + 3 * width * f["tp"]  # RoPE on q, k; SwiGLU
    else:
        tp_elems = 2 * width * f["tp"]  # GELU
    elem_bytes = tokens * (seq_elems * f["seq"] + tp_elems) * ab
    if moe:
        # Per token copy: gathered by expert (read, write), zero-filled and scattered back by slot
        # (write; read, write), read by the weighted sum, which writes the token once; under
        # expert parallelism regrouped by local expert and back (2 × read, write). The router's
        # passes over n_experts scores per token are small beside these (n_experts ≪ dim).
        copies = 6 * m.top_k + (4 * m.top_k if lay.ep > 1 else 0)
        elem_bytes += tokens * f["seq"] * (copies + 1) * h * ab
    if impl.dropout:
        elem_bytes += tokens * 2 * h * f["seq"]  # residual dropout masks
    if fp8:
        # Casting each GEMM input (forward) and output gradient (backward) to 1-byte FP8.
        elem_bytes += tokens * (3 * h * f["seq"] + q * f["tp"] + width * f["tp"]) * (ab + 1)
    elem_fwd = (elem_bytes + score_bytes) / hbm
    elem_bwd = 2 * elem_fwd  # backward reads the saved tensors and the incoming gradient, writes one

    # Tensor parallelism, per layer and pass: 2 all-gathers + 2 reduce-scatters of the layer's
    # activation with sequence parallelism, 2 all-reduces without (the same volume).
    # An MoE block's routed experts need no tp region, only its shared experts do.
    tp = Group.of(hw, lay.tp, 1)
    boundary = tokens * h * ab
    regions = 1 if moe and not m.n_shared_experts else 2
    tp_pass = 2 * regions * (lay.tp - 1) / lay.tp * boundary
    tp_fwd = 2 * regions * tp.gather(boundary) if lay.sequence_parallel else regions * tp.all_reduce(boundary)
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
            kv_rank = kv * f["kv"] if m.kv_heads_per_rank(lay.tp) % lay.cp == 0 else q * f["tp"]
            qkvo = tokens * (2 * q * f["tp"] + 2 * kv_rank) * ab
            cp_fwd_bytes = cp_bwd_bytes = (lay.cp - 1) / lay.cp * qkvo
            cp_fwd = cp_bwd = cp.gather(qkvo, calls=4)

    # Expert parallelism: dispatch (after a count exchange) and combine in forward, their reverses
    # in backward. The shared experts compute while the dispatch travels, and their backward
    # while its reverse does (angelptm.distributed.expert_parallel); the combines are exposed.
    ep_fwd = ep_bwd = ep_pass = 0.0
    if moe and lay.ep > 1:
        ep = Group.all_to_all_of(hw, lay.ep, lay.tp)
        rows = tokens * f["seq"] * m.top_k * h * ab  # this rank's token copies
        combine = ep.all_to_all(rows)
        ep_fwd = max(0.0, ep.all_to_all(rows, calls=2) - shared_fwd) + combine
        ep_bwd = combine + max(0.0, combine - 2 * shared_fwd)
        ep_pass = 2 * all_to_all_bytes(m, lay, cfg)

    layer_fwd = gemm + attn_fwd + elem_fwd + tp_fwd + cp_fwd + ep_fwd
    if lay.checkpointing == "full":
        recompute = layer_fwd
        recompute_tp, recompute_cp, recompute_ep = tp_pass, cp_fwd_bytes, ep_pass
    elif lay.checkpointing == "selective":
        recompute = attn_fwd + score_bytes / hbm
        recompute_tp = recompute_cp = recompute_ep = 0.0
    else:
        recompute = recompute_tp = recompute_cp = recompute_ep = 0.0
    layer_bwd = gemm + attn_bwd + elem_bwd + tp_fwd + cp_bwd + recompute + ep_bwd
    return LayerTime(
        forward=layer_fwd, backward=layer_bwd, gemm=gemm, weight_gemm=weight_gemm, attn_fwd=attn_fwd,
        attn_bwd=attn_bwd, elem_fwd=elem_fwd, elem_bwd=elem_bwd, recompute=recompute, tp_fwd=tp_fwd, cp_fwd=cp_fwd,
        cp_bwd=cp_bwd, ep_fwd=ep_fwd, ep_bwd=ep_bwd, tp_bytes=2 * tp_pass + regather + recompute_tp,
        cp_bytes=cp_fwd_bytes + cp_bwd_bytes + recompute_cp, ep_bytes=2 * ep_pass + recompute_ep,
    )
