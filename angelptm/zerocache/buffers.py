"""What one rank holds for one page: its parameter, gradient and optimizer-state tensors and tiers.

Names used throughout ZeROCache:
- `full`: the whole page of parameters on the device; every parameter of the page is a view
  into it. Under stage 3 its storage is released (resized to zero bytes) between uses.
- the *own range*: the elements this rank updates: the whole page at stage 0, the rank's
  shard from stage 1 on (1/dp, or 1/edp for the expert pages).
- `comm`: the page collectives of the group the page is sharded over (dp × cp, or edp).
- `param_shard` (stage 3): the own range of the parameters, on the device or the host; it is
  the only copy of the parameters between uses.
- `grad_full`: the bucket where backward accumulates this rank's local gradients for the page.
- `grad_shard` (stages 1-3): the sum over the dp group of the own range's gradients.
- the *slab*: the optimizer state of the own range in one fp32 block, [exp_avg | exp_avg_sq]
  plus [master] when the parameters themselves cannot serve as the fp32 master copy (they are
  not fp32, or they live on another tier than the one the update runs on). A small gap separates
  the segments so that the update's streams through them do not share cache sets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from angelptm.zerocache.comm import Handle, PageComm
from angelptm.zerocache.pages import Page, Slot


SLAB_GAP_NUMEL = 17 * 1024  # 68 KiB: keeps each segment 4 KiB-aligned, off the others' cache sets
GAPPED_SEGMENT_NUMEL = 2**19  # segments of 2 MiB or more get the gap; shorter ones do not need it


def slab_gap(own_numel: int) -> int:
    return SLAB_GAP_NUMEL if own_numel >= GAPPED_SEGMENT_NUMEL else 0


def slab_numel(own_numel: int, with_master: bool) -> int:
    """Elements of a slab: two or three segments of `own_numel`, with a gap after each but the
    last when the segments are long."""
    segments = 3 if with_master else 2
    return segments * own_numel + (segments - 1) * slab_gap(own_numel)


def slab_segments(slab: torch.Tensor, own_numel: int) -> list[torch.Tensor]:
    """[exp_avg, exp_avg_sq] or [exp_avg, exp_avg_sq, master]: the segments of a slab tensor."""
    gap = slab_gap(own_numel)
    step = own_numel + gap
    return [slab[i * step : i * step + own_numel] for i in range((len(slab) + gap) // step)]


def needs_master(dtype: torch.dtype, param_tier: str, state_tier: str) -> bool:
    """Whether a page's slab carries its own fp32 master copy of the parameters."""
    compute_tier = "device" if state_tier == "device" else "host"
    return dtype != torch.float32 or param_tier != compute_tier


@dataclass
class PageBuffers:
    page: Page
    stage: int
    own_start: int
    own_stop: int
    param_tier: str  # "device" or "host": where the own range of the parameters lives
    state_tier: str  # "device", "host" or "nvme": where the slab lives
    full: torch.Tensor
    comm: PageComm
    param_shard: Optional[torch.Tensor] = None
    grad_full: Optional[torch.Tensor] = None
    grad_shard: Optional[torch.Tensor] = None
    slab: Optional[torch.Tensor] = None  # device or host tier; None on nvme
    nvme_offset: int = -1
    reduction: Optional[Handle] = None  # the gradient reduction in flight

    @property
    def own_numel(self) -> int:
        return self.own_stop - self.own_start

    @property
    def compute_tier(self) -> str:
        """Where the AdamW update of this page runs: next to its state."""
        return "device" if self.state_tier == "device" else "host"

    @property
    def separate_master(self) -> bool:
        return needs_master(self.page.dtype, self.param_tier, self.state_tier)

    @property
    def slab_numel(self) -> int:
        return slab_numel(self.own_numel, self.separate_master)

    def own_part(self, slot: Slot) -> tuple[int, int]:
        """The page elements [lo, hi) that are both `slot`'s and in the own range (lo == hi: none)."""
        lo = max(slot.offset, self.own_start)
        return lo, max(lo, min(slot.offset + slot.numel, self.own_stop))

    def param_own(self) -> torch.Tensor:
        if self.stage == 3:
            return self.param_shard
        return self.full[self.own_start : self.own_stop]

    def grad_own(self) -> torch.Tensor:
        return self.grad_full if self.stage == 0 else self.grad_shard

    def state_views(self, slab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(fp32 master, exp_avg, exp_avg_sq) of the own range, given the slab's tensor."""
        segments = slab_segments(slab, self.own_numel)
        master = segments[2] if self.separate_master else self.param_own()
        return master, segments[0], segments[1]
