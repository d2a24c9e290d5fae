"""The planner's step time against published end-to-end runs of Megatron-LM on A100s.

Each run is planned as it ran (GPT with learned positions, unfused softmax attention, dropout,
fp32 gradient buffers: `MEGATRON_2021`) on the built-in A100 profile, and the predicted
throughput is compared with the published one.
"""

import pytest

from angelptm.config import config_from_dict
from angelptm.plan import plan
from angelptm.planning.model import MEGATRON_2021

# Narayanan et al., "Efficient Large-Scale Language Model Training on GPU Clusters Using
# Megatron-LM", SC'21, Table 1 (weak scaling, A100-80GB on Selene, vocabulary 51200, sequence
# 2048, full activation recomputation). Columns: parameters (billions), attention heads, hidden
# size, layers, tensor-parallel size, pipeline-parallel size, GPUs, batch size, achieved
# teraFLOP/s per GPU (counting the recomputed forward, Eq. 3). The microbatch sizes and the
# interleaved schedule's virtual stages are those of the paper's own launch script,
# Megatron-LM examples/sc21/run_table_1.sh (MBS; num-layers-per-virtual-pipeline-stage).
NARAYANAN_TABLE_1 = [
    # params, heads, hidden, layers, tp, pp, gpus, batch, tflops, micro_batch, virtual_stages
    (1.7, 24, 2304, 24, 1, 1, 32, 512, 137, 16, 1),
    (3.6, 32, 3072, 30, 2, 1, 64, 512, 138, 16, 1),
    (7.5, 32, 4096, 36, 4, 1, 128, 512, 142, 16, 1),
    (18.4, 48, 6144, 40, 8, 1, 256, 1024, 135, 8, 1),
    (39.1, 64, 8192, 48, 8, 2, 512, 1536, 138, 4, 1),
    (76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140, 2, 3),
    (145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148, 2, 2),
    (310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155, 1, 2),
    (529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163, 1, 3),
    (1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163, 1, 1),
]

# Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models", MLSys 2023,
# Table 3 (configurations, data-parallel size 1) and Table 5 (model / hardware FLOPs utilization
# with sequence parallelism and selective recomputation), A100-80GB, vocabulary 51200, sequence
# 2048; the 175B and 530B runs use the interleaved schedule with 3 virtual stages.
KORTHIKANTI_TABLE_5 = [
    # name, heads, hidden, layers, tp, pp, gpus, batch, micro_batch, virtual_stages, MFU %, HFU %
    ("22B", 64, 6144, 48, 8, 1, 8, 4, 4, 1, 41.5, 43.7),
    ("175B", 96, 12288, 96, 8, 8, 64, 64, 1, 3, 51.4, 52.8),
    ("530B", 128, 20480, 105, 8, 35, 280, 280, 1, 3, 56.0, 57.0),
    ("1T", 160, 25600, 128, 8, 64, 512, 512, 1, 1, 56.3, 57.0),
]


def _megatron_gpt(heads, hidden, layers, tp, pp, batch, micro_batch, virtual, sp, checkpointing):
    return config_from_dict({
        "model": {"arch": "gpt", "dim": hidden, "n_layers": layers, "n_heads": heads, "n_kv_heads": heads,
                  "ffn_dim": 4 * hidden, "vocab_size": 51200, "max_seq_len": 2048, "tie_embeddings": True},
        "parallel": {"tp": tp, "pp": pp, "sequence_parallel": sp, "pp_virtual_stages": virtual,
                     "pp_schedule": "interleaved" if virtual > 1 else "1f1b"},
        "precision": {"dtype": "bfloat16"},
        "train": {"global_batch": batch, "micro_batch": micro_batch, "seq_len": 2048,
                  "activation_checkpointing": checkpointing},
    })


def narayanan_predictions():
    """(published, predicted) teraFLOP/s per GPU for each row of Table 1."""
    out = []
    for params, heads, hidden, layers, tp, pp, gpus, batch, published, mb, virtual in NARAYANAN_TABLE_1:
        cfg = _megatron_gpt(heads, hidden, layers, tp, pp, batch, mb, virtual, sp=False, checkpointing="full")
        result = plan(cfg, gpus, "a100", impl=MEGATRON_2021)
        assert result.valid, result.reasons
        assert result.params / 1e9 == pytest.approx(params, abs=0.06)  # the paper's parameter counts
        out.append((published, result.timing.hardware_tflops_per_gpu))
    return out


def test_narayanan_weak_scaling_within_15_percent():
    errors = [abs(pred - pub) / pub for pub, pred in narayanan_predictions()]
    assert sum(e <= 0.15 for e in errors) >= 8, errors
    # Today every row lands within 10%; a change that loosens that shows here.
    assert max(errors) < 0.10, errors


@pytest.mark.parametrize("row", KORTHIKANTI_TABLE_5, ids=[r[0] for r in KORTHIKANTI_TABLE_5])
def test_korthikanti_utilization_within_15_percent(row):
    name, heads, hidden, layers, tp, pp, gpus, batch, mb, virtual, mfu, hfu = row
    cfg = _megatron_gpt(heads, hidden, layers, tp, pp, batch, mb, virtual, sp=True, checkpointing="selective")
    result = plan(cfg, gpus, "a100", impl=MEGATRON_2021)
    assert result.fits, result.reasons
    assert 100 * result.timing.mfu == pytest.approx(mfu, rel=0.15)
    assert 100 * result.timing.hfu == pytest.approx(hfu, rel=0.15)
