"""The blockwise GEMM through `torch._scaled_mm`'s own blockwise scaling (cuBLASLt on Hopper).

CPU builds of torch have no blockwise scaling. These tests hold our calls to the contract torch's
CUDA `_scaled_mm` checks (ATen/native/cuda/ScaledBlas.cpp: each mode's scale shapes and strides)
through a stand-in that enforces that contract and does the blockwise math; they show that the
probe admits a correct implementation, turns a wrong one away, and that every GEMM of a blockwise
layer then goes through it. The GPU suite's parity section checks the real cuBLASLt.
"""

import math

import pytest
import torch

from angelptm.fp8 import E4M3, Float8Linear, gemm, kernels
from angelptm.fp8.scaling import BLOCK, Quantized

_REAL_SCALED_MM = torch._scaled_mm


def contract_scaled_mm(calls: list, misread_b: bool = False):
    """`_scaled_mm` as on CUDA 12.9+: 1x128 tiles on mat_a, outer-dim-major (M, K/128) scales;
    mat_b (K, N) column-major with its scales the transpose of (N/128, K/128) row-major blocks or
    of (N, K/128) outer-dim-major tiles. `misread_b` reads b's scales transposed, a plausible bug
    whose shapes still pass for square scale grids."""
    def scaled_mm(mat_a, mat_b, scale_a, scale_b, out_dtype=None, use_fast_accum=False, **kwargs):
        if scale_a.numel() == 1 or scale_a.shape[-1] == 1:
            return _REAL_SCALED_MM(mat_a, mat_b, scale_a, scale_b, out_dtype=out_dtype,
                                   use_fast_accum=use_fast_accum, **kwargs)
        (m, k), n = mat_a.shape, mat_b.shape[1]
        kb = math.ceil(k / BLOCK)
        sb = scale_b.t()
        if use_fast_accum or scale_a.shape != (m, kb) or scale_a.stride() != (1, m):
            raise RuntimeError("Invalid scaling configuration")
        if sb.shape == (math.ceil(n / BLOCK), kb) and sb.stride() == (kb, 1):
            kind = "block"
        elif sb.shape == (n, kb) and sb.stride() == (1, n):
            kind = "tile"
        else:
            raise RuntimeError("Invalid scaling configuration")
        calls.append(kind)
        scaled_mm.scales = (scale_a, scale_b)
        sb = sb.contiguous()
        if misread_b:
            sb = sb.t().reshape(sb.shape)
        a = Quantized(mat_a, scale_a.contiguous(), "tile")
        return kernels.blockwise_mm_reference(a, Quantized(mat_b.t(), sb, kind), out_dtype)
    return scaled_mm


@pytest.fixture
def fresh_probe(monkeypatch):
    monkeypatch.setattr(gemm, "_NATIVE_BLOCKWISE", {})


def operands(m: int, k: int, n: int, b_kind: str):
    gen = torch.Generator().manual_seed(1)
    a = kernels.cast_tiles(torch.randn(m, k, generator=gen), E4M3)[0]
    w = torch.randn(n, k, generator=gen)
    b = kernels.cast_blocks(w, E4M3)[0] if b_kind == "block" else kernels.cast_tiles(w, E4M3)[0]
    return a, b


@pytest.mark.parametrize("b_kind", ["block", "tile"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_gemms_in_whole_blocks_go_through_scaled_mm_with_the_layouts_it_checks(b_kind, out_dtype, fresh_probe,
                                                                                monkeypatch):
    calls = []
    native = contract_scaled_mm(calls)
    monkeypatch.setattr(torch, "_scaled_mm", native)
    assert gemm.native_blockwise(torch.device("cpu"), b_kind, out_dtype)
    calls.clear()
    a, b = operands(256, 1024, 384, b_kind)
    got = gemm.scaled_mm(a, b, out_dtype)
    assert calls == [b_kind]
    assert torch.equal(got, kernels.blockwise_mm_reference(a, b, out_dtype))
    # The casts lay their scales out as cuBLASLt reads them: no copy on the way in.
    assert [s.data_ptr() for s in native.scales] == [a.scale_inv.data_ptr(), b.scale_inv.data_ptr()]


@pytest.mark.parametrize("shape", [(200, 1024, 384), (256, 1024, 200), (256, 640, 384)])
def test_gemms_not_in_whole_blocks_take_the_kernel(shape, fresh_probe, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "_scaled_mm", contract_scaled_mm(calls))
    a, b = operands(*shape, "block")
    got = gemm.scaled_mm(a, b, torch.float32)
    assert calls == []
    assert torch.equal(got, kernels.blockwise_mm_reference(a, b, torch.float32))


def test_the_probe_turns_away_a_blockwise_gemm_that_reads_scales_wrongly(fresh_probe, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "_scaled_mm", contract_scaled_mm(calls, misread_b=True))
    assert not gemm.native_blockwise(torch.device("cpu"), "block", torch.float32)
    calls.clear()
    a, b = operands(256, 1024, 384, "block")
    assert torch.equal(gemm.scaled_mm(a, b, torch.float32), kernels.blockwise_mm_reference(a, b, torch.float32))
    assert calls == []


def test_builds_without_blockwise_scaling_take_the_kernel(fresh_probe):
    assert not gemm.native_blockwise(torch.device("cpu"), "block", torch.bfloat16)
    a, b = operands(256, 1024, 384, "block")
    torch.testing.assert_close(gemm.scaled_mm(a, b, torch.bfloat16),
                               kernels.blockwise_mm_reference(a, b, torch.bfloat16), rtol=0, atol=0)


def test_a_blockwise_layer_runs_all_three_gemms_through_scaled_mm_with_unchanged_results(fresh_probe,
                                                                                         monkeypatch):
    torch.manual_seed(0)
    layer = Float8Linear(512, 1024, bias=False, recipe="blockwise")
    x = torch.randn(2, 256, 512)
    dy = torch.randn(2, 256, 1024)

    def fwd_bwd():
        xi = x.clone().requires_grad_()
        layer.weight.grad = None
        y = layer(xi)
        y.backward(dy)
        return y, xi.grad, layer.weight.grad
    want = fwd_bwd()  # CPU torch: the probe says no, the kernel's reference runs
    calls = []
    monkeypatch.setattr(torch, "_scaled_mm", contract_scaled_mm(calls))
    monkeypatch.setattr(gemm, "_NATIVE_BLOCKWISE", {})
    assert all(gemm.native_blockwise(torch.device("cpu"), kind, torch.float32) for kind in ("block", "tile"))
    calls.clear()
    layer.refresh_weight()
    got = fwd_bwd()
    # forward: x tiles x weight blocks; input gradient: dy tiles x transposed weight blocks;
    # weight gradient: dy^T tiles x x^T tiles, both along the 512 tokens.
    assert calls == ["block", "block", "tile"]
    for g, w in zip(got, want):
        assert torch.equal(g, w)
