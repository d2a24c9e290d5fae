"""Model arithmetic for planning: parameters, FLOPs and the activations a layer saves, for llama and gpt.

Everything is counted per token and per tensor-parallel split, so that memory and time for any
layout are sums of these tables scaled by the layout's degrees. The llama tables describe
`angelptm.models.llama` exactly, its mixture-of-experts blocks (`angelptm.models.moe`) included:
router, routed experts (every one for memory, the top k a token passes through for FLOPs),
shared experts, dense first layers (tests hold them against a real model on the meta device and
against the tensors autograd saves on CPU); the gpt tables describe the GPT of Megatron-LM
(learned positions, LayerNorm, 4h GELU MLP, biases), whose activations Korthikanti et al. 2022
("Reducing Activation Recomputation in Large Transformer Models", Sec. 4) count.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal, Optional

from angelptm.config import Config, ModelConfig
from angelptm.errors import UserError

# How a tensor divides over the tensor-parallel group:
#   "tp"   column-parallel outputs / row-parallel inputs (heads, ffn columns): always 1/t;
#   "kv"   key/value heads: 1/t while t divides n_kv_heads, else one replicated head per rank;
#   "seq"  the norm/residual region: 1/t with sequence parallelism, replicated without;
#   "vocab" the vocab-parallel embedding, output head and loss: vocab padded to a multiple of t;
#   "rep"  replicated on every tensor-parallel rank (norm weights, row-parallel biases).
Split = Literal["tp", "kv", "seq", "vocab", "rep"]


def dtype_bytes(cfg: Config) -> int:
    """Bytes per element of the compute dtype (parameters and activations)."""
    return 4 if cfg.precision.dtype == "float32" else 2


@dataclass(frozen=True)
class Implementation:
    """How the planned layers run, where systems differ in ways that change memory and time.

    `angelptm` is the default. Others exist so that published runs can be planned as they ran.
    """

    name: str
    # flash: fused SDPA, no s×s scores kept; unfused: scores, softmax and dropout in memory
    attention: Literal["flash", "unfused"]
    dropout: bool  # dropout on attention probabilities and on both residual branches
    grad_bytes: Optional[int]  # bytes per gradient element; None: the parameter dtype's
    # With sequence parallelism, whether a column-parallel linear keeps the all-gathered input it
    # computed with (angelptm: its tensor-parallel hooks gather before the block) or only its
    # sequence shard, gathered again in backward (Megatron-LM; Korthikanti et al. 2022, Sec. 4.2.2).
    keeps_gathered_input: bool
    # ZeRO state in ZeROCache's pages (angelptm.zerocache), or one flat buffer reduced in place.
    paged: bool


ANGELPTM = Implementation("angelptm", attention="flash", dropout=False, grad_bytes=None,
                          keeps_gathered_input=True, paged=True)
# Megatron-LM as Narayanan et al. 2021 and Korthikanti et al. 2022 ran it: fused scale-mask-softmax
# on materialised scores, dropout 0.1, fp16 compute with fp32 gradient accumulation buffers.
MEGATRON_2021 = Implementation("megatron-lm-2021", attention="unfused", dropout=True, grad_bytes=4,
                               keeps_gathered_input=False, paged=False)


@dataclass(frozen=True)
class Saved:
    """One tensor a layer keeps for backward: elements per token, bytes per element, how it splits."""

    name: str
    per_token: float
    elem_bytes: int
    split: Split
    core: bool = False  # part of the attention core that selective recomputation drops


@dataclass(frozen=True)
class ModelShape:
    """The numbers the planner needs from a model config; built once, used for every layout."""

    arch: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    max_seq_len: int
    tied: bool
    # One layer's weights that take part in a matmul (no biases, no norms), as (split, count)
    # pairs: hashable, so that per-layout results can be cached.
    layer_gemm_weights: tuple
    # Mixture of experts (left at these defaults by a dense model). An MoE block's plain GEMM
    # weights (attention and shared experts) as (split, count) pairs; its routed experts and router
    # are counted apart, since they run as a grouped GEMM and in float32.
    n_experts: int = 0
    top_k: int = 0
    n_shared_experts: int = 0
    expert_ffn_dim: int = 0
    first_dense_layers: int = 0
    router: str = "softmax"  # softmax | sigmoid
    z_loss: bool = False  # the router z-loss is on (it keeps the logits for backward)
    moe_gemm_weights: tuple = ()

    def __hash__(self) -> int:
        # The planner caches per-layout results keyed on the shape; hash its fields once.
        return self._hash

    @functools.cached_property
    def _hash(self) -> int:
        return hash(tuple(getattr(self, f) for f in self.__dataclass_fields__))

    @property
    def q_dim(self) -> int:
        """Width of the queries, and of the attention output wo reads: dim unless head_dim is set apart."""
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def moe_layers(self) -> int:
        """Blocks with experts: all after the first `first_dense_layers` of an MoE model."""
        return self.n_layers - self.first_dense_layers if self.n_experts else 0

    def layer_kinds(self, n_layers: int) -> tuple[int, int]:
        """(dense, MoE) blocks among `n_layers` blocks of one rank: MoE wherever the model has them
        (exact without a pipeline; with one, the costlier assumption for the busiest rank)."""
        moe = min(n_layers, self.moe_layers)
        return n_layers - moe, moe

    @property
    def expert_numel(self) -> int:
        """One routed expert's SwiGLU weights: w1, w2, w3."""
        return 3 * self.dim * self.expert_ffn_dim

    @property
    def routed_gemm_weights(self) -> int:
        """Routed-expert weights one token multiplies with: top_k experts."""
        return self.top_k * self.expert_numel

    @property
    def router_weights(self) -> int:
        return self.n_experts * self.dim

    @property
    def num_params(self) -> int:
        """All parameters of the model (every expert), tied weights once."""
        embedding, block, norm, output = self.unit_params(1)
        dense, moe = self.layer_kinds(self.n_layers)
        moe_block = sum(n for n, _ in self.moe_block_params(1, 1)) if moe else 0
        return (sum(embedding) + dense * sum(block) + moe * moe_block + sum(norm)
                + (0 if self.tied else sum(output)))

    @property
    def active_params(self) -> int:
        """Parameters one token passes through: of an MoE block only its top_k routed experts."""
        idle = self.moe_layers * (self.n_experts - self.top_k) * self.expert_numel
        return self.num_params - idle

    @property
    def gemm_weights_per_token(self) -> int:
        """Matmul weights one token passes through in all blocks (the output head apart)."""
        dense, moe = self.layer_kinds(self.n_layers)
        moe_layer = sum(n for _, n in self.moe_gemm_weights) + self.routed_gemm_weights + self.router_weights
        return dense * sum(n for _, n in self.layer_gemm_weights) + (moe * moe_layer if moe else 0)

    def rank_gemm_weights(self, tp: int, ep: int, n_layers: int) -> tuple[float, float]:
        """(plain, routed-expert) matmul weight elements a rank of `n_layers` blocks holds: what FP8
        casts and gathers in one byte (the float32 router and the head apart)."""
        f = self.split_factors(tp, False)
        dense, moe = self.layer_kinds(n_layers)
        plain = per_rank(self.layer_gemm_weights, f) * dense
        if not moe:
            return plain, 0.0
        local = self.n_experts // ep * self.expert_numel  # whole on every tp rank
        return plain + moe * per_rank(self.moe_gemm_weights, f), moe * local

    @functools.lru_cache(maxsize=None)
    def unit_params(self, tp: int) -> tuple[tuple[int, ...], ...]:
        """Parameter sizes one tensor-parallel rank holds, per unit and in registration order:
        (embedding, one block, final norm, output head). Column-parallel weights (wq, w1, w3; gpt's
        fused qkv and fc1 with their biases) split their rows, row-parallel ones (wo, w2; proj,
        fc2) their columns, k/v follow `kv_heads_per_rank`, the vocabulary is padded to a
        multiple of tp; norms and row-parallel biases are replicated."""
        h = self.dim
        heads, kv = self.n_heads // tp * self.head_dim, self.kv_heads_per_rank(tp) * self.head_dim
        ffn, vocab = self.ffn_dim // tp, math.ceil(self.vocab_size / tp) * h
        if self.arch == "llama":
            block = (h, heads * h, kv * h, kv * h, h * heads, h, ffn * h, h * ffn, ffn * h)
            return (vocab,), block, (h,), (vocab,)
        block = (h, h, (heads + 2 * kv) * h, heads + 2 * kv, h * heads, h, h, h, ffn * h, ffn, h * ffn, h)
        return (vocab, self.max_seq_len * h), block, (h, h), (vocab,)

    @functools.lru_cache(maxsize=None)
    def moe_block_params(self, tp: int, ep: int) -> tuple[tuple[int, bool], ...]:
        """(size, is a routed-expert weight) of each parameter of an MoE block one rank holds, in
        registration order: the dense block's norms and attention, the router (n_experts × dim),
        the routed experts' stacked w1, w2, w3 (n_experts / ep of them), the shared experts' one
        SwiGLU, n_shared_experts · expert_ffn_dim wide. Under tp the router and the routed experts
        are whole on every rank (`angelptm.distributed.tensor_parallel`), the shared experts split
        as a dense SwiGLU."""
        h = self.dim
        attention = self.unit_params(tp)[1][:6]  # attention_norm, wq, wk, wv, wo, ffn_norm
        routed = self.n_experts // ep * self.expert_ffn_dim * h
        shared = self.n_shared_experts * self.expert_ffn_dim // tp * h
        return (tuple((n, False) for n in (*attention, self.n_experts * h)) + ((routed, True),) * 3
                + ((shared, False),) * (3 if shared else 0))

    def flops_per_token(self, seq_len: int) -> float:
        """Model FLOPs per trained token (forward + backward), PaLM's convention (Chowdhery et al.
        2022, App. B): 6 per matmul weight, plus 12·layers·q_dim·seq for attention scores and values
        counted over the full (not causal-halved) sequence. Recomputation is not counted here."""
        gemm = self.gemm_weights_per_token + self.vocab_size * self.dim
        return 6.0 * gemm + 12.0 * self.n_layers * self.q_dim * seq_len

    def kv_heads_per_rank(self, tp: int) -> int:
        return self.n_kv_heads // tp if self.n_kv_heads % tp == 0 else 1

    @functools.lru_cache(maxsize=None)
    def split_factors(self, tp: int, sequence_parallel: bool) -> dict:
        """Fraction of a full tensor of each split that one tensor-parallel rank holds (do not mutate)."""
        padded_vocab = math.ceil(self.vocab_size / tp)
        return {
            "tp": 1.0 / tp,
            "kv": self.kv_heads_per_rank(tp) / self.n_kv_heads,
            "seq": 1.0 / tp if sequence_parallel else 1.0,
            "vocab": padded_vocab / self.vocab_size,
            "rep": 1.0,
        }


