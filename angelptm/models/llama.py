"""A plain PyTorch Llama-family decoder: RMSNorm, rotary positions, grouped-query attention, SwiGLU.

One decoder with the options the Hugging Face families it imports need, not a copy per family:
q/k/v (and o) biases (Qwen2), a per-head RMSNorm of q and k before RoPE (Qwen3) or after it
(Hunyuan dense), scaled RoPE (Llama 3.x; `angelptm.models.rope`), a sliding window (Mistral) and
heads wider or narrower than dim / n_heads (`model.head_dim`; Qwen3).

The model knows nothing of parallelism. `angelptm.distributed.parallelize` and the pipeline
splitter transform it from the outside: they swap linear layers for sharded ones, replace
`CoreAttention` with ring or Ulysses attention, and drop the modules a pipeline stage does not
own (a stage without `tok_embeddings` takes hidden states in; one without `output` returns them).

Weights follow Hugging Face's Llama layout (q/k rotate the two halves of each head), so import and
export are plain renames. Initialisation depends only on the seed and each parameter's name, so
every layout starts from the same full weights.
"""

from __future__ import annotations

import math
import zlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from angelptm.config import ModelConfig
from angelptm.models.moe import MoE
from angelptm.models.rope import apply_rope, rope_tables


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 so bf16 activations do not lose the mean of squares.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


class CoreAttention(nn.Module):
    """Causal attention over (batch, heads, seq, head_dim); context parallelism replaces this module.

    With a sliding window each position sees itself and the `window - 1` positions before it, as
    Mistral's attention does; a sequence no longer than the window is plain causal attention.
    With `doc_ids` (packed rows) a query also sees only keys of its own document. Without either,
    the causal kernel runs with no mask at all.
    """

    def __init__(self, window: Optional[int] = None):
        super().__init__()
        self.window = window

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        seq, grouped = q.shape[2], q.shape[1] != k.shape[1]
        if doc_ids is None and (self.window is None or seq <= self.window):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=grouped)
        visible = visible_keys(seq, self.window, doc_ids, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=grouped)


def visible_keys(seq: int, window: Optional[int], doc_ids: Optional[torch.Tensor],
                 device: torch.device) -> torch.Tensor:
    """Which keys each query may attend to: earlier or the same position, within the sliding window,
    and (with `doc_ids` (batch, seq)) in the query's own document.

    Shape (seq, seq), or (batch, 1, seq, seq) with doc_ids, to broadcast over the heads. Every query
    sees at least itself, so no softmax row is empty.
    """
    distance = torch.arange(seq, device=device)[:, None] - torch.arange(seq, device=device)[None, :]
    visible = distance >= 0
    if window is not None:
        visible = visible & (distance < window)
    if doc_ids is None:
        return visible
    return (visible & (doc_ids[:, :, None] == doc_ids[:, None, :]))[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.resolved_head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=cfg.o_bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm != "none":  # one weight, head_dim long, shared by every head (whole on each tp rank)
            self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps)
        self.core = CoreAttention(cfg.sliding_window)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        batch, seq, _ = x.shape
        # Head counts come from the projections' widths, so tensor-parallel shards just work.
        q = self.wq(x).view(batch, seq, -1, self.head_dim)
        k = self.wk(x).view(batch, seq, -1, self.head_dim)
        v = self.wv(x).view(batch, seq, -1, self.head_dim)
        if self.qk_norm == "before_rope":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.qk_norm == "after_rope":
            q, k = self.q_norm(q), self.k_norm(k)
        out = self.core(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), doc_ids)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def is_moe_layer(cfg: ModelConfig, layer: int) -> bool:
    """Whether block `layer` has experts: all after the first `model.moe.first_dense_layers` of an MoE model."""
    return cfg.moe.n_experts > 0 and layer >= cfg.moe.first_dense_layers


