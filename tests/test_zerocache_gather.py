"""Stage 3 keeps the pages backward needs first gathered from forward into backward: their bytes
move once instead of twice, the peak stays where forward had it, and no parameter is ever stale."""

import torch

from angelptm.distributed.spawn import run_distributed
from angelptm.zerocache import ZeROCacheOptimizer
from test_zerocache_support import HYPER, SMALL_PAGES, batches, full_weights, loss_of, tiny_model, train_steps


def _gathered(opt: ZeROCacheOptimizer) -> set[int]:
    return {b.page.index for b in opt._buffers if b.full.untyped_storage().nbytes()}


def _peak_params(opt: ZeROCacheOptimizer, run) -> int:
    opt.ledger.start_step()  # a window around `run` alone
    run()
    opt.ledger.start_step()
    return opt.memory_ledger()["device"]["peak_params"]


def _observe() -> dict:
    model = tiny_model()
    with ZeROCacheOptimizer(model, None, **HYPER, stage=3, page_mb=SMALL_PAGES) as opt:
        rows = batches(1, 4)[0].chunk(opt.dp)[opt.rank]
        out = {"pages": len(opt._buffers), "unit_pages": [u.pages for u in opt._gatherer.units]}
        with torch.no_grad():
            out["peak_no_grad"] = _peak_params(opt, lambda: loss_of(model, rows))
        out["after_no_grad"] = _gathered(opt)
        losses = []
        out["peak_training"] = _peak_params(opt, lambda: losses.append(loss_of(model, rows)))
        out["after_forward"] = _gathered(opt)
        losses[0].backward()
        out["after_backward"] = _gathered(opt)
        opt.step()
        opt.zero_grad()
        loss_of(model, rows).backward()  # a step of forward and backward alone, for its bytes
        opt.step()
        page_bytes = {b.page.index: b.page.nbytes for b in opt._buffers}
        out["all_gather_bytes"] = opt.comm_bytes["all_gather"]
        out["expected_bytes"] = (2 * sum(page_bytes.values()) - sum(page_bytes[i] for i in out["after_forward"])) // 2
        return out


def test_forward_keeps_the_last_pages_for_backward_without_raising_the_peak():
    for seen in run_distributed(_observe, 2):
        kept = seen["after_forward"]
        assert set(seen["unit_pages"][-1]) <= kept  # backward starts with the last unit
        trailing = set()
        for pages in reversed(seen["unit_pages"]):  # the kept pages are those of the last units
            if kept <= trailing:
                break
            trailing.update(pages)
        assert kept <= trailing and len(kept) < seen["pages"]
        assert seen["after_no_grad"] == set() and seen["after_backward"] == set()
        assert seen["peak_training"] == seen["peak_no_grad"]
        # Forward gathers every page, backward every page but the kept ones (dp 2: half of each).
        assert seen["all_gather_bytes"] == seen["expected_bytes"]


def _train(extra_forward: bool) -> tuple[list[float], dict]:
    """Two steps; with `extra_forward`, a forward with autograd on and no backward comes between
    each backward and its step, so pages are still kept when the parameters change."""
    model = tiny_model()
    with ZeROCacheOptimizer(model, None, **HYPER, stage=3, page_mb=SMALL_PAGES) as opt:
        if extra_forward:
            step = opt.step

            def step_after_a_forward(*args):
                loss_of(model, batches(1, 2, seed=9)[0])
                step(*args)

            opt.step = step_after_a_forward
        losses = train_steps(model, opt, batches(3, 4), accum=1)
        return losses, full_weights(model, opt)


def test_parameters_changed_by_a_step_are_gathered_again():
    for (plain_losses, plain), (losses, weights) in zip(*(run_distributed(_train, 2, extra) for extra in (False, True))):
        assert losses == plain_losses
        assert all(torch.equal(weights[name], plain[name]) for name in plain)
