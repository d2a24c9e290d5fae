"""Expert parallelism: the routed experts of every MoE layer split over the ranks of the "ep" group,
each token copy sent to the rank holding its expert and its output sent back.

Rank r of ep holds L = n_experts / ep experts, r·L .. r·L + L - 1: a slice along dim 0 of each
stacked expert weight, recorded in `model.shard_specs` so that initial values and checkpoints are
those of the full stacked tensors (a checkpoint written at one ep loads at any other). The layer's
`experts` module is replaced by `ExpertParallelExperts`, which takes the rows the layer sorted by
expert and runs:

    counts    all-to-all of the per-expert counts: how many rows each rank sends each rank, per expert
    dispatch  all-to-all of the rows with those uneven splits; asynchronous, the shared experts
              compute while the rows travel
    compute   the rows arrive by source rank (each source's by expert): regrouped by local expert,
              through the grouped GEMM, and put back in arrival order
    combine   all-to-all with the splits reversed: every row returns to its token's rank, in the
              order the layer sent it, so the layer's combine step is unchanged

Each all-to-all is an explicit autograd function whose backward is the reverse all-to-all. The
asynchronous one is split in two functions, start and finish, with the shared experts' forward in
between; in backward the finish starts the reverse transfer and the start waits for it, and since
autograd runs the later-created nodes first, the shared experts' backward runs in between again.
An expert that receives no row, a rank that receives none, and any imbalance are ordinary cases.

Under tensor parallelism each tp rank routes its own tokens (its sequence slice) and exchanges
them over the ep group of its tp coordinate; the expert slices are whole on every tp rank.

Bytes: every all-to-all adds to `comm_bytes()["ep"]` the bytes this rank sends to the other ranks
(what it keeps for its own experts never leaves it).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from angelptm.distributed.collectives import Group, all_to_all, count_bytes, reduce_from_parallel
from angelptm.distributed.tensor_parallel import ShardSpec
from angelptm.models.moe import MoE, GroupedExperts

EXPERT_WEIGHTS = ("w1", "w2", "w3")


# ---------------------------------------------------------------------------------------------
# The all-to-all of rows


@torch.compiler.disable
def all_to_all_rows(x: torch.Tensor, send: list[int], recv: list[int], group: Group,
                    async_op: bool = False) -> tuple[torch.Tensor, Optional[dist.Work]]:
    """Send rows send[0:j].sum() .. of `x` (the next send[j]) to rank j; receive recv[i] rows from
    rank i, in rank order. Returns the received rows and, with `async_op`, the work to wait for."""
    out = x.new_empty((sum(recv), *x.shape[1:]))
    row_bytes = math.prod(x.shape[1:]) * x.element_size()
    count_bytes(group, (sum(send) - send[group.rank]) * row_bytes)
    work = dist.all_to_all_single(out, x.contiguous(), recv, send, group=group.pg, async_op=async_op)
    return out, work


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send, recv, group):
        ctx.splits, ctx.group = (send, recv), group
        return all_to_all_rows(x, send, recv, group)[0]

    @staticmethod
    def backward(ctx, grad):
        send, recv = ctx.splits
        return all_to_all_rows(grad, recv, send, ctx.group)[0], None, None, None


class Transfer:
    """One asynchronous all-to-all of rows, in forward (splits `send` -> `recv`) and then of their
    gradients in backward (reversed), each started by one autograd function and waited for by the other."""

    def __init__(self, send: list[int], recv: list[int], group: Group):
        self.send, self.recv, self.group = send, recv, group
        self._work: Optional[dist.Work] = None
        self._sent: Optional[torch.Tensor] = None  # kept alive until the transfer completes
        self._received: Optional[torch.Tensor] = None

    def start(self, x: torch.Tensor, backward: bool) -> torch.Tensor:
        send, recv = (self.recv, self.send) if backward else (self.send, self.recv)
        self._sent = x.contiguous()
        self._received, self._work = all_to_all_rows(self._sent, send, recv, self.group, async_op=True)
        return self._received

    def finish(self) -> torch.Tensor:
        self._work.wait()
        received, self._work, self._sent, self._received = self._received, None, None, None
        return received


class _StartTransfer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, transfer):
        ctx.transfer = transfer
        return transfer.start(x, backward=False)  # not to be read before _FinishTransfer

    @staticmethod
    def backward(ctx, grad_in_flight):
        # `grad_in_flight` is what _FinishTransfer.backward is sending; this is what it receives.
        return ctx.transfer.finish(), None


class _FinishTransfer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, in_flight, transfer):
        ctx.transfer = transfer
        return transfer.finish().view_as(in_flight)

    @staticmethod
    def backward(ctx, grad):
        ctx.transfer.start(grad, backward=True)
        return grad, None


def all_to_all_region(x: torch.Tensor, send: list[int], recv: list[int], group: Group) -> torch.Tensor:
    """The rows of `x` to the ranks `send` says, those of the other ranks back (`recv`); backward reversed."""
    return _AllToAll.apply(x, send, recv, group)


def all_to_all_overlapped(x: torch.Tensor, send: list[int], recv: list[int], group: Group,
                          meanwhile: Optional[Callable[[], torch.Tensor]]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """`all_to_all_region`, running `meanwhile()` while the rows (and in backward their gradients) travel."""
    transfer = Transfer(send, recv, group)
    in_flight = _StartTransfer.apply(x, transfer)
    side = None if meanwhile is None else meanwhile()
    return _FinishTransfer.apply(in_flight, transfer), side


# ---------------------------------------------------------------------------------------------
# Regrouping the received rows by expert


class _Permute(torch.autograd.Function):
    """x[order]; the backward is the gather by the inverse order (no accumulating scatter)."""

    @staticmethod
    def forward(ctx, x, order, inverse):
        ctx.inverse = inverse
        return x[order]

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.inverse], None, None


def expert_major_order(counts: torch.Tensor) -> torch.Tensor:
    """Rows arrive source-major: counts[i, l] rows from rank i for local expert l, source by source.
    The order that lists them expert-major (expert l's rows from rank 0, then rank 1, ...)."""
    sources, experts = counts.shape
    flat = counts.reshape(-1)
    chunk_start = flat.cumsum(0) - flat
    chunks = torch.arange(sources * experts, device=counts.device).view(sources, experts).T.reshape(-1)
    lengths = flat[chunks]
    first_of_chunk = torch.repeat_interleave(chunk_start[chunks], lengths)
    rank_in_chunk = torch.arange(int(lengths.sum()), device=counts.device) - torch.repeat_interleave(
        lengths.cumsum(0) - lengths, lengths)
    return first_of_chunk + rank_in_chunk


# ---------------------------------------------------------------------------------------------
# The module and how it is applied


class ExpertParallelExperts(GroupedExperts):
    """This rank's n_experts / ep experts (parameters w1, w2, w3 as in `GroupedExperts`, so names
    stay) behind the dispatch and combine all-to-alls over `ep`. `edp` is the group of ranks holding
    the same experts, over which ZeROCache shards and reduces them."""

    def __init__(self, n_experts: int, dim: int, hidden: int, ep: Group, edp: Group):
        super().__init__(n_experts // ep.size, dim, hidden)
        self.n_experts, self.ep, self.edp = n_experts, ep, edp

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor,
                meanwhile: Optional[Callable[[], torch.Tensor]] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if torch.is_autocast_enabled(x.device.type):  # the GEMMs compute in it anyway: send half the bytes
            x = x.to(torch.get_autocast_dtype(x.device.type))
        ranks, local = self.ep.size, self.n_experts // self.ep.size
        counts = all_to_all(tokens_per_expert.view(ranks, local), 0, 0, self.ep)  # [i, l]: from rank i for expert l
        send = tokens_per_expert.view(ranks, local).sum(1).tolist()
        recv = counts.sum(1).tolist()
        received, shared = all_to_all_overlapped(x, send, recv, self.ep, meanwhile)
        order = expert_major_order(counts)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        out = self.compute(_Permute.apply(received, order, inverse), counts.sum(0))
        return all_to_all_region(_Permute.apply(out, inverse, order), recv, send, self.ep), shared


def apply_expert_parallel(model: nn.Module, ep: Group, edp: Group) -> None:
    """Replace every MoE layer's experts with this rank's slice of them behind all-to-alls, and
    record the slices in `model.shard_specs` (initial values, checkpoints)."""
    specs = getattr(model, "shard_specs", {})
    for name, module in model.named_modules():
        if not isinstance(module, MoE):
            continue
        experts = module.experts
        n_experts, hidden, dim = experts.w1.shape
        with torch.device(experts.w1.device):
            sliced = ExpertParallelExperts(n_experts, dim, hidden, ep, edp)
        sliced.allow_grouped_mm = experts.allow_grouped_mm
        module.experts = sliced
        local = n_experts // ep.size
        for kind in EXPERT_WEIGHTS:
            key, shape = f"{name}.experts.{kind}", tuple(getattr(experts, kind).shape)
            # Under tp the slice is held whole by every tp rank (`tensor_parallel._shard_moe`).
            specs[key] = dataclasses.replace(specs.get(key, ShardSpec(shape)), full_shape=shape, dim=0,
                                             start=ep.rank * local, length=local)
    model.shard_specs = specs


def sum_routing_over_token_shards(model: nn.Module, shards: list[Group]) -> None:
    """Where the tokens of a microbatch are spread over ranks (the cp group's sequence chunks,
    and under sequence parallelism the tp group's), give every MoE layer the sum of its routing
    totals over them, so that each rank computes the routing losses of the whole microbatch (the
    balancing loss is a product of means: no rank's own tokens give it) and the gradient of its
    own tokens' part."""
    groups = [group for group in shards if group.size > 1]
    if not groups:
        return

    def total(local: torch.Tensor) -> torch.Tensor:
        for group in groups:
            local = reduce_from_parallel(local, group)  # backward: the identity
        return local

    for module in model.modules():
        if isinstance(module, MoE):
            module.sum_over_token_shards = total


def expert_parallel_modules(model: nn.Module) -> list[ExpertParallelExperts]:
    return [m for m in model.modules() if isinstance(m, ExpertParallelExperts)]
