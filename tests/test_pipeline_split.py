"""Stage splitting from a meta model, and the split backward that zero-bubble schedules run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from angelptm.config import ModelConfig
from angelptm.distributed import materialize
from angelptm.distributed.pipeline import merge_stages, split_model, stage_layer_ranges
from angelptm.distributed.pipeline.split_backward import postpone_weight_grads, run_weight_grads, split_linear_backward
from angelptm.errors import ConfigError
from angelptm.models.llama import build_llama

MODEL = ModelConfig(dim=64, n_layers=8, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=32)


def test_layers_are_split_evenly_with_fewer_on_the_stage_that_holds_the_head():
    model = build_llama(MODEL)
    assert stage_layer_ranges(model, 1) == [range(0, 8)]
    assert stage_layer_ranges(model, 2) == [range(0, 4), range(4, 8)]
    assert stage_layer_ranges(model, 3) == [range(0, 3), range(3, 6), range(6, 8)]
    assert stage_layer_ranges(model, 8) == [range(i, i + 1) for i in range(8)]


def test_a_large_head_moves_layers_to_the_earlier_stages():
    big_vocab = build_llama(ModelConfig(dim=64, n_layers=8, n_heads=4, ffn_dim=128, vocab_size=4096))
    ranges = stage_layer_ranges(big_vocab, 2)
    assert len(ranges[0]) > len(ranges[1])


def test_stages_keep_full_model_names_and_own_embedding_head_as_placed():
    model = build_llama(MODEL)
    full = dict(model.named_parameters())
    pp, v = 2, 2
    stages = {c * pp + r: chunk for r in range(pp) for c, chunk in enumerate(split_model(model, r, pp, v))}
    names = [set(dict(stages[s].named_parameters())) for s in range(pp * v)]
    assert set().union(*names) == set(full)
    assert sum(len(n) for n in names) == len(full)  # each parameter on exactly one stage
    assert "tok_embeddings.weight" in names[0] and "output.weight" in names[-1] and "norm.weight" in names[-1]
    assert list(stages[1].layers) == ["2", "3"]
    assert all(p.is_meta for s in stages.values() for p in s.parameters())
    assert len(model.layers) == 8  # the meta model itself is left whole


def test_stages_chained_compute_what_the_whole_model_computes():
    whole = materialize(build_llama(MODEL), torch.device("cpu"), 0)
    stages = [materialize(stage, torch.device("cpu"), 0)
              for r in range(4) for stage in split_model(build_llama(MODEL), r, 4)]
    tokens = torch.randint(0, MODEL.vocab_size, (2, 16))
    h = tokens
    for stage in stages:
        h = stage(h)
    torch.testing.assert_close(h, whole(tokens), rtol=0, atol=0)


def test_merged_stages_share_the_stages_parameters_under_full_names():
    full = dict(build_llama(MODEL).named_parameters())
    chunks = [materialize(c, torch.device("cpu"), 0) for c in split_model(build_llama(MODEL), 0, 2, 2)]
    merged = merge_stages(chunks)
    owned = {n: p for c in chunks for n, p in c.named_parameters()}
    assert dict(merged.named_parameters()).keys() == owned.keys() <= full.keys()
    assert all(p is owned[n] for n, p in merged.named_parameters())
    assert merge_stages(chunks[:1]) is chunks[0]


@pytest.mark.parametrize("n_layers,pp,v,tie,message", [
    (4, 4, 2, False, "model.n_layers=4 cannot give each of the 8 pipeline stages"),
    (4, 2, 1, True, "model.tie_embeddings=true needs the embedding and the output head on one stage"),
])
def test_impossible_splits_raise_one_line(n_layers, pp, v, tie, message):
    cfg = ModelConfig(dim=64, n_layers=n_layers, n_heads=4, tie_embeddings=tie)
    with pytest.raises(ConfigError, match=message) as err:
        split_model(build_llama(cfg), 0, pp, v)
    assert "\n" not in str(err.value)


def test_split_backward_gives_the_gradients_of_one_backward():
    tokens = torch.randint(0, MODEL.vocab_size, (2, 16))

    def grads(split: bool) -> dict[str, torch.Tensor]:
        model = materialize(build_llama(MODEL), torch.device("cpu"), 0)
        if split:
            split_linear_backward(model)
        loss = F.cross_entropy(model(tokens).flatten(0, 1), tokens.roll(-1, 1).flatten())
        if not split:
            loss.backward()
            return {n: p.grad for n, p in model.named_parameters()}
        with postpone_weight_grads() as work:
            loss.backward()
        # After the input-gradient pass only the non-linear parameters have gradients.
        assert model.layers["0"].attention.wq.weight.grad is None
        assert model.layers["0"].attention_norm.weight.grad is not None
        assert len(work) == 7 * MODEL.n_layers + 1  # q, k, v, o, w1, w2, w3 per layer, and the head
        run_weight_grads(work)
        return {n: p.grad for n, p in model.named_parameters()}

    plain, split = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(split[name], plain[name], rtol=1e-6, atol=1e-7, msg=name)
