"""`Float8Linear`: an `nn.Linear` whose three GEMMs (forward, input gradient, weight gradient) run in FP8.

For y = x W^T + b with x (M, K), W (N, K), dy (M, N), every GEMM is `a @ b.T` of two operands
quantized along the contracted dimension (see `scaling.py`):

    forward      y  = x      @ W^T          a = x   (M, K),  b = W   (N, K)
    input grad   dx = dy     @ W            a = dy  (M, N),  b = W^T (K, N)
    weight grad  dW = dy^T   @ x            a = dy^T (N, M), b = x^T (K, M)

so each of x, W and dy is quantized twice, once per GEMM it feeds; for the tensorwise, delayed
and rowwise recipes both copies come out of one pass over the tensor. The forward
keeps only the FP8 x^T for the backward, not x itself.

The FP8 copies of the weight are cast once per optimizer step and reused by every microbatch;
no second full-precision copy of the weight is kept. A weight's version counter cannot tell
when it changed (fused optimizers, and foreach ones in some torch versions, update parameters
without bumping it), so the cache is dropped explicitly: by a global optimizer step post-hook,
registered with the first `Float8Linear`, that clears the cache of every live layer after any
`torch.optim.Optimizer` step (ZeROCache's included); by `update_float8_scales(model)`, which a
training loop calls once per step whatever its optimizer; and by `refresh_weight()`. Between
steps the cache is also keyed on the weight's version and storage, which catches in-place
edits such as `load_state_dict`. The master weight stays in its own dtype, so under autocast an FP32 weight
goes straight to FP8. Under `torch.compile` there is no cache: the graph casts the weight on every
call; a layer with a `weight_source` (below) runs eagerly between compiled graphs.

Layers that read the same tensor (wq, wk and wv; w1 and w3) cast it once: the last input cast is
kept, keyed on the tensor itself, its version, the recipe and the amax groups, which fix the codes
(`_LastInputCast`). All of them then save the same FP8 copy for their weight gradients. Delayed
scaling keeps a scale per layer, so each of its layers casts for itself, as does every layer under
`torch.compile`, where the graph keeps no cache.

Sharded layouts plug in from outside: a tensor-parallel wrapper hands a shard as the weight and
the tp group in `amax_groups.weight`, so every shard is scaled like the whole weight. A layer can
also be given its FP8 weight ready-made (`weight_source`): ZeRO-3 gathers the weight already cast
(FP8 all-gather), so the layer asks for the forward copy in forward and for the transposed copy in
backward, when the gatherer holds each, and keeps neither in between.
"""

from __future__ import annotations

import weakref
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from angelptm.errors import UserError
from angelptm.fp8 import kernels
from angelptm.fp8.delayed import DelayedScale
from angelptm.fp8.gemm import scaled_mm
from angelptm.fp8.scaling import (AmaxGroups, BlockwiseRecipe, DelayedRecipe, Float8Recipe, Quantized,
                                  RowwiseRecipe, recipe_from_name)

ROLES = ("input", "weight", "grad_output")
_ALIGN = 16  # FP8 GEMMs need every dimension, the contracted one included, to be a multiple of 16

_LIVE_LAYERS: "weakref.WeakSet[Float8Linear]" = weakref.WeakSet()
_step_hook = None


def _drop_weight_caches(optimizer, args, kwargs) -> None:
    """Optimizer step post-hook: after any step every FP8 weight copy may be stale."""
    for layer in list(_LIVE_LAYERS):
        layer.refresh_weight()


def _track(layer: "Float8Linear") -> None:
    global _step_hook
    _LIVE_LAYERS.add(layer)
    if _step_hook is None:
        _step_hook = register_optimizer_step_post_hook(_drop_weight_caches)


