"""The FP8 quantization passes, each either a Triton kernel or its torch reference.

`cast_tensorwise` (fused amax + scale + cast, optionally emitting the transposed copy from the
same read), `cast_groups` (per row, or per 1x128 tile, along either dimension) and `cast_blocks`
(128x128) return `Quantized` operands ready for `gemm.scaled_mm`; `blockwise_mm` is the GEMM of
the blockwise recipe.

Which implementation runs: `backend="triton"` or `"torch"` forces one; the default `"auto"`
(or the environment variable ANGELPTM_FP8_BACKEND) uses the kernels for CUDA tensors and the
references elsewhere. Forcing "triton" on CPU tensors needs TRITON_INTERPRET=1 set before
triton is imported; the tests do that to hold each kernel to its reference bit for bit.
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Optional, Sequence

import torch

from angelptm.errors import UserError
from angelptm.fp8 import scaling
from angelptm.fp8.formats import Fp8Format
from angelptm.fp8.scaling import BLOCK, Quantized, all_reduce_max

BACKENDS = ("auto", "triton", "torch")
_HAVE_TRITON = importlib.util.find_spec("triton") is not None
_MAX_AMAX_PROGRAMS = 1024  # amax partials; the cast kernel reduces them all in one block
_AMAX_BLOCK = 4096


def use_triton(x: torch.Tensor, backend: Optional[str] = None) -> bool:
    backend = backend or os.environ.get("ANGELPTM_FP8_BACKEND", "auto")
    if backend not in BACKENDS:
        raise UserError(f"ANGELPTM_FP8_BACKEND must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "triton":
        if not _HAVE_TRITON:
            raise UserError("fp8 backend 'triton' needs the triton package; install it or use backend 'torch'")
        return True
    return x.is_cuda and _HAVE_TRITON


def _tk():
    from angelptm.fp8 import triton_kernels
    return triton_kernels


def _format_args(fmt: Fp8Format) -> dict:
    return dict(FMAX=fmt.max, MANT=fmt.mantissa_bits, MIN_EXP=fmt.min_normal_exp)


def amax(x: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """max |x| as a 0-dim FP32 tensor."""
    if not use_triton(x, backend):
        return x.abs().amax().float()
    return _amax_partials(x.contiguous()).amax()


def _amax_partials(x: torch.Tensor) -> torch.Tensor:
    n = x.numel()
    programs = max(1, min(math.ceil(n / _AMAX_BLOCK), _MAX_AMAX_PROGRAMS))
    partials = torch.empty(programs, dtype=torch.float32, device=x.device)
    _tk().amax_partials_kernel[(programs,)](x, partials, n, BLOCK=_AMAX_BLOCK, num_warps=8)
    return partials


def cast_tensorwise(x: torch.Tensor, fmt: Fp8Format, *, scale: Optional[torch.Tensor] = None,
                    power_of_two: bool = False, amax_floor: float = 1e-12, transpose: bool = False,
                    record_amax: Optional[torch.Tensor] = None, amax_groups: Sequence = (),
                    backend: Optional[str] = None) -> tuple[Quantized, Optional[Quantized]]:
    """One scale for the 2-D tensor x; see `scaling.quantize_tensorwise` for the arguments."""
    if not use_triton(x, backend):
        return scaling.quantize_tensorwise(x, fmt, scale=scale, power_of_two=power_of_two, amax_floor=amax_floor,
                                           transpose=transpose, record_amax=record_amax, amax_groups=amax_groups)
    x = x.contiguous()
    rows, cols = x.shape
    out = torch.empty((rows, cols), dtype=fmt.dtype, device=x.device)
    out_t = torch.empty((cols, rows), dtype=fmt.dtype, device=x.device) if transpose else out
    scale_inv = torch.empty((), dtype=torch.float32, device=x.device)
    if scale is None:
        source = all_reduce_max(_amax_partials(x), amax_groups)
    else:
        source = scale
    block_r, block_c = 64, 64
    grid = (cdiv(rows, block_r), cdiv(cols, block_c))
    _tk().cast_tensorwise_kernel[grid](
        x, out, out_t, source, scale_inv, record_amax if record_amax is not None else scale_inv,
        rows, cols, x.stride(0), source.numel(), amax_floor,
        FROM_AMAX=scale is None, POW2=power_of_two, WRITE_T=transpose, RECORD_AMAX=record_amax is not None,
        SRC_BLOCK=max(16, next_pow2(source.numel())), BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
        **_format_args(fmt))
    q = Quantized(out, scale_inv, "tensor")
    return q, (Quantized(out_t, scale_inv, "tensor") if transpose else None)


def cast_groups(x: torch.Tensor, fmt: Fp8Format, *, group: Optional[int], dim: int, power_of_two: bool = False,
                amax_floor: float = 1e-12, backend: Optional[str] = None) -> Quantized:
    """Scales per `group` elements along `dim` (rowwise when group is None); dim=0 returns the
    transposed operand. See `scaling.quantize_groups`."""
    if not use_triton(x, backend):
        return scaling.quantize_groups(x, fmt, group=group, dim=dim, power_of_two=power_of_two,
                                       amax_floor=amax_floor)
    src = x.t() if dim == 0 else x
    rows, cols = src.shape
    out = torch.empty((rows, cols), dtype=fmt.dtype, device=x.device)
    opts = dict(POW2=power_of_two, **_format_args(fmt))
    # Tiles are long on the input's contiguous dimension so loads coalesce.
    contiguous_cols = src.stride(1) == 1
    if group is None:
        amax = torch.zeros(rows, dtype=torch.float32, device=x.device)
        scale_inv = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
        block_r, block_c = (16, 128) if contiguous_cols else (128, 16)
        grid = (cdiv(rows, block_r), cdiv(cols, block_c))
        strides = (src.stride(0), src.stride(1))
        _tk().row_amax_kernel[grid](src, amax, rows, cols, *strides, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
        _tk().cast_rows_kernel[grid](src, out, amax, scale_inv, rows, cols, *strides, amax_floor,
                                     BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4, **opts)
        return Quantized(out, scale_inv, "row")
    if group != BLOCK:
        raise ValueError(f"tile groups are {BLOCK} long, got {group}")
    n_groups = cdiv(cols, BLOCK)
    scale_inv = torch.empty((rows, n_groups), dtype=torch.float32, device=x.device)
    block_r = 16 if contiguous_cols else 64
    _tk().cast_tiles_kernel[(cdiv(rows, block_r), n_groups)](
        src, out, scale_inv, rows, cols, src.stride(0), src.stride(1), n_groups, amax_floor,
        BLOCK_R=block_r, GROUP=BLOCK, num_warps=4, **opts)
    return Quantized(out, scale_inv, "tile")


def cast_blocks(x: torch.Tensor, fmt: Fp8Format, *, transpose: bool = False, power_of_two: bool = False,
                amax_floor: float = 1e-12, backend: Optional[str] = None) -> tuple[Quantized, Optional[Quantized]]:
    """One scale per 128x128 block, with the transposed copy on request. See `scaling.quantize_blocks`."""
    if not use_triton(x, backend):
        return scaling.quantize_blocks(x, fmt, transpose=transpose, power_of_two=power_of_two,
                                       amax_floor=amax_floor)
    x = x.contiguous()
    rows, cols = x.shape
    nr, nc = cdiv(rows, BLOCK), cdiv(cols, BLOCK)
    out = torch.empty((rows, cols), dtype=fmt.dtype, device=x.device)
    out_t = torch.empty((cols, rows), dtype=fmt.dtype, device=x.device) if transpose else out
    scale_inv = torch.empty((nr, nc), dtype=torch.float32, device=x.device)
    _tk().cast_blocks_kernel[(nr, nc)](
        x, out, out_t, scale_inv, rows, cols, x.stride(0), nc, amax_floor,
        POW2=power_of_two, WRITE_T=transpose, BLOCK=BLOCK, num_warps=8, **_format_args(fmt))
    q = Quantized(out, scale_inv, "block")
    return q, (Quantized(out_t, scale_inv.t().contiguous(), "block") if transpose else None)


def blockwise_mm(a: Quantized, b: Quantized, out_dtype: torch.dtype, backend: Optional[str] = None) -> torch.Tensor:
    """a (M, K) @ b (N, K)^T for 1x128-tiled `a` and 1x128- or 128x128-scaled `b`, promoting each
    128-long K-slice's partial sum to FP32 and scaling it there."""
    if not use_triton(a.data, backend):
        return blockwise_mm_reference(a, b, out_dtype)
    m, k = a.shape
    n = b.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=a.data.device)
    block_m, block_n = 128, 128
    grid = (cdiv(m, block_m) * cdiv(n, block_n),)
    _tk().blockwise_gemm_kernel[grid](
        a.data, b.data, out, a.scale_inv, b.scale_inv, m, n, k, cdiv(k, BLOCK),
        B_ROW_BLOCK=b.block[0], BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK, GROUP_M=8,
        num_warps=8, num_stages=3)
    return out


def blockwise_mm_reference(a: Quantized, b: Quantized, out_dtype: torch.dtype) -> torch.Tensor:
    """The same math as the kernel: exact FP8 products summed in FP32 per K-slice, then scaled."""
    m, k = a.shape
    n = b.shape[0]
    scale_b = b.scale_inv.repeat_interleave(b.block[0], dim=0)[:n]
    out = torch.zeros((m, n), dtype=torch.float32, device=a.data.device)
    for kb in range(math.ceil(k / BLOCK)):
        ks = slice(kb * BLOCK, (kb + 1) * BLOCK)
        partial = a.data[:, ks].float() @ b.data[:, ks].float().t()
        out += partial * (a.scale_inv[:, kb, None] * scale_b[None, :, kb])
    return out.to(out_dtype)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
