"""The mesh: layout rules raise one-line ConfigErrors naming the degree and the rule, on every rank,
before any collective. (The mesh's groups are checked with the collectives, in test_mesh_collectives.py.)"""

import pytest
import torch.distributed as dist

from angelptm.config import config_from_dict
from angelptm.distributed.mesh import ParallelDims, validate_layout
from angelptm.distributed.spawn import run_distributed
from angelptm.errors import ConfigError

MODEL = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 128, "max_seq_len": 64}


def cfg_with(**parallel):
    return config_from_dict({"model": MODEL, "train": {"seq_len": 32}, "parallel": parallel})


@pytest.mark.parametrize("dims, parallel", [
    (ParallelDims(tp=4), {}),  # 4 heads, 2 kv heads each on two ranks
    (ParallelDims(tp=2, cp=2), {}),
    (ParallelDims(cp=4), {"cp_mode": "ulysses"}),
    (ParallelDims(cp=16), {}),  # 32 tokens = 2·16 chunks of 1
    (ParallelDims(tp=2, cp=8), {"sequence_parallel": False}),
])
def test_valid_layouts_pass(dims, parallel):
    validate_layout(dims, cfg_with(**parallel))


@pytest.mark.parametrize("dims, parallel, words", [
    (ParallelDims(tp=8), {}, ["parallel.tp=8", "n_heads=4"]),
    (ParallelDims(tp=3), {}, ["parallel.tp=3", "n_heads=4"]),
    (ParallelDims(cp=3), {}, ["parallel.cp=3", "2·cp = 6"]),
    (ParallelDims(cp=32), {}, ["parallel.cp=32", "seq_len=32"]),
    (ParallelDims(cp=8), {"cp_mode": "ulysses"}, ["parallel.cp=8", "ulysses", "heads"]),
    (ParallelDims(tp=2, cp=4), {"cp_mode": "ulysses"}, ["parallel.cp=4", "2 attention heads"]),
    (ParallelDims(tp=4, cp=16), {}, ["parallel.tp=4", "sequence_parallel", "2 tokens"]),
])
def test_bad_layouts_name_degree_and_rule(dims, parallel, words):
    with pytest.raises(ConfigError) as e:
        validate_layout(dims, cfg_with(**parallel))
    message = str(e.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_kv_heads_must_divide_or_be_divided_by_tp():
    cfg = config_from_dict({"model": {**MODEL, "dim": 96, "n_heads": 12, "n_kv_heads": 6, "ffn_dim": 96},
                            "train": {"seq_len": 32}})
    with pytest.raises(ConfigError, match="n_kv_heads=6"):
        validate_layout(ParallelDims(tp=4), cfg)


def test_ffn_dim_must_divide():
    cfg = config_from_dict({"model": {**MODEL, "ffn_dim": 98}, "train": {"seq_len": 32}})
    with pytest.raises(ConfigError, match="ffn_dim=98"):
        validate_layout(ParallelDims(tp=4), cfg)


def _trainer_error(out):
    from angelptm.train.trainer import Trainer

    cfg = config_from_dict({"model": MODEL, "parallel": {"cp": 2}, "train": {"seq_len": 30, "output_dir": out}})
    try:
        Trainer(cfg)
    except ConfigError as e:
        # Nothing was started: no process group, so no rank can be left waiting in a collective.
        return str(e), dist.is_initialized()
    return None, dist.is_initialized()


@pytest.mark.slow
def test_trainer_refuses_bad_layout_on_every_rank_before_any_collective(tmp_path):
    results = run_distributed(_trainer_error, 2, str(tmp_path / "run"), init_group=False)
    for message, initialized in results:
        assert message is not None and "parallel.cp=2" in message and "seq_len=30" in message
        assert not initialized
    assert not (tmp_path / "run").exists()
