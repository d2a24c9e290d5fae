"""Collectives over one mesh dimension, as autograd regions, each adding its bytes to a per-group counter.

Tensor, sequence and context parallelism are built from the regions below; each is an explicit
autograd function whose backward is the dual collective (Megatron's f and g operators):

    copy_to_parallel         forward: identity         backward: all-reduce
    reduce_from_parallel     forward: all-reduce       backward: identity
    gather_sequence          forward: all-gather       backward: reduce-scatter
    reduce_scatter_sequence  forward: reduce-scatter   backward: all-gather
    all_to_all               forward: all-to-all       backward: the inverse all-to-all

The plain (non-autograd) collectives underneath are usable on their own: gradient sync, loss
statistics and the ring exchange of context parallelism call them directly.

Byte accounting: every call adds to `comm_bytes()[group.name]` the bytes this rank sends under
the bandwidth-optimal algorithm for a group of p ranks and a full tensor of N bytes: all-reduce
2(p-1)/p·N, all-gather and reduce-scatter (p-1)/p·N, all-to-all (p-1)/p·N, point-to-point N.
These are the bus bytes NCCL reports and the planner predicts; gloo may move more on the wire for
small messages, but the work asked of the network is the same. A group of one sends nothing and
returns at once, so a single process runs the same code without any communication.

Under `torch.compile` the plain collectives run eagerly, between compiled graphs: their byte
counters are Python state a graph cannot update, and a region containing one runs eagerly whole.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup, ReduceOp
from torch.distributed.device_mesh import DeviceMesh


@dataclass(frozen=True)
class Group:
    """One dimension of the mesh as the collectives see it: its name (for the byte counters) and group."""

    name: str
    pg: ProcessGroup
    rank: int
    size: int

    def global_rank(self, group_rank: int) -> int:
        return dist.get_global_rank(self.pg, group_rank)


def group_of(mesh: DeviceMesh, dim: str) -> Group:
    """The Group of mesh dimension `dim` ("dp", "cp", "tp", "pp" or the flattened "dp_cp") for this rank."""
    # A flattened dimension is created once by `mesh.init` on every rank; here it is looked up.
    sub = mesh[tuple(dim.split("_"))]._flatten(dim) if "_" in dim else mesh[dim]
    return Group(dim, sub.get_group(), sub.get_local_rank(), sub.size())


_BYTES: dict[str, int] = defaultdict(int)


def comm_bytes() -> dict[str, int]:
    """Bytes this rank has sent per group name since the last `reset_comm_bytes`."""
    return dict(_BYTES)


def reset_comm_bytes() -> None:
    _BYTES.clear()


def count_bytes(group: Group, nbytes: int) -> None:
    """Add `nbytes` sent by this rank to `group`'s counter; for traffic outside these helpers (pipeline P2P)."""
    _BYTES[group.name] += int(nbytes)


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


# ---------------------------------------------------------------------------------------------
# Plain collectives


