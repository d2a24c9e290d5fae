"""DCP checkpoints of ZeROCache: resumable under another dp degree, stage, page size and tier, with
the same next losses; a tp shard's range lands at its place in the global tensor, padding left
out; loading never runs pickled code. (Across tp degrees through the trainer: test_parity.py.)"""

import math
import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp

from angelptm.distributed.spawn import run_distributed
from angelptm.distributed.tensor_parallel import ShardSpec
from angelptm.errors import UserError
from angelptm.zerocache import ZeROCacheOptimizer
from angelptm.dcp_safe import load
from angelptm.zerocache.flat_shard import FlatShard
from conftest import one_line
from test_zerocache_support import (
    HYPER, SMALL_PAGES, batches, full_weights, loss_difference, tiny_model, train_steps,
)

SAVED_AT, STEPS = 4, 8
SAVED_LAYOUT = dict(stage=3, offload_optimizer="nvme", offload_params="cpu", page_mb=SMALL_PAGES)


def _optimizer(model, nvme_dir, layout):
    layout = {"page_mb": SMALL_PAGES, **layout}
    return ZeROCacheOptimizer(model, None, **HYPER, nvme_dir=nvme_dir, **layout)


def _resume(ckpt_dir: str, nvme_dir: str, layout: dict) -> tuple[list[float], dict]:
    """Start from other weights, load the checkpoint, and train the remaining steps; also return the
    loaded weights."""
    model = tiny_model(seed=1)
    with _optimizer(model, nvme_dir, layout) as opt:
        state = opt.state_dict()
        load(state, ckpt_dir)
        opt.load_state_dict(state)
        loaded = full_weights(model, opt)
        return train_steps(model, opt, batches(STEPS, 12)[SAVED_AT:], accum=1), loaded


def _save_midway_then_resume(ckpt_dir: str, nvme_dir: str, resume_layout: dict) -> tuple[list, list]:
    """Train all steps saving at SAVED_AT (the uninterrupted run), then resume in `resume_layout`."""
    data = batches(STEPS, 12)
    model = tiny_model()
    with _optimizer(model, nvme_dir, SAVED_LAYOUT) as opt:
        train_steps(model, opt, data[:SAVED_AT], accum=1)
        dcp.save(opt.state_dict(), checkpoint_id=ckpt_dir)
        uninterrupted = train_steps(model, opt, data[SAVED_AT:], accum=1)
    return uninterrupted, _resume(ckpt_dir, nvme_dir, resume_layout)[0]


@pytest.mark.slow
def test_resume_in_other_layouts_gives_the_same_next_losses(tmp_path):
    ckpt, nvme = str(tmp_path / "ckpt"), str(tmp_path / "nvme")
    # saved at dp 2 / stage 3 / NVMe state, host params; resumed at dp 2 / stage 0 / NVMe ...
    uninterrupted, same_dp = run_distributed(_save_midway_then_resume, 2, ckpt, nvme,
                                             dict(stage=0, offload_optimizer="nvme"))[0]
    assert loss_difference(same_dp, uninterrupted) < 1e-5
    # ... at dp 1 / stage 1 / device, and at dp 3 / stage 2 / host with other page sizes
    for dp, layout in [(1, dict(stage=1)), (3, dict(stage=2, offload_optimizer="cpu", page_mb=0.05))]:
        resumed, loaded = run_distributed(_resume, dp, ckpt, nvme, layout)[0]
        assert loss_difference(resumed, uninterrupted) < 1e-5, (dp, layout)
    # The "model" part is a plain model checkpoint: full tensors under the parameters' own names.
    plain = tiny_model(seed=2)
    state = {"model": plain.state_dict()}
    load(state, ckpt)
    assert all(torch.equal(state["model"][name], value) for name, value in loaded.items())


@pytest.mark.slow
def test_weights_alone_load_from_a_plain_state_dict(tmp_path):
    source = tiny_model(seed=3)
    weights = {n: p.detach().clone() for n, p in source.named_parameters()}
    loaded = run_distributed(_load_plain_weights, 2, weights)[0]
    assert all(torch.equal(loaded[name], value) for name, value in weights.items())


def _load_plain_weights(weights: dict) -> dict:
    model = tiny_model()
    with _optimizer(model, None, dict(stage=3, offload_params="cpu", offload_optimizer="cpu")) as opt:
        opt.load_state_dict({"model": weights})  # full tensors; moments start at zero
        return full_weights(model, opt)


@pytest.mark.parametrize("spec, local_shape, flat_range, boxes", [
    # vocabulary rows 3-4 of 5 on the second of two tp ranks, padded to 3 rows: the padding is left out
    (ShardSpec((5, 4), dim=0, start=3, length=2), (3, 4), (2, 11), [((3, 2), (1, 2)), ((4, 0), (1, 4))]),
    # a row-parallel weight's columns 3-5 of 6
    (ShardSpec((2, 6), dim=1, start=3, length=3), (2, 3), (1, 5), [((0, 4), (1, 2)), ((1, 3), (1, 2))]),
    # a norm every tp rank holds whole
    (ShardSpec((4,), copies=2), (4,), (1, 3), [((1,), (2,))]),
])
def test_flat_shards_of_tp_slices_describe_the_global_tensor(spec, local_shape, flat_range, boxes):
    start, stop = flat_range
    flat = torch.full((stop - start,), -1.0)
    shard = FlatShard(flat, torch.Size(local_shape), start, spec)
    assert tuple(shard.shape) == spec.full_shape
    assert [(tuple(c.offsets), tuple(c.sizes)) for c in shard.__create_chunk_list__()] == boxes
    whole = torch.arange(float(torch.Size(spec.full_shape).numel())).view(spec.full_shape)
    shard.copy_from_global(whole)
    expected = spec.local_value(whole, torch.Size(local_shape)).reshape(-1)[start:stop]
    real = flat != -1.0  # the padding stays as it was
    assert torch.equal(flat[real], expected[real])
    assert int(real.sum()) == sum(math.prod(sizes) for _, sizes in boxes)


def test_pickled_objects_in_a_checkpoint_are_refused(tmp_path):
    dcp.save({"w": torch.ones(3), "note": "any non-tensor value is pickled"}, checkpoint_id=str(tmp_path))
    state = {"w": torch.zeros(3), "note": ""}
    with pytest.raises(UserError, match="pickled object") as error:
        load(state, str(tmp_path))
    one_line(str(error.value))


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_metadata_naming_code_is_refused_without_running_it(tmp_path):
    dcp.save({"w": torch.ones(3)}, checkpoint_id=str(tmp_path))
    marker = str(tmp_path / "ran")
    (tmp_path / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(UserError, match="not plain DCP metadata") as error:
        load({"w": torch.zeros(3)}, str(tmp_path))
    one_line(str(error.value))
    assert not os.path.exists(marker)
