"""The mixture-of-experts feed-forward layer: a top-k router, SwiGLU experts computed as grouped
GEMMs over the tokens sorted by expert, optional shared experts, and the routing losses.

The layer is plain PyTorch and knows nothing of parallelism. Its forward is four steps, each a
function of its own:

    route     each token picks its top-k experts and their gate weights      (`Router`)
    dispatch  the token copies sorted by expert, those over capacity dropped (`sort_by_expert`)
    compute   each expert's SwiGLU over its contiguous run of rows           (`GroupedExperts`)
    combine   expert outputs weighted by their gates, summed per token       (`combine`)

The compute step, the `experts` module, is the seam expert parallelism uses: it takes the sorted
rows and the count per expert, and the shared experts' work to run meanwhile (here simply after;
`angelptm.distributed.expert_parallel` swaps in a module that sends the rows to the ranks holding
their experts and runs the shared experts while they travel).

Each forward leaves its `RoutingStats` in `last_routing`; `angelptm.train.routing_stats` collects
them over a training step for the metrics and the auxiliary-loss-free bias update. The routing
losses join backward through the layer's output (`_AuxLossGradient`), so they train the router on
whichever pipeline stage the layer runs.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from angelptm.config import MoEConfig

GROUPED_MM_ALIGN_BYTES = 16  # the CUDA grouped GEMM wants every row of its operands 16-byte aligned


# ---------------------------------------------------------------------------------------------
# Grouped GEMM: rows of x in contiguous groups, group g multiplied by weight[g]


# Run eagerly inside compiled blocks: the kernel's compile-time shape check accepts bf16 alone,
# whatever the device's eager kernel takes.
@torch.compiler.disable
def grouped_linear(x: torch.Tensor, weight: torch.Tensor, group_ends: torch.Tensor) -> torch.Tensor:
    """(N, in) rows in groups, group g ending at row group_ends[g], times weight[g].T of (G, out, in):
    (N, out), as one `torch._grouped_mm`. Stored as nn.Linear's (out, in), the transposed view is
    the column-major operand the CUDA kernel wants."""
    return torch._grouped_mm(x, weight.transpose(-2, -1), offs=group_ends)


def looped_linear(x: torch.Tensor, weight: torch.Tensor, group_sizes: list[int]) -> torch.Tensor:
    """What `grouped_linear` computes, one matmul per group (the fallback where it is missing or
    refuses the device or dtype)."""
    return torch.cat([rows @ w.T for rows, w in zip(x.split(group_sizes), weight)])


@torch.compiler.disable  # a real forward and backward, run once, never traced into a compiled block
@functools.cache
def grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` exists here and matches `looped_linear`, forward and backward, on
    `device` in `dtype` with an empty group among uneven ones; probed once per device and dtype
    (the CUDA kernel takes bf16 on recent GPUs only, the CPU one what this torch build has)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(48, 32, generator=gen)
    weight = torch.randn(3, 16, 32, generator=gen)
    grad = torch.randn(48, 16, generator=gen)
    sizes = [16, 0, 32]
    ends = torch.tensor(sizes, device=device).cumsum(0).to(torch.int32)
    results = []
    for linear in (functools.partial(grouped_linear, group_ends=ends), functools.partial(looped_linear, group_sizes=sizes)):
        xi = x.to(device, dtype).requires_grad_()
        wi = weight.to(device, dtype).requires_grad_()
        try:
            with _plain_autograd(device):
                out = linear(xi, wi)
                out.backward(grad.to(device, dtype))
        except (RuntimeError, NotImplementedError):
            return False
        results.append([t.float().cpu() for t in (out, xi.grad, wi.grad)])
    tolerance = 1e-2 if dtype.itemsize < 4 else 1e-4
    return all(torch.allclose(a, b, rtol=tolerance, atol=tolerance * 10) for a, b in zip(*results))


@contextlib.contextmanager
def _plain_autograd(device: torch.device):
    """Gradients on, autocast off, and identity saved-tensor hooks: the first call can come from
    a no_grad forward or from inside activation checkpointing, whose hooks would otherwise take
    the probe's saved tensors for the block's."""
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False), \
            torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        yield


def _rows_aligned(*tensors: torch.Tensor) -> bool:
    return all(t.shape[-1] * t.element_size() % GROUPED_MM_ALIGN_BYTES == 0 for t in tensors)


class GroupedExperts(nn.Module):
    """`n_experts` SwiGLU MLPs, w2(silu(w1 x) * w3 x), each weight kind stacked in one parameter in
    nn.Linear's (out, in) layout per expert: w1, w3 (E, hidden, dim) and w2 (E, dim, hidden).

    The rows of the input come sorted by expert; `tokens_per_expert[e]` of them go to expert e
    (zero is fine). `meanwhile`, if given, is other work of the layer (the shared experts) whose
    result is returned beside the experts' output. Set `allow_grouped_mm` False to force the
    per-expert matmuls. `float8`, set by `angelptm.fp8.convert_to_float8` (None: full precision),
    runs the three GEMMs in FP8 (`angelptm.fp8.grouped.Float8Experts`).
    """

    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.allow_grouped_mm = True
        self.float8: Optional[nn.Module] = None

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor,
                meanwhile: Optional[Callable[[], torch.Tensor]] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.compute(x, tokens_per_expert), None if meanwhile is None else meanwhile()

    def compute(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """Every expert's SwiGLU over its run of the rows."""
        if self.float8 is not None:  # FP8 casts the weights from their own dtype, whatever autocast says
            sizes = tokens_per_expert.tolist()

            def fp8(rows: torch.Tensor, name: str) -> torch.Tensor:
                return self.float8.linear(rows, getattr(self, name), name, sizes)

            return fp8(F.silu(fp8(x, "w1")) * fp8(x, "w3"), "w2")
        w1, w2, w3 = self.w1, self.w2, self.w3
        if torch.is_autocast_enabled(x.device.type):
            # Autocast does not cast for the grouped GEMM; do what it does for nn.Linear.
            dtype = torch.get_autocast_dtype(x.device.type)
            x, w1, w2, w3 = (t.to(dtype) for t in (x, w1, w2, w3))
        if self.allow_grouped_mm and _rows_aligned(x, w2) and grouped_mm_works(x.device, x.dtype):
            linear = functools.partial(grouped_linear, group_ends=tokens_per_expert.cumsum(0).to(torch.int32))
        else:
            linear = functools.partial(looped_linear, group_sizes=tokens_per_expert.tolist())
        return linear(F.silu(linear(x, w1)) * linear(x, w3), w2)


