"""The AdamW step for pages whose optimizer state lives off the device (host or NVMe).

Pages stream through a pipeline `depth` pages deep, so that moving data overlaps the CPU update:

    fetch (page i + depth):  gradient shard device -> host staging (fp32); NVMe slab -> host staging
    update (page i):         fused CPU AdamW on the host slab
    return (page i):         fp32 master -> device parameters; host slab -> NVMe

Staging buffers are pinned, 4 KiB-aligned and reused from step to step (counted as host
buffers in the ledger). On a CPU-only machine the device copies run inline; the NVMe reads and
writes still run on the I/O thread pool, overlapping with the update.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional

import torch

from angelptm.zerocache.adamw import adamw_
from angelptm.zerocache.buffers import PageBuffers
from angelptm.zerocache.tiers import Allocator, IoRequest, NvmeFile, Pending, Transfers, host_empty


class StagingPool:
    """Equal-sized host fp32 buffers, handed out and taken back; allocated on first demand."""

    def __init__(self, alloc: Allocator, numel: int):
        self.alloc = alloc
        self.numel = numel
        self._free: list[torch.Tensor] = []

    def take(self, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(buffer to give back later, view of its first `numel` elements)."""
        buffer = self._free.pop() if self._free else self.alloc.empty("host", "buffers", self.numel, torch.float32)
        return buffer, buffer[:numel]

    def give(self, buffer: torch.Tensor) -> None:
        self._free.append(buffer)


@dataclass
class _InFlight:
    page_buffers: PageBuffers
    grad_buffer: torch.Tensor
    grad: torch.Tensor
    grad_copy: Pending
    slab_buffer: Optional[torch.Tensor]  # NVMe pages: the staging buffer behind `slab`
    slab: torch.Tensor
    read: Optional[IoRequest]


@dataclass
class _Returning:
    slab_buffer: torch.Tensor
    param_copy: Pending
    write: IoRequest


class OffloadStepper:
    def __init__(self, pages: list[PageBuffers], alloc: Allocator, transfers: Transfers,
                 nvme: Optional[NvmeFile], depth: int):
        self.pages = pages
        self.transfers = transfers
        self.nvme = nvme
        self.depth = max(1, depth)
        self.grads = StagingPool(alloc, max((b.own_numel for b in pages), default=0))
        self.slabs = StagingPool(alloc, max((b.slab_numel for b in pages if b.state_tier == "nvme"), default=0))

    # -- slabs on NVMe -------------------------------------------------------------------------

    def new_slab(self, b: PageBuffers) -> torch.Tensor:
        """A host tensor shaped like an NVMe page's slab, owned by the caller (not in the ledger)."""
        return host_empty(b.slab_numel, torch.float32, self.transfers.device.type == "cuda")

    def read_slab(self, b: PageBuffers) -> torch.Tensor:
        """A host copy of an NVMe page's slab, owned by the caller."""
        slab = self.new_slab(b)
        self.nvme.read(b.nvme_offset, slab).wait()
        return slab

    def write_slab(self, b: PageBuffers, slab: torch.Tensor) -> None:
        self.nvme.write(b.nvme_offset, slab).wait()

    # -- the pipelined step --------------------------------------------------------------------

    def _fetch(self, b: PageBuffers, divisor: Optional[torch.Tensor]) -> _InFlight:
        grad_buffer, grad = self.grads.take(b.own_numel)
        grad_copy = self.transfers.copy(grad, b.grad_own(), divisor)
        if b.state_tier == "nvme":
            slab_buffer, slab = self.slabs.take(b.slab_numel)
            return _InFlight(b, grad_buffer, grad, grad_copy, slab_buffer, slab, self.nvme.read(b.nvme_offset, slab))
        return _InFlight(b, grad_buffer, grad, grad_copy, None, b.slab, None)

    def _retire(self, r: _Returning) -> None:
        r.param_copy.wait()  # the slab's master must reach the device before the buffer is reused
        r.write.wait()
        self.slabs.give(r.slab_buffer)

    def step(self, step: torch.Tensor, grad_scale: Optional[torch.Tensor], hypers: list[dict]) -> None:
        """Update every offloaded page; `step` is a host scalar, `grad_scale` a device scalar,
        `hypers` the AdamW settings of each parameter group.

        fp32 gradients are divided by `grad_scale` on their way to the host, so the CPU pass
        reads them once and writes them never (28 bytes per parameter, the AdamW minimum);
        other dtypes are widened on the way and divided inside the update."""
        host_scale = None if grad_scale is None else grad_scale.cpu()
        fetching: deque[_InFlight] = deque()
        returning: deque[_Returning] = deque()
        param_copies: list[Pending] = []
        upcoming = iter(self.pages)
        for _ in self.pages:
            while len(fetching) <= self.depth:
                b = next(upcoming, None)
                if b is None:
                    break
                fetching.append(self._fetch(b, grad_scale if b.page.dtype == torch.float32 else None))
            f = fetching.popleft()
            f.grad_copy.wait()
            if f.read is not None:
                f.read.wait()
            b = f.page_buffers
            master, exp_avg, exp_avg_sq = b.state_views(f.slab)
            divided_inside = host_scale if b.page.dtype != torch.float32 else None
            adamw_([master], [f.grad], [exp_avg], [exp_avg_sq], step, grad_scale=divided_inside,
                   **hypers[b.page.group])
            self.grads.give(f.grad_buffer)
            param_copy = self.transfers.copy(b.param_own(), master) if b.separate_master else Pending()
            if f.slab_buffer is None:
                param_copies.append(param_copy)
                continue
            returning.append(_Returning(f.slab_buffer, param_copy, self.nvme.write(b.nvme_offset, f.slab)))
            while len(returning) > self.depth:
                self._retire(returning.popleft())
        while returning:
            self._retire(returning.popleft())
        for copy in param_copies:
            copy.wait()
