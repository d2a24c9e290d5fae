"""Gradient reduction over the dp group (each page over its own group: see experts.py), page by
page, overlapped with backward.

A hook on every parameter moves its gradient into the page's bucket (`grad_full`) as soon as
autograd has accumulated it, and drops the parameter's own `.grad`. When the last gradient of a
page arrives, the page's reduction starts at once:

- stage 0: all-reduce of the bucket, then divide by dp · cp (the bucket holds the mean);
- stages 1-3: reduce-scatter of the bucket, added into `grad_shard` (which holds the sum; the
  optimizer divides by dp inside the AdamW pass). Stage 1 zeroes and keeps its bucket, stages
  2-3 free it, so they never hold the gradients of more than a few pages at once.

Reductions start in one fixed page order on every rank (last page first, the order backward
finishes them), so ranks always issue the same collectives in the same order; pages whose
gradients never arrive (unused parameters) are reduced when backward ends.

Gradient accumulation: inside `no_sync()`, stages 0-1 keep accumulating locally and reduce once,
on the next backward outside it (overlapped with it) or at `reduce_deferred()`; stages 2-3
reduce-scatter after every backward regardless, since holding whole gradients would defeat their
purpose. Every pattern gives the exact sum.

Split backward (zero-bubble pipelines, `pipeline.split_backward`): an input-gradient pass gives
the norms' and embeddings' gradients while the weights' come in a later weight pass (through
autograd, so these hooks see them too). Where a backward would end with reductions, the
input-gradient pass leaves its few gradients in `.grad` and reduces nothing; the weight pass
adds them to the buckets with its own, so each page is reduced once, complete.
"""

from __future__ import annotations

from collections import deque
from functools import partial
from typing import Callable

import torch
from torch.autograd import Variable

from angelptm.distributed.pipeline.split_backward import postponed_weight_work
from angelptm.zerocache.buffers import PageBuffers
from angelptm.zerocache.pages import Slot
from angelptm.zerocache.tiers import Allocator


class GradReducer:
    def __init__(self, buffers: list[PageBuffers], stage: int, mean_divisor: int, alloc: Allocator,
                 max_in_flight: int, on_param_grad: Callable[[torch.nn.Parameter], None]):
        self.buffers = buffers
        self.stage = stage
        self.mean_divisor = mean_divisor  # the ranks whose tokens the gradients sum over
        self.alloc = alloc
        self.max_in_flight = max(1, max_in_flight)
        self.on_param_grad = on_param_grad  # stage 3 frees a unit's pages when its grads are in
        self.defer = False  # set by no_sync() for stages 0-1
        self._deferred = False  # local gradients wait for reduce_deferred() or a synced backward
        self._arrived = [0] * len(buffers)
        self._next = len(buffers) - 1  # the next page to reduce, counting down
        self._in_flight: deque[PageBuffers] = deque()
        self._in_backward = False
        self._held: dict[int, tuple[PageBuffers, Slot, torch.nn.Parameter]] = {}  # left in .grad for the weight pass
        self._hooks = [
            slot.param.register_post_accumulate_grad_hook(partial(self._on_grad, b, slot))
            for b in buffers if not b.page.frozen for slot in b.page.slots
        ]

    def _bucket(self, b: PageBuffers) -> torch.Tensor:
        if b.reduction is not None and self.stage <= 1:
            self._finish(b)  # the persistent bucket is being read by a reduction: let it end
        if b.grad_full is None:  # stages 2-3: a fresh bucket per backward
            b.grad_full = self.alloc.zeros("device", "grads", b.page.numel, b.page.dtype)
        return b.grad_full

    @property
    def _reduces_after_backward(self) -> bool:
        return not (self.defer and self.stage <= 1)

    def _on_grad(self, b: PageBuffers, slot: Slot, param: torch.nn.Parameter) -> None:
        if param.grad is None:  # its backward function returned no gradient (a postponed weight's)
            return
        if not self._in_backward:
            self._in_backward = True
            Variable._execution_engine.queue_callback(self._end_backward)
        if self._reduces_after_backward and postponed_weight_work() is not None:
            self._held[id(param)] = (b, slot, param)
            return
        self._add_held()
        if param.grad is not None:  # None: a tied weight held earlier, added just now with this gradient
            self._add(b, slot, param)

    def _add_held(self) -> None:
        held, self._held = self._held, {}
        for b, slot, param in held.values():
            self._add(b, slot, param)

    def _add(self, b: PageBuffers, slot: Slot, param: torch.nn.Parameter) -> None:
        """Move `param`'s gradient into its page's bucket; start the page's reduction once complete."""
        bucket = self._bucket(b)
        bucket[slot.offset : slot.offset + slot.numel].view(slot.shape).add_(param.grad)
        self._deferred |= not self._reduces_after_backward
        param.grad = None
        self._arrived[b.page.index] += 1
        self.on_param_grad(param)
        if self._arrived[b.page.index] == len(b.page.slots):
            self._start_ready()

    def _start_ready(self, flush: bool = False, force: bool = False) -> None:
        if not (self._reduces_after_backward or force):
            return
        while self._next >= 0:
            b = self.buffers[self._next]
            if b.page.frozen:  # no gradients: nothing to reduce
                self._next -= 1
                continue
            if not flush and self._arrived[self._next] < len(b.page.slots):
                return
            if flush and b.grad_full is None:  # stages 2-3: no gradient reached this page
                b.grad_full = self.alloc.zeros("device", "grads", b.page.numel, b.page.dtype)
            self._start(b)
            self._next -= 1

    def _start(self, b: PageBuffers) -> None:
        if b.reduction is not None:
            # This page's reduction from the previous backward (gradient accumulation) is still in
            # flight: it happens when max_in_flight (from zero.prefetch_pages) is at least the
            # number of pages. It must add into grad_shard before this one does, and its handle
            # must not be dropped unwaited.
            self._finish(b)
        bucket = b.grad_full
        if self.stage == 0:
            b.reduction = b.comm.all_reduce(bucket).then(lambda: bucket.div_(self.mean_divisor))
        else:
            b.reduction = b.comm.reduce_scatter_add(b.grad_shard, bucket)
            if self.stage == 1:
                b.reduction.then(bucket.zero_)  # the bucket stays for the next step
            else:
                b.grad_full = None  # the reduction owns the bucket until it ends
                b.reduction.then(lambda: self.alloc.free(bucket, "device", "grads"))
        self._in_flight.append(b)
        while len(self._in_flight) > self.max_in_flight:
            self._finish(self._in_flight[0])

    def _finish(self, b: PageBuffers) -> None:
        b.reduction.wait()
        b.reduction = None
        self._in_flight.remove(b)

    def _end_backward(self) -> None:
        self._in_backward = False
        if self._reduces_after_backward and postponed_weight_work():
            return  # an input-gradient pass: its pages are completed, and reduced, by the weight pass
        self._add_held()  # an input-gradient pass that postponed nothing is a whole backward
        self._start_ready(flush=True)
        if self._reduces_after_backward:
            self._deferred = False
        self._arrived = [0] * len(self.buffers)
        self._next = len(self.buffers) - 1

    def reduce_deferred(self) -> None:
        """Start reducing what backward passes under no_sync() left local (stages 0-1)."""
        if self._deferred:
            self._start_ready(flush=True, force=True)
            self._next = len(self.buffers) - 1
            self._deferred = False

    def wait_all(self) -> None:
        """Finish every reduction in flight (before clipping or stepping)."""
        while self._in_flight:
            self._finish(self._in_flight[0])

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()

