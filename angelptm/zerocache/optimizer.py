"""ZeROCacheOptimizer: data-parallel AdamW with ZeRO stages 0-3 over paged, tiered memory.

    opt = ZeROCacheOptimizer(model, mesh, lr=3e-4, stage=3, offload_optimizer="cpu")
    for step in ...:
        for i, batch in enumerate(microbatches):
            with opt.no_sync(i < len(microbatches) - 1):   # stages 0-1 reduce once per step
                loss_fn(model(batch)).backward()
        # (or: run every backward under no_sync(), then call opt.reduce_gradients())
        grad_norm = opt.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()

Construction packs the model's parameters into pages (they become views into them; frozen ones,
requires_grad False, in pages of their own with no gradients or optimizer state),
decides where each page's parameter shard and optimizer state live (`placement`), and installs
the hooks that reduce gradients during backward (`grads.GradReducer`) and, at stage 3, gather
parameters around each unit (`gather.ParamGatherer`). The dp group is the "dp" dimension of a
DeviceMesh (with "cp": context-parallel ranks hold the same weights), an explicit ProcessGroup,
or the whole world. A DeviceMesh also brings the model-parallel dimensions: "tp", whose sharded
parameters (`model.shard_specs`) get their partial gradients summed, their norm counted and their
checkpoint placed in the global tensors (tensor_parallel.py), and "pp", whose stages hold other
parameters, so the global gradient norm sums over it too. Under expert parallelism the expert
weights are sharded and reduced over the expert-data-parallel group instead (experts.py).

Gradients are averaged over the dp group (like DDP). Parameters' `.grad` stay None: gradients
live in the pages. At stage 3, parameters have no storage outside a unit's forward and backward;
at stages 1-2 the step's parameter gathers finish during the next forward (publish.py).
`gathered_parameters()` gives every parameter its full, current value (for export or evaluation
without the model hooks).
"""

from __future__ import annotations

import logging
from collections import Counter
from contextlib import contextmanager
from typing import Iterator, Optional, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from angelptm.distributed.collectives import Group, group_of
from angelptm.distributed.mesh import DATA_DIMS, init_process_group
from angelptm.distributed.tensor_parallel import spec_of
from angelptm.errors import UserError
from angelptm.zerocache import checkpoint
from angelptm.zerocache.adamw import adamw_
from angelptm.zerocache.buffers import PageBuffers
from angelptm.zerocache.comm import PageComm
from angelptm.zerocache.experts import ExpertSharding
from angelptm.zerocache.fp8_gather import Float8Gather, fp8_gathered_layers
from angelptm.zerocache.gather import ParamGatherer
from angelptm.zerocache.grads import GradReducer
from angelptm.zerocache.ledger import MemoryLedger
from angelptm.zerocache.offload import OffloadStepper
from angelptm.zerocache.pages import Page, build_pages, find_units, shard_range
from angelptm.zerocache.placement import plan_placement, slab_bytes
from angelptm.zerocache.publish import PagePublisher
from angelptm.zerocache.tensor_parallel import TensorParallelPages
from angelptm.zerocache.tiers import BLOCK, Allocator, NvmeFile, Transfers

log = logging.getLogger(__name__)


def dp_group(mesh: Union[DeviceMesh, dist.ProcessGroup, None], device: torch.device) -> dist.ProcessGroup:
    """The process group ZeROCache shards over: the ranks that see different tokens of a mesh
    (dp, and cp with it: context-parallel ranks hold the same weights), a group, or the world
    (started for the parameters' device when there is none yet)."""
    if mesh is None:
        init_process_group("nccl" if device.type == "cuda" else "gloo")
        return dist.group.WORLD
    if isinstance(mesh, DeviceMesh):
        names = mesh.mesh_dim_names or ()
        if "dp" in names and "cp" in names:
            return mesh["dp", "cp"]._flatten(DATA_DIMS).get_group()
        return mesh["dp"].get_group() if "dp" in names else mesh.get_group()
    return mesh


