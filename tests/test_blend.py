"""Weighted blends: shares follow the weights, any split of a step reads the same rows, exact resume, bad input."""

import json

import numpy as np
import pytest
import torch

from angelptm.config import BlendSourceConfig, DataConfig, config_from_dict
from angelptm.data import Blend, BlendSampler, ByteTokenizer, TokenDataset, build_datasets, build_token_file
from angelptm.data.builder import checksum
from angelptm.errors import ConfigError, UserError

from conftest import one_line, tiny_config, tiny_sections

SEQ, BATCH = 8, 16


def source(index: int, tokens: int) -> TokenDataset:
    """A dataset whose ids, 10000·index + position, say which source and which window a row came from."""
    ids = (10000 * index + np.arange(tokens)).astype(np.uint32)
    return TokenDataset(ids, 40000, "test", checksum(ids), f"source{index}")


def blend(weights=(5, 3, 2), tokens=(801, 401, 2001)):
    return Blend([source(i, n) for i, n in enumerate(tokens)], weights)


def test_shares_follow_the_weights_at_every_step_and_rows_come_from_their_source():
    sampler = BlendSampler(blend(), SEQ, BATCH, seed=3)
    weights = np.array([0.5, 0.3, 0.2])
    counted = np.zeros(3)
    for step in range(200):
        owners = sampler.batch(step)[:, 0].numpy() // 10000
        for row in sampler.batch(step).numpy():
            assert len(set(row // 10000)) == 1  # a window never mixes sources
        counted += np.bincount(owners, minlength=3)
        by_source = sampler.tokens_by_source(step + 1)
        assert [by_source[f"source{i}"] for i in range(3)] == list(counted.astype(int) * SEQ)
        # A deterministic schedule, not a random draw: within two samples of the weights at every step.
        assert np.abs(counted - weights * (step + 1) * BATCH).max() <= 2


def test_each_source_walks_its_own_permutation_of_windows():
    sampler = BlendSampler(blend(weights=(1, 1, 1), tokens=(801, 801, 801)), SEQ, BATCH, seed=0)
    windows = 100  # (801 - 1) / 8 per source
    rows = torch.cat([sampler.batch(step) for step in range(3 * windows // BATCH + 1)])[:3 * windows].numpy()
    orders = [[(r[0] % 10000) // SEQ for r in rows if r[0] // 10000 == s] for s in range(3)]
    for order in orders:  # each source's first epoch: every one of its windows exactly once
        assert sorted(order) == list(range(windows))
    assert orders[0] != orders[1] != orders[2]  # and not one permutation shared by all


@pytest.mark.parametrize("split", [[16], [8, 8], [4, 4, 4, 4], [2] * 8, [1] * 16, [5, 11]])
def test_any_split_of_the_global_batch_reads_the_same_rows(split):
    sampler = BlendSampler(blend(), SEQ, BATCH, seed=7)
    for step in (0, 1, 37, 10**6):
        parts, start = [], 0
        for count in split:
            parts.append(sampler.rows(step, start, count))
            start += count
        assert torch.equal(torch.cat(parts), sampler.batch(step))


def test_resume_reads_the_same_next_batches_and_checks_the_blend():
    first = BlendSampler(blend(), SEQ, BATCH, seed=1)
    state = json.loads(json.dumps(first.state_dict(next_step=57)))
    again = BlendSampler(blend(), SEQ, BATCH, seed=1)
    step = again.load_state_dict(state)
    assert step == 57
    for s in range(step, step + 5):
        assert torch.equal(again.batch(s), first.batch(s))
    with pytest.raises(UserError) as e:
        BlendSampler(blend(weights=(5, 3, 3)), SEQ, BATCH, seed=1).load_state_dict(state)
    assert "data.sources" in one_line(str(e.value))


def test_blend_training_logs_tokens_by_source_and_resumes_exactly(tmp_path, one_thread, own_process_group):
    from angelptm.train.trainer import Trainer

    paths = []
    for name, text in (("a", "alpha beta gamma " * 80), ("b", "0123456789 " * 150)):
        (tmp_path / f"{name}.txt").write_text(text)
        build_token_file(tmp_path / f"{name}.txt", tmp_path / name, ByteTokenizer())
        paths.append(str(tmp_path / name))
    data = {"source": "stdlib", "sources": [{"path": paths[0], "weight": 3}, {"path": paths[1], "weight": 1}]}
    straight = Trainer(tiny_config(tmp_path / "straight", data=data, train={"steps": 4})).fit()
    cut = tiny_sections(tmp_path / "cut", data=data, train={"steps": 4, "ckpt_every": 2})
    Trainer(config_from_dict(cut)).fit(until=2)
    resumed = Trainer(config_from_dict(cut)).fit()
    assert (resumed["loss"], resumed["grad_norm"]) == (straight["loss"], straight["grad_norm"])
    assert straight["tokens_by_source"] == {paths[0]: 3 * 8 * 32, paths[1]: 1 * 8 * 32}
    assert resumed["tokens_by_source"] == straight["tokens_by_source"]


@pytest.mark.parametrize("sources, key", [
    ([{"path": "a", "weight": 0}], "data.sources[0].weight"),
    ([{"path": "a", "weight": -1}], "data.sources[0].weight"),
    ([{"source": "tokens"}], "data.sources[0].source"),
    ([{"source": "synthetic", "path": "a"}], "data.sources[0].path"),
    ([{"path": "a"}, {"path": "a", "weight": 2}], "data.sources[1]"),
    ([{"path": "a", "weight": "heavy"}], "data.sources"),
])
def test_bad_blend_entries_are_one_line_errors_naming_the_key(sources, key):
    with pytest.raises(ConfigError) as e:
        config_from_dict({"data": {"sources": sources}})
    assert key in one_line(str(e.value))


def test_a_blend_with_a_missing_path_or_beside_data_path_is_refused(tmp_path):
    with pytest.raises(ConfigError) as e:
        config_from_dict({"data": {"source": "tokens", "path": "x", "sources": [{"path": "a"}]}})
    assert "data.sources" in one_line(str(e.value))
    cfg = DataConfig(sources=[BlendSourceConfig(path=str(tmp_path / "nowhere"))])
    with pytest.raises(UserError) as e:
        build_datasets(cfg, SEQ, 259)
    assert f"data.sources[0].path={tmp_path / 'nowhere'}" in one_line(str(e.value))
