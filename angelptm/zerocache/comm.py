"""Page collectives over the dp group: asynchronous all-reduce, reduce-scatter and all-gather.

Each call moves one whole page and returns a handle whose `wait()` finishes the operation. The
bytes each rank sends are counted per operation (`sent_bytes`) using the algorithm that really
runs: ring all-reduce 2B(n-1)/n, all-gather and reduce-scatter B(n-1)/n for a page of B bytes.

gloo's own reduce-scatter runs as a full all-reduce (twice the bytes), and its all-gather takes
3-4x as long as sending the same bytes (on 2 ranks, 90 ms for a 100 MB page against 26 ms). On
gloo, therefore, reduce-scatter is one all-to-all (each rank sends every other rank its chunk)
followed by a local sum of the n chunks received, and all-gather is n broadcasts, rank p's shard
from rank p. Each rank sends B(n-1)/n bytes, as the ring would. Point-to-point sends would be as
fast, but a gather is left in flight when `step()` returns (stages 1-2 finish it in the next
forward), and gloo lets a process group be destroyed with collectives queued, not with sends
pending. NCCL uses its native ring collectives.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Optional, Union

import torch
import torch.distributed as dist

from angelptm.zerocache.tiers import Allocator

# Newer torch names the single-tensor collectives *_single and deprecates the older names, which
# the oldest torch this library supports has alone.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class Handle:
    """An operation in flight (one or more pieces of work); `wait()` completes it (and runs its
    local epilogue) once."""

    def __init__(self, work: Union[dist.Work, list[dist.Work]], epilogue: Optional[Callable[[], None]] = None):
        self._works = work if isinstance(work, list) else [work]
        self._epilogue = epilogue
        self._done = False

    def then(self, step: Callable[[], None]) -> "Handle":
        """Run `step` after the operation and the epilogues added before it."""
        first = self._epilogue

        def chained() -> None:
            if first is not None:
                first()
            step()

        self._epilogue = chained
        return self

    def wait(self) -> None:
        if self._done:
            return
        for work in self._works:
            work.wait()
        if self._epilogue is not None:
            self._epilogue()
        self._done = True


class PageComm:
    def __init__(self, group: Optional[dist.ProcessGroup], alloc: Allocator):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.alloc = alloc
        self.on_gloo = dist.get_backend(group) == "gloo"  # see the module doc
        self._global = [dist.get_global_rank(group, p) if group is not None else p for p in range(self.size)]
        self.sent_bytes: Counter = Counter()

    def _share(self, nbytes: int) -> int:
        return nbytes * (self.size - 1) // self.size

    def all_reduce(self, buffer: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> Handle:
        self.sent_bytes["all_reduce"] += 2 * self._share(buffer.numel() * buffer.element_size())
        return Handle(dist.all_reduce(buffer, op=op, group=self.group, async_op=True))

    def all_gather(self, full: torch.Tensor, shard: torch.Tensor) -> Handle:
        """Fill `full` with every rank's `shard` (in place when `shard` is this rank's slice)."""
        self.sent_bytes["all_gather"] += self._share(full.numel() * full.element_size())
        if not self.on_gloo:
            return Handle(_all_gather_single(full, shard, group=self.group, async_op=True))
        chunks = full.view(self.size, -1)
        if chunks[self.rank].data_ptr() != shard.data_ptr():
            chunks[self.rank].copy_(shard.view(-1))
        return Handle([dist.broadcast(chunks[p], src=self._global[p], group=self.group, async_op=True)
                       for p in range(self.size)])

    def reduce_scatter_add(self, out: torch.Tensor, full: torch.Tensor) -> Handle:
        """out += the sum over ranks of chunk number `rank` of their `full` (which must stay
        untouched until the handle is waited on)."""
        self.sent_bytes["reduce_scatter"] += self._share(full.numel() * full.element_size())
        if self.on_gloo:
            received = self.alloc.empty("device", "buffers", full.numel(), full.dtype)
            work = dist.all_to_all_single(received, full, group=self.group, async_op=True)

            def epilogue() -> None:
                for chunk in received.view(self.size, -1):  # in rank order, whatever order they came in
                    out.add_(chunk)
                self.alloc.free(received, "device", "buffers")
        else:
            received = self.alloc.empty("device", "buffers", out.numel(), out.dtype)
            work = _reduce_scatter_single(received, full, group=self.group, async_op=True)

            def epilogue() -> None:
                out.add_(received)
                self.alloc.free(received, "device", "buffers")

        return Handle(work, epilogue)
