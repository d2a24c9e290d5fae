"""Triton kernels for the FP8 hot passes: scale + cast (+ transpose) with per-tensor, per-row or
per-column scales, 1x128 tile casts (one copy, or both copies from one read), 128x128 block
casts, and the blockwise GEMM.

Launched through `kernels.py`, which also holds the torch references they are tested against.
Bit-exactness with torch's round-to-nearest-even cast holds by construction on every backend:

- every cast rounds onto the FP8 grid in FP32 arithmetic (`_round_to_grid`) before converting, so
  the conversion itself is exact, whatever rounding the backend's converter uses (the CPU
  interpreter's differs from the GPU's);
- signs travel as bits, never through unary minus, which some Triton releases compile to `0 - x`
  and so turn the -0.0 of a small negative value into +0.0 (torch keeps the sign);
- scales use correctly rounded division (`div_rn`): Triton's `/` is approximate on NVIDIA GPUs;
- amaxes are exact whatever the reduction order, and come from the caller.
"""

import functools
import os

import triton
import triton.language as tl
import triton.testing


@triton.jit
def _round_to_grid(y, MANT: tl.constexpr, MIN_EXP: tl.constexpr):
    """Round FP32 `y` (already clamped to the format's range) to the FP8 grid, ties to even.

    Adding 2^(e + 23 - MANT) to |y| (e = its exponent, floored at the smallest normal one) leaves
    exactly MANT bits after the point of |y|'s leading bit in the FP32 sum, and the FP32 adder
    rounds to nearest even; subtracting it back is exact. The sign bit is copied back from y's bit
    pattern, so a small negative value that rounds to zero stays -0.0, as torch's cast gives.
    """
    bits = y.to(tl.int32, bitcast=True)
    magnitude = bits & 0x7FFFFFFF
    a = magnitude.to(tl.float32, bitcast=True)
    e = tl.maximum((magnitude >> 23) - 127, MIN_EXP)
    magic = ((e + (23 - MANT + 127)) << 23).to(tl.float32, bitcast=True)
    rounded = ((a + magic) - magic).to(tl.int32, bitcast=True)
    return (rounded | (bits ^ magnitude)).to(tl.float32, bitcast=True)


@triton.jit
def _quantize(x, scale, FMAX: tl.constexpr, MANT: tl.constexpr, MIN_EXP: tl.constexpr):
    y = tl.minimum(tl.maximum(x * scale, -FMAX), FMAX)
    return _round_to_grid(y, MANT, MIN_EXP)


