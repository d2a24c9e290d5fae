"""FP8 grouped GEMMs for MoE experts: rows in contiguous groups, group g times expert weight g, in FP8.

For rows x (M, K) sorted by expert, group g of `sizes[g]` rows, and stacked weights W (G, N, K)
in nn.Linear's (out, in) layout per expert, `grouped_float8_linear` computes y_g = x_g @ W_g^T
with the three GEMMs of each group (forward, input gradient, weight gradient) in FP8, each group
exactly as a `Float8Linear` of that expert's weight would compute it on that group's rows:

    forward      y_g  = x_g    @ W_g^T      e4m3 x e4m3, fast accumulation
    input grad   dx_g = dy_g   @ W_g        grad_output in the recipe's format (e5m2 tensorwise)
    weight grad  dW_g = dy_g^T @ x_g        both operands quantized along the group's tokens

Scales, per recipe:

- tensorwise: one scale per expert weight, and one per group for x and dy (the amax of that
  group's rows). An expert is one linear layer whose input is its group: a scale over all groups
  would let one expert's outliers crush the resolution of every other expert's tokens, and would
  make an expert's result depend on which other tokens share the batch (the ep layout included);
- rowwise: per row of each operand along the contracted dimension, as the recipe defines for
  one linear: per token for x and dy, per output channel of each W_g; the weight-gradient
  operands per column of the group (over its tokens only);
- blockwise: 1x128 tiles of each group's rows, 128x128 blocks of each W_g. It maps onto the
  per-group GEMMs unchanged (no grouped kernel takes blockwise scales), so it runs the loop;
- delayed: experts use current (tensorwise) scaling, same formats. An amax history per local
  expert would be checkpointed state whose shape depends on the ep degree (no resharding across
  ep), and an expert's row count changes from step to step, which is what history smooths poorly.

The casts are `Float8Linear.quantize`'s own (each group's rows padded to 16 as there), the GEMMs
`gemm.scaled_mm`. Where this torch build has `torch._scaled_grouped_mm` and it proves right on
the device (probed once), the forward and input-gradient GEMMs of the all-e4m3 cases (rowwise;
tensorwise forward) run as one grouped GEMM with the scales expanded per row, bf16 out; every
other GEMM runs one `scaled_mm` per non-empty group (never per token). Expert GEMMs are never
split across ranks (under tp every rank holds the routed experts whole and computes its own
tokens; ep moves whole groups), so no amax is all-reduced.

The FP8 weights are cast once per optimizer step, like `Float8Linear`'s (same refresh rules), and
w1 and w3, which read the same rows, share their cast as Float8Linear layers share theirs.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from angelptm.fp8.formats import E4M3
from angelptm.fp8.gemm import scaled_mm
from angelptm.fp8.linear import Float8Linear, _LastInputCast, _pad_rows, _track
from angelptm.fp8.scaling import (AmaxGroups, DelayedRecipe, Float8Recipe, Quantized, TensorwiseRecipe,
                                  recipe_from_name)

GROUPED_KINDS = ("tensor", "row")  # scale kinds torch._scaled_grouped_mm can take, expanded per row


@dataclass
class StackedOperands:
    """One quantized operand per expert, stacked: data (G, rows, cols); scale_inv (G,) per tensor,
    (G, rows, 1) per row, (G, nr, nc) per block."""

    data: torch.Tensor
    scale_inv: torch.Tensor
    kind: str

    def __getitem__(self, g: int) -> Quantized:
        return Quantized(self.data[g], self.scale_inv[g], self.kind)

    def row_scales(self) -> torch.Tensor:
        """(G, rows) FP32: each row's scale_inv, what the grouped GEMM takes for its second operand."""
        g, rows = self.data.shape[:2]
        if self.kind == "tensor":
            return self.scale_inv[:, None].expand(g, rows).contiguous()
        return self.scale_inv[..., 0].contiguous()


