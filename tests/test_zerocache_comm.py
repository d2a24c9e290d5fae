"""Page collectives (zerocache/comm.py) on gloo: exact results and byte counts, several in flight.

On gloo, all-gather runs as one broadcast per rank and reduce-scatter as an all-to-all and a local
sum in rank order. Three ranks check that every rank's chunk reaches every other rank, with
several pages in flight at once, and that each rank's shard gets exactly what summing the ranks'
chunks in rank order onto it gives.
"""

import pytest
import torch
import torch.distributed as dist

from angelptm.distributed.spawn import run_distributed
from angelptm.zerocache.comm import PageComm
from angelptm.zerocache.ledger import MemoryLedger
from angelptm.zerocache.tiers import Allocator

PAGE = 6 * 1000  # elements; a multiple of the rank count


def _page(rank: int, index: int) -> torch.Tensor:
    return torch.randn(PAGE, generator=torch.Generator().manual_seed(100 * index + rank))


def _collectives(pages: int) -> dict:
    rank, size = dist.get_rank(), dist.get_world_size()
    ledger = MemoryLedger()
    comm = PageComm(dist.group.WORLD, Allocator(torch.device("cpu"), ledger))
    chunk = PAGE // size

    # Several gathers in flight at once, as when stages 1-2 publish every page after a step:
    # half of them gather in place (the shard is this rank's slice), half from a separate shard.
    fulls, handles = [], []
    for i in range(pages):
        full = torch.full((PAGE,), float("nan"))
        own = _page(rank, i)[rank * chunk : (rank + 1) * chunk]
        if i % 2:
            full[rank * chunk : (rank + 1) * chunk] = own
            handles.append(comm.all_gather(full, full[rank * chunk : (rank + 1) * chunk]))
        else:
            handles.append(comm.all_gather(full, own.clone()))
        fulls.append(full)
    for h in handles:
        h.wait()
    expected = [torch.cat([_page(r, i)[r * chunk : (r + 1) * chunk] for r in range(size)]) for i in range(pages)]
    gathered = all(torch.equal(f, e) for f, e in zip(fulls, expected))

    # Reduce-scatters into shards that already hold something (gradient accumulation).
    outs = [torch.ones(chunk) for _ in range(pages)]
    buckets = [_page(rank, 50 + i) for i in range(pages)]
    handles = [comm.reduce_scatter_add(out, bucket) for out, bucket in zip(outs, buckets)]
    for h in handles:
        h.wait()
    scattered = True
    for i, out in enumerate(outs):
        reference = torch.ones(chunk)
        for r in range(size):
            reference += _page(r, 50 + i)[rank * chunk : (rank + 1) * chunk]
        scattered &= torch.equal(out, reference)

    summed = _page(rank, 99)
    comm.all_reduce(summed).wait()
    reduced = torch.allclose(summed, sum(_page(r, 99) for r in range(size)), rtol=1e-6, atol=1e-6)
    return {"gathered": gathered, "scattered": scattered, "reduced": reduced, "sent": dict(comm.sent_bytes),
            "buffers_left": ledger.report()["device"]["buffers"]}


@pytest.mark.slow
def test_page_collectives_are_exact_and_count_the_ring_bytes():
    pages = 4
    for result in run_distributed(_collectives, 3, pages):
        assert result["gathered"] and result["scattered"] and result["reduced"]
        share = PAGE * 4 * 2 // 3  # bytes a rank sends per page: (n-1)/n of it
        assert result["sent"] == {"all_gather": pages * share, "reduce_scatter": pages * share,
                                  "all_reduce": 2 * share}
        assert result["buffers_left"] == 0  # whatever a collective borrowed went back to the ledger


def _alone() -> bool:
    comm = PageComm(dist.group.WORLD, Allocator(torch.device("cpu"), MemoryLedger()))
    page = torch.arange(8.0)
    comm.all_gather(page, page).wait()
    out = torch.ones(8)
    comm.reduce_scatter_add(out, page).wait()
    return torch.equal(page, torch.arange(8.0)) and torch.equal(out, torch.arange(8.0) + 1) \
        and sum(comm.sent_bytes.values()) == 0


def test_collectives_on_a_group_of_one_leave_the_page_as_it_is():
    assert run_distributed(_alone, 1) == [True]