# ---------------------------------------------------------------------------------------------
# Route


@dataclass
class Routing:
    experts: torch.Tensor  # (tokens, k) the chosen experts of each token
    gates: torch.Tensor  # (tokens, k) float32 weights of their outputs
    probs: torch.Tensor  # (tokens, n_experts) float32 router probabilities, for the balancing loss
    logits: torch.Tensor  # (tokens, n_experts) float32, for the z-loss


class Router(nn.Module):
    """Scores every expert for every token and keeps the top k, in float32 whatever autocast says.

    softmax: probabilities over the experts (Mixtral). sigmoid: an independent score per expert
    (DeepSeek-V3), probabilities for the balancing loss being the scores normalised per token.
    With k > 1 the gates are the chosen scores normalised to sum to 1 (Mixtral, DeepSeek-V3,
    Qwen3-MoE); a single expert keeps its raw score, so the router still learns from the
    language-model loss (Switch). With `aux_free` a per-expert bias (a buffer, not a parameter)
    is added to the scores for the choice only, never to the gates, and `update_bias` moves it
    outside autograd toward balance.
    """

    def __init__(self, dim: int, n_experts: int, top_k: int, score: str, aux_free: bool):
        super().__init__()
        self.top_k, self.score = top_k, score
        self.weight = nn.Parameter(torch.empty(n_experts, dim))  # not an nn.Linear: FP8 conversion skips it
        self.expert_bias: Optional[torch.Tensor]
        self.register_buffer("expert_bias", torch.zeros(n_experts) if aux_free else None)

    def forward(self, x: torch.Tensor) -> Routing:
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        if self.score == "softmax":
            scores = probs = logits.softmax(dim=-1)
        else:
            scores = logits.sigmoid()
            probs = scores / scores.sum(dim=-1, keepdim=True)
        choice = scores if self.expert_bias is None else scores + self.expert_bias
        experts = choice.topk(self.top_k, dim=-1).indices
        gates = scores.gather(-1, experts)
        if self.top_k > 1:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return Routing(experts, gates, probs, logits)

    @torch.no_grad()
    def update_bias(self, tokens_per_expert: torch.Tensor, rate: float) -> None:
        """DeepSeek-V3's step: raise the bias of each expert loaded below the mean by `rate`, lower
        each one above it by `rate`."""
        load = tokens_per_expert.to(self.expert_bias)
        self.expert_bias += rate * torch.sign(load.mean() - load)

    def reset_bias(self) -> None:
        """Back to no bias (the state a new model starts in; `to_empty` leaves buffers unset)."""
        if self.expert_bias is not None:
            self.expert_bias.zero_()


# ---------------------------------------------------------------------------------------------
# Dispatch and combine


def expert_capacity(capacity_factor: float, tokens: int, top_k: int, n_experts: int) -> int:
    """ceil(capacity_factor · tokens · k / E) token copies per expert."""
    return math.ceil(capacity_factor * tokens * top_k / n_experts)


