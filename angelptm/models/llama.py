"""A plain PyTorch Llama-family decoder: RMSNorm, rotary positions, grouped-query attention, SwiGLU.

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


def rope_tables(head_dim: int, positions: torch.Tensor, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (len(positions), head_dim) for the rotate-half convention."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x of shape (batch, seq, heads, head_dim) by the tables of shape (seq, head_dim)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class CoreAttention(nn.Module):
    """Causal attention over (batch, heads, seq, head_dim); context parallelism replaces this module."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)
        self.core = CoreAttention()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        # Head counts come from the projections' widths, so tensor-parallel shards just work.
        q = self.wq(x).view(batch, seq, -1, self.head_dim)
        k = self.wk(x).view(batch, seq, -1, self.head_dim)
        v = self.wv(x).view(batch, seq, -1, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = self.core(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
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


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
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
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg) for i in range(cfg.n_layers)})
        self.norm: Optional[RMSNorm] = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output: Optional[nn.Linear] = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the output head; call again after `to_empty`, which unties them."""
        if self.cfg.tie_embeddings and self.tok_embeddings is not None and self.output is not None:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`tokens` are ids, or hidden states on a pipeline stage without embeddings.

        `positions` (seq,) are the absolute positions of the local sequence; context parallelism
        passes the positions of the chunks a rank holds. Default: 0..seq-1.
        """
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        if positions is None:
            positions = torch.arange(h.shape[1], device=h.device)
        cos, sin = rope_tables(self.cfg.dim // self.cfg.n_heads, positions, self.cfg.rope_theta)
        for layer in self.layers.values():
            h = layer(h, cos, sin)
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
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    std = 0.02
    if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        std /= math.sqrt(2 * cfg.n_layers)  # residual branches: keep the stream's variance flat
    return torch.randn(shape, generator=gen) * std


def build_llama(cfg: ModelConfig, device: str | torch.device = "meta") -> Llama:
    with torch.device(device):
        return Llama(cfg)


def num_params(cfg: ModelConfig) -> int:
    """Parameter count of the plain model (tied weights counted once)."""
    head_dim = cfg.dim // cfg.n_heads
    attn = cfg.dim * head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    block = attn + 3 * cfg.dim * cfg.ffn_dim + 2 * cfg.dim
    embeddings = cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2)
    return cfg.n_layers * block + cfg.dim + embeddings


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 per matmul weight + 12·layers·dim·seq for attention.

    Norm weights and an untied input embedding (a lookup) do no matmul work, so they are left out.
    """
    norms = (2 * cfg.n_layers + 1) * cfg.dim
    matmul_params = num_params(cfg) - norms - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim)
    return 6 * matmul_params + 12 * cfg.n_layers * cfg.dim * seq_len