def per_rank(table: tuple, factors: dict) -> float:
    """Elements of a (split, count) table that one tensor-parallel rank holds."""
    return sum(n * factors[split] for split, n in table)


def _gemm_weights(cfg: ModelConfig, ffn_dim: int) -> tuple:
    h, f, head_dim = cfg.dim, ffn_dim, cfg.resolved_head_dim
    q, kv = cfg.n_heads * head_dim, cfg.n_kv_heads * head_dim
    # llama: wq, wo, w1, w2, w3 split over heads / ffn columns, wk and wv over kv heads;
    # gpt: q and proj, fc1 and fc2, k and v.
    ffn = 3 * h * f if cfg.arch == "llama" else 2 * h * f
    return (("tp", 2 * h * q + ffn), ("kv", 2 * h * kv))


def model_shape(cfg: ModelConfig) -> ModelShape:
    moe = cfg.moe
    if moe.n_experts and cfg.arch != "llama":
        raise UserError(f"model.moe.n_experts={moe.n_experts}: mixture-of-experts blocks are built for "
                        f"model.arch=llama only (got {cfg.arch}); set model.arch=llama or model.moe.n_experts=0")
    experts = {}
    if moe.n_experts:
        expert_ffn = moe.expert_ffn_dim or cfg.ffn_dim
        experts = dict(
            n_experts=moe.n_experts, top_k=moe.top_k, n_shared_experts=moe.n_shared_experts,
            expert_ffn_dim=expert_ffn, first_dense_layers=moe.first_dense_layers, router=moe.router,
            z_loss=moe.z_loss_coef > 0,
            # attention and the shared experts' SwiGLU: a dense block that wide
            moe_gemm_weights=_gemm_weights(cfg, moe.n_shared_experts * expert_ffn),
        )
    return ModelShape(
        arch=cfg.arch, dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_kv_heads, head_dim=cfg.resolved_head_dim, ffn_dim=cfg.ffn_dim,
        vocab_size=cfg.vocab_size, max_seq_len=cfg.max_seq_len, tied=cfg.tie_embeddings,
        layer_gemm_weights=_gemm_weights(cfg, cfg.ffn_dim), **experts,
    )


