"""The mesh and its collectives: the mesh orders its dims (pp, dp, cp, tp) and flattens dp × cp; each
autograd region computes the right forward and the dual backward; every call adds exactly the bus bytes
of its algorithm to its group's counter; a group of one sends nothing."""

import pytest
import torch
import torch.distributed as dist

from angelptm.distributed.collectives import (
    Group,
    all_gather,
    all_reduce,
    all_reduce_coalesced,
    all_to_all,
    all_to_all_region,
    comm_bytes,
    copy_to_parallel,
    gather_sequence,
    group_of,
    reduce_from_parallel,
    reduce_scatter,
    reduce_scatter_sequence,
    reset_comm_bytes,
    ring_shift,
)
from angelptm.distributed.mesh import ParallelDims, init
from angelptm.distributed.spawn import run_distributed

P = 4


def _rank_tensor(rank: int, shape=(2, 8, 3)) -> torch.Tensor:
    """A tensor that differs on every rank and in every element."""
    return torch.arange(torch.Size(shape).numel(), dtype=torch.float32).view(shape) + 100 * rank


def _mesh_members():
    mesh = init(ParallelDims(dp=2, cp=2))
    members = {}
    for dim in ("tp", "cp", "dp", "dp_cp"):
        group = group_of(mesh, dim)
        members[dim] = sorted(group.global_rank(r) for r in range(group.size))
    return members


def _check_collectives():
    members = _mesh_members()
    mesh = init(ParallelDims(tp=P))
    g = group_of(mesh, "tp")
    r = g.rank
    every = [_rank_tensor(i) for i in range(P)]
    x = _rank_tensor(r)
    n = x.numel() * 4
    expected_bytes = {}
    results = {}

    reset_comm_bytes()
    results["all_reduce"] = torch.equal(all_reduce(x.clone(), g), sum(every))
    expected_bytes["all_reduce"] = 2 * (P - 1) * n // P
    results["all_gather"] = torch.equal(all_gather(x, 1, g), torch.cat(every, 1))
    expected_bytes["all_gather"] = (P - 1) * n
    results["reduce_scatter"] = torch.equal(reduce_scatter(x, 1, g), sum(every).chunk(P, 1)[r])
    expected_bytes["reduce_scatter"] = (P - 1) * n // P
    # all-to-all: split heads (dim 0 here), gather the sequence (dim 1); then its inverse brings x back.
    y = all_to_all(x.repeat(2, 1, 1), 0, 1, g)
    results["all_to_all"] = torch.equal(y, torch.cat([e.repeat(2, 1, 1)[r:r + 1] for e in every], 1))
    results["all_to_all_inverse"] = torch.equal(all_to_all(y, 1, 0, g), x.repeat(2, 1, 1))
    expected_bytes["all_to_all"] = 2 * (P - 1) * 2 * n // P
    shifted = ring_shift(x, g).wait()
    results["ring_shift"] = torch.equal(shifted, every[(r - 1) % P])
    expected_bytes["ring_shift"] = n
    a, b = x.clone(), x[0].clone()
    all_reduce_coalesced([a, b], g)
    results["coalesced"] = torch.equal(a, sum(every)) and torch.equal(b, sum(every)[0])
    expected_bytes["coalesced"] = 2 * (P - 1) * (n + n // 2) // P
    results["bytes"] = (comm_bytes(), {"tp": sum(expected_bytes.values())})
    results["members"] = members

    # Autograd regions: forward and backward against the collective each one's dual should be.
    grad = _rank_tensor(r) * 0.5 + 1
    all_grads = [_rank_tensor(i) * 0.5 + 1 for i in range(P)]

    def run(fn, inp, upstream):
        inp = inp.clone().requires_grad_()
        out = fn(inp)
        out.backward(upstream)
        return out.detach(), inp.grad

    out, dx = run(lambda t: copy_to_parallel(t, g), x, grad)
    results["copy_to_parallel"] = torch.equal(out, x) and torch.equal(dx, sum(all_grads))
    out, dx = run(lambda t: reduce_from_parallel(t, g), x, grad)
    results["reduce_from_parallel"] = torch.equal(out, sum(every)) and torch.equal(dx, grad)
    full_grad = torch.cat(all_grads, 1)
    out, dx = run(lambda t: gather_sequence(t, g), x, full_grad * (r + 1))
    results["gather_sequence"] = (torch.equal(out, torch.cat(every, 1))
                                  and torch.equal(dx, (full_grad * sum(range(1, P + 1))).chunk(P, 1)[r]))
    out, dx = run(lambda t: reduce_scatter_sequence(t, g), x, grad[:, : 8 // P])
    results["reduce_scatter_sequence"] = (torch.equal(out, sum(every).chunk(P, 1)[r])
                                          and torch.equal(dx, torch.cat([a[:, : 8 // P] for a in all_grads], 1)))
    upstream = _rank_tensor(r, (1, 8 * P, 3))
    out, dx = run(lambda t: all_to_all_region(t, 0, 1, g), x.repeat(2, 1, 1), upstream)
    results["all_to_all_region"] = torch.equal(out, y) and torch.equal(dx, all_to_all(upstream, 1, 0, g))
    return results


@pytest.mark.slow
def test_mesh_groups_collectives_and_byte_counters():
    per_rank = run_distributed(_check_collectives, P)
    assert per_rank[0]["members"] == {"tp": [0], "cp": [0, 1], "dp": [0, 2], "dp_cp": [0, 1, 2, 3]}
    assert per_rank[3]["members"] == {"tp": [3], "cp": [2, 3], "dp": [1, 3], "dp_cp": [0, 1, 2, 3]}
    for rank, results in enumerate(per_rank):
        results.pop("members")
        measured, expected = results.pop("bytes")
        assert measured == expected, f"rank {rank}"
        failed = [name for name, ok in results.items() if not ok]
        assert not failed, f"rank {rank}: {failed}"


def test_group_of_one_sends_nothing_and_returns_input():
    single = Group("tp", None, 0, 1)  # never touched: a group of one communicates with no one
    reset_comm_bytes()
    x = torch.randn(2, 4, 3, requires_grad=True)
    for region in (copy_to_parallel, reduce_from_parallel, gather_sequence, reduce_scatter_sequence):
        assert region(x, single) is x
    assert all_to_all_region(x, 1, 2, single) is x
    assert ring_shift(x, single).wait() is x
    assert all_reduce(x.detach(), single) is not None and comm_bytes() == {}
    assert not dist.is_initialized()
