"""ZeROCache page layout and placement: packing, alignment, units, budgets and their explanation."""

import pytest
import torch

from angelptm.config import ModelConfig
from angelptm.errors import UserError
from angelptm.models.llama import build_llama
from angelptm.zerocache.ledger import GIB
from angelptm.zerocache.pages import SHARD_ALIGN_NUMEL, build_pages, find_units, page_numel_for, shard_range
from angelptm.zerocache.placement import plan_placement, slab_bytes

TINY = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=259, max_seq_len=32)


def tiny_model(**changes):
    cfg = ModelConfig(**{**vars(TINY), **changes})
    model = build_llama(cfg, "cpu")
    model.init_weights(0)
    return model


def test_units_follow_execution_order():
    units = find_units(tiny_model())
    assert [u.name for u in units] == ["tok_embeddings", "layers.0", "layers.1", "norm", "output"]
    block = units[1]
    assert len(block.params) == 9  # 2 norms + 4 attention + 3 feed-forward weights


@pytest.mark.parametrize("dp", [1, 2, 3])
def test_pages_hold_every_parameter_once_aligned_and_in_order(dp):
    model = tiny_model()
    units = find_units(model)
    pages = build_pages(model, units, page_mb=0.03, dp=dp)
    capacity = page_numel_for(0.03, torch.float32, dp)
    slots = [s for p in pages for s in p.slots]
    assert [s.name for s in slots] == [n for n, _ in model.named_parameters()]  # execution order
    for page in pages:
        assert page.numel % (dp * SHARD_ALIGN_NUMEL) == 0
        assert page.numel <= capacity or len(page.slots) == 1  # only oversized parameters overflow
        ends = [s.offset + s.numel for s in page.slots]
        assert all(s.offset % 16 == 0 for s in page.slots)  # 64-byte aligned views
        assert all(end <= nxt.offset for end, nxt in zip(ends, page.slots[1:]))
        assert ends[-1] <= page.numel
    # a page never mixes units: stage 3 gathers exactly a unit's pages
    owner = {id(p): i for i, u in enumerate(units) for p in u.params}
    for page in pages:
        assert len({owner[id(s.param)] for s in page.slots}) == 1


def test_shards_split_pages_evenly():
    model = tiny_model()
    pages = build_pages(model, find_units(model), page_mb=0.03, dp=4)
    for page in pages:
        ranges = [shard_range(page, r, 4) for r in range(4)]
        assert ranges[0][0] == 0 and ranges[-1][1] == page.numel
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert all((hi - lo) * 4 % 4096 == 0 for lo, hi in ranges)  # O_DIRECT-sized fp32 shards


def test_tied_embedding_is_packed_once_and_used_by_both_units():
    model = tiny_model(tie_embeddings=True)
    units = find_units(model)
    pages = build_pages(model, units, page_mb=0.03, dp=2)
    names = [s.name for p in pages for s in p.slots]
    assert names.count("tok_embeddings.weight") == 1 and "output.weight" not in names
    by_name = {u.name: u for u in units}
    assert by_name["output"].pages == by_name["tok_embeddings"].pages


def _placement(model, stage, budget_gb, **kw):
    units = find_units(model)
    pages = build_pages(model, units, page_mb=0.03, dp=2)
    kw = dict(offload_optimizer="cpu", offload_params="none", prefetch_pages=2, max_in_flight=2) | kw
    return pages, plan_placement(pages, units, stage, 2, device_budget_gb=budget_gb, **kw)


def test_no_budget_follows_the_offload_keys():
    model = tiny_model()
    pages, p = _placement(model, 3, None, offload_optimizer="nvme", offload_params="cpu")
    assert set(p.state_tiers) == {"nvme"} and set(p.param_tiers) == {"host"}
    pages, p = _placement(model, 1, None, offload_optimizer="none")
    assert set(p.state_tiers) == {"device"} and set(p.param_tiers) == {"device"}


def test_budget_splits_pages_fractionally_and_explains_in_one_line():
    model = tiny_model()
    pages, everything = _placement(model, 3, None, offload_optimizer="cpu", offload_params="cpu")
    shards = sum(p.nbytes // 2 for p in pages)
    slabs = sum(slab_bytes(p, p.numel // 2, "device", "device") for p in pages)
    half = (everything.fixed_device_bytes + (shards + slabs) / 2) / GIB
    pages, p = _placement(model, 3, half, offload_optimizer="cpu", offload_params="cpu")
    on_device = p.param_tiers.count("device") + p.state_tiers.count("device")
    assert 0 < on_device < 2 * len(pages)  # neither all nor nothing
    assert p.param_tiers.count("device") == len(pages)  # parameters claim the budget first
    assert "\n" not in p.explanation and "device" in p.explanation and "host" in p.explanation
    kept = sum(pg.nbytes // 2 for i, pg in enumerate(pages) if p.param_tiers[i] == "device") + sum(
        slab_bytes(pg, pg.numel // 2, "device", "device") for i, pg in enumerate(pages) if p.state_tiers[i] == "device")
    assert p.fixed_device_bytes + kept <= half * GIB


def test_budget_too_small_is_a_user_error_naming_the_key():
    model = tiny_model()
    with pytest.raises(UserError, match="zero.device_budget_gb"):
        _placement(model, 1, 1e-6)
    with pytest.raises(UserError, match="zero.offload_optimizer"):
        pages, p = _placement(model, 3, None, offload_optimizer="cpu", offload_params="cpu")
        _placement(model, 3, (p.fixed_device_bytes + 4096) / GIB, offload_optimizer="none", offload_params="cpu")


def test_pages_never_mix_parameter_groups():
    model = tiny_model()
    units = find_units(model)
    pages = build_pages(model, units, page_mb=0.03, dp=2, group_of=lambda p: int(p.ndim < 2))
    for page in pages:
        assert {int(s.param.ndim < 2) for s in page.slots} == {page.group}
    assert {page.group for page in pages} == {0, 1}
