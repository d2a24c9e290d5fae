"""The FP8 GEMM `a @ b.T` of two quantized operands, whatever their scale granularity.

Per-tensor and per-row scales go through `torch._scaled_mm` on accelerators (cuBLASLt on NVIDIA
GPUs): `a.data` row-major and `b.data.t()` column-major is exactly the layout it wants, and it
writes the result in the dtype asked for (bf16 under autocast) with no separate cast pass. On CPU
`dequantized_mm` computes what torch's own CPU emulation of `_scaled_mm` does, bit for bit: on CPUs
with AMX torch hands `_scaled_mm` to oneDNN instead, whose FP8 matmul there is a reference loop
about a hundred times slower, and whose sums then differ from one CPU to the next. `fast_accum` lets the tensor cores accumulate without periodic FP32
promotion; like torchao, the forward GEMM uses it and the two gradient GEMMs do not.

Blockwise scales (1x128 tiles times 128x128 blocks or 1x128 tiles) also go through
`torch._scaled_mm` where cuBLASLt takes them (CUDA 12.9 and later on Hopper): it promotes each
128-long K-slice to FP32 itself. Whether it does is probed once per device, scale kind and output
dtype, on operands whose scales span orders of magnitude, against the reference; everywhere else
(CPU, older builds, shapes not in whole 128-blocks) the Triton kernel `kernels.blockwise_mm` does
the same math.
"""

from __future__ import annotations

from typing import Optional

import torch

from angelptm.fp8.formats import E4M3
from angelptm.fp8.kernels import blockwise_mm, blockwise_mm_reference, cast_blocks, cast_tiles
from angelptm.fp8.scaling import BLOCK, Quantized

# (device type, Quantized.kind, out dtype) -> whether torch._scaled_mm accepts it here.
_SUPPORTED: dict[tuple, bool] = {}
# (device, kind of b, out dtype) -> whether torch._scaled_mm computes blockwise GEMMs correctly here.
_NATIVE_BLOCKWISE: dict[tuple, bool] = {}


def scaled_mm(a: Quantized, b: Quantized, out_dtype: torch.dtype, *, fast_accum: bool = False,
              backend: Optional[str] = None) -> torch.Tensor:
    """(M, N) = a (M, K) @ b (N, K)^T, dequantized, in `out_dtype`. `backend` forces the blockwise
    GEMM's Triton kernel ("triton") or reference ("torch") instead of cuBLASLt."""
    if a.kind == "tile":
        if backend is None and _whole_blocks(a, b) and native_blockwise(a.data.device, b.kind, out_dtype):
            return blockwise_scaled_mm(a, b, out_dtype)
        return blockwise_mm(a, b, out_dtype, backend)
    if a.data.device.type == "cpu":
        return dequantized_mm(a, b, out_dtype)
    scale_b = b.scale_inv.reshape(1, -1) if b.kind == "row" else b.scale_inv
    if _accepts(a.data.device, a.kind, out_dtype):
        return torch._scaled_mm(a.data, b.data.t(), a.scale_inv, scale_b, out_dtype=out_dtype,
                                use_fast_accum=fast_accum)
    out = torch._scaled_mm(a.data, b.data.t(), a.scale_inv, scale_b, out_dtype=torch.bfloat16,
                           use_fast_accum=fast_accum)
    return out.to(out_dtype)


def dequantized_mm(a: Quantized, b: Quantized, out_dtype: torch.dtype) -> torch.Tensor:
    """a @ b.T for per-tensor or per-row scales as torch emulates `_scaled_mm` on CPU: both operands
    dequantized to float32 (a row's scale is a (rows, 1) column), one float32 GEMM, one cast.
    Autocast stays out: the GEMM is float32 whatever the region, as `_scaled_mm`'s would be."""
    with torch.autocast(a.data.device.type, enabled=False):
        out = (a.data.float() * a.scale_inv) @ (b.data.float() * b.scale_inv).t()
    return out.to(out_dtype)