class Float8Linear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 recipe: str | Float8Recipe = "tensorwise", amax_groups: Optional[AmaxGroups] = None,
                 device=None, dtype=None):
        if in_features % _ALIGN or out_features % _ALIGN:
            raise UserError(f"Float8Linear needs in_features and out_features divisible by {_ALIGN}, "
                            f"got {in_features}x{out_features}; keep this layer in full precision")
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.recipe = recipe_from_name(recipe)
        self.amax_groups = amax_groups or AmaxGroups()
        if isinstance(self.recipe, (RowwiseRecipe, BlockwiseRecipe)) and any(
                getattr(self.amax_groups, role) for role in ROLES):
            raise UserError(f"amax_groups apply to the tensorwise and delayed recipes, not {self.recipe.name}")
        self._init_scaling_state(device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: str | Float8Recipe = "tensorwise",
                    amax_groups: Optional[AmaxGroups] = None) -> "Float8Linear":
        """Wrap an existing layer, sharing its parameters (optimizers keep tracking them)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, recipe=recipe,
                  amax_groups=amax_groups, device="meta")
        new.weight = linear.weight
        new.bias = linear.bias
        new._init_scaling_state(linear.weight.device)
        return new

    def __setstate__(self, state) -> None:
        # Copies and unpickled layers skip __init__ but need their cache dropped on optimizer steps too.
        super().__setstate__(state)
        _track(self)

    def _init_scaling_state(self, device) -> None:
        """Delayed scaling keeps one `DelayedScale` per operand role as a submodule (so in state_dict)."""
        self._weight_cache: Optional[tuple] = None
        # transposed -> the FP8 weight: (out, in) quantized along in, or its (in, out) transpose
        # quantized along out. Set by whoever holds the weight in FP8 already (see the module doc).
        self.weight_source: Optional[Callable[[bool], Quantized]] = None
        _track(self)
        if not isinstance(self.recipe, DelayedRecipe):
            return
        r = self.recipe
        formats = {"input": r.input_format, "weight": r.weight_format, "grad_output": r.grad_format}
        for role in ROLES:
            state = DelayedScale(formats[role], r.amax_history_len, r.margin, r.power_of_two_scales, r.amax_floor,
                                 groups=getattr(self.amax_groups, role), device=device)
            setattr(self, f"{role}_scale", state)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe.name}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        out_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        apply = _Float8LinearFn.apply if self.weight_source is None else _apply_with_weight_source
        with torch.autocast(device_type, enabled=False):
            return apply(x, self.weight, self.bias, self, out_dtype)

    # ------------------------------------------------------------------------------------------

    def quantize(self, role: str, x: torch.Tensor, *, need_rows: bool, need_t: bool
                 ) -> tuple[Optional[Quantized], Optional[Quantized]]:
        """Quantize the 2-D operand `x` playing `role`: the copy quantized along its rows' length
        (`need_rows`) and the transposed copy quantized along its columns (`need_t`)."""
        recipe = self.recipe
        fmt = {"input": recipe.input_format, "weight": recipe.weight_format, "grad_output": recipe.grad_format}[role]
        opts = dict(power_of_two=recipe.power_of_two_scales, amax_floor=recipe.amax_floor)
        if isinstance(recipe, RowwiseRecipe):
            return kernels.cast_rowwise(x, fmt, rows=need_rows, transpose=need_t, **opts)
        if isinstance(recipe, BlockwiseRecipe):
            if role == "weight":
                return kernels.cast_blocks(x, fmt, transpose=need_t, **opts)
            return kernels.cast_tiles(x, fmt, rows=need_rows, transpose=need_t, **opts)
        if isinstance(recipe, DelayedRecipe):
            state: DelayedScale = getattr(self, f"{role}_scale")
            return kernels.cast_tensorwise(x, fmt, scale=state.scale if state.ready else None, rows=need_rows,
                                           transpose=need_t, record_amax=state.current_amax,
                                           amax_groups=state.groups, **opts)
        return kernels.cast_tensorwise(x, fmt, rows=need_rows, transpose=need_t,
                                       amax_groups=getattr(self.amax_groups, role), **opts)

    def quantized_input(self, x: torch.Tensor, need_t: bool) -> tuple[Quantized, Optional[Quantized]]:
        """The FP8 copies of x as a 2-D operand (tokens padded to a multiple of 16, features), shared
        with the previous FP8 layer when it cast the same tensor (see the module doc)."""
        def cast():
            tokens = x.numel() // x.shape[-1]
            return self.quantize("input", _pad_rows(x.reshape(tokens, x.shape[-1])), need_rows=True, need_t=need_t)
        if (isinstance(self.recipe, DelayedRecipe) or torch.compiler.is_compiling()  # a graph keeps no cache
                or x.is_inference()):  # inference tensors have no version to key on
            return cast()
        key = (x._version, self.recipe, self.amax_groups.input)
        copies = _last_input.get(x, key, need_t)
        if copies is None:
            copies = cast()
            _last_input.put(x, key, copies)
        return copies

    def quantized_weight(self, need_t: bool) -> tuple[Quantized, Optional[Quantized]]:
        """The weight's FP8 copies, cast at most once per weight update."""
        w = self.weight
        if torch.compiler.is_compiling():
            # A cache is Python state a graph cannot keep; compiled, the cast costs about one read of w.
            return self.quantize("weight", w.detach(), need_rows=True, need_t=need_t)
        key = (w._version, w.data_ptr())
        cache = self._weight_cache
        if cache is None or cache[0] != key or (need_t and cache[2] is None):
            rows, t = self.quantize("weight", w.detach(), need_rows=True, need_t=need_t)
            cache = self._weight_cache = (key, rows, t)
        return cache[1], cache[2]

    def refresh_weight(self) -> None:
        """Drop the cached FP8 weight; the next forward casts the weight again."""
        self._weight_cache = None