def _norm_saved(m: ModelShape, name: str, ab: int, impl: Implementation) -> list[Saved]:
    """RMSNorm (llama) keeps its input upcast to fp32, the fp32 rsqrt and the normalised value;
    LayerNorm (gpt) its input and fp32 mean and rstd. The norm's output is the next linears'
    input, kept whole on every tp rank or as a sequence shard (see `Implementation`)."""
    h = m.dim
    linear_input = Saved(f"{name}.output", h, ab, "rep" if impl.keeps_gathered_input else "seq")
    if m.arch == "llama":
        return [Saved(f"{name}.input_fp32", h, 4, "seq"), Saved(f"{name}.rsqrt", 1, 4, "seq"),
                Saved(f"{name}.normed", h, ab, "seq"), linear_input]
    return [Saved(f"{name}.input", h, ab, "seq"), Saved(f"{name}.mean_rstd", 2, 4, "seq"), linear_input]


@functools.lru_cache(maxsize=None)
def layer_saved(m: ModelShape, seq_len: int, ab: int, impl: Implementation, moe: bool = False) -> tuple[Saved, ...]:
    """Tensors one transformer layer (`moe`: an MoE block) saves for backward when nothing is
    recomputed (`ab`: bytes per element of the compute dtype).

    llama (angelptm.models.llama, read off autograd): the two RMSNorms; RoPE's rotated q and k;
    SDPA's q, k, v, output and fp32 log-sum-exp; SwiGLU's w1·x, silu(w1·x), w3·x and their product
    (an MoE block: `_moe_saved` instead). gpt: Korthikanti et al. 2022, Sec. 4.1, term by term, plus
    LayerNorm's fp32 mean and rstd.
    """
    h, f, a, q, kv = m.dim, m.ffn_dim, m.n_heads, m.q_dim, m.kv_dim
    names = ("attention_norm", "ffn_norm") if m.arch == "llama" else ("ln_1", "ln_2")
    ffn_norm = _norm_saved(m, names[1], ab, impl)
    out = _norm_saved(m, names[0], ab, impl) + (ffn_norm[:-1] if moe else ffn_norm)
    rotated = "_rotated" if m.arch == "llama" else ""
    out += [Saved(f"q{rotated}", q, ab, "tp"), Saved(f"k{rotated}", kv, ab, "kv"), Saved("v", kv, ab, "kv")]
    if impl.attention == "flash":
        out += [Saved("attention.out", q, ab, "tp"), Saved("attention.logsumexp", a, 4, "tp", core=True)]
    else:
        scores = a * seq_len  # per query token: one score per head per key
        out.append(Saved("softmax.out", scores, ab, "tp", core=True))
        if impl.dropout:
            out += [Saved("softmax.dropout_mask", scores, 1, "tp", core=True),
                    Saved("softmax.dropout_out", scores, ab, "tp", core=True)]
        out.append(Saved("attention.out", q, ab, "tp"))
    if moe:
        out += _moe_saved(m, ab)
    elif m.arch == "llama":
        out += [Saved(f"mlp.{name}", f, ab, "tp") for name in ("w1_out", "silu_out", "w3_out", "product")]
    else:
        out += [Saved("mlp.gelu_in", f, ab, "tp"), Saved("mlp.gelu_out", f, ab, "tp")]
    if impl.dropout:
        out += [Saved("attention.residual_dropout_mask", h, 1, "seq"),
                Saved("mlp.residual_dropout_mask", h, 1, "seq")]
    return tuple(out)