def blockwise_scaled_mm(a: Quantized, b: Quantized, out_dtype: torch.dtype) -> torch.Tensor:
    """a (M, K) 1x128-tiled @ b (N, K)^T 128x128-blocked or 1x128-tiled through `torch._scaled_mm`.

    cuBLASLt reads tile scales column-major (stride (1, rows)), as the casts lay them out, and b's
    blocks as those of the column-major (K, N) operand, a transposed view: nothing is copied
    unless a scale comes laid out otherwise. Fast accumulation is not offered with blockwise scales.
    """
    scale_a = a.scale_inv.t().contiguous().t()
    scale_b = b.scale_inv.contiguous().t() if b.kind == "block" else b.scale_inv.t().contiguous()
    return torch._scaled_mm(a.data, b.data.t(), scale_a, scale_b, out_dtype=out_dtype)


def _whole_blocks(a: Quantized, b: Quantized) -> bool:
    """cuBLASLt's blockwise modes get whole 128-blocks, and K in whole groups of four: torch
    versions differ on whether a 128x128 scale's rows are padded to 16 bytes, which then is moot."""
    (m, k), n = a.shape, b.shape[0]
    return m % BLOCK == 0 and n % BLOCK == 0 and k % (4 * BLOCK) == 0


@torch.compiler.assume_constant_result  # a compiled graph asks once, while tracing, and keeps the answer
def native_blockwise(device: torch.device, b_kind: str, out_dtype: torch.dtype) -> bool:
    """Whether `torch._scaled_mm` does 1x128-by-`b_kind` blockwise GEMMs on `device`, right.

    Probed once: an operand pair whose tile and block scales range over 2^-12..2^12, so a scale
    read from the wrong place shows, against the reference; rows must agree to 1% (bf16 output
    rounding and Hopper's FP8 accumulation within a slice stay far below).
    """
    key = (device, b_kind, out_dtype)
    if key not in _NATIVE_BLOCKWISE:
        a, b = _spread_operands(device, b_kind)
        try:
            got = blockwise_scaled_mm(a, b, out_dtype).float()
        except (RuntimeError, ValueError):  # this build or device has no blockwise scaling
            _NATIVE_BLOCKWISE[key] = False
        else:
            want = blockwise_mm_reference(a, b, torch.float32)
            row_err = (got - want).abs().amax(dim=1) / want.abs().amax(dim=1)
            _NATIVE_BLOCKWISE[key] = bool(row_err.max() < 1e-2)
    return _NATIVE_BLOCKWISE[key]


def _spread_operands(device: torch.device, b_kind: str) -> tuple[Quantized, Quantized]:
    """A (256, 512) 1x128-tiled operand and a (384, 512) `b_kind` one, every tile or block of them
    2^-12..2^12 times the size of the next."""
    gen = torch.Generator(device=device).manual_seed(0)

    def spread(rows: int, cols: int, block_rows: int) -> torch.Tensor:
        mags = torch.randint(-12, 13, (rows // block_rows, cols // BLOCK), generator=gen, device=device)
        mags = mags.repeat_interleave(block_rows, 0).repeat_interleave(BLOCK, 1)
        return torch.randn(rows, cols, generator=gen, device=device) * torch.exp2(mags.float())
    a = cast_tiles(spread(256, 4 * BLOCK, 1), E4M3, backend="torch")[0]
    if b_kind == "block":
        return a, cast_blocks(spread(384, 4 * BLOCK, BLOCK), E4M3, backend="torch")[0]
    return a, cast_tiles(spread(384, 4 * BLOCK, 1), E4M3, backend="torch")[0]


@torch.compiler.assume_constant_result  # a compiled graph asks once, while tracing, and keeps the answer
def _accepts(device: torch.device, kind: str, out_dtype: torch.dtype) -> bool:
    """Probe once whether this build's `_scaled_mm` gives `out_dtype` for this scaling kind.

    cuBLASLt's rowwise path only writes bf16 in some torch versions; there a float32 result is
    computed in bf16 and widened.
    """
    key = (device.type, kind, out_dtype)
    if key not in _SUPPORTED:
        a = torch.zeros(16, 16, device=device).to(torch.float8_e4m3fn)
        scale_a = torch.ones(16, 1, device=device) if kind == "row" else torch.ones((), device=device)
        scale_b = scale_a.reshape(1, -1) if kind == "row" else scale_a
        try:
            torch._scaled_mm(a, a.t(), scale_a, scale_b, out_dtype=out_dtype)
            _SUPPORTED[key] = True
        except RuntimeError:
            _SUPPORTED[key] = False
    return _SUPPORTED[key]