def build_moe(cfg: ModelConfig) -> MoE:
    """The MoE feed-forward, its shared experts one dense SwiGLU as wide as all of them (DeepSeek's form)."""
    moe = cfg.moe
    shared = FeedForward(cfg.dim, moe.n_shared_experts * moe.expert_ffn_dim) if moe.n_shared_experts else None
    return MoE(cfg.dim, moe, shared_experts=shared)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: bool = False):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = build_moe(cfg) if moe else FeedForward(cfg.dim, cfg.ffn_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, doc_ids)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    """tokens (batch, seq) -> logits (batch, seq, vocab). Build on the meta device, then `init_weights`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.arch != "llama":
            raise ValueError(f"Llama built from a config with model.arch={cfg.arch}")
        self.cfg = cfg
        self.tok_embeddings: Optional[nn.Embedding] = nn.Embedding(cfg.vocab_size, cfg.dim)
        # A dict keyed by the original index keeps parameter names stable when a pipeline
        # stage deletes the layers it does not own.
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg, is_moe_layer(cfg, i)) for i in range(cfg.n_layers)})
        self.norm: Optional[RMSNorm] = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output: Optional[nn.Linear] = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the output head; call again after `to_empty`, which unties them."""
        if self.cfg.tie_embeddings and self.tok_embeddings is not None and self.output is not None:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None,
                doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`tokens` are ids, or hidden states on a pipeline stage without embeddings.

        `positions` are the absolute positions of the local sequence, (seq,) shared by every row or
        (batch, seq) per row; context parallelism passes the positions of the chunks a rank holds,
        packed rows positions that restart at 0 where each document starts. Default: 0..seq-1.
        `doc_ids` (batch, seq), non-decreasing along a row, keep attention inside each document;
        None: one document per row.
        """
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        if positions is None:
            positions = torch.arange(h.shape[1], device=h.device)
        cos, sin = rope_tables(self.cfg.resolved_head_dim, positions.reshape(-1), self.cfg.rope_theta,
                               self.cfg.rope_scaling)
        cos, sin = cos.view(*positions.shape, -1), sin.view(*positions.shape, -1)
        for layer in self.layers.values():
            h = layer(h, cos, sin, doc_ids)
        if self.norm is not None:
            h = self.norm(h)
        return self.output(h) if self.output is not None else h

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Fill every parameter with `initial_value`; the same seed gives the same weights anywhere."""
        for name, param in self.named_parameters():
            param.copy_(initial_value(name, tuple(param.shape), self.cfg, seed))


def initial_value(name: str, shape: tuple[int, ...], cfg: ModelConfig, seed: int) -> torch.Tensor:
    """The initial full value of parameter `name` of the plain model, on CPU in fp32.

    Each parameter draws from its own generator seeded by (seed, name), so the value does not
    depend on which rank builds it or in which order. Sharded layouts build the full value one
    parameter at a time and keep their slice.
    """
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    std = 0.02
    if name.endswith(("attention.wo.weight", "feed_forward.w2.weight", "experts.w2", "shared_experts.w2.weight")):
        std /= math.sqrt(2 * cfg.n_layers)  # residual branches: keep the stream's variance flat
    return torch.randn(shape, generator=gen) * std


def build_llama(cfg: ModelConfig, device: str | torch.device = "meta") -> Llama:
    with torch.device(device):
        return Llama(cfg)


def _attention_extras(cfg: ModelConfig) -> int:
    """Parameters of one attention layer that do no matmul work: its biases and q/k norm weights."""
    head_dim = cfg.resolved_head_dim
    biases = head_dim * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.qkv_bias + cfg.dim * cfg.o_bias
    return biases + 2 * head_dim * (cfg.qk_norm != "none")


def _feed_forward_params(cfg: ModelConfig, active: bool) -> int:
    """Feed-forward parameters of all layers: dense SwiGLUs, and in MoE layers the router, the shared
    experts and every routed expert (`active`: only the top_k a token passes through)."""
    moe = cfg.moe
    moe_layers = max(0, cfg.n_layers - moe.first_dense_layers) if moe.n_experts else 0
    experts = (moe.top_k if active else moe.n_experts) + moe.n_shared_experts
    moe_layer = cfg.dim * moe.n_experts + 3 * cfg.dim * (moe.expert_ffn_dim or 0) * experts
    return (cfg.n_layers - moe_layers) * 3 * cfg.dim * cfg.ffn_dim + moe_layers * moe_layer


def num_params(cfg: ModelConfig, active: bool = False) -> int:
    """Parameter count of the plain model (tied weights counted once); `active`: of an MoE model,
    only the experts one token passes through."""
    attn = cfg.dim * cfg.resolved_head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + _attention_extras(cfg)
    block = attn + 2 * cfg.dim
    embeddings = cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2)
    return cfg.n_layers * block + _feed_forward_params(cfg, active) + cfg.dim + embeddings


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 per matmul weight (of an MoE layer, those a
    token uses) + 12·layers·(n_heads·head_dim)·seq for attention scores and values.

    Norm weights, biases and an untied input embedding (a lookup) do no matmul work, so they are left out.
    """
    norms = (2 * cfg.n_layers + 1) * cfg.dim + cfg.n_layers * _attention_extras(cfg)
    matmul_params = num_params(cfg, active=True) - norms - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim)
    return 6 * matmul_params + 12 * cfg.n_layers * cfg.n_heads * cfg.resolved_head_dim * seq_len