def sort_by_expert(experts: torch.Tensor, n_experts: int, capacity: Optional[int]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order the token copies (slot t·k + j: token t's j-th choice) by expert.

    Returns (slots, kept per expert, routed per expert): `slots` lists the kept slots expert by
    expert, each expert's in token order (a stable sort). With a capacity an expert keeps its
    first `capacity` copies by token position (the flattened batch, row by row) and drops the
    rest; a dropped copy adds nothing to its token, whose other choices and residual stream go on.
    """
    flat = experts.reshape(-1)
    routed = torch.bincount(flat, minlength=n_experts)
    slots = torch.argsort(flat, stable=True)
    if capacity is None:
        return slots, routed, routed
    first_of_expert = routed.cumsum(0) - routed
    rank_in_expert = torch.arange(flat.numel(), device=flat.device) - first_of_expert[flat[slots]]
    return slots[rank_in_expert < capacity], routed.clamp(max=capacity), routed


class _GatherTokens(torch.autograd.Function):
    """x[slots // k]: each kept slot's token row. The backward puts each row's gradient in its own
    slot and sums every token's k slots, with no accumulating scatter (which torch runs serially
    on CPU for the backward of plain indexing)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, slots: torch.Tensor, top_k: int) -> torch.Tensor:
        ctx.save_for_backward(slots)
        ctx.top_k, ctx.n_tokens = top_k, x.shape[0]
        return x[slots // top_k]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (slots,) = ctx.saved_tensors
        per_slot = grad.new_zeros(ctx.n_tokens * ctx.top_k, grad.shape[1])
        per_slot[slots] = grad
        return per_slot.view(ctx.n_tokens, ctx.top_k, -1).sum(dim=1), None, None


def gather_tokens(x: torch.Tensor, slots: torch.Tensor, top_k: int) -> torch.Tensor:
    """The rows the experts compute on: token slots // k of x (tokens, dim), in the order of `slots`."""
    return _GatherTokens.apply(x, slots, top_k)


def combine(expert_out: torch.Tensor, slots: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Each token's output: its experts' rows weighted by their gates and summed (a dropped slot
    adds zero). expert_out (kept, dim) in the order of `slots`; gates (tokens, k) -> (tokens, dim)."""
    tokens, top_k = gates.shape
    per_slot = expert_out.new_zeros(tokens * top_k, expert_out.shape[1])
    per_slot[slots] = expert_out  # each slot once: a plain scatter, its backward a gather
    return torch.bmm(gates.to(expert_out.dtype).unsqueeze(1), per_slot.view(tokens, top_k, -1)).squeeze(1)


# ---------------------------------------------------------------------------------------------
# The layer


@dataclass
class RoutingStats:
    """What one forward of an MoE layer leaves for the trainer (`angelptm.train.routing_stats`)."""

    aux_loss: torch.Tensor  # scalar, detached: the balancing loss and z-loss, coefficients applied
    tokens_per_expert: torch.Tensor  # (n_experts,) token copies the router sent to each expert
    dropped: torch.Tensor  # scalar: copies dropped over capacity


@dataclass
class RoutingTotals:
    """Sums over the tokens of a microbatch, which the routing losses are functions of."""

    routed: torch.Tensor  # (n_experts,) token copies routed to each expert (no gradient)
    prob_sums: torch.Tensor  # (n_experts,) the sum over tokens of each expert's router probability
    lse_squares: torch.Tensor  # the sum over tokens of logsumexp(router logits)²
    tokens: torch.Tensor  # how many tokens

    def flat(self) -> torch.Tensor:
        return torch.cat([self.routed.double(), self.prob_sums.double(),
                          self.lse_squares.double().view(1), self.tokens.double().view(1)])

    @classmethod
    def from_flat(cls, flat: torch.Tensor) -> "RoutingTotals":
        n_experts = (flat.numel() - 2) // 2
        routed, prob_sums, rest = flat.split([n_experts, n_experts, 2])
        return cls(routed.detach(), prob_sums.float(), rest[0].float(), rest[1].detach())


def load_balancing_loss(totals: RoutingTotals, top_k: int) -> torch.Tensor:
    """Switch / Mixtral: E · sum_i f_i · P_i, f_i the fraction of the token copies routed to expert
    i (counts, no gradient), P_i the mean router probability of expert i; 1 when balanced."""
    fraction = totals.routed.float() / (totals.tokens.float() * top_k)
    return totals.routed.numel() * (fraction * totals.prob_sums / totals.tokens.float()).sum()


def z_loss(totals: RoutingTotals) -> torch.Tensor:
    """ST-MoE's router z-loss: the mean over tokens of logsumexp(logits)², which keeps logits small."""
    return totals.lse_squares / totals.tokens.float()


class _AuxLossGradient(torch.autograd.Function):
    """The identity on the layer's output whose backward also starts the auxiliary loss's
    backward, with gradient `scale`. The loss then trains the router wherever the layer runs (any
    pipeline stage, inside recomputation) without travelling to the language-model loss."""

    @staticmethod
    def forward(ctx, out, aux_loss, scale):
        ctx.scale, ctx.aux = scale, (aux_loss.dtype, aux_loss.device)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        dtype, device = ctx.aux
        return grad, torch.full((), ctx.scale, dtype=dtype, device=device), None  # a fill: no host copy


class MoE(nn.Module):
    """x (..., dim) -> (..., dim): routed SwiGLU experts, plus shared experts every token passes
    through (any module of x, e.g. a dense SwiGLU of n_shared_experts · expert_ffn_dim).

    Dropless unless `cfg.capacity_factor` is set (see `sort_by_expert` for which copies drop).

    The routing losses are functions of sums over the microbatch's tokens (`RoutingTotals`). Where
    other ranks hold the rest of those tokens (sequence shards), `sum_over_token_shards` is set to
    a differentiable sum over them whose backward is the identity, so every rank computes the
    losses of the whole microbatch and the gradient of its own tokens. In training the losses
    reach backward through the output, times `aux_loss_scale` (what the trainer scales the
    language-model loss of one microbatch by).
    """

    def __init__(self, dim: int, cfg: MoEConfig, shared_experts: Optional[nn.Module] = None):
        super().__init__()
        self.cfg = cfg
        self.router = Router(dim, cfg.n_experts, cfg.top_k, cfg.router, aux_free=cfg.balance == "aux_free")
        self.experts = GroupedExperts(cfg.n_experts, dim, cfg.expert_ffn_dim)
        self.shared_experts = shared_experts
        self.sum_over_token_shards: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        self.aux_loss_scale = 1.0
        self.last_routing: Optional[RoutingStats] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        tokens = x.reshape(-1, x.shape[-1])
        routing = self.router(tokens)
        capacity = None if cfg.capacity_factor is None else expert_capacity(
            cfg.capacity_factor, tokens.shape[0], cfg.top_k, cfg.n_experts)
        slots, kept, routed = sort_by_expert(routing.experts, cfg.n_experts, capacity)
        shared = None if self.shared_experts is None else functools.partial(self.shared_experts, tokens)
        expert_out, shared_out = self.experts(gather_tokens(tokens, slots, cfg.top_k), kept, shared)
        out = combine(expert_out, slots, routing.gates)
        if shared_out is not None:
            out = out + shared_out
        return self._add_routing_losses(out, routing, routed, kept).view_as(x)

    # Eager inside compiled blocks: compiled, the losses' gradient was lost where their statistics
    # entered the graph from outside it (the sum over token shards runs eagerly).
    @torch.compiler.disable
    def _add_routing_losses(self, out: torch.Tensor, routing: Routing, routed: torch.Tensor,
                            kept: torch.Tensor) -> torch.Tensor:
        """`out`, carrying the routing losses' gradient; leaves the routing in `last_routing`."""
        totals = self._totals(routing, routed)
        aux_loss = self._aux_loss(totals)
        self.last_routing = RoutingStats(aux_loss.detach(), totals.routed.long(), routed.sum() - kept.sum())
        if aux_loss.requires_grad:
            out = _AuxLossGradient.apply(out, aux_loss, self.aux_loss_scale)
        return out

    def _totals(self, routing: Routing, routed: torch.Tensor) -> RoutingTotals:
        cfg, probs = self.cfg, routing.probs
        balancing = cfg.balance == "aux_loss" and cfg.aux_loss_coef
        # Only the sums a loss needs: each saves its input for backward.
        local = RoutingTotals(
            routed, probs.sum(dim=0) if balancing else probs.new_zeros(probs.shape[1]),
            routing.logits.logsumexp(dim=-1).square().sum() if cfg.z_loss_coef else probs.new_zeros(()),
            probs.new_full((), probs.shape[0]))
        if self.sum_over_token_shards is None:
            return local
        return RoutingTotals.from_flat(self.sum_over_token_shards(local.flat()))

    def _aux_loss(self, totals: RoutingTotals) -> torch.Tensor:
        cfg = self.cfg
        loss = totals.prob_sums.new_zeros(())
        if cfg.balance == "aux_loss" and cfg.aux_loss_coef:
            loss = loss + cfg.aux_loss_coef * load_balancing_loss(totals, cfg.top_k)
        if cfg.z_loss_coef:
            loss = loss + cfg.z_loss_coef * z_loss(totals)
        return loss
