"""ZeROCache under tensor parallelism: what the tp group changes for a rank's pages.

Pages are built from this rank's local (tp-sharded) parameters. tp peers hold parameters of the
same local shapes in the same order, and the same dp × cp rank, so their page layouts and own
ranges match element for element: a segment of a page is the same part of a parameter on every
tp rank. Each parameter's `ShardSpec` (`model.shard_specs`) then says what the tp group adds:

- Gradients that each tp rank computes only in part (the norms under sequence parallelism, kv
  heads shared by tp / n_kv_heads ranks) are summed over the ranks holding that slice. The sum
  runs on the own range of each page once the dp reduction is over: it commutes with the dp mean,
  and touches only the segments of such parameters.
- The global gradient norm counts a slice held by c tp ranks 1/c on each of them, so that the sum
  over tp counts it once (`angelptm.distributed.tensor_parallel.local_grad_norm_squared`'s rule).

Checkpoints use the specs too: see checkpoint.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from angelptm.distributed.collectives import Group
from angelptm.distributed.tensor_parallel import ShardSpec, squared_l2_norm, sum_over_copies
from angelptm.zerocache.buffers import PageBuffers


@dataclass(frozen=True)
class Segment:
    """The part of one parameter inside a page's own range: elements [lo, hi) of the own range."""

    buffers: PageBuffers
    spec: ShardSpec
    lo: int
    hi: int

    def grad(self) -> torch.Tensor:
        return self.buffers.grad_own()[self.lo : self.hi]


def own_segments(buffers: list[PageBuffers], specs: dict[str, ShardSpec],
                 keep: Callable[[ShardSpec], bool]) -> list[Segment]:
    """The own-range segments of the parameters whose spec `keep` accepts."""
    segments = []
    for b in buffers:
        for slot in b.page.slots:
            spec = specs[slot.name]
            lo, hi = b.own_part(slot)
            if keep(spec) and lo < hi:
                segments.append(Segment(b, spec, lo - b.own_start, hi - b.own_start))
    return segments


class TensorParallelPages:
    def __init__(self, buffers: list[PageBuffers], specs: dict[str, ShardSpec], tp: Group):
        self.tp = tp
        self.partial = own_segments(buffers, specs, lambda spec: spec.partial_grad)
        self.replicated = own_segments(buffers, specs, lambda spec: spec.copies > 1)

    def sum_partial_gradients(self) -> None:
        """Sum the tp-partial gradients (after the dp reduction, before clipping and the step)."""
        sum_over_copies([(segment.spec, segment.grad()) for segment in self.partial], self.tp)

    def grad_norm_squared(self, buffers: list[PageBuffers]) -> torch.Tensor:
        """This rank's share of the squared global norm of the own-range gradients of `buffers`, in
        float64: all of it, less the part of each slice held by c tp ranks that the other c - 1 count."""
        squares = squared_l2_norm([b.grad_own() for b in buffers])
        mine = {id(b) for b in buffers}
        for segment in self.replicated:
            if id(segment.buffers) in mine:
                squares = squares - squared_l2_norm([segment.grad()]) * (1 - 1 / segment.spec.copies)
        return squares
