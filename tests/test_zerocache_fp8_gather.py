"""FP8 all-gather under ZeRO-3: the weights of FP8 layers travel as FP8 codes with their scales, and
training is the same as gathering them in full precision and casting after (same codes, same
scales, so the same losses bit for bit), at a quarter of the fp32 bytes for those pages."""

import pytest
import torch

from angelptm.config import config_from_dict
from angelptm.distributed.parallelize import apply_activation_checkpointing
from angelptm.distributed.spawn import run_distributed
from angelptm.errors import ConfigError, UserError
from angelptm.fp8 import convert_to_float8
from angelptm.zerocache import ZeROCacheOptimizer
from conftest import one_line
from test_zerocache_support import HYPER, SMALL_PAGES, batches, full_weights, tiny_model, train_steps


def _fp8_model(recipe: str, checkpointing: str = "none"):
    """`recipe` for every eligible layer; "mixed": rowwise MLPs, tensorwise attention."""
    model = tiny_model()
    if recipe == "mixed":
        convert_to_float8(model, "rowwise", skip=("output", "attention"))
    model = convert_to_float8(model, "tensorwise" if recipe == "mixed" else recipe)
    apply_activation_checkpointing(model, checkpointing)
    return model


def _train(recipe: str, fp8_all_gather: bool, checkpointing: str = "none"):
    """(losses, full weights, all-gather bytes of the last step, gathered FP8 weights, elements of
    FP8 weights that forward keeps gathered for backward) on this rank."""
    model = _fp8_model(recipe, checkpointing)
    page_mb = 8.0 if recipe == "mixed" else SMALL_PAGES  # one page per block: both recipes share it
    with ZeROCacheOptimizer(model, None, **HYPER, stage=3, page_mb=page_mb, fp8_all_gather=fp8_all_gather) as opt:
        losses = train_steps(model, opt, batches(4, 8), accum=2)
        sources = [m.weight_source is not None for m in model.modules() if hasattr(m, "weight_source")]
        fp8_weights = {id(m.weight) for m in model.modules() if hasattr(m, "weight_source")}
        kept = sum(slot.numel for index in opt._gatherer._kept_for_backward  # see gather.py
                   for slot in opt._buffers[index].page.slots if id(slot.param) in fp8_weights)
        return losses, full_weights(model, opt), opt.comm_bytes.get("all_gather", 0), sources, kept


def _both(recipe: str, checkpointing: str = "none"):
    return _train(recipe, False, checkpointing), _train(recipe, True, checkpointing)


@pytest.mark.parametrize("recipe, checkpointing", [
    ("tensorwise", "none"), ("rowwise", "none"), ("rowwise", "full"),
    ("mixed", "none"),  # pages holding both kinds, with large pages
])
def test_fp8_gather_trains_exactly_like_casting_after_the_gather(recipe, checkpointing):
    for plain, fp8 in run_distributed(_both, 2, recipe, checkpointing):
        assert fp8[0] == plain[0]  # the same losses, bit for bit
        assert all(torch.equal(fp8[1][name], plain[1][name]) for name in plain[1])
        assert all(fp8[3]) and not any(plain[3])  # every FP8 layer takes its weight from the gather


def test_fp8_gather_moves_a_quarter_of_the_fp32_bytes_of_fp8_pages():
    """The 14 Float8Linear weights (q, k, v, o, w1, w2, w3 per layer) are gathered twice per
    microbatch (forward and backward); the embedding, norms and head stay fp32. Gathering in full
    precision, forward keeps the last block's weights for backward; as codes, backward gathers
    their transposed copy."""
    plain, fp8 = run_distributed(_both, 2, "tensorwise")[0]
    model = _fp8_model("tensorwise")
    fp8_numel = sum(m.weight.numel() for m in model.modules() if hasattr(m, "weight_source"))
    microbatches = 2
    kept = plain[4]
    assert kept > 0
    # Each rank sends half of every gathered page (dp 2); pages are padded, so bound it closely.
    saved = plain[2] - fp8[2]
    expected = microbatches * (2 * fp8_numel * (4 - 1) - kept * 4) // 2
    assert expected <= saved <= 1.1 * expected


def _reject(recipe: str, **kwargs) -> str:
    with pytest.raises(UserError) as e:
        ZeROCacheOptimizer(_fp8_model(recipe), None, fp8_all_gather=True, **kwargs)
    return str(e.value)


@pytest.mark.parametrize("recipe, stage", [("tensorwise", 2), ("delayed", 3)])  # delayed: scales from history
def test_fp8_gather_needs_stage_3_and_a_gatherable_recipe(recipe, stage):
    assert "zero.stage=3" in one_line(run_distributed(_reject, 1, recipe, stage=stage)[0])
    with pytest.raises(ConfigError) as e:
        config_from_dict({"zero": {"stage": stage},
                          "precision": {"fp8": {"enabled": True, "recipe": recipe, "fp8_all_gather": True}}})
    assert "zero.stage=3" in one_line(str(e.value))
