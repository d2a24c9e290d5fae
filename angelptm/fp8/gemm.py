"""The FP8 GEMM `a @ b.T` of two quantized operands, whatever their scale granularity.

Per-tensor and per-row scales go through `torch._scaled_mm` (cuBLASLt on NVIDIA GPUs, a
reference implementation on CPU): `a.data` row-major and `b.data.t()` column-major is exactly
the layout it wants, and it writes the result in the dtype asked for (bf16 under autocast) with
no separate cast pass. `fast_accum` lets the tensor cores accumulate without periodic FP32
promotion; like torchao, the forward GEMM uses it and the two gradient GEMMs do not.
Blockwise scales, which cuBLAS does not take in the torch versions we
support, go through the Triton kernel that promotes each 128-long K-slice to FP32
(`kernels.blockwise_mm`).
"""

from __future__ import annotations

from typing import Optional

import torch

from angelptm.fp8.kernels import blockwise_mm
from angelptm.fp8.scaling import Quantized

# (device type, Quantized.kind, out dtype) -> whether torch._scaled_mm accepts it here.
_SUPPORTED: dict[tuple, bool] = {}


def scaled_mm(a: Quantized, b: Quantized, out_dtype: torch.dtype, *, fast_accum: bool = False,
              backend: Optional[str] = None) -> torch.Tensor:
    """(M, N) = a (M, K) @ b (N, K)^T, dequantized, in `out_dtype`."""
    if a.kind == "tile":
        return blockwise_mm(a, b, out_dtype, backend)
    scale_b = b.scale_inv.reshape(1, -1) if b.kind == "row" else b.scale_inv
    if _accepts(a.data.device, a.kind, out_dtype):
        return torch._scaled_mm(a.data, b.data.t(), a.scale_inv, scale_b, out_dtype=out_dtype,
                                use_fast_accum=fast_accum)
    out = torch._scaled_mm(a.data, b.data.t(), a.scale_inv, scale_b, out_dtype=torch.bfloat16,
                           use_fast_accum=fast_accum)
    return out.to(out_dtype)


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
