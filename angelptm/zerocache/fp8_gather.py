"""Stage 3's FP8 all-gather: the weights of FP8 layers are gathered already cast, a byte an element.

At stage 3 every forward and backward gathers each weight page. When the layer using a weight
runs its GEMMs in FP8 anyway (`Float8Linear` with the tensorwise or rowwise recipe), gathering it
in bf16 or fp32 and casting it on every rank afterwards moves 2-4 times the bytes the GEMM reads.
Instead, once per optimizer step, each rank casts its own range of such pages with the scales
the whole weight gets, and the gathers move the FP8 codes:

- Scales: each rank measures the amaxes of its own range (per weight for tensorwise; per row and
  per column of the weight for rowwise); one all-reduce (MAX) over the dp group completes them,
  followed, for tensorwise, by the layer's own weight amax groups (tp), as the layer would do.
  The codes and scales are then exactly those of casting the gathered weight.
- Copies: tensorwise has one, whose transpose serves the input-gradient GEMM. Rowwise quantizes
  the weight along its rows for the forward GEMM and along its columns for the input-gradient
  one (the transposed operand); forward gathers the first, backward the second, each at a byte
  an element (half of bf16).
- The layer takes its operand through `Float8Linear.weight_source`. A copy that is not gathered
  when asked for (the recomputed forward of activation checkpointing asks for the forward copy
  during backward; evaluation under `gathered_parameters()`) is gathered then.

These pages hold FP8 weights only (`pages.build_pages`), so no full-precision copy of them is
gathered for training; `gathered_parameters()` still gathers their full precision for export.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from angelptm.fp8.formats import cast_to_fp8
from angelptm.fp8.linear import Float8Linear
from angelptm.fp8.scaling import Quantized, RowwiseRecipe, TensorwiseRecipe, all_reduce_max, scale_from_amax
from angelptm.zerocache.buffers import PageBuffers
from angelptm.zerocache.comm import Handle, PageComm
from angelptm.zerocache.pages import Slot
from angelptm.zerocache.tiers import Allocator

FORWARD, TRANSPOSED = "forward", "transposed"  # the two copies a rowwise weight needs


def fp8_gathered_layers(model: nn.Module) -> dict[int, Float8Linear]:
    """{id(weight): layer} for the layers whose weight stage 3 can gather in FP8: tensorwise or
    rowwise recipe, and a weight that no other module uses (a tied weight needs full precision)."""
    uses: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        uses[id(param)] = uses.get(id(param), 0) + 1
    return {
        id(module.weight): module for module in model.modules()
        if isinstance(module, Float8Linear) and isinstance(module.recipe, (TensorwiseRecipe, RowwiseRecipe))
        and module.weight.requires_grad and uses[id(module.weight)] == 1
    }


@dataclass
class _Weight:
    """One FP8 weight of a page: where its own range lies, and this step's scales."""

    slot: Slot
    layer: Float8Linear
    lo: int  # own-range elements [lo, hi) hold the weight's flat elements [first, first + hi - lo)
    hi: int
    first: int
    scale_inv: dict[str, torch.Tensor] = field(default_factory=dict)  # per copy

    @property
    def rowwise(self) -> bool:
        return isinstance(self.layer.recipe, RowwiseRecipe)

    @property
    def rows_cols(self) -> tuple[int, int]:
        return self.slot.shape[0], self.slot.shape[1]

    def covered_rows(self) -> tuple[int, int]:
        """The rows [r0, r1) the own range touches (maybe in part)."""
        cols = self.rows_cols[1]
        return self.first // cols, (self.first + self.hi - self.lo - 1) // cols + 1

    def in_rows(self, part: torch.Tensor) -> torch.Tensor:
        """`part` (the weight's own-range elements) placed in the rows it touches, zeros elsewhere."""
        r0, r1 = self.covered_rows()
        cols = self.rows_cols[1]
        rows = part.new_zeros((r1 - r0) * cols, dtype=torch.float32)
        start = self.first - r0 * cols
        rows[start : start + part.numel()] = part
        return rows.view(r1 - r0, cols)

    def out_of_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The own-range elements of a covered-rows tensor (`in_rows`' inverse)."""
        start = self.first - self.covered_rows()[0] * self.rows_cols[1]
        return rows.reshape(-1)[start : start + self.hi - self.lo]


class _FP8Page:
    def __init__(self, b: PageBuffers, weights: list[_Weight]):
        self.buffers = b
        self.weights = weights
        self.copies = (FORWARD, TRANSPOSED) if any(w.rowwise for w in weights) else (FORWARD,)
        self.own: dict[str, torch.Tensor] = {}  # copy -> this step's codes of the own range (uint8)
        self.gathered: dict[str, tuple[torch.Tensor, Handle]] = {}  # copy -> the page's codes


class Float8Gather:
    """Casts and gathers the FP8 pages; installed as the weight source of their layers."""

    def __init__(self, buffers: list[PageBuffers], layers: dict[int, Float8Linear], comm: PageComm,
                 alloc: Allocator):
        self.comm = comm
        self.alloc = alloc
        self.pages: dict[int, _FP8Page] = {}
        for b in buffers:
            if not b.page.fp8:
                continue
            weights = []
            for slot in b.page.slots:
                lo, hi = b.own_part(slot)
                weight = _Weight(slot, layers[id(slot.param)], lo - b.own_start, hi - b.own_start, lo - slot.offset)
                weight.layer.weight_source = self._source(b.page.index, weight)
                weights.append(weight)
            self.pages[b.page.index] = _FP8Page(b, weights)
        self._stale = True

    def __contains__(self, index: int) -> bool:
        return index in self.pages

    def invalidate(self) -> None:
        """The parameters changed (an optimizer step, a load): cast again before the next gather."""
        self._stale = True

    # -- casting ---------------------------------------------------------------------------------

    @staticmethod
    def _amax(w: _Weight, part: torch.Tensor) -> torch.Tensor:
        """The amaxes of a weight's own-range part: [whole] for tensorwise, [rows | columns] for
        rowwise (zeros where the part has nothing)."""
        if not w.rowwise:
            return (part.abs().amax() if part.numel() else part.new_zeros(())).float().reshape(1)
        rows, cols = w.rows_cols
        amax = part.new_zeros(rows + cols, dtype=torch.float32)
        if part.numel():
            r0, r1 = w.covered_rows()
            covered = w.in_rows(part.abs())
            amax[r0:r1] = covered.amax(1)
            amax[rows:] = covered.amax(0)
        return amax

    def _complete(self, amaxes: list[torch.Tensor], weights: list[_Weight]) -> list[torch.Tensor]:
        """The whole weights' amaxes: MAX over the dp group, then over each tensorwise weight's
        amax groups (tp), one all-reduce per group."""
        flat = torch.cat(amaxes)
        if self.comm.size > 1:
            self.comm.all_reduce(flat, dist.ReduceOp.MAX).wait()
        amaxes = list(flat.split([a.numel() for a in amaxes]))
        by_groups: dict[tuple, list[int]] = {}
        for i, w in enumerate(weights):
            if not w.rowwise and w.layer.amax_groups.weight:
                by_groups.setdefault(tuple(w.layer.amax_groups.weight), []).append(i)
        for groups, members in by_groups.items():
            reduced = all_reduce_max(torch.cat([amaxes[i] for i in members]), groups)
            for i, amax in zip(members, reduced.split(1)):
                amaxes[i] = amax
        return amaxes

    @torch.no_grad()
    def _cast(self) -> None:
        """This step's scales and own-range codes of every FP8 page."""
        device = self.alloc.device
        # The own ranges, on the device when parameters are offloaded to the host.
        owns = {index: page.buffers.param_own().to(device) for index, page in self.pages.items()}
        weights = [(index, w) for index, page in self.pages.items() for w in page.weights]
        amaxes = self._complete([self._amax(w, owns[index][w.lo : w.hi]) for index, w in weights],
                                [w for _, w in weights])
        for (index, w), amax in zip(weights, amaxes):
            page, part = self.pages[index], owns[index][w.lo : w.hi].float()
            for copy in page.copies:
                if copy not in page.own:
                    page.own[copy] = self.alloc.zeros("device", "params", page.buffers.own_numel, torch.uint8)
            recipe, fmt = w.layer.recipe, w.layer.recipe.weight_format
            opts = dict(power_of_two=recipe.power_of_two_scales, amax_floor=recipe.amax_floor)
            if not w.rowwise:
                scale = scale_from_amax(amax, fmt, **opts).reshape(())
                w.scale_inv = {FORWARD: scale.reciprocal()}
                page.own[FORWARD][w.lo : w.hi] = cast_to_fp8(part * scale, fmt).view(torch.uint8)
                continue
            rows = w.rows_cols[0]
            row_scale, col_scale = scale_from_amax(amax[:rows], fmt, **opts), scale_from_amax(amax[rows:], fmt, **opts)
            w.scale_inv = {FORWARD: row_scale.reciprocal()[:, None], TRANSPOSED: col_scale.reciprocal()[:, None]}
            if part.numel():
                r0, r1 = w.covered_rows()
                values = w.in_rows(part)
                for copy, scaled in ((FORWARD, values * row_scale[r0:r1, None]), (TRANSPOSED, values * col_scale)):
                    page.own[copy][w.lo : w.hi] = w.out_of_rows(cast_to_fp8(scaled, fmt).view(torch.uint8))
        self._stale = False

    # -- gathering -------------------------------------------------------------------------------

    def gather(self, index: int, transposed: bool) -> Handle:
        """Start gathering page `index`'s codes: the copy for the input-gradient GEMM when
        `transposed` (the forward copy where the two are one), else the forward copy."""
        page = self.pages[index]
        return self._gather_copy(index, TRANSPOSED if transposed and TRANSPOSED in page.copies else FORWARD)

    def _gather_copy(self, index: int, copy: str) -> Handle:
        page = self.pages[index]
        if self._stale:
            self._cast()
        if copy not in page.gathered:
            codes = self.alloc.empty("device", "params", page.buffers.page.numel, torch.uint8)
            page.gathered[copy] = (codes, self.comm.all_gather(codes, page.own[copy]))
        return page.gathered[copy][1]

    def free(self, index: int) -> None:
        """Release the page's gathered codes (waiting for any gather still writing them)."""
        page = self.pages[index]
        for codes, handle in page.gathered.values():
            handle.wait()
            self.alloc.free(codes, "device", "params")
        page.gathered.clear()

    def _source(self, index: int, w: _Weight):
        def operand(transposed: bool) -> Quantized:
            copy = TRANSPOSED if transposed and w.rowwise else FORWARD  # tensorwise: one copy serves both
            self._gather_copy(index, copy).wait()
            fmt = w.layer.recipe.weight_format
            codes, _ = self.pages[index].gathered[copy]
            data = codes[w.slot.offset : w.slot.offset + w.slot.numel].view(fmt.dtype).view(w.slot.shape)
            kind = "row" if w.rowwise else "tensor"
            return Quantized(data.t().contiguous() if transposed else data, w.scale_inv[copy], kind)
        return operand