@torch.compiler.disable
def all_reduce(x: torch.Tensor, group: Group, op: ReduceOp = ReduceOp.SUM) -> torch.Tensor:
    """Reduce `x` in place over the group and return it."""
    if group.size == 1:
        return x
    count_bytes(group, 2 * (group.size - 1) * _nbytes(x) // group.size)
    dist.all_reduce(x, op=op, group=group.pg)
    return x


@torch.compiler.disable
def all_gather(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim`, in rank order."""
    if group.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(group.size)]
    count_bytes(group, (group.size - 1) * _nbytes(x))
    dist.all_gather(parts, x.contiguous(), group=group.pg)
    return torch.cat(parts, dim=dim)


@torch.compiler.disable
def reduce_scatter(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """Sum `x` over the group and keep this rank's slice along `dim` (the size must divide)."""
    if group.size == 1:
        return x
    if x.shape[dim] % group.size:
        raise ValueError(f"reduce-scatter of size {x.shape[dim]} along dim {dim} over {group.size} ranks")
    parts = [part.contiguous() for part in x.chunk(group.size, dim=dim)]
    out = torch.empty_like(parts[group.rank])
    count_bytes(group, (group.size - 1) * _nbytes(out))
    dist.reduce_scatter(out, parts, group=group.pg)
    return out


@torch.compiler.disable
def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group: Group) -> torch.Tensor:
    """Split `x` along `scatter_dim`, send piece j to rank j, and concatenate what arrives along `gather_dim`."""
    if group.size == 1:
        return x
    if x.shape[scatter_dim] % group.size:
        raise ValueError(f"all-to-all of size {x.shape[scatter_dim]} along dim {scatter_dim} over {group.size} ranks")
    send = torch.stack(x.chunk(group.size, dim=scatter_dim))  # piece j at index j of dim 0
    recv = torch.empty_like(send)
    count_bytes(group, (group.size - 1) * _nbytes(send) // group.size)
    dist.all_to_all_single(recv, send, group=group.pg)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class PendingShift:
    """A ring shift in flight: `wait()` returns the tensor received from the previous rank."""

    def __init__(self, sent: torch.Tensor, received: torch.Tensor, works: list):
        self.sent = sent  # kept alive until the send completes
        self.received = received
        self.works = works

    def wait(self) -> torch.Tensor:
        for work in self.works:
            work.wait()
        return self.received


@torch.compiler.disable
def ring_shift(x: torch.Tensor, group: Group, tag: int = 0) -> PendingShift:
    """Start sending `x` to the next rank of the ring and receiving the previous rank's; do not wait.

    Returning at once lets the caller compute on what it holds while the next block travels. Two
    shifts in flight at the same time must use different tags.
    """
    if group.size == 1:
        return PendingShift(x, x, [])
    x = x.contiguous()
    received = torch.empty_like(x)
    ops = [
        dist.P2POp(dist.isend, x, group.global_rank((group.rank + 1) % group.size), group.pg, tag),
        dist.P2POp(dist.irecv, received, group.global_rank((group.rank - 1) % group.size), group.pg, tag),
    ]
    count_bytes(group, _nbytes(x))
    return PendingShift(x, received, dist.batch_isend_irecv(ops))


# ---------------------------------------------------------------------------------------------
# Autograd regions


class _CopyToParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        # Reduce a copy: autograd may hand the same gradient tensor to another branch (a residual add).
        return all_reduce(grad.clone(memory_format=torch.contiguous_format), ctx.group), None


class _ReduceFromParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x.clone(memory_format=torch.contiguous_format), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter(grad, ctx.dim, ctx.group), None, None


class _ReduceScatterSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, ctx.dim, ctx.group), None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group):
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return all_to_all(grad, gather_dim, scatter_dim, ctx.group), None, None, None


def copy_to_parallel(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Enter a parallel region with a replicated input: each rank's gradient is partial, so sum them."""
    return x if group.size == 1 else _CopyToParallel.apply(x, group)


def reduce_from_parallel(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Leave a parallel region: sum the partial outputs; the gradient is already replicated."""
    return x if group.size == 1 else _ReduceFromParallel.apply(x, group)


def gather_sequence(x: torch.Tensor, group: Group, dim: int = 1) -> torch.Tensor:
    """Sequence-parallel entry: gather the sequence shards; backward reduce-scatters the partial gradients."""
    return x if group.size == 1 else _GatherSequence.apply(x, dim, group)


def reduce_scatter_sequence(x: torch.Tensor, group: Group, dim: int = 1) -> torch.Tensor:
    """Sequence-parallel exit: sum the partial outputs and keep this rank's sequence shard."""
    return x if group.size == 1 else _ReduceScatterSequence.apply(x, dim, group)


def all_to_all_region(x: torch.Tensor, scatter_dim: int, gather_dim: int, group: Group) -> torch.Tensor:
    """Reshard `x` from `gather_dim` to `scatter_dim` (Ulysses: sequence shards <-> head shards)."""
    return x if group.size == 1 else _AllToAll.apply(x, scatter_dim, gather_dim, group)


def all_reduce_coalesced(tensors: list[torch.Tensor], group: Group, op: ReduceOp = ReduceOp.SUM) -> None:
    """Reduce many tensors in place with one collective over a flat buffer (one latency, not one per tensor)."""
    if group.size == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    all_reduce(flat, group, op)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
