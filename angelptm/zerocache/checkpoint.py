"""ZeROCache state as a DCP state dict that looks like any model checkpoint, and reshards freely.

    {"model": {<name>: parameter (fp32: the master copy where one exists)},
     "optim": {"exp_avg": {<name>: ...}, "exp_avg_sq": {<name>: ...}, "step": scalar tensor}}

Every value is a `FlatShard` with the parameter's own name and global shape (the unsharded,
unpadded tensor under tensor parallelism), over the range of it this rank owns (its own range; at
stage 0 the whole page). What several ranks hold alike (stage 0's pages across dp, norms and
shared kv heads across tp) DCP writes once. Nothing of the layout (dp or tp degree, stage, page
size, tier) appears in the keys, so a checkpoint loads into any other layout, and its "model"
part into a plain model (export, or the model-only checkpoints of import-hf). Frozen parameters
(a LoRA base) are in "model" alone: they have no optimizer state. Loading a state without "optim" loads the weights alone and starts the moments from zero, as a
fresh optimizer would; its values may also be global tensors (a plain model's state_dict).

Device- and host-tier state is read and written in place. NVMe-tier state is staged through
host memory for the duration of a save or load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import torch

from angelptm.errors import UserError
from angelptm.zerocache.buffers import PageBuffers
from angelptm.zerocache.flat_shard import FlatShard

if TYPE_CHECKING:
    from angelptm.zerocache.optimizer import ZeROCacheOptimizer


def _shards(opt: "ZeROCacheOptimizer", b: PageBuffers, own: torch.Tensor) -> Iterator[tuple[str, FlatShard]]:
    """(name, FlatShard) of every parameter of the page, over `own` (a tensor of the own range)."""
    for slot in b.page.slots:
        lo, hi = b.own_part(slot)
        yield slot.name, FlatShard(own[lo - b.own_start : hi - b.own_start], slot.shape, lo - slot.offset,
                                   opt._specs[slot.name])


def build_state_dict(opt: "ZeROCacheOptimizer") -> dict:
    model: dict = {}
    exp_avg: dict = {}
    exp_avg_sq: dict = {}
    for b in opt._buffers:
        if b.page.frozen:  # parameters alone
            model.update(_shards(opt, b, b.param_own()))
            continue
        # NVMe state: a host copy that lives as long as the state dict does.
        slab = opt._offload.read_slab(b) if b.state_tier == "nvme" else b.slab
        for target, own in zip((model, exp_avg, exp_avg_sq), b.state_views(slab)):
            target.update(_shards(opt, b, own))
    step = torch.tensor(float(opt._steps))
    return {"model": model, "optim": {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "step": step}}


def _fill(target: dict, source: dict, section: str) -> None:
    """Copy each source value (a FlatShard, or a global tensor) into the target's own range."""
    for name, shard in target.items():
        if name not in source:
            raise UserError(f"the state has no {section}.{name}; it was saved from another model")
        value = source[name]
        if isinstance(value, FlatShard):
            shard.flat.copy_(value.flat)
        else:
            shard.copy_from_global(value.detach())


def load_state_dict(opt: "ZeROCacheOptimizer", state: dict) -> None:
    """Copy a state dict (built by `build_state_dict`, filled by `dcp.load`) into place."""
    if "model" not in state:
        raise UserError("the state has no 'model' section; load a checkpoint with model weights")
    optim = state.get("optim")
    for b in opt._buffers:
        if b.page.frozen:
            _fill(dict(_shards(opt, b, b.param_own())), state["model"], "model")
            continue
        slab = opt._offload.new_slab(b).zero_() if b.state_tier == "nvme" else b.slab
        master, exp_avg, exp_avg_sq = b.state_views(slab)
        _fill(dict(_shards(opt, b, master)), state["model"], "model")
        if optim is None:
            exp_avg.zero_()
            exp_avg_sq.zero_()
        else:
            _fill(dict(_shards(opt, b, exp_avg)), optim["exp_avg"], "optim.exp_avg")
            _fill(dict(_shards(opt, b, exp_avg_sq)), optim["exp_avg_sq"], "optim.exp_avg_sq")
        if b.state_tier == "nvme":
            opt._offload.write_slab(b, slab)
        if b.separate_master:
            b.param_own().copy_(master)
    opt._steps = int(optim["step"].item()) if optim is not None else 0
    opt._publish_params()
