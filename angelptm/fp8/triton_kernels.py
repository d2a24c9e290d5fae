"""Triton kernels for the FP8 hot passes: amax, fused scale + cast (+ transpose), row/tile/block casts, blockwise GEMM.

Launched through `kernels.py`, which also holds the torch references they are tested against.
Every cast rounds onto the FP8 grid in FP32 arithmetic (`_round_to_grid`) before converting,
so the conversion itself is exact and the result is bit-identical to torch's
round-to-nearest-even cast on every backend, the CPU interpreter included (whose own FP8
conversion rounds differently). Scales use correctly rounded division (`div_rn`) for the
same reason: Triton's `/` is approximate on NVIDIA GPUs.
"""

import triton
import triton.language as tl


@triton.jit
def _round_to_grid(y, MANT: tl.constexpr, MIN_EXP: tl.constexpr):
    """Round FP32 `y` (already clamped to the format's range) to the FP8 grid, ties to even.

    Adding 2^(e + 23 - MANT) to |y| (e = its exponent, floored at the smallest normal one) leaves
    exactly MANT bits after the point of |y|'s leading bit in the FP32 sum, and the FP32 adder
    rounds to nearest even; subtracting it back is exact. The sign is copied back from the bit
    pattern, so -0.0 and small negatives that round to zero keep torch's negative zero.
    """
    bits = y.to(tl.int32, bitcast=True)
    a = tl.abs(y)
    e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.maximum(e, MIN_EXP)
    magic = ((e + (23 - MANT + 127)) << 23).to(tl.float32, bitcast=True)
    r = (a + magic) - magic
    return tl.where(bits < 0, -r, r)


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
def amax_partials_kernel(x_ptr, partials_ptr, n, BLOCK: tl.constexpr):
    """partials[pid] = max |x| over this program's grid-stride share of the flat tensor."""
    pid = tl.program_id(0)
    acc = tl.zeros((BLOCK,), tl.float32)
    for start in range(pid * BLOCK, n, tl.num_programs(0) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        acc = tl.maximum(acc, tl.abs(x))
    tl.store(partials_ptr + pid, tl.max(acc, axis=0))


@triton.jit
def cast_tensorwise_kernel(x_ptr, out_ptr, out_t_ptr, scale_src_ptr, scale_inv_ptr, record_ptr,
                           R, C, stride_r, n_src, amax_floor,
                           FMAX: tl.constexpr, MANT: tl.constexpr, MIN_EXP: tl.constexpr,
                           FROM_AMAX: tl.constexpr, POW2: tl.constexpr, WRITE_T: tl.constexpr,
                           RECORD_AMAX: tl.constexpr, SRC_BLOCK: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """One scale for the whole (R, C) tensor: from amax partials (current scaling) or given
    (delayed). Writes the row-major FP8 copy and, with WRITE_T, the transposed (C, R) copy from
    the same read; with RECORD_AMAX raises *record_ptr to this tensor's amax."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    if FROM_AMAX:
        i = tl.arange(0, SRC_BLOCK)
        amax = tl.max(tl.load(scale_src_ptr + i, mask=i < n_src, other=0.0), axis=0)
        scale = _scale_from_amax(amax, amax_floor, FMAX, POW2)
    else:
        scale = tl.load(scale_src_ptr)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    x = tl.load(x_ptr + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    q = _quantize(x, scale, FMAX, MANT, MIN_EXP).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * C + cols[None, :], q, mask=mask)
    if WRITE_T:
        tl.store(out_t_ptr + cols[None, :] * R + rows[:, None], q, mask=mask)
    if RECORD_AMAX:
        tl.atomic_max(record_ptr, tl.max(tl.max(tl.abs(x), axis=1), axis=0))
    if (pid_r == 0) & (pid_c == 0):
        tl.store(scale_inv_ptr, _reciprocal(scale))


@triton.jit
def cast_tiles_kernel(x_ptr, out_ptr, scale_inv_ptr, R, C, stride_r, stride_c, n_groups, amax_floor,
                      FMAX: tl.constexpr, MANT: tl.constexpr, MIN_EXP: tl.constexpr, POW2: tl.constexpr,
                      BLOCK_R: tl.constexpr, GROUP: tl.constexpr):
    """One scale per GROUP consecutive elements of each row of the strided (R, C) view (1x128
    tiles), in one read; output (R, C) row-major. Reading through strides lets the same kernel
    quantize down the columns of a row-major tensor and emit its transpose."""
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
    tl.store(scale_inv_ptr + rows * n_groups + pid_g, _reciprocal(scale), mask=row_mask)


@triton.jit
def row_amax_kernel(x_ptr, amax_ptr, R, C, stride_r, stride_c, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """amax[r] = max(amax[r], max |x[r, tile]|) of the strided (R, C) view; amax starts at zero.
    A 2-D grid of tiles keeps every SM busy however long the rows are."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_mask = rows < R
    mask = row_mask[:, None] & (cols[None, :] < C)
    x = tl.load(x_ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask, other=0.0)
    tl.atomic_max(amax_ptr + rows, tl.max(tl.abs(x.to(tl.float32)), axis=1), mask=row_mask)


@triton.jit
def cast_rows_kernel(x_ptr, out_ptr, amax_ptr, scale_inv_ptr, R, C, stride_r, stride_c, amax_floor,
                     FMAX: tl.constexpr, MANT: tl.constexpr, MIN_EXP: tl.constexpr, POW2: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Cast the strided (R, C) view with one scale per row from `row_amax_kernel`'s amaxes."""
    pid_c = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    row_mask = rows < R
    mask = row_mask[:, None] & (cols[None, :] < C)
    scale = _scale_from_amax(tl.load(amax_ptr + rows, mask=row_mask, other=0.0), amax_floor, FMAX, POW2)
    x = tl.load(x_ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask, other=0.0).to(tl.float32)
    q = _quantize(x, scale[:, None], FMAX, MANT, MIN_EXP)
    tl.store(out_ptr + rows[:, None] * C + cols[None, :], q.to(out_ptr.dtype.element_ty), mask=mask)
    if pid_c == 0:
        tl.store(scale_inv_ptr + rows, _reciprocal(scale), mask=row_mask)


@triton.jit
def cast_blocks_kernel(x_ptr, out_ptr, out_t_ptr, scale_inv_ptr, R, C, stride_r, n_col_blocks, amax_floor,
                       FMAX: tl.constexpr, MANT: tl.constexpr, MIN_EXP: tl.constexpr, POW2: tl.constexpr,
                       WRITE_T: tl.constexpr, BLOCK: tl.constexpr):
    """One scale per BLOCK x BLOCK square; row-major copy and, with WRITE_T, the transposed one."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * BLOCK + tl.arange(0, BLOCK)
    cols = pid_c * BLOCK + tl.arange(0, BLOCK)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    x = tl.load(x_ptr + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    scale = _scale_from_amax(amax, amax_floor, FMAX, POW2)
    q = _quantize(x, scale, FMAX, MANT, MIN_EXP).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * C + cols[None, :], q, mask=mask)
    if WRITE_T:
        tl.store(out_t_ptr + cols[None, :] * R + rows[:, None], q, mask=mask)
    tl.store(scale_inv_ptr + pid_r * n_col_blocks + pid_c, _reciprocal(scale))


@triton.jit
def blockwise_gemm_kernel(a_ptr, b_ptr, out_ptr, sa_ptr, sb_ptr, M, N, K, n_k_groups,
                          B_ROW_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out (M, N) = a (M, K) @ b (N, K)^T with a's scales per (row, K-slice of BLOCK_K) and b's
    per (row block of B_ROW_BLOCK, K-slice). Each slice's partial sum leaves the tensor cores
    in FP32 and is scaled before it is accumulated: DeepSeek-V3's FP32 promotion."""
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
        k_mask = k < K
        a = tl.load(a_ptr + offs_m[:, None] * K + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptr + offs_n[:, None] * K + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        partial = tl.dot(a, tl.trans(b), out_dtype=tl.float32)
        sa = tl.load(sa_ptr + offs_m * n_k_groups + kb, mask=m_mask, other=0.0)
        sb = tl.load(sb_ptr + (offs_n // B_ROW_BLOCK) * n_k_groups + kb, mask=n_mask, other=0.0)
        acc += partial * (sa[:, None] * sb[None, :])
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], out, mask=m_mask[:, None] & n_mask[None, :])