def mesh_dim(mesh: Union[DeviceMesh, dist.ProcessGroup, None], dim: str) -> Group:
    """The group of a model-parallel dimension ("tp", "pp") of a DeviceMesh; a group of one otherwise."""
    if isinstance(mesh, DeviceMesh) and dim in (mesh.mesh_dim_names or ()):
        return group_of(mesh, dim)
    return Group(dim, None, 0, 1)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's parameter groups: matrices decay; norms and biases do not."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _check_arguments(stage, page_mb, offload_optimizer, offload_params, nvme_dir, prefetch_pages) -> None:
    if stage not in (0, 1, 2, 3):
        raise UserError(f"zero.stage={stage} must be 0, 1, 2 or 3")
    if not page_mb > 0:
        raise UserError(f"zero.page_mb={page_mb} must be positive")
    if offload_optimizer not in ("none", "cpu", "nvme"):
        raise UserError(f"zero.offload_optimizer={offload_optimizer} must be none, cpu or nvme")
    if offload_params not in ("none", "cpu"):
        raise UserError(f"zero.offload_params={offload_params} must be none or cpu (parameters live on "
                        "device or host)")
    if offload_params != "none" and stage != 3:
        raise UserError(f"zero.offload_params={offload_params} needs sharded parameters; set zero.stage=3")
    if offload_optimizer == "nvme" and not nvme_dir:
        raise UserError("zero.offload_optimizer=nvme needs a folder; set zero.nvme_dir=/path/on/nvme")
    if prefetch_pages < 0:
        raise UserError(f"zero.prefetch_pages={prefetch_pages} must be >= 0")


