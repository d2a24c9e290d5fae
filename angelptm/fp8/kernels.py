"""The FP8 quantization passes, each either a Triton kernel or its torch reference.

`cast_tensorwise` (one scale; current or given), `cast_rowwise` (one scale per row for the
row-major copy, per column for the transposed copy) and `cast_tiles` (1x128 tiles along the rows
for the row-major copy, along the columns for the transposed one) each emit both FP8 copies a
GEMM operand needs from a single read of the tensor; `cast_tiles` and `cast_blocks` (128x128)
serve the blockwise recipe, whose GEMM is `blockwise_mm`. All return `Quantized` operands ready
for `gemm.scaled_mm`.

On the GPU a cast is at most two launches and never waits for the device: amaxes that must be
known before the cast (current scaling, per-row and per-column scales) come from one torch
reduction kernel each (`torch.linalg.vector_norm(x, inf)`, exact and without an |x| temporary),
which the cast kernel reads on the device; everything else (scales, their reciprocals, the
recorded amax of delayed scaling) happens inside the cast kernel.

Which implementation runs: `backend="triton"` or `"torch"` forces one; the default `"auto"`
(or the environment variable ANGELPTM_FP8_BACKEND) uses the kernels for CUDA tensors and the
references elsewhere. Forcing "triton" on CPU tensors needs TRITON_INTERPRET=1 set before
triton is imported; the tests do that to hold each kernel to its reference bit for bit.

Under `torch.compile` the casts always take the references, which inductor compiles into kernels
fused with the surrounding elementwise work; the blockwise GEMM kernel stays out of the graph and
runs eagerly (where cuBLASLt takes blockwise scales, `gemm.scaled_mm` uses it instead, in the graph).
"""

from __future__ import annotations

import functools
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
HAVE_TRITON = importlib.util.find_spec("triton") is not None
OptionalPair = tuple[Optional[Quantized], Optional[Quantized]]


