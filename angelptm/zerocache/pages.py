"""The page layout: which parameter sits where in which fixed-size flat page.

A page is the unit of communication, offload and prefetch. Parameters are packed whole, in
execution order, into pages of at most `page_mb`, one pool per dtype and optimizer parameter group
(so one AdamW call with one weight decay updates a page), and the weights that stage 3 gathers in
FP8 in pools of their own (`fp8_gather.py`); a parameter larger than a page gets a page of its own. Pages close at the boundary of each *unit* (a transformer block, or
a module outside the blocks that owns parameters directly), so that stage 3 gathers exactly the
pages a unit needs. Each page is padded so that it splits into `dp` equal shards whose byte size
is a multiple of 4 KiB: shards then map straight onto O_DIRECT file I/O.

Under expert parallelism the expert weights (`expert_params`) get pools of their own, split over
the expert-data-parallel group (`expert_dp` ranks) instead of dp (see experts.py).

Frozen parameters (requires_grad False: a LoRA base) get pools of their own too: their pages hold
parameters alone, sharded at stage 3 and gathered for compute like the rest, with no gradient
buckets and no optimizer state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

# Every shard of fp32 state is a whole number of 4 KiB blocks (O_DIRECT's alignment), and of the
# chunks that gradient norms sum (tensor_parallel.NORM_CHUNK_NUMEL), so shards and pages sum the same ones.
SHARD_ALIGN_NUMEL = 1024
# Parameters start on 64-byte boundaries inside a page, so views stay vector-aligned.
PARAM_ALIGN_BYTES = 64


@dataclass
class Slot:
    """One parameter inside a page: elements [offset, offset + numel) of the page."""

    name: str
    param: nn.Parameter
    offset: int
    numel: int
    shape: torch.Size


@dataclass
class Page:
    index: int
    dtype: torch.dtype
    group: int  # the optimizer parameter group of every parameter in it
    numel: int  # padded: a multiple of shards · SHARD_ALIGN_NUMEL
    slots: list[Slot] = field(default_factory=list)
    fp8: bool = False  # holds only weights that stage 3 gathers in FP8
    expert: bool = False  # holds only expert weights, sharded over the expert-data-parallel group
    frozen: bool = False  # holds only frozen parameters: no gradients, no optimizer state
    shards: int = 1  # the ranks its elements are split over from stage 1 on (dp, or edp for experts)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass
class Unit:
    """A module whose parameters are gathered together (stage 3) before it runs."""

    name: str
    module: nn.Module
    params: list[nn.Parameter]  # the parameters it uses, tied and frozen ones included
    pages: list[int] = field(default_factory=list)  # indices of the pages holding them


def shard_range(page: Page, rank: int, dp: int) -> tuple[int, int]:
    """Elements of `page` that rank `rank` of `dp` owns when state is sharded."""
    size = page.numel // dp
    return rank * size, (rank + 1) * size


def find_units(model: nn.Module) -> list[Unit]:
    """Units in execution order: each block of `model.layers`, and every other module that owns
    parameters directly (embeddings, final norm, output head)."""
    blocks = getattr(model, "layers", None)
    block_ids = {id(b) for b in blocks.values()} if isinstance(blocks, nn.ModuleDict) else (
        {id(b) for b in blocks} if isinstance(blocks, nn.ModuleList) else set()
    )
    units: list[Unit] = []
    inside_block: set[int] = set()
    for name, module in model.named_modules(remove_duplicate=True):
        if id(module) in inside_block:
            continue
        if id(module) in block_ids:
            inside_block.update(id(m) for m in module.modules())
            params = list(module.parameters())
        else:
            params = list(module.parameters(recurse=False))
        if params:
            units.append(Unit(name or "<root>", module, params))
    return units


def _round_up(value: int, multiple: int) -> int:
    return math.ceil(value / multiple) * multiple


def page_numel_for(page_mb: float, dtype: torch.dtype, dp: int) -> int:
    """Capacity of one page in elements: page_mb rounded down to whole aligned shards."""
    quantum = dp * SHARD_ALIGN_NUMEL
    return max(quantum, int(page_mb * 2**20 / dtype.itemsize) // quantum * quantum)


def build_pages(model: nn.Module, units: list[Unit], page_mb: float, dp: int,
                group_of: Callable[[nn.Parameter], int] = lambda param: 0,
                fp8_params: frozenset[int] = frozenset(), expert_params: frozenset[int] = frozenset(),
                expert_dp: int = 1) -> list[Page]:
    """Pack every parameter of `model` into pages; fill `unit.pages` as a side effect.
    `fp8_params`: the ids of the parameters gathered in FP8, which get pages of their own;
    `expert_params`: those of the expert weights, in pages split over `expert_dp` ranks."""
    names = {id(p): n for n, p in model.named_parameters()}
    pages: list[Page] = []
    page_of: dict[int, int] = {}
    for unit in units:
        open_pages: dict[tuple[torch.dtype, int, bool, bool, bool], Page] = {}
        for param in unit.params:
            if id(param) in page_of:  # tied: already packed by an earlier unit
                continue
            dtype, numel = param.dtype, param.numel()
            pool = (dtype, group_of(param), id(param) in fp8_params, id(param) in expert_params,
                    not param.requires_grad)
            shards = expert_dp if pool[3] else dp
            capacity = page_numel_for(page_mb, dtype, shards)
            align = max(1, PARAM_ALIGN_BYTES // dtype.itemsize)
            page = open_pages.get(pool)
            offset = _round_up(page.numel, align) if page is not None else 0
            if page is None or numel > capacity or offset + numel > capacity:
                page = Page(len(pages), dtype, pool[1], 0, fp8=pool[2], expert=pool[3], frozen=pool[4],
                            shards=shards)
                pages.append(page)
                open_pages[pool] = page
                offset = 0
            page.slots.append(Slot(names[id(param)], param, offset, numel, param.shape))
            page.numel = offset + numel  # padded when the page closes
            page_of[id(param)] = page.index
            if numel > capacity:  # an oversized parameter keeps its page to itself
                del open_pages[pool]
    for page in pages:
        page.numel = _round_up(max(page.numel, 1), page.shards * SHARD_ALIGN_NUMEL)
    for unit in units:
        unit.pages = sorted({page_of[id(p)] for p in unit.params})
    return pages