class ZeROCacheOptimizer(torch.optim.Optimizer):
    def __init__(self, model: nn.Module, mesh: Union[DeviceMesh, dist.ProcessGroup, None] = None, *,
                 lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, stage: int = 0, page_mb: float = 32.0,
                 offload_optimizer: str = "none", offload_params: str = "none",
                 nvme_dir: Optional[str] = None, device_budget_gb: Optional[float] = None,
                 prefetch_pages: int = 2, fp8_all_gather: bool = False):
        """`fp8_all_gather` (stage 3): gather the weights of FP8 layers as FP8 (fp8_gather.py)."""
        _check_arguments(stage, page_mb, offload_optimizer, offload_params, nvme_dir, prefetch_pages)
        fp8_layers = fp8_gathered_layers(model) if fp8_all_gather else {}
        if fp8_all_gather and (stage != 3 or not fp8_layers):
            raise UserError("precision.fp8.fp8_all_gather gathers stage-3 weights of Float8Linear layers with the "
                            "tensorwise or rowwise recipe; set zero.stage=3 and such a precision.fp8.recipe, or "
                            "fp8_all_gather=false")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise UserError("the model has no trainable parameters; nothing to optimise")
        devices = {p.device for p in params}
        if len(devices) != 1 or next(iter(devices)).type == "meta":
            raise UserError(f"parameters sit on {sorted(map(str, devices))}; materialise the model on one "
                            "device before building the optimizer")
        groups = [g for g in parameter_groups(model, weight_decay) if g["params"]]
        super().__init__(groups, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        param_group = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        self.device = devices.pop()
        self.stage = stage
        self.group = dp_group(mesh, self.device)
        tp, pp = mesh_dim(mesh, "tp"), mesh_dim(mesh, "pp")
        # Their ranks hold other parameters (or other slices of them): squared norms add up over them.
        self._norm_groups = [g.pg for g in (tp, pp) if g.size > 1]
        self.ledger = MemoryLedger()
        self._alloc = Allocator(self.device, self.ledger)
        self._comm = PageComm(self.group, self._alloc)
        self.dp, self.rank = self._comm.size, self._comm.rank
        # Expert parallelism: the expert weights shard over their own group, edp (experts.py).
        self._experts = ExpertSharding.of(model)
        self._expert_comm = PageComm(self._experts.edp.pg, self._alloc) if self._experts else None
        self._page_comms = [comm for comm in (self._comm, self._expert_comm) if comm is not None]
        max_in_flight = max(2, prefetch_pages)

        units = find_units(model)
        # Frozen parameters (a LoRA base) belong to no group: their pages are never stepped.
        pages = build_pages(model, units, page_mb, self.dp, lambda param: param_group.get(id(param), 0),
                            frozenset(fp8_layers), self._experts.params if self._experts else frozenset(),
                            self._expert_comm.size if self._expert_comm else 1)
        self._specs = {slot.name: spec_of(model, slot.name, slot.param, tp.size)
                       for page in pages for slot in page.slots}
        self.placement = plan_placement(
            pages, units, stage, self.dp, offload_optimizer=offload_optimizer, offload_params=offload_params,
            device_budget_gb=device_budget_gb, prefetch_pages=prefetch_pages, max_in_flight=max_in_flight)
        # NVMe first: a missing, unwritable or full folder fails before the model is touched.
        offsets, nvme_bytes = self._nvme_layout(pages)
        self._nvme = NvmeFile(nvme_dir, nvme_bytes) if nvme_bytes else None
        if nvme_bytes:
            self.ledger.add("nvme", "optimizer", nvme_bytes)

        self._buffers = [self._adopt(page, offsets.get(page.index, -1)) for page in pages]
        self._trainable = [b for b in self._buffers if not b.page.frozen]  # the pages with gradients and state
        self._transfers = Transfers(self.device)
        self._offload = OffloadStepper([b for b in self._trainable if b.state_tier != "device"], self._alloc,
                                       self._transfers, self._nvme, prefetch_pages)
        self._init_state()
        self._tp_pages = TensorParallelPages(self._trainable, self._specs, tp)
        self._tp_summed = False  # whether this step's tp-partial gradients are summed yet
        self._fp8 = Float8Gather(self._buffers, fp8_layers, self._comm, self._alloc) if fp8_layers else None
        self._gatherer = ParamGatherer(units, self._buffers, self._alloc, prefetch_pages, self._fp8) \
            if stage == 3 else None
        self._publisher = PagePublisher(units, self._trainable) if stage in (1, 2) and self.dp > 1 else None
        self._reducer = GradReducer(self._buffers, stage, self.dp, self._alloc, max_in_flight,
                                    self._gatherer.on_param_grad if self._gatherer else lambda param: None)
        self._steps = 0
        self._step_device = torch.zeros((), device=self.device)
        self._step_host = torch.zeros(())
        self._grad_scale: Optional[torch.Tensor] = None  # set by clip_grad_norm_ for the next step
        self._sent_at_step_end: Counter = Counter()
        self._sent_last_step: dict = {}
        self.ledger.start_step()
        if self.rank == 0:
            log.info(self.placement.explanation)

    @classmethod
    def from_config(cls, model: nn.Module, mesh: Union[DeviceMesh, dist.ProcessGroup, None],
                    cfg) -> "ZeROCacheOptimizer":
        """Build from a full `angelptm.Config` (its `zero.*` and `optim.*` keys)."""
        z, o = cfg.zero, cfg.optim
        return cls(model, mesh, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                   stage=z.stage, page_mb=z.page_mb, offload_optimizer=z.offload_optimizer,
                   offload_params=z.offload_params, nvme_dir=z.nvme_dir,
                   device_budget_gb=z.device_budget_gb, prefetch_pages=z.prefetch_pages,
                   fp8_all_gather=cfg.precision.fp8.enabled and cfg.precision.fp8.fp8_all_gather)

    # -- construction --------------------------------------------------------------------------

    def _comm_of(self, page: Page) -> PageComm:
        """The collectives of the group the page is sharded over."""
        return self._expert_comm if page.expert else self._comm

    def _own_range(self, page: Page) -> tuple[int, int]:
        comm = self._comm_of(page)
        # A frozen page is never updated, so below stage 3 (parameters whole on every rank) it owns all.
        whole = self.stage == 0 or (page.frozen and self.stage < 3)
        return (0, page.numel) if whole else shard_range(page, comm.rank, comm.size)

    def _nvme_layout(self, pages: list[Page]) -> tuple[dict[int, int], int]:
        offsets, end = {}, 0
        for page in pages:
            if self.placement.state_tiers[page.index] == "nvme":
                start, stop = self._own_range(page)
                offsets[page.index] = end
                nbytes = slab_bytes(page, stop - start, self.placement.param_tiers[page.index], "nvme")
                end += -(-nbytes // BLOCK) * BLOCK
        return offsets, end

    @torch.no_grad()
    def _adopt(self, page: Page, nvme_offset: int) -> PageBuffers:
        """Move the page's parameters into pages (they become views) and allocate its buffers."""
        full = self._alloc.zeros("device", "params", page.numel, page.dtype)
        for slot in page.slots:
            view = full[slot.offset : slot.offset + slot.numel].view(slot.shape)
            view.copy_(slot.param)
            slot.param.data = view
        start, stop = self._own_range(page)
        b = PageBuffers(page, self.stage, start, stop, self.placement.param_tiers[page.index],
                        self.placement.state_tiers[page.index], full, self._comm_of(page),
                        nvme_offset=nvme_offset)
        if self.stage == 3:
            b.param_shard = self._alloc.empty(b.param_tier, "params", b.own_numel, page.dtype)
            b.param_shard.copy_(full[start:stop])
            full.untyped_storage().resize_(0)
            self.ledger.sub("device", "params", page.nbytes)
        if page.frozen:
            return b
        if self.stage <= 1:
            b.grad_full = self._alloc.zeros("device", "grads", page.numel, page.dtype)
        if self.stage >= 1:
            b.grad_shard = self._alloc.zeros("device", "grads", b.own_numel, page.dtype)
        if b.state_tier != "nvme":
            b.slab = self._alloc.zeros(b.state_tier, "optimizer", b.slab_numel, torch.float32)
        return b

    @torch.no_grad()
    def _init_state(self) -> None:
        """Moments start at zero; a separate master starts as a copy of the parameters."""
        for b in self._trainable:
            slab = self._offload.new_slab(b).zero_() if b.state_tier == "nvme" else b.slab
            master, _, _ = b.state_views(slab)
            if b.separate_master:
                master.copy_(b.param_own())
            if b.state_tier == "nvme":
                self._offload.write_slab(b, slab)

    # -- the training-step API -----------------------------------------------------------------

    @property
    def _mean_divisor(self) -> int:
        """What the held gradients must be divided by: stage 0 holds means, stages 1-3 sums."""
        return 1 if self.stage == 0 else self.dp

    @contextmanager
    def no_sync(self, enabled: bool = True) -> Iterator[None]:
        """Backward passes inside accumulate gradients locally (stages 0-1; see grads.py)."""
        previous, self._reducer.defer = self._reducer.defer, enabled
        try:
            yield
        finally:
            self._reducer.defer = previous

    def reduce_gradients(self) -> None:
        """Reduce the gradients that backward passes under `no_sync()` accumulated locally; for a
        microbatch loop that cannot leave its last backward outside no_sync (a pipeline runner)."""
        self._reducer.reduce_deferred()

    @torch.no_grad()
    def _complete_gradients(self) -> None:
        """Wait for the dp reductions, then sum the tp-partial gradients (once per step)."""
        self._reducer.wait_all()
        if not self._tp_summed:
            self._tp_pages.sum_partial_gradients()
            self._tp_summed = True

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Global L2 norm of the averaged gradients over all dp shards, tp slices, pp stages and
        ep ranks' experts; scales the next step's gradients by min(1, max_norm / (norm + 1e-6)) as
        torch.nn.utils.clip_grad_norm_ does."""
        self._complete_gradients()
        squares = self._tp_pages.grad_norm_squared([b for b in self._trainable if not b.page.expert])
        if self._experts is not None:
            squares = squares + self._experts.grad_norm_squared(self._tp_pages, self._trainable, self.stage)
        if self.stage >= 1 and self.dp > 1:
            dist.all_reduce(squares, group=self.group)
        for group in self._norm_groups:
            dist.all_reduce(squares, group=group)
        total = (squares.sqrt() / self._mean_divisor).float()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        self._grad_scale = self._mean_divisor / coef
        return total

    @torch.no_grad()
    def parameters_finite(self) -> bool:
        """Whether every element of every parameter is finite, on every rank (collective over
        dp × cp, tp and pp). Each rank checks the own ranges it updates, so each element once."""
        own = [b.param_own() for b in self._buffers]
        largest = torch.stack(torch._foreach_norm(own, float("inf"))).max() if own else torch.zeros(())
        bad = (~torch.isfinite(largest)).to(torch.int64).reshape(1).to(self.device)
        for group in [self.group, *self._norm_groups]:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=group)
        return not bool(bad.item())

    @torch.no_grad()
    def step(self, closure=None) -> None:
        if closure is not None:
            raise UserError("ZeROCacheOptimizer.step takes no closure; run forward and backward before it")
        self._complete_gradients()
        self._settle_params()  # the update writes the own ranges the last gathers read
        hypers = [dict(lr=g["lr"], betas=tuple(g["betas"]), eps=g["eps"], weight_decay=g["weight_decay"])
                  for g in self.param_groups]
        self._steps += 1
        scale = self._grad_scale
        if scale is None and self._mean_divisor != 1:
            scale = torch.tensor(float(self._mean_divisor), device=self.device)
        self._step_device.fill_(self._steps)
        self._step_device_tier(scale, hypers)
        if self._offload.pages:
            self._step_host.fill_(self._steps)
            self._offload.step(self._step_host, scale, hypers)
        self._publish_params()
        if self._fp8 is not None:
            self._fp8.invalidate()
        self._grad_scale = None
        self._tp_summed = False
        sent = sum((Counter(comm.sent_bytes) for comm in self._page_comms), Counter())
        self._sent_last_step = dict(sent - self._sent_at_step_end)
        self._sent_at_step_end = sent
        self.ledger.start_step()

    def _step_device_tier(self, scale: Optional[torch.Tensor], hypers: list[dict]) -> None:
        """One multi-tensor AdamW per parameter group over the device-tier pages; pages whose
        gradients are not fp32 are widened first, one page at a time to bound the extra memory."""
        batches: dict[int, tuple[list, list, list, list]] = {}
        for b in self._trainable:
            if b.state_tier != "device":
                continue
            master, exp_avg, exp_avg_sq = b.state_views(b.slab)
            grad = b.grad_own()
            if grad.dtype == torch.float32:
                for tensors, t in zip(batches.setdefault(b.page.group, ([], [], [], [])),
                                      (master, grad, exp_avg, exp_avg_sq)):
                    tensors.append(t)
                continue
            widened = self._alloc.empty("device", "buffers", b.own_numel, torch.float32).copy_(grad)
            adamw_([master], [widened], [exp_avg], [exp_avg_sq], self._step_device, grad_scale=scale,
                   **hypers[b.page.group])
            self._alloc.free(widened, "device", "buffers")
        for group, (masters, grads, exp_avgs, exp_avg_sqs) in batches.items():
            adamw_(masters, grads, exp_avgs, exp_avg_sqs, self._step_device, grad_scale=scale, **hypers[group])
        for b in self._trainable:
            if b.state_tier == "device" and b.separate_master:
                b.param_own().copy_(b.state_views(b.slab)[0])

    def _publish_params(self) -> None:
        """Stages 1-2: every rank updated its shard of each page; start gathering the full pages,
        which the next forward waits for page by page (publish.py)."""
        if self._publisher is not None:
            self._publisher.start()

    def _settle_params(self) -> None:
        """Before parameters are read or written outside forward and backward: finish the gathers
        still in flight (stages 1-2), free the pages a forward kept for its backward (stage 3)."""
        if self._publisher is not None:
            self._publisher.wait_all()
        if self._gatherer is not None:
            self._gatherer.drop_holds()

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients held in the pages (parameters' own .grad are always None)."""
        self._reducer.wait_all()
        for b in self._buffers:
            for grad in (b.grad_full, b.grad_shard):
                if grad is not None:
                    grad.zero_()
        self._tp_summed = False
        self._grad_scale = None  # a clip measured for a skipped step must not reach the next one

    @contextmanager
    def gathered_parameters(self) -> Iterator[None]:
        """Give every parameter its full, current value inside the `with` block: stage 3 gathers
        them all; stages 1-2 finish the gathers the last step started."""
        if self._gatherer is None:
            self._settle_params()
            yield
            return
        self._gatherer.gather_all()
        try:
            yield
        finally:
            self._gatherer.free_all()

    # -- memory, communication, checkpoints, lifetime ------------------------------------------

    def memory_ledger(self) -> dict:
        """Bytes per tier per kind now, and their peaks during the last step (see ledger.py)."""
        return self.ledger.report()

    def memory_metrics(self) -> dict:
        """{"mem_device_gb", "mem_host_gb", "mem_nvme_gb"}: the last step's peaks, for metrics.jsonl."""
        return self.ledger.metrics()

    @property
    def comm_bytes(self) -> dict:
        """Bytes this rank sent per collective kind during the last step (from the end of the
        previous `step()` to the end of the last one: its forwards, backwards and update)."""
        return self._sent_last_step

    def state_dict(self) -> dict:
        """Parameters and optimizer state as a DCP state dict (see checkpoint.py): save it with
        `dcp.save`; to resume, fill it with `angelptm.dcp_safe.load(state, path)` and pass it back to
        `load_state_dict`."""
        self._reducer.wait_all()
        self._settle_params()
        return checkpoint.build_state_dict(self)

    def load_state_dict(self, state_dict: dict) -> None:
        self._settle_params()
        checkpoint.load_state_dict(self, state_dict)
        if self._fp8 is not None:
            self._fp8.invalidate()

    def close(self) -> None:
        """Release the NVMe file; the optimizer is unusable afterwards."""
        self._settle_params()
        if self._nvme is not None:
            self._nvme.close()
            self.ledger.sub("nvme", "optimizer", self._nvme.nbytes)
            self._nvme = None

    def __enter__(self) -> "ZeROCacheOptimizer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