def use_triton(x: torch.Tensor, backend: Optional[str] = None) -> bool:
    if torch.compiler.is_compiling():
        return False  # inductor turns the references into kernels fused with their neighbours
    backend = backend or os.environ.get("ANGELPTM_FP8_BACKEND", "auto")
    if backend not in BACKENDS:
        raise UserError(f"ANGELPTM_FP8_BACKEND must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "triton":
        if not HAVE_TRITON:
            raise UserError("fp8 backend 'triton' needs the triton package; install it or use backend 'torch'")
        return True
    return x.is_cuda and HAVE_TRITON


def _tk():
    from angelptm.fp8 import triton_kernels
    return triton_kernels


@functools.lru_cache(maxsize=None)
def _format_args(fmt: Fp8Format) -> dict:
    """The kernels' compile-time description of a format (cached: launches are on the hot path)."""
    return dict(FMAX=fmt.max, MANT=fmt.mantissa_bits, MIN_EXP=fmt.min_normal_exp)


def amax(x: torch.Tensor, dim: Optional[int] = None, backend: Optional[str] = None) -> torch.Tensor:
    """max |x| over `dim` (all elements when None) in x's dtype, which holds it exactly."""
    if not use_triton(x, backend):
        return x.abs().amax(dim=dim) if dim is not None else x.abs().amax()
    return torch.linalg.vector_norm(x, float("inf"), dim=dim)


# Tiles of the cast kernel: a transposing cast stores 128-byte column segments of the transposed
# copy; a plain one reads 256-byte row segments. Both leave many programs per SM.
_TILE_T = dict(BLOCK_R=128, BLOCK_C=64, num_warps=8)
_TILE_ROWS = dict(BLOCK_R=32, BLOCK_C=128, num_warps=4)


def _launch_cast(x: torch.Tensor, fmt: Fp8Format, row_src: torch.Tensor, col_src: torch.Tensor, *,
                 per_vector: bool, src_is_scale: bool, rows: bool, transpose: bool,
                 record_amax: Optional[torch.Tensor], power_of_two: bool, amax_floor: float):
    n_rows, n_cols = x.shape
    dev = x.device
    out = torch.empty((n_rows, n_cols), dtype=fmt.dtype, device=dev) if rows else None
    out_t = torch.empty((n_cols, n_rows), dtype=fmt.dtype, device=dev) if transpose else None
    if per_vector:
        row_inv = torch.empty((n_rows, 1), dtype=torch.float32, device=dev) if rows else None
        col_inv = torch.empty((n_cols, 1), dtype=torch.float32, device=dev) if transpose else None
    else:
        row_inv = col_inv = torch.empty((), dtype=torch.float32, device=dev)
    tile = _TILE_T if transpose else _TILE_ROWS
    grid = (cdiv(n_rows, tile["BLOCK_R"]), cdiv(n_cols, tile["BLOCK_C"]))
    # Outputs a launch does not write still need a pointer: any tensor on the device will do.
    _tk().cast_kernel[grid](
        x, _or(out, out_t), _or(out_t, out), row_src, col_src, _or(row_inv, col_inv), _or(col_inv, row_inv),
        _or(record_amax, row_src), n_rows, n_cols, x.stride(0), amax_floor,
        POW2=power_of_two, PER_VECTOR=per_vector, SRC_IS_SCALE=src_is_scale, WRITE_ROWS=rows, WRITE_T=transpose,
        RECORD_AMAX=record_amax is not None, **tile, **_format_args(fmt))
    return out, out_t, row_inv, col_inv


def _or(a: Optional[torch.Tensor], b: torch.Tensor) -> torch.Tensor:
    return a if a is not None else b


def cast_tensorwise(x: torch.Tensor, fmt: Fp8Format, *, scale: Optional[torch.Tensor] = None,
                    power_of_two: bool = False, amax_floor: float = 1e-12, rows: bool = True,
                    transpose: bool = False, record_amax: Optional[torch.Tensor] = None,
                    amax_groups: Sequence = (), backend: Optional[str] = None) -> OptionalPair:
    """One scale for the 2-D tensor x: the row-major copy (`rows`) and the transposed one
    (`transpose`). See `scaling.quantize_tensorwise` for the arguments."""
    if not use_triton(x, backend):
        q, q_t = scaling.quantize_tensorwise(x, fmt, scale=scale, power_of_two=power_of_two, amax_floor=amax_floor,
                                             transpose=transpose, record_amax=record_amax, amax_groups=amax_groups)
        return (q if rows else None), q_t
    x = x.contiguous()
    if scale is None:
        src = amax(x, backend="triton")
        if amax_groups:
            src = all_reduce_max(src.float(), amax_groups)
    else:
        src = scale
    cast = functools.partial(_launch_cast, fmt=fmt, row_src=src, col_src=src, per_vector=False,
                             src_is_scale=scale is not None, power_of_two=power_of_two, amax_floor=amax_floor)
    if transpose and _no_fused_transpose(x):
        # One scale for the whole tensor: the transposed copy is the transpose of the codes.
        out, _, scale_inv, _ = cast(x, rows=True, transpose=False, record_amax=record_amax)
        out_t, out = out.t().contiguous(), (out if rows else None)
    else:
        out, out_t, scale_inv, _ = cast(x, rows=rows, transpose=transpose, record_amax=record_amax)
    return _quantized(out, scale_inv, "tensor"), _quantized(out_t, scale_inv, "tensor")


def _no_fused_transpose(x: torch.Tensor) -> bool:
    """Whether the transposed FP8 copy of x must be made otherwise than by a cast kernel that also
    writes the row-major copy.

    On an H100 (Triton 3.6) the fused cast-and-transpose of the tensorwise and 128x128-block
    kernels wrote wrong FP8 codes for float32 sources at training sizes, while the same kernels'
    row-major copies, and their transposes of bfloat16 sources, were exact. Where one scale covers
    the tensor (or a square block), the transposed copy holds the same codes, so it is a transpose
    of 1-byte codes: a quarter of the bytes of transposing the float32 source, and no second cast.
    1x128 tiles scale the two copies differently: a float32 source gets two single-copy casts.
    """
    return x.dtype == torch.float32


def cast_rowwise(x: torch.Tensor, fmt: Fp8Format, *, rows: bool = True, transpose: bool = False,
                 power_of_two: bool = False, amax_floor: float = 1e-12, backend: Optional[str] = None
                 ) -> OptionalPair:
    """The row-major copy with one scale per row (`rows`) and the transposed copy with one scale
    per column of x (`transpose`), from one read of x. See `scaling.quantize_groups`."""
    if not use_triton(x, backend):
        opts = dict(group=None, power_of_two=power_of_two, amax_floor=amax_floor)
        return (scaling.quantize_groups(x, fmt, dim=1, **opts) if rows else None,
                scaling.quantize_groups(x, fmt, dim=0, **opts) if transpose else None)
    x = x.contiguous()
    row_amax = amax(x, dim=1, backend="triton") if rows else None
    col_amax = amax(x, dim=0, backend="triton") if transpose else None
    out, out_t, row_inv, col_inv = _launch_cast(
        x, fmt, _or(row_amax, col_amax), _or(col_amax, row_amax), per_vector=True, src_is_scale=False,
        rows=rows, transpose=transpose, record_amax=None, power_of_two=power_of_two, amax_floor=amax_floor)
    return _quantized(out, row_inv, "row"), _quantized(out_t, col_inv, "row")


def _quantized(data: Optional[torch.Tensor], scale_inv: torch.Tensor, kind: str) -> Optional[Quantized]:
    return None if data is None else Quantized(data, scale_inv, kind)


def cast_tiles(x: torch.Tensor, fmt: Fp8Format, *, rows: bool = True, transpose: bool = False,
               power_of_two: bool = False, amax_floor: float = 1e-12, backend: Optional[str] = None
               ) -> OptionalPair:
    """The row-major copy with one scale per 1x128 tile of a row (`rows`) and the transposed copy
    with one per 128x1 tile of a column of x (`transpose`). See `scaling.quantize_groups`."""
    opts = dict(power_of_two=power_of_two, amax_floor=amax_floor)
    if not use_triton(x, backend):
        return (scaling.quantize_groups(x, fmt, group=BLOCK, dim=1, **opts) if rows else None,
                scaling.quantize_groups(x, fmt, group=BLOCK, dim=0, **opts) if transpose else None)
    if rows and transpose and not _no_fused_transpose(x):
        return _cast_tiles_both(x.contiguous(), fmt, **opts)
    return (_cast_tiles_along(x, fmt, dim=1, **opts) if rows else None,
            _cast_tiles_along(x, fmt, dim=0, **opts) if transpose else None)


def _cast_tiles_along(x: torch.Tensor, fmt: Fp8Format, *, dim: int, power_of_two: bool, amax_floor: float
                      ) -> Quantized:
    """One tiled copy: along x's rows (dim=1) or, transposed, along its columns (dim=0)."""
    src = x.t() if dim == 0 else x
    rows, cols = src.shape
    out = torch.empty((rows, cols), dtype=fmt.dtype, device=x.device)
    n_groups = cdiv(cols, BLOCK)
    scale_inv = torch.empty((n_groups, rows), dtype=torch.float32, device=x.device).t()  # column-major
    # Tiles are long on the input's contiguous dimension so loads coalesce.
    block_r = 16 if src.stride(1) == 1 else 64
    _tk().cast_tiles_kernel[(cdiv(rows, block_r), n_groups)](
        src, out, scale_inv, rows, cols, src.stride(0), src.stride(1), amax_floor,
        POW2=power_of_two, BLOCK_R=block_r, GROUP=BLOCK, num_warps=4, **_format_args(fmt))
    return Quantized(out, scale_inv, "tile")


def _cast_tiles_both(x: torch.Tensor, fmt: Fp8Format, *, power_of_two: bool, amax_floor: float) -> OptionalPair:
    """Both tiled copies of the row-major x from one read of each 128x128 block."""
    rows, cols = x.shape
    dev = x.device
    out = torch.empty((rows, cols), dtype=fmt.dtype, device=dev)
    out_t = torch.empty((cols, rows), dtype=fmt.dtype, device=dev)
    scale_inv = torch.empty((cdiv(cols, BLOCK), rows), dtype=torch.float32, device=dev).t()  # column-major
    scale_inv_t = torch.empty((cdiv(rows, BLOCK), cols), dtype=torch.float32, device=dev).t()
    _tk().cast_tiles_t_kernel[(cdiv(rows, BLOCK), cdiv(cols, BLOCK))](
        x, out, out_t, scale_inv, scale_inv_t, rows, cols, x.stride(0), amax_floor,
        POW2=power_of_two, GROUP=BLOCK, num_warps=8, **_format_args(fmt))
    return Quantized(out, scale_inv, "tile"), Quantized(out_t, scale_inv_t, "tile")


def cast_blocks(x: torch.Tensor, fmt: Fp8Format, *, transpose: bool = False, power_of_two: bool = False,
                amax_floor: float = 1e-12, backend: Optional[str] = None) -> OptionalPair:
    """One scale per 128x128 block, with the transposed copy on request. See `scaling.quantize_blocks`."""
    if not use_triton(x, backend):
        return scaling.quantize_blocks(x, fmt, transpose=transpose, power_of_two=power_of_two,
                                       amax_floor=amax_floor)
    if transpose and _no_fused_transpose(x):
        # 128x128 blocks of x^T are the transposes of x's blocks: same scales, transposed codes.
        q = cast_blocks(x, fmt, power_of_two=power_of_two, amax_floor=amax_floor, backend=backend)[0]
        return q, q.t()
    x = x.contiguous()
    rows, cols = x.shape
    nr, nc = cdiv(rows, BLOCK), cdiv(cols, BLOCK)
    out = torch.empty((rows, cols), dtype=fmt.dtype, device=x.device)
    out_t = torch.empty((cols, rows), dtype=fmt.dtype, device=x.device) if transpose else out
    scale_inv = torch.empty((nr, nc), dtype=torch.float32, device=x.device)
    _tk().cast_blocks_kernel[(nr, nc)](
        x, out, out_t, scale_inv, rows, cols, x.stride(0), nc, amax_floor,
        POW2=power_of_two, WRITE_T=transpose, BLOCK=BLOCK, SUB=64, num_warps=4, **_format_args(fmt))
    q = Quantized(out, scale_inv, "block")
    return q, (Quantized(out_t, scale_inv.t().contiguous(), "block") if transpose else None)


@torch.compiler.disable  # a compiled graph would inline the reference's per-slice loop of FP32 GEMMs
def blockwise_mm(a: Quantized, b: Quantized, out_dtype: torch.dtype, backend: Optional[str] = None) -> torch.Tensor:
    """a (M, K) @ b (N, K)^T for 1x128-tiled `a` and 1x128- or 128x128-scaled `b`, promoting each
    128-long K-slice's partial sum to FP32 and scaling it there."""
    if not use_triton(a.data, backend):
        return blockwise_mm_reference(a, b, out_dtype)
    m, k = a.shape
    n = b.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=a.data.device)
    grid = lambda meta: (cdiv(m, meta["BLOCK_M"]) * cdiv(n, BLOCK),)  # noqa: E731
    _tk().blockwise_gemm_kernel[grid](
        a.data, b.data, out, a.scale_inv, b.scale_inv, m, n, k, cdiv(k, BLOCK), *a.scale_inv.stride(),
        *b.scale_inv.stride(),
        B_ROW_BLOCK=b.block[0], EVEN_K=k % BLOCK == 0, BLOCK_N=BLOCK, BLOCK_K=BLOCK)
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
