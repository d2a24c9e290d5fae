"""Placement: which pages' parameter shards and optimizer state stay on the device, from a budget.

The device keeps what every step needs there (stages 0-2: the whole parameters; gradients;
in-flight buffers). What remains of `zero.device_budget_gb` goes page by page, first to stage-3
parameter shards (used three times a step), then to optimizer state (used once); the pages that
do not fit go to the offload tier the config names. The split is fractional: any number of pages
may stay. Without a budget the `offload_*` keys alone decide (all on device for `none`).
"""

from __future__ import annotations

from dataclasses import dataclass

from angelptm.errors import UserError
from angelptm.zerocache.buffers import needs_master, slab_numel
from angelptm.zerocache.ledger import GIB
from angelptm.zerocache.pages import Page, Unit

STATE_TIER = {"none": "device", "cpu": "host", "nvme": "nvme"}


@dataclass
class Placement:
    param_tiers: list[str]  # per page: where this rank's own parameter range lives
    state_tiers: list[str]  # per page: where its optimizer-state slab lives
    fixed_device_bytes: int  # what the device holds whatever the split
    explanation: str


def _gb(nbytes: float) -> str:
    return f"{nbytes / GIB:.3f} GB"


def slab_bytes(page: Page, own_numel: int, param_tier: str, state_tier: str) -> int:
    """Bytes of a page's optimizer-state slab (see buffers.PageBuffers); none for a frozen page."""
    if page.frozen:
        return 0
    return 4 * slab_numel(own_numel, needs_master(page.dtype, param_tier, state_tier))


def in_flight_bytes(pages: list[Page], units: list[Unit], stage: int, prefetch_pages: int,
                    max_in_flight: int) -> int:
    """Bytes of full parameter pages and gradient buckets a rank may hold at once, beyond its
    shards: at stage 3 two units' pages (the running one, and a tied embedding or the unit being
    released) plus the prefetched pages; from stage 2 one unit's buckets plus, for every reduction
    in flight, its bucket and its receive buffer."""
    widest = max((sum(pages[i].nbytes for i in u.pages) for u in units), default=0)
    largest = max((p.nbytes for p in pages), default=0)
    # A window longer than the model holds no more pages than there are.
    prefetch_pages, max_in_flight = min(prefetch_pages, len(pages)), min(max_in_flight, len(pages))
    gathered = 2 * widest + prefetch_pages * largest if stage == 3 else 0
    buckets = widest + 2 * max_in_flight * largest if stage >= 2 else 0
    return gathered + buckets


def plan_placement(pages: list[Page], units: list[Unit], stage: int, dp: int, *,
                   offload_optimizer: str, offload_params: str, device_budget_gb: float | None,
                   prefetch_pages: int, max_in_flight: int) -> Placement:
    own = [p.numel if stage == 0 or (p.frozen and stage < 3) else p.numel // p.shards for p in pages]
    param_bytes = [p.nbytes for p in pages]
    shard_bytes = [n * p.dtype.itemsize for n, p in zip(own, pages)]
    with_grads = [not p.frozen for p in pages]
    grads = sum(b for b, g in zip(param_bytes, with_grads) if g) if stage <= 1 else 0  # persistent buckets
    grads += sum(b for b, g in zip(shard_bytes, with_grads) if g) if stage >= 1 else 0
    params_movable = stage == 3 and offload_params == "cpu"
    params = sum(param_bytes) if stage <= 2 else 0 if params_movable else sum(shard_bytes)
    flight = in_flight_bytes(pages, units, stage, prefetch_pages, max_in_flight)
    fixed = params + grads + flight
    param_tiers = ["device"] * len(pages)
    state_tiers = ["device" if p.frozen else STATE_TIER[offload_optimizer] for p in pages]  # frozen: no state
    if params_movable:
        param_tiers = ["host"] * len(pages)

    if device_budget_gb is not None:
        budget = int(device_budget_gb * GIB)
        if fixed > budget:
            if params_movable:
                fix = "lower zero.page_mb or zero.prefetch_pages to hold fewer pages in flight"
            else:
                fix = "set zero.offload_params=cpu" if stage == 3 else "use zero.stage=3 with zero.offload_params=cpu"
            raise UserError(
                f"zero.device_budget_gb={device_budget_gb} is below the {_gb(fixed)} this layout keeps on "
                f"the device (stage {stage}: params {_gb(params)}, grads {_gb(grads)}, in-flight pages "
                f"{_gb(flight)}); raise it, or {fix}"
            )
        left = budget - fixed
        if params_movable:
            for i, nbytes in enumerate(shard_bytes):
                if nbytes <= left:
                    param_tiers[i], left = "device", left - nbytes
        for i, page in enumerate(pages):
            nbytes = slab_bytes(page, own[i], param_tiers[i], "device")
            if nbytes <= left:
                state_tiers[i], left = "device", left - nbytes
            elif offload_optimizer == "none":
                need = sum(slab_bytes(p, own[j], param_tiers[j], "device") for j, p in enumerate(pages))
                raise UserError(
                    f"zero.device_budget_gb={device_budget_gb} leaves {_gb(budget - fixed)} for optimizer "
                    f"state that needs {_gb(need)} on the device; set zero.offload_optimizer=cpu (or nvme) "
                    "to keep the rest off the device, or raise the budget"
                )
    explanation = _explain(pages, own, param_tiers, state_tiers, stage, dp, device_budget_gb, fixed,
                           shard_bytes, params_movable)
    return Placement(param_tiers, state_tiers, fixed, explanation)


def _explain(pages, own, param_tiers, state_tiers, stage, dp, budget_gb, fixed, shard_bytes,
             params_movable) -> str:
    n = len(pages)
    parts = []
    for tier in ("device", "host", "nvme"):
        p_pages = [i for i in range(n) if param_tiers[i] == tier] if stage == 3 else []
        s_pages = [i for i in range(n) if state_tiers[i] == tier]
        nbytes = sum(slab_bytes(pages[i], own[i], param_tiers[i], tier) for i in s_pages)
        if params_movable or tier != "device":  # else the shards are already in `fixed`
            nbytes += sum(shard_bytes[i] for i in p_pages)
        if tier == "device":
            nbytes += fixed
        elif not p_pages and not s_pages:
            continue
        what = [f"param shards {len(p_pages)}/{n} pages"] if stage == 3 else []
        what.append(f"optimizer {len(s_pages)}/{n} pages")
        parts.append(f"{tier} {_gb(nbytes)} ({', '.join(what)})")
    budget = f"budget {budget_gb:.3f} GB" if budget_gb is not None else "no budget"
    return (f"zerocache placement: stage {stage}, dp {dp}, {n} pages, {budget}; device keeps "
            f"{_gb(fixed)} for params, grads and in-flight pages; " + "; ".join(parts))