def _moe_saved(m: ModelShape, ab: int) -> list[Saved]:
    """What an MoE feed-forward (angelptm.models.moe, read off autograd) keeps per token, dropless:
    the router's float32 copy of its input (which stands for the norm's output; a shared expert
    keeps that too when it differs) and scores; the chosen experts, their gates and the slots
    sorted by expert; per token copy (top_k of them) the gathered row, the expert's SwiGLU
    intermediates and its output row for the weighted sum; the shared experts' SwiGLU. With a
    capacity factor fewer copies are kept: this counts them all. A few tensors of n_experts
    elements per layer (group offsets, the balancing loss's fractions, in bf16 the router's float32
    copy of its weight) are left out."""
    h, k, hidden = m.dim, m.top_k, m.expert_ffn_dim
    out = [Saved("router.input_fp32", h, 4, "seq"), Saved("router.scores", m.n_experts, 4, "seq")]
    if m.router == "sigmoid":  # probabilities: the scores over their per-token sum
        out.append(Saved("router.score_sum", 1, 4, "seq"))
    if m.z_loss:  # logsumexp keeps its input and its result
        out += [Saved("router.logits", m.n_experts, 4, "seq"), Saved("router.logsumexp", 1, 4, "seq")]
    out.append(Saved("router.experts", k, 8, "seq"))
    if k > 1:  # gates: the chosen scores normalised to sum to 1
        out += [Saved("router.chosen_scores", k, 4, "seq"), Saved("router.chosen_sum", 1, 4, "seq")]
    out.append(Saved("combine.gates", k, ab, "seq"))  # in the compute dtype, for the weighted sum
    out += [Saved("dispatch.slots", k, 8, "seq"), Saved("experts.rows", k * h, ab, "seq")]
    # Routed experts are whole on every tp rank, which computes its own tokens ("seq", as the router).
    out += [Saved(f"experts.{name}", k * hidden, ab, "seq") for name in ("w1_out", "silu_out", "w3_out", "product")]
    out.append(Saved("combine.rows", k * h, ab, "seq"))
    if m.n_shared_experts:
        if ab != 4:
            out.append(Saved("ffn_norm.output", h, ab, "seq"))
        width = m.n_shared_experts * hidden
        out += [Saved(f"shared.{name}", width, ab, "tp") for name in ("w1_out", "silu_out", "w3_out", "product")]
    return out