@triton.jit
def _scale_from_amax(amax, amax_floor, FMAX: tl.constexpr, POW2: tl.constexpr):
    scale = tl.math.div_rn(tl.zeros_like(amax) + FMAX, tl.maximum(amax, amax_floor))
    if POW2:
        scale = (scale.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
    return scale


@triton.jit
def _reciprocal(scale):
    return tl.math.div_rn(tl.zeros_like(scale) + 1.0, scale)


@triton.jit
def _load_tile(x_ptr, row0, col0, R, C, stride_r, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The BLOCK_R x BLOCK_C tile at (row0, col0) of the row-major (R, C) x in float32, zeros past
    its edges, with the tile's row and column indices and their masks."""
    rows = row0 + tl.arange(0, BLOCK_R)
    cols = col0 + tl.arange(0, BLOCK_C)
    row_mask = rows < R
    col_mask = cols < C
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return x, rows, cols, row_mask, col_mask, mask


@triton.jit
def cast_kernel(x_ptr, out_ptr, out_t_ptr, row_src_ptr, col_src_ptr, row_scale_inv_ptr, col_scale_inv_ptr,
                record_ptr, R, C, stride_r, amax_floor,
                FMAX: tl.constexpr, MANT: tl.constexpr, MIN_EXP: tl.constexpr, POW2: tl.constexpr,
                PER_VECTOR: tl.constexpr, SRC_IS_SCALE: tl.constexpr, WRITE_ROWS: tl.constexpr,
                WRITE_T: tl.constexpr, RECORD_AMAX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Cast the row-major (R, C) tensor to the row-major FP8 copy (WRITE_ROWS) and the transposed
    (C, R) copy (WRITE_T), from one read.

    One scale for the tensor (PER_VECTOR false): row_src holds its amax, or the scale itself
    (SRC_IS_SCALE, delayed scaling); row_scale_inv receives 1/scale. One scale per row for the
    row-major copy and per column for the transposed one (PER_VECTOR, rowwise): row_src and
    col_src hold those amaxes, row_scale_inv and col_scale_inv receive the reciprocals. With
    RECORD_AMAX, *record_ptr is raised to the tensor's amax.
    """
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    x, rows, cols, row_mask, col_mask, mask = _load_tile(x_ptr, pid_r * BLOCK_R, pid_c * BLOCK_C, R, C, stride_r,
                                                         BLOCK_R, BLOCK_C)
    if PER_VECTOR:
        if WRITE_ROWS:
            row_amax = tl.load(row_src_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
            row_scale = _scale_from_amax(row_amax, amax_floor, FMAX, POW2)
            q = _quantize(x, row_scale[:, None], FMAX, MANT, MIN_EXP)
            tl.store(out_ptr + rows[:, None] * C + cols[None, :], q.to(out_ptr.dtype.element_ty), mask=mask)
            if pid_c == 0:
                tl.store(row_scale_inv_ptr + rows, _reciprocal(row_scale), mask=row_mask)
        if WRITE_T:
            col_amax = tl.load(col_src_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            col_scale = _scale_from_amax(col_amax, amax_floor, FMAX, POW2)
            q_t = _quantize(x, col_scale[None, :], FMAX, MANT, MIN_EXP)
            tl.store(out_t_ptr + cols[None, :] * R + rows[:, None], q_t.to(out_t_ptr.dtype.element_ty), mask=mask)
            if pid_r == 0:
                tl.store(col_scale_inv_ptr + cols, _reciprocal(col_scale), mask=col_mask)
    else:
        if SRC_IS_SCALE:
            scale = tl.load(row_src_ptr).to(tl.float32)
        else:
            scale = _scale_from_amax(tl.load(row_src_ptr).to(tl.float32), amax_floor, FMAX, POW2)
        q = _quantize(x, scale, FMAX, MANT, MIN_EXP).to(out_ptr.dtype.element_ty)
        if WRITE_ROWS:
            tl.store(out_ptr + rows[:, None] * C + cols[None, :], q, mask=mask)
        if WRITE_T:
            tl.store(out_t_ptr + cols[None, :] * R + rows[:, None], q, mask=mask)
        if RECORD_AMAX:
            tl.atomic_max(record_ptr, tl.max(tl.max(tl.abs(x), axis=1), axis=0))
        if (pid_r == 0) & (pid_c == 0):
            tl.store(row_scale_inv_ptr, _reciprocal(scale))


@triton.jit
def cast_tiles_kernel(x_ptr, out_ptr, scale_inv_ptr, R, C, stride_r, stride_c, amax_floor,
                      FMAX: tl.constexpr, MANT: tl.constexpr, MIN_EXP: tl.constexpr, POW2: tl.constexpr,
                      BLOCK_R: tl.constexpr, GROUP: tl.constexpr):
    """One scale per GROUP consecutive elements of each row of the strided (R, C) view (1x128
    tiles), in one read; output (R, C) row-major, scales (R, groups) column-major. Reading through
    strides lets the same kernel quantize down the columns of a row-major tensor and emit its
    transpose."""
    pid_r = tl.program_id(0)
    pid_g = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_g * GROUP + tl.arange(0, GROUP)
    row_mask = rows < R
    mask = row_mask[:, None] & (cols[None, :] < C)
    x = tl.load(x_ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask, other=0.0).to(tl.float32)
    scale = _scale_from_amax(tl.max(tl.abs(x), axis=1), amax_floor, FMAX, POW2)
    q = _quantize(x, scale[:, None], FMAX, MANT, MIN_EXP)
    tl.store(out_ptr + rows[:, None] * C + cols[None, :], q.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_inv_ptr + pid_g * R + rows, _reciprocal(scale), mask=row_mask)


@triton.jit
def cast_tiles_t_kernel(x_ptr, out_ptr, out_t_ptr, scale_inv_ptr, scale_inv_t_ptr, R, C, stride_r, amax_floor,
                        FMAX: tl.constexpr, MANT: tl.constexpr, MIN_EXP: tl.constexpr, POW2: tl.constexpr,
                        GROUP: tl.constexpr):
    """Both 1x128-tiled copies of the row-major (R, C) tensor from one read: the row-major copy
    with a scale per GROUP elements of a row, and the (C, R) transposed copy with a scale per GROUP
    elements of a column. A program holds one GROUP x GROUP block, whose row tiles and column
    tiles are whole in it; scales land column-major, (R, C/GROUP) and (C, R/GROUP)."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    x, rows, cols, row_mask, col_mask, mask = _load_tile(x_ptr, pid_r * GROUP, pid_c * GROUP, R, C, stride_r,
                                                         GROUP, GROUP)
    magnitude = tl.abs(x)
    row_scale = _scale_from_amax(tl.max(magnitude, axis=1), amax_floor, FMAX, POW2)
    q = _quantize(x, row_scale[:, None], FMAX, MANT, MIN_EXP)
    tl.store(out_ptr + rows[:, None] * C + cols[None, :], q.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_inv_ptr + pid_c * R + rows, _reciprocal(row_scale), mask=row_mask)
    col_scale = _scale_from_amax(tl.max(magnitude, axis=0), amax_floor, FMAX, POW2)
    q_t = _quantize(x, col_scale[None, :], FMAX, MANT, MIN_EXP)
    tl.store(out_t_ptr + cols[None, :] * R + rows[:, None], q_t.to(out_t_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_inv_t_ptr + pid_r * C + cols, _reciprocal(col_scale), mask=col_mask)


@triton.jit
def cast_blocks_kernel(x_ptr, out_ptr, out_t_ptr, scale_inv_ptr, R, C, stride_r, n_col_blocks, amax_floor,
                       FMAX: tl.constexpr, MANT: tl.constexpr, MIN_EXP: tl.constexpr, POW2: tl.constexpr,
                       WRITE_T: tl.constexpr, BLOCK: tl.constexpr, SUB: tl.constexpr):
    """One scale per BLOCK x BLOCK square; row-major copy and, with WRITE_T, the transposed one.

    The block is walked twice in SUB x SUB pieces, once for its amax and once to cast (that read
    hits L2): a program holds a piece, not the block, in registers, so several programs share an
    SM and their loads overlap one another's arithmetic.
    """
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    amax = 0.0
    for i in tl.static_range(BLOCK // SUB):
        for j in tl.static_range(BLOCK // SUB):
            x, rows, cols, _, _, mask = _load_tile(x_ptr, pid_r * BLOCK + i * SUB, pid_c * BLOCK + j * SUB, R, C,
                                                   stride_r, SUB, SUB)
            amax = tl.maximum(amax, tl.max(tl.max(tl.abs(x), axis=1), axis=0))
    scale = _scale_from_amax(amax, amax_floor, FMAX, POW2)
    for i in tl.static_range(BLOCK // SUB):
        for j in tl.static_range(BLOCK // SUB):
            x, rows, cols, _, _, mask = _load_tile(x_ptr, pid_r * BLOCK + i * SUB, pid_c * BLOCK + j * SUB, R, C,
                                                   stride_r, SUB, SUB)
            q = _quantize(x, scale, FMAX, MANT, MIN_EXP).to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + rows[:, None] * C + cols[None, :], q, mask=mask)
            if WRITE_T:
                tl.store(out_t_ptr + cols[None, :] * R + rows[:, None], q, mask=mask)
    tl.store(scale_inv_ptr + pid_r * n_col_blocks + pid_c, _reciprocal(scale))


def _gemm_configs() -> list:
    """Tile configurations the blockwise GEMM picks from per (M, N, K), timed on first use.

    Every configuration keeps BLOCK_N = BLOCK_K = 128, the scale block, so a weight's scale is one
    number per K-slice. Compiled for Hopper, a program waits for each slice's tensor-core product
    before it scales it (the sm_90 code has `wgmma.wait_group 0` inside the loop), so within one
    program the FP32 promotion does not overlap the next slice's MMAs; the 64-row configuration
    keeps two programs per SM, where one's promotion can run under the other's MMAs. The
    interpreter cannot time anything: it gets the first configuration.
    """
    configs = [triton.Config({"BLOCK_M": 128, "GROUP_M": 8}, num_warps=8, num_stages=4),
               triton.Config({"BLOCK_M": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
               triton.Config({"BLOCK_M": 64, "GROUP_M": 8}, num_warps=4, num_stages=4)]
    return configs[:1] if os.environ.get("TRITON_INTERPRET") == "1" else configs


@triton.autotune(configs=_gemm_configs(), key=["M", "N", "K", "B_ROW_BLOCK"],
                 do_bench=functools.partial(triton.testing.do_bench, warmup=5, rep=20))
@triton.jit
def blockwise_gemm_kernel(a_ptr, b_ptr, out_ptr, sa_ptr, sb_ptr, M, N, K, n_k_groups,
                          stride_sa_m, stride_sa_k, stride_sb_n, stride_sb_k,
                          B_ROW_BLOCK: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out (M, N) = a (M, K) @ b (N, K)^T with a's scales per (row, K-slice of BLOCK_K) and b's
    per (row block of B_ROW_BLOCK, K-slice), each grid of scales read through its strides. The FP8
    tensor cores multiply each slice; its partial sum leaves them in FP32 and is scaled before it
    is accumulated: DeepSeek-V3's FP32 promotion, which also bounds the error of Hopper's
    reduced-precision FP8 accumulation to one slice."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    # Walk GROUP_M row-tiles per column of tiles, so neighbouring programs share tiles in L2.
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for kb in range(0, n_k_groups):
        k = kb * BLOCK_K + offs_k
        if EVEN_K:
            a = tl.load(a_ptr + offs_m[:, None] * K + k[None, :], mask=m_mask[:, None], other=0.0)
            b = tl.load(b_ptr + offs_n[:, None] * K + k[None, :], mask=n_mask[:, None], other=0.0)
        else:
            a = tl.load(a_ptr + offs_m[:, None] * K + k[None, :], mask=m_mask[:, None] & (k[None, :] < K),
                        other=0.0)
            b = tl.load(b_ptr + offs_n[:, None] * K + k[None, :], mask=n_mask[:, None] & (k[None, :] < K),
                        other=0.0)
        partial = tl.dot(a, tl.trans(b), out_dtype=tl.float32)
        sa = tl.load(sa_ptr + offs_m * stride_sa_m + kb * stride_sa_k, mask=m_mask, other=0.0)
        if B_ROW_BLOCK == BLOCK_N:
            # A weight block spans the whole tile: one scale, one multiply per row.
            sb = tl.load(sb_ptr + pid_n * stride_sb_n + kb * stride_sb_k)
            acc += partial * (sa * sb)[:, None]
        else:
            sb = tl.load(sb_ptr + (offs_n // B_ROW_BLOCK) * stride_sb_n + kb * stride_sb_k, mask=n_mask,
                         other=0.0)
            acc += partial * (sa[:, None] * sb[None, :])
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], out, mask=m_mask[:, None] & n_mask[None, :])