class _LastInputCast:
    """The FP8 copies of the last input cast, until that tensor is freed or another is cast."""

    def __init__(self):
        self._entry: Optional[tuple] = None  # (weakref to the input, key, row-major copy, transposed copy)

    def get(self, x: torch.Tensor, key: tuple, need_t: bool) -> Optional[tuple]:
        entry = self._entry
        if entry is None or entry[0]() is not x or entry[1] != key or (need_t and entry[3] is None):
            return None
        return entry[2], entry[3]

    def put(self, x: torch.Tensor, key: tuple, copies: tuple) -> None:
        self._entry = (weakref.ref(x, self._forget), key, *copies)

    def _forget(self, ref: weakref.ref) -> None:
        if self._entry is not None and self._entry[0] is ref:
            self._entry = None


_last_input = _LastInputCast()


@torch.compiler.disable  # the gathered weight comes from Python state a graph cannot follow: run eagerly
def _apply_with_weight_source(*args) -> torch.Tensor:
    return _Float8LinearFn.apply(*args)


def _pad_rows(x: torch.Tensor) -> torch.Tensor:
    """Zero rows up to a multiple of 16: the token count is the contracted dimension of the
    weight-gradient GEMM. Zero rows add nothing to any product."""
    extra = -x.shape[0] % _ALIGN
    return F.pad(x, (0, 0, 0, extra)) if extra else x


def _unpad_rows(y: torch.Tensor, tokens: int) -> torch.Tensor:
    return y if y.shape[0] == tokens else y[:tokens]


def _tensors(q: Optional[Quantized]) -> tuple:
    return (None, None) if q is None else (q.data, q.scale_inv)


def _operand(data: Optional[torch.Tensor], scale_inv: Optional[torch.Tensor], kind: str) -> Optional[Quantized]:
    return None if data is None else Quantized(data, scale_inv, kind)


class _Float8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], layer: Float8Linear,
                out_dtype: torch.dtype) -> torch.Tensor:
        need_dgrad, need_wgrad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        lead, tokens = x.shape[:-1], x.numel() // x.shape[-1]
        source = layer.weight_source
        if source is None:
            w_rows, w_t = layer.quantized_weight(need_t=need_dgrad)
        else:  # the transposed copy is asked for in backward
            w_rows, w_t = source(False), None
        x_rows, x_t = layer.quantized_input(x, need_t=need_wgrad)
        y = _unpad_rows(scaled_mm(x_rows, w_rows, out_dtype, fast_accum=True), tokens)
        if bias is not None:
            y = y + bias.to(out_dtype)
        ctx.layer, ctx.tokens, ctx.x_shape, ctx.x_dtype = layer, tokens, x.shape, x.dtype
        ctx.source = source
        ctx.grad_dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        ctx.kinds = (w_t.kind if w_t is not None else None, x_t.kind if x_t is not None else None)
        ctx.save_for_backward(*_tensors(w_t), *_tensors(x_t))
        return y.view(*lead, weight.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        w_t_data, w_t_scale, x_t_data, x_t_scale = ctx.saved_tensors
        need_dgrad, need_wgrad, need_bgrad = ctx.needs_input_grad[:3]
        dy2d = dy.reshape(ctx.tokens, dy.shape[-1])
        dy_rows, dy_t = ctx.layer.quantize("grad_output", _pad_rows(dy2d), need_rows=need_dgrad, need_t=need_wgrad)
        dx = dw = db = None
        if need_dgrad:
            w_t = _operand(w_t_data, w_t_scale, ctx.kinds[0]) if ctx.source is None else ctx.source(True)
            dx = _unpad_rows(scaled_mm(dy_rows, w_t, ctx.x_dtype), ctx.tokens).view(ctx.x_shape)
        if need_wgrad:
            x_t = _operand(x_t_data, x_t_scale, ctx.kinds[1])
            dw = scaled_mm(dy_t, x_t, ctx.grad_dtypes[0])
        if need_bgrad:
            db = dy2d.sum(0, dtype=torch.float32).to(ctx.grad_dtypes[1])
        return dx, dw, db, None, None
