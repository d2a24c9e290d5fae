"""ZeROCache's memory arithmetic: how one rank's parameters pack into pages, what each ZeRO stage
keeps of them, and which tier (device, pinned host, NVMe) a device budget leaves them on.

This mirrors `angelptm.zerocache` without building anything: `pack_unit` follows
`pages.build_pages`, `zero_bytes` follows `placement.plan_placement` and `buffers.PageBuffers`,
and tests hold the two equal on real models. ZeROCache shards over the data group, dp·cp ranks
(context-parallel ranks hold the same weights), and routed experts under expert parallelism over
the expert-data-parallel group, dp·cp / ep ranks. Systems planned with a flat gradient buffer
(Megatron-LM's distributed optimizer) skip the pages and reduce gradients in place.

Under LoRA (`angelptm.planning.adapters`) every base weight is frozen and packs in pools of its
own, as ZeROCache packs frozen parameters: pages of parameters alone, whole on every rank below
stage 3 and sharded at stage 3, with no gradient buckets and no optimizer state; the adapters
pack in each block's trainable pool and alone have gradients and AdamW state.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from angelptm.config import Config
from angelptm.planning.adapters import adapter_params
from angelptm.planning.layout import Layout, stage_units
from angelptm.planning.model import Implementation, ModelShape, dtype_bytes

SHARD_ALIGN_NUMEL = 1024  # every shard is a whole number of 4 KiB blocks of fp32 state
PARAM_ALIGN_BYTES = 64  # parameters start on 64-byte boundaries inside a page


@dataclass(frozen=True)
class PageLayout:
    """One rank's parameters in pages: parameter elements, page elements (padding included), page
    count, largest page, and the most pages one unit (a block, the embedding, the head) spans."""

    params: int
    total: int
    count: int
    largest: int
    widest_unit: int
    widest_unit_numel: int  # elements of the unit whose pages add up to the most
    sharded: float  # page elements one rank owns from stage 1 on, each page split over its group
    # Under expert parallelism, the routed-expert pools (split over dp·cp / ep ranks): their
    # parameter elements, page elements and page count; zero without.
    expert_params: int
    expert_total: int
    expert_count: int
    # The pools with gradients and optimizer state (all of them in full fine-tuning, the adapters'
    # alone under LoRA): parameter elements, page elements and what one rank owns from stage 1 on.
    trainable_params: int
    trainable_total: int
    trainable_sharded: float


def _round_up(value: int, multiple: int) -> int:
    return math.ceil(value / multiple) * multiple


def pack_unit(numels: tuple[int, ...], itemsize: int, page_mb: float, shards: int) -> list[int]:
    """Page sizes (elements) of one unit: parameters packed whole in order, a new page when the
    next does not fit, an oversized parameter on a page of its own, each page padded to shards·1024."""
    quantum = shards * SHARD_ALIGN_NUMEL
    capacity = max(quantum, int(page_mb * 2**20 / itemsize) // quantum * quantum)
    align = max(1, PARAM_ALIGN_BYTES // itemsize)
    pages: list[int] = []
    filled = None  # elements of the open page, None when no page is open
    for n in numels:
        offset = _round_up(filled, align) if filled is not None else 0
        if filled is None or n > capacity or offset + n > capacity:
            if filled is not None:
                pages.append(filled)
            offset = 0
        filled = offset + n
        if n > capacity:
            pages.append(filled)
            filled = None
    if filled is not None:
        pages.append(filled)
    return [_round_up(max(p, 1), quantum) for p in pages]


@functools.lru_cache(maxsize=None)
def page_layout(m: ModelShape, tp: int, ep: int, n_layers: int, units: tuple[str, ...], itemsize: int,
                page_mb: float, shards: int, adapters: tuple[int, ...] = ()) -> PageLayout:
    """Pages of a rank holding `n_layers` blocks and the outside `units` ("embedding", "norm",
    "output"). Pages close at every unit's end, so all blocks of a kind pack alike: one is packed.
    Under expert parallelism an MoE block's routed-expert weights pack in pools of their own,
    split over the expert-data-parallel group (shards / ep ranks), as `pages.build_pages` does.
    `adapters` (one block's LoRA adapter sizes on this rank, `adapters.adapter_params`): every other
    parameter is frozen, in pools apart from each block's adapter pool."""
    embedding, block, norm, output = m.unit_params(tp)
    outside = [numels for name, numels in (("embedding", embedding), ("norm", norm), ("output", output))
               if name in units]
    dense, moe = m.layer_kinds(n_layers)

    frozen = bool(adapters)

    def pools(numels: tuple[int, ...], group: int = shards, expert: bool = False, trainable: bool = not frozen) -> list:
        return [(pack_unit(numels, itemsize, page_mb, group), group, expert, trainable)]

    adapter_pool = pools(adapters, trainable=True) if adapters else []

    # Each distinct unit once (a list of pools), with how many times it repeats: a 10-million-layer
    # model (which the trainer's preflight must refuse in milliseconds) packs in the time of one block.
    unit_pages = [(pools(block) + adapter_pool, dense)] if dense else []
    moe_block = m.moe_block_params(tp, ep) if moe else ()
    routed = tuple(n for n, is_routed in moe_block if is_routed) if ep > 1 else ()
    if moe and routed:
        plain = pools(tuple(n for n, is_routed in moe_block if not is_routed))
        unit_pages.append((plain + pools(routed, shards // ep, expert=True) + adapter_pool, moe))
    elif moe:  # without expert parallelism the experts share the block's pools
        unit_pages.append((pools(tuple(n for n, _ in moe_block)) + adapter_pool, moe))
    unit_pages += [(pools(numels), 1) for numels in outside]

    total = count = expert_total = expert_count = trainable_total = 0
    sharded = trainable_sharded = 0.0
    for unit, repeat in unit_pages:
        for pages, group, expert, trainable in unit:
            total, count = total + repeat * sum(pages), count + repeat * len(pages)
            sharded += repeat * sum(pages) / group
            if expert:
                expert_total, expert_count = expert_total + repeat * sum(pages), expert_count + repeat * len(pages)
            if trainable:
                trainable_total += repeat * sum(pages)
                trainable_sharded += repeat * sum(pages) / group
    params = dense * sum(block) + moe * sum(n for n, _ in moe_block) + sum(sum(numels) for numels in outside)
    return PageLayout(
        params=params + n_layers * sum(adapters),
        total=total, count=count, largest=max(max(p) for unit, _ in unit_pages for p, _, _, _ in unit),
        widest_unit=max(sum(len(p) for p, _, _, _ in unit) for unit, _ in unit_pages),
        widest_unit_numel=max(sum(sum(p) for p, _, _, _ in unit) for unit, _ in unit_pages),
        sharded=sharded, expert_params=moe * sum(routed), expert_total=expert_total, expert_count=expert_count,
        trainable_params=n_layers * sum(adapters) if frozen else params,
        trainable_total=trainable_total, trainable_sharded=trainable_sharded,
    )


def needs_master(param_bytes: int, param_tier: str, state_tier: str) -> bool:
    """A separate fp32 master copy unless the parameters are fp32 and live where AdamW runs."""
    compute_tier = "device" if state_tier == "device" else "host"
    return param_bytes != 4 or param_tier != compute_tier


@dataclass
class ZeroBytes:
    """One rank's ZeRO state in bytes, by kind and tier, and what limits it."""

    params_device: float
    params_host: float
    grads: float
    optimizer_device: float
    optimizer_host: float
    optimizer_nvme: float
    optimizer_on_device: float  # fraction of the optimizer state (and of the AdamW work) on device
    total_numel: float  # elements of the pages (or flat buffer) this rank holds whole before sharding
    expert_numel: float  # of those, the routed-expert pools sharded over dp·cp / ep (zero without ep)
    trainable_numel: float  # of those, the elements with gradients (under LoRA the adapters', none of the experts)
    in_flight: float  # gathered parameter pages and gradient buckets beyond the shards
    own_numel: float  # elements this rank's optimizer updates
    pages: PageLayout
    problems: list[str]


def zero_bytes(m: ModelShape, lay: Layout, cfg: Config, impl: Implementation, n_layers: int,
               stage_name: str) -> ZeroBytes:
    """What ZeRO stage `lay.zero_stage` keeps on one rank of `stage_name` that holds `n_layers`
    blocks, and on which tier."""
    z, stage = cfg.zero, lay.zero_stage
    shards = lay.dp * lay.cp
    pb = dtype_bytes(cfg)
    gb = impl.grad_bytes or pb
    pages = page_layout(m, lay.tp, lay.ep, n_layers, stage_units(m, lay, stage_name), pb, z.page_mb, shards,
                        adapter_params(m, cfg, lay.tp))
    in_flight = 0.0
    if impl.paged:
        total, expert, sharded = pages.total, pages.expert_total, pages.sharded
        trainable, trainable_sharded = pages.trainable_total, pages.trainable_sharded
        # Windows longer than the rank's pages hold no more than those (as placement.in_flight_bytes).
        prefetch, reductions = min(z.prefetch_pages, pages.count), min(max(2, z.prefetch_pages), pages.count)
        if stage >= 2:  # the running unit's buckets; a bucket and a receive buffer per reduction in flight
            in_flight = (pages.widest_unit_numel + 2 * reductions * pages.largest) * pb
            if stage == 3:  # whole units gathered, two at once for a tied pair, plus the prefetch
                in_flight += (2 * pages.widest_unit_numel + prefetch * pages.largest) * pb
    else:  # one flat buffer per group: dense weights over dp·cp, routed experts over dp·cp / ep
        edp = shards // lay.ep
        expert = _round_up(pages.expert_params, edp)
        total = _round_up(pages.params - pages.expert_params, shards) + expert
        sharded = (total - expert) / shards + expert / edp
        trainable, trainable_sharded = total, sharded
        if pages.trainable_params < pages.params:  # LoRA: a flat buffer of the adapters alone
            trainable = _round_up(pages.trainable_params, shards)
            trainable_sharded = trainable / shards
    own = total if stage == 0 else sharded  # the parameters' own range (stage 3 keeps only it)
    own_trainable = trainable if stage == 0 else trainable_sharded  # what gets gradients and AdamW
    # Stages 0-1 keep a bucket of whole gradients; ZeROCache's stages 1-3 add the reduced shard,
    # a flat buffer reduce-scatters in place.
    grads = trainable * gb if stage <= 1 else 0.0
    if stage >= 2 or (stage == 1 and impl.paged):
        grads += own_trainable * gb
    params_whole = total * pb if stage <= 2 else 0.0
    shard_params = own * pb if stage == 3 else 0.0
    movable = stage == 3 and z.offload_params == "cpu"
    fixed = params_whole + grads + in_flight + (0.0 if movable else shard_params)

    def slab(param_tier: str, state_tier: str) -> float:
        return own_trainable * 4 * (3 if needs_master(pb, param_tier, state_tier) else 2)

    state_tier = {"none": "device", "cpu": "host", "nvme": "nvme"}[z.offload_optimizer]
    params_on_device = 0.0 if movable else shard_params
    on_device = 1.0 if state_tier == "device" else 0.0  # fraction of the optimizer state
    problems: list[str] = []
    if z.device_budget_gb is not None:
        # The budget goes first to stage-3 parameter shards (used three times a step), then to
        # optimizer state (used once); what does not fit goes to the offload tiers.
        left = z.device_budget_gb * 1e9 - fixed
        if left < 0:
            problems.append(f"zero.device_budget_gb={z.device_budget_gb} is below the {fixed / 1e9:.2f} GB "
                            "this layout keeps on the device; raise it or use zero.stage=3 with offload_params=cpu")
            left = 0.0
        if movable:
            params_on_device = min(shard_params, left)
            left -= params_on_device
        want = slab("device" if params_on_device >= shard_params else "host", "device")
        on_device = min(1.0, left / want) if want else 1.0
        if on_device < 1 and state_tier == "device":
            problems.append(f"zero.device_budget_gb={z.device_budget_gb} leaves {left / 1e9:.2f} GB for optimizer "
                            f"state that needs {want / 1e9:.2f} GB; set zero.offload_optimizer=cpu or raise the budget")
            on_device = 1.0
    param_tier = "device" if params_on_device >= shard_params else "host"
    optimizer_off = (1 - on_device) * slab(param_tier, state_tier)
    return ZeroBytes(
        params_device=params_whole + params_on_device, params_host=shard_params - params_on_device,
        grads=grads, optimizer_device=on_device * slab(param_tier, "device"),
        optimizer_host=optimizer_off if state_tier == "host" else 0.0,
        optimizer_nvme=optimizer_off if state_tier == "nvme" else 0.0,
        optimizer_on_device=on_device, total_numel=total, expert_numel=expert, trainable_numel=trainable,
        in_flight=in_flight, own_numel=own_trainable, pages=pages, problems=problems,
    )
