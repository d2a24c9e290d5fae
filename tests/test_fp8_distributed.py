"""FP8 amax all-reduce over the groups that share a tensor: tp for weights, dp for activations (gloo, 4 ranks)."""

import pytest
import torch
import torch.distributed as dist

from angelptm.distributed.spawn import run_distributed
from angelptm.fp8 import AmaxGroups, Float8Linear, update_float8_scales

pytestmark = pytest.mark.slow

# 4 ranks as a 2x2 mesh: tp groups {0,1} {2,3}, dp groups {0,2} {1,3}.
TP_GROUPS, DP_GROUPS = [[0, 1], [2, 3]], [[0, 2], [1, 3]]


def _my_groups():
    rank = dist.get_rank()
    tp = dp = None
    for ranks in TP_GROUPS:  # every rank creates every group, in the same order
        group = dist.new_group(ranks)
        tp = group if rank in ranks else tp
    for ranks in DP_GROUPS:
        group = dist.new_group(ranks)
        dp = group if rank in ranks else dp
    return tp, dp


def _worker():
    tp, dp = _my_groups()
    return {"delayed": _delayed(tp, dp), "current": _current_scaling(tp)}


def _delayed(tp, dp):
    rank = dist.get_rank()
    torch.manual_seed(rank)
    layer = Float8Linear(64, 32, bias=False, recipe="delayed",
                         amax_groups=AmaxGroups(input=(dp,), weight=(tp,), grad_output=(dp,)))
    with torch.no_grad():
        layer.weight.mul_(rank + 1)  # every rank's local amaxes differ
    x = torch.randn(16, 64) * (4 - rank)
    dy = torch.randn(16, 32) * (rank + 2)
    layer(x).backward(dy)
    local = {"input": x.abs().max(), "weight": layer.weight.detach().abs().max(), "grad_output": dy.abs().max()}
    update_float8_scales(layer)
    reduced = {role: getattr(layer, f"{role}_scale").amax_history[1].clone() for role in local}
    scales = {role: getattr(layer, f"{role}_scale").scale.clone() for role in local}
    return {"local": local, "reduced": reduced, "scales": scales}


def _current_scaling(tp):
    """Tensorwise (current) scaling of a weight shard: each shard is scaled like the whole weight."""
    rank = dist.get_rank()
    torch.manual_seed(rank)
    layer = Float8Linear(64, 32, bias=False, recipe="tensorwise", amax_groups=AmaxGroups(weight=(tp,)))
    with torch.no_grad():
        layer.weight.mul_(rank + 1)
    rows, _ = layer.quantized_weight(need_t=False)
    return {"local": layer.weight.detach().abs().max(), "scale_inv": rows.scale_inv}


def _group_max(values, groups):
    """rank -> the max of `values` over that rank's group."""
    return {r: max(float(values[o]) for o in g) for g in groups for r in g}


@pytest.fixture(scope="module")
def per_rank():
    return run_distributed(_worker, 4)


def test_delayed_amaxes_are_all_reduced_over_the_right_groups(per_rank):
    results = [r["delayed"] for r in per_rank]
    for role, groups in (("input", DP_GROUPS), ("grad_output", DP_GROUPS), ("weight", TP_GROUPS)):
        want = _group_max([res["local"][role] for res in results], groups)
        for rank, res in enumerate(results):
            assert float(res["reduced"][role]) == want[rank], (role, rank)
        for g in groups:  # same scale inside a group
            assert all(torch.equal(results[g[0]]["scales"][role], results[r]["scales"][role]) for r in g)
    # ...and not across groups: the two tp groups hold different weights.
    assert not torch.equal(results[0]["scales"]["weight"], results[2]["scales"]["weight"])


def test_current_scaling_reduces_the_weight_amax_over_tp(per_rank):
    results = [r["current"] for r in per_rank]
    want = _group_max([res["local"] for res in results], TP_GROUPS)
    for rank, res in enumerate(results):
        torch.testing.assert_close(res["scale_inv"], torch.tensor(want[rank] / 448.0))