@functools.lru_cache(maxsize=None)
def embed_saved(m: ModelShape, impl: Implementation) -> tuple[Saved, ...]:
    """First stage, outside the layers: token ids (int64), and gpt's embedding dropout mask."""
    out = [Saved("tokens", 1, 8, "rep")]
    if impl.dropout:
        out.append(Saved("embedding.dropout_mask", m.dim, 1, "seq"))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def head_saved(m: ModelShape, ab: int, impl: Implementation) -> tuple[Saved, ...]:
    """Last stage, outside the layers: final norm, targets, and the fp32 probabilities of the loss."""
    norm = _norm_saved(m, "norm" if m.arch == "llama" else "ln_f", ab, impl)
    return tuple(norm + [Saved("targets", 1, 8, "rep"), Saved("loss.log_probs", m.vocab_size, 4, "vocab")])


@functools.lru_cache(maxsize=None)
def bytes_per_token(saved: tuple[Saved, ...], m: ModelShape, tp: int, sequence_parallel: bool,
                    keep_core: bool = True) -> float:
    """Bytes per token one tensor-parallel rank holds of `saved`."""
    f = m.split_factors(tp, sequence_parallel)
    return sum(s.per_token * s.elem_bytes * f[s.split] for s in saved if keep_core or not s.core)