class Float8Experts(nn.Module):
    """The FP8 recipe of one `GroupedExperts` and its FP8 weight caches; `GroupedExperts.compute`
    calls `linear` for each of its GEMMs when it holds one. No parameters, no buffers: the
    experts' state dict is that of the full-precision module."""

    def __init__(self, recipe: str | Float8Recipe = "tensorwise"):
        super().__init__()
        recipe = recipe_from_name(recipe)
        if isinstance(recipe, DelayedRecipe):  # see the module doc
            recipe = TensorwiseRecipe(power_of_two_scales=recipe.power_of_two_scales, amax_floor=recipe.amax_floor)
        self.recipe = recipe
        self.amax_groups = AmaxGroups()  # read by Float8Linear.quantize: nothing to all-reduce here
        self._weight_cache: dict[str, tuple] = {}
        self._last_input = _LastInputCast()
        _track(self)  # every optimizer step drops the cache, as for Float8Linear

    def __setstate__(self, state) -> None:
        # Copies and unpickled modules skip __init__ but need their cache dropped on optimizer steps too.
        super().__setstate__(state)
        _track(self)

    def extra_repr(self) -> str:
        return f"recipe={self.recipe.name}"

    def refresh_weight(self) -> None:
        """Drop the cached FP8 weights; the next forward casts them again."""
        self._weight_cache = {}

    # Float8Linear's casts per recipe, reading only `recipe` and `amax_groups` (shared, not copied).
    quantize = Float8Linear.quantize

    def quantized_weight(self, name: str, weight: torch.Tensor, need_t: bool
                         ) -> tuple[StackedOperands, Optional[StackedOperands]]:
        """Each expert's FP8 copies of `weight` (G, N, K): along K, and transposed along N."""
        w = weight.detach()
        key = (w._version, w.data_ptr())
        cache = self._weight_cache.get(name)
        if cache is None or cache[0] != key or (need_t and cache[2] is None):
            cache = self._weight_cache[name] = (key, *self._cast_weight(w, need_t))
        return cache[1], cache[2]

    def quantized_input(self, x: torch.Tensor, sizes: list[int], need_t: bool
                        ) -> tuple[list[Quantized], Optional[list[Quantized]]]:
        """Each non-empty group's FP8 copies of x, cast as Float8Linear casts its input (rows padded
        to 16, the weight gradient's contracted dimension; both copies from one read), and kept
        for the next GEMM reading the same x."""
        def cast():
            copies = [self.quantize("input", _pad_rows(x[rows]), need_rows=True, need_t=need_t)
                      for _, rows in _spans(sizes)]
            return [q for q, _ in copies], ([q_t for _, q_t in copies] if need_t else None)
        if x.is_inference():  # inference tensors have no version to key on
            return cast()
        key = (x._version, tuple(sizes))
        copies = self._last_input.get(x, key, need_t)
        if copies is None:
            copies = cast()
            self._last_input.put(x, key, copies)
        return copies

    def _cast_weight(self, w: torch.Tensor, need_t: bool) -> tuple[StackedOperands, Optional[StackedOperands]]:
        copies = [self.quantize("weight", w[g], need_rows=True, need_t=need_t) for g in range(w.shape[0])]
        rows = _stack([c[0] for c in copies])
        return rows, (_stack([c[1] for c in copies]) if need_t else None)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, name: str, sizes: list[int]) -> torch.Tensor:
        """(M, K) rows in groups of `sizes` -> (M, N), group g times weight[g]^T, in FP8. `name` keys
        the weight's cache. The output is in the autocast dtype if autocast is on, else x's."""
        device_type = x.device.type
        out_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        return grouped_float8_linear(x, weight, sizes, self, name, out_dtype)


def _stack(qs: list[Quantized]) -> StackedOperands:
    return StackedOperands(torch.stack([q.data for q in qs]), torch.stack([q.scale_inv for q in qs]), qs[0].kind)


@torch.compiler.disable  # group sizes are Python ints and the weight cache Python state: run eagerly
def grouped_float8_linear(x: torch.Tensor, weight: torch.Tensor, sizes: list[int], experts: Float8Experts,
                          name: str, out_dtype: torch.dtype) -> torch.Tensor:
    with torch.autocast(x.device.type, enabled=False):
        return _GroupedFloat8LinearFn.apply(x, weight, list(sizes), experts, name, out_dtype)


def _spans(sizes: list[int]) -> list[tuple[int, slice]]:
    """(expert, its rows) for every non-empty group."""
    ends = itertools.accumulate(sizes)
    return [(g, slice(end - n, end)) for g, (n, end) in enumerate(zip(sizes, ends)) if n]


class _GroupedFloat8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, sizes: list[int], experts: Float8Experts, name: str,
                out_dtype: torch.dtype) -> torch.Tensor:
        need_dgrad, need_wgrad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        spans = _spans(sizes)
        w_rows, w_t = experts.quantized_weight(name, weight, need_t=need_dgrad)
        x_rows, x_t = experts.quantized_input(x, sizes, need_t=need_wgrad)
        y = grouped_mm(x_rows, w_rows, spans, x.shape[0], out_dtype, fast_accum=True)
        ctx.experts, ctx.spans, ctx.x_dtype, ctx.w_dtype = experts, spans, x.dtype, weight.dtype
        ctx.w_t = w_t  # the cached copy, not a tensor of this graph; the same object backward reads
        ctx.x_t_kind = x_t[0].kind if x_t else None
        ctx.save_for_backward(*(t for q_t in x_t or () for t in (q_t.data, q_t.scale_inv)))
        ctx.w_shape = weight.shape
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        need_dgrad, need_wgrad = ctx.needs_input_grad[:2]
        dy = dy.contiguous()
        saved = ctx.saved_tensors
        experts, spans = ctx.experts, ctx.spans
        dy_copies = [experts.quantize("grad_output", _pad_rows(dy[rows]), need_rows=need_dgrad, need_t=need_wgrad)
                     for _, rows in spans]
        dx = dw = None
        if need_dgrad:
            dx = grouped_mm([q for q, _ in dy_copies], ctx.w_t, spans, dy.shape[0], ctx.x_dtype)
        if need_wgrad:
            dw = dy.new_zeros(ctx.w_shape, dtype=ctx.w_dtype)  # an expert without rows gets no gradient
            for i, (g, _) in enumerate(spans):
                x_t = Quantized(saved[2 * i], saved[2 * i + 1], ctx.x_t_kind)
                dw[g] = scaled_mm(dy_copies[i][1], x_t, ctx.w_dtype)
        return dx, dw, None, None, None, None


