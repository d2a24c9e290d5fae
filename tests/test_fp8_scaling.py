"""FP8 formats and scales: saturating casts, amax floor, power-of-two scales, delayed-scaling histories,
and the CPU GEMM of scaled operands."""

import pytest
import torch

from angelptm.errors import UserError
from angelptm.fp8 import E4M3, E5M2, DelayedScale, recipe_from_name
from angelptm.fp8.delayed import update_delayed_scales
from angelptm.fp8.formats import cast_to_fp8
from angelptm.fp8.gemm import scaled_mm
from angelptm.fp8.scaling import (power_of_two_floor, quantize_blocks, quantize_groups, quantize_tensorwise,
                                  scale_from_amax)


def test_formats_saturate_instead_of_overflowing():
    x = torch.tensor([1e6, -1e6, 448.0, 500.0, 1e-9])
    assert cast_to_fp8(x, E4M3).float().tolist() == [448.0, -448.0, 448.0, 448.0, 0.0]
    assert cast_to_fp8(x, E5M2).float()[:2].tolist() == [57344.0, -57344.0]
    assert torch.isinf(x.to(torch.float8_e5m2).float()[0]), "torch's own E5M2 cast overflows"
    assert E4M3.unit_roundoff == 2**-4 and E5M2.unit_roundoff == 2**-3


def test_all_zero_tensors_get_a_finite_scale_and_stay_zero():
    q, _ = quantize_tensorwise(torch.zeros(8, 16), E4M3)
    assert torch.isfinite(q.scale_inv) and q.scale_inv > 0
    assert q.dequantize().eq(0).all()
    rows = quantize_groups(torch.zeros(4, 32), E4M3, group=None, dim=1)
    assert torch.isfinite(rows.scale_inv).all() and rows.dequantize().eq(0).all()


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_cpu_gemm_is_the_float32_product_of_the_dequantized_operands(out_dtype):
    """Bit for bit, on every CPU (torch's own `_scaled_mm` takes oneDNN's path on some), and in float32
    inside a bfloat16 autocast region too: the GEMM's precision is the recipe's, not the region's."""
    x, w = torch.randn(33, 256) * 5, torch.randn(17, 256) / 16
    for a, b in [(quantize_tensorwise(x, E4M3)[0], quantize_tensorwise(w, E4M3)[0]),
                 (quantize_groups(x, E4M3, group=None, dim=1), quantize_groups(w, E4M3, group=None, dim=1))]:
        want = (a.dequantize() @ b.dequantize().t()).to(out_dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = scaled_mm(a, b, out_dtype)
        assert got.dtype == out_dtype and torch.equal(got, want)


def test_scale_maps_amax_onto_the_format_maximum():
    amax = torch.tensor([3.0, 0.5, 1000.0])
    scale = scale_from_amax(amax, E4M3)
    torch.testing.assert_close(amax * scale, torch.full((3,), 448.0))
    x = torch.randn(32, 48) * 7
    q, _ = quantize_tensorwise(x, E4M3)
    assert q.data.float().abs().max() == 448.0


def test_power_of_two_scales_round_down_and_unscale_exactly():
    amax = torch.tensor([3.0, 0.5, 1000.0, 1e-3])
    scale = scale_from_amax(amax, E4M3, power_of_two=True)
    exponent = torch.log2(scale)
    assert torch.equal(exponent, exponent.round())
    assert (scale <= scale_from_amax(amax, E4M3)).all() and (scale > scale_from_amax(amax, E4M3) / 2).all()
    torch.testing.assert_close(power_of_two_floor(torch.tensor([1.0, 1.5, 0.75])), torch.tensor([1.0, 1.0, 0.5]))


def test_group_and_block_scales_follow_their_granularity():
    x = torch.ones(3, 300)
    x[1, 128:256] = 100.0  # one loud 1x128 tile in row 1
    tiles = quantize_groups(x, E4M3, group=128, dim=1)
    assert tiles.scale_inv.shape == (3, 3)
    torch.testing.assert_close(tiles.scale_inv[1], torch.tensor([1.0, 100.0, 1.0]) / 448)
    rows = quantize_groups(x, E4M3, group=None, dim=1)
    assert rows.scale_inv.shape == (3, 1) and rows.scale_inv[1, 0] == 100.0 / 448
    columns = quantize_groups(x, E4M3, group=None, dim=0)  # the transpose, scaled per column of x
    assert columns.data.shape == (300, 3) and columns.scale_inv[200, 0] == 100.0 / 448
    blocks, blocks_t = quantize_blocks(torch.ones(130, 260), E4M3, transpose=True)
    assert blocks.scale_inv.shape == (2, 3) and blocks_t.scale_inv.shape == (3, 2)
    assert torch.equal(blocks_t.dequantize(), blocks.dequantize().t())


def test_delayed_history_rotates_and_sets_the_scale_from_its_max():
    state = DelayedScale(E4M3, history_len=3)
    assert not state.ready
    amaxes = [2.0, 8.0, 1.0, 0.5, 0.25]
    seen = []
    for amax in amaxes:
        state.current_amax.fill_(amax)
        update_delayed_scales([state])
        seen.append(amax)
        window = seen[-3:]
        assert state.ready and bool(state.initialized)
        torch.testing.assert_close(state.scale, torch.tensor(448.0 / max(window)))
        # Slot 0 is cleared for the next step; the last steps' amaxes follow, newest first.
        assert state.amax_history.tolist() == [0.0] + window[::-1][:2] + [0.0] * (2 - len(window[::-1][:2]))
    # After 8.0 falls out of the 3-step window the scale follows the smaller amaxes.
    assert float(state.scale) == 448.0 / 1.0


def test_an_overflowing_step_leaves_the_scale_finite():
    state = DelayedScale(E4M3, history_len=3)
    for amax in (4.0, float("inf"), float("nan")):
        state.current_amax.fill_(amax)
        update_delayed_scales([state])
        assert float(state.scale) == 448.0 / 4.0
    assert torch.isfinite(state.amax_history).all()


def test_delayed_margin_and_power_of_two():
    state = DelayedScale(E5M2, history_len=2, margin=2, power_of_two=True)
    state.current_amax.fill_(3.0)
    update_delayed_scales([state])
    expected = power_of_two_floor(torch.tensor(57344.0 / 3.0 / 4))
    assert torch.equal(state.scale, expected)


def test_microbatches_raise_the_running_amax():
    state = DelayedScale(E4M3, history_len=4)
    for peak in (1.0, 5.0, 2.0):
        quantize_tensorwise(torch.full((4, 4), peak), E4M3, record_amax=state.current_amax)
    assert float(state.current_amax) == 5.0


def test_recipe_names_and_options():
    assert recipe_from_name("delayed", amax_history_len=4, margin=1).amax_history_len == 4
    with pytest.raises(UserError, match="must be one of"):
        recipe_from_name("fp4")
    with pytest.raises(UserError, match=">= 1"):
        recipe_from_name("delayed", amax_history_len=0)