def grouped_mm(a_groups: list[Quantized], b: StackedOperands, spans: list[tuple[int, slice]], rows: int,
               out_dtype: torch.dtype, fast_accum: bool = False) -> torch.Tensor:
    """(rows, N): the rows of each span, a_groups[i] (padded to 16 rows, quantized along K), times
    b[g]^T (N, K). One `torch._scaled_grouped_mm` where it applies, else one `scaled_mm` per group."""
    if spans and _grouped_applies(a_groups, b, out_dtype):
        return _grouped_scaled_mm(a_groups, b, spans, fast_accum)
    out = torch.zeros(rows, b.data.shape[1], dtype=out_dtype, device=b.data.device)
    for (g, span), a in zip(spans, a_groups):
        out[span] = scaled_mm(a, b[g], out_dtype, fast_accum=fast_accum)[:span.stop - span.start]
    return out


def _grouped_applies(a_groups: list[Quantized], b: StackedOperands, out_dtype: torch.dtype) -> bool:
    a = a_groups[0]
    return (out_dtype == torch.bfloat16 and a.kind in GROUPED_KINDS and b.kind in GROUPED_KINDS
            and a.data.dtype == b.data.dtype == E4M3.dtype and scaled_grouped_mm_works(a.data.device))


def _grouped_scaled_mm(a_groups: list[Quantized], b: StackedOperands, spans: list[tuple[int, slice]],
                       fast_accum: bool) -> torch.Tensor:
    """One grouped GEMM over every group: the groups' codes side by side (pad rows dropped), each
    row's scale expanded from its group's (tensorwise) or its own (rowwise); empty experts' weights
    sit in `b` and get an empty group."""
    sizes = [0] * b.data.shape[0]
    for g, span in spans:
        sizes[g] = span.stop - span.start
    data = torch.cat([a.data[:sizes[g]] for (g, _), a in zip(spans, a_groups)])
    scales = torch.cat([a.scale_inv.reshape(-1).expand(sizes[g]) if a.kind == "tensor" else a.scale_inv[:sizes[g], 0]
                        for (g, _), a in zip(spans, a_groups)])
    ends = torch.tensor(sizes, device=data.device).cumsum(0).to(torch.int32)
    return torch._scaled_grouped_mm(data, b.data.transpose(-2, -1), scales.contiguous(), b.row_scales(), offs=ends,
                                    out_dtype=torch.bfloat16, use_fast_accum=fast_accum)


@functools.cache
def scaled_grouped_mm_works(device: torch.device) -> bool:
    """Whether `torch._scaled_grouped_mm` exists here and matches the per-group `scaled_mm` on
    `device` to 1% (bf16 output rounding stays far below), rowwise e4m3 scales with uneven groups
    and an empty one, with and without fast accumulation; probed once per device (the CUDA kernel
    needs Hopper-class GPUs; CPU builds have none)."""
    if not hasattr(torch, "_scaled_grouped_mm"):
        return False
    gen = torch.Generator().manual_seed(0)
    experts = Float8Experts("rowwise")
    x = torch.randn(48, 32, generator=gen).to(device)  # groups of 5 and 43 rows: offsets off any alignment
    w = _stack([experts.quantize("weight", torch.randn(16, 32, generator=gen).to(device), need_rows=True,
                                 need_t=False)[0] for _ in range(3)])
    spans = [(0, slice(0, 5)), (2, slice(5, 48))]  # expert 1 gets no row
    a_groups = [experts.quantize("input", _pad_rows(x[rows]), need_rows=True, need_t=False)[0] for _, rows in spans]
    want = torch.cat([scaled_mm(a, w[g], torch.float32)[:rows.stop - rows.start]
                      for (g, rows), a in zip(spans, a_groups)])
    for fast_accum in (False, True):  # the gradient GEMM's setting, and the forward's
        try:
            got = _grouped_scaled_mm(a_groups, w, spans, fast_accum=fast_accum).float()
        except (RuntimeError, NotImplementedError, ValueError):
            return False
        if not (got - want).abs().amax() < 1e-2 * want.abs().amax():
            return False
    return True
