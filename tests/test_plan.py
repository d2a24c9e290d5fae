"""`angelptm plan`: the API, the command line, impossible layouts, hardware profiles, search, presets.

Each preset's full plan is pinned in tests/data/plan_<preset>.json so that any change to the
formulas shows as a diff; regenerate them with ANGELPTM_UPDATE_PLAN_SNAPSHOTS=1 after checking
the new numbers.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from angelptm.config import config_from_dict, load_config
from angelptm.errors import UserError
from angelptm.cli import main as angelptm_main
from angelptm.distributed.mesh import ParallelDims, validate_layout
from angelptm.distributed.pipeline import build_schedule
from angelptm.plan import plan, render, search
from angelptm.planning.hardware import BUILTIN, load_hardware, resolve_hardware
from angelptm.planning.model import model_shape
from angelptm.planning.search import candidate_layouts

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
PRESETS = {"llama7b_8gpu": 8, "llama70b_64gpu": 64, "gpt175b_1024gpu": 1024, "llama1t_10240gpu": 10240,
           "mixtral8x7b_64gpu": 64}

SMALL = {
    "model": {"dim": 2048, "n_layers": 16, "n_heads": 16, "n_kv_heads": 8, "ffn_dim": 5632, "vocab_size": 32000,
              "max_seq_len": 2048},
    "precision": {"dtype": "bfloat16"},
    "train": {"global_batch": 64, "micro_batch": 2, "seq_len": 2048},
}


def small(**overrides):
    return config_from_dict(SMALL, [f"{k}={v}" for k, v in overrides.items()])


# ---------------------------------------------------------------------------------------------
# The plan


def test_plan_reports_every_kind_and_dimension():
    result = plan(small(**{"parallel.tp": 2, "parallel.pp": 2, "zero.stage": 1}), 16, "h100")
    assert result.valid and result.fits, result.reasons
    assert (result.layout.dp, result.layout.tp, result.layout.pp) == (4, 2, 2)
    assert result.microbatches == 64 // (2 * 4)
    mem, t, c = result.memory, result.timing, result.comm
    kinds = ("params", "grads", "optimizer", "activations", "comm_buffers", "reserved")
    assert all(getattr(mem, k) > 0 for k in kinds)
    assert mem.device_total == pytest.approx(sum(getattr(mem, k) for k in kinds) + mem.fp8_buffers)
    assert c.tp > 0 and c.pp > 0 and c.dp > 0 and c.cp == 0
    parts = ("gemm", "attention", "elementwise", "recompute", "tp_comm", "cp_comm", "pp_comm", "bubble",
             "dp_exposed", "optimizer")
    assert t.step == pytest.approx(sum(getattr(t, p) for p in parts))
    assert 0 < t.mfu <= t.hfu < 1
    assert t.tokens_per_s == pytest.approx(64 * 2048 / t.step)
    assert json.loads(json.dumps(result.to_dict()))["layout"]["tp"] == 2
    text = render(result, small())
    for needle in ("memory per GPU", "activations", "communication per GPU", "bubble", "MFU", "verdict     fits",
                   "assumed overlap"):
        assert needle in text


def test_knobs_move_memory_and_time_the_right_way():
    base = plan(small(**{"zero.stage": 0}), 8, "h100")
    sharded = plan(small(**{"zero.stage": 3}), 8, "h100")
    assert sharded.memory.params == pytest.approx(base.memory.params / 8, rel=0.01)
    assert sharded.memory.optimizer < base.memory.optimizer
    assert sharded.comm.dp > base.comm.dp
    full = plan(small(**{"train.activation_checkpointing": "full"}), 8, "h100")
    assert full.memory.activations < base.memory.activations
    assert full.timing.recompute > 0 and full.timing.step > base.timing.step
    offloaded = plan(small(**{"zero.stage": 1, "zero.offload_optimizer": "cpu"}), 8, "h100")
    assert offloaded.memory.optimizer == 0 and offloaded.memory.host > 0
    budget = plan(small(**{"zero.stage": 1, "zero.offload_optimizer": "cpu", "zero.device_budget_gb": 1000}), 8, "h100")
    assert budget.memory.host == 0  # a budget with room keeps every page on device
    fp8 = plan(small(**{"precision.fp8.enabled": True}), 8, "h100")
    assert fp8.memory.fp8_buffers > 0 and fp8.timing.gemm < base.timing.gemm
    ring = plan(small(**{"parallel.cp": 2}), 8, "h100")
    ulysses = plan(small(**{"parallel.cp": 2, "parallel.cp_mode": "ulysses"}), 8, "h100")
    assert ring.comm.cp > 0 and ulysses.comm.cp > 0
    assert ring.memory.activations < base.memory.activations


def test_pipeline_schedules_trade_bubble_for_memory():
    pipe = {"parallel.pp": 4, "train.micro_batch": 1}
    runs = {name: plan(small(**pipe, **{"parallel.pp_schedule": name, "parallel.pp_virtual_stages": 2}), 8, "h100")
            for name in ("gpipe", "1f1b", "interleaved", "zero_bubble")}
    assert runs["gpipe"].timing.bubble == pytest.approx(runs["1f1b"].timing.bubble)
    assert runs["gpipe"].memory.activations > runs["1f1b"].memory.activations  # all 32 microbatches vs 4
    assert runs["interleaved"].timing.bubble < runs["1f1b"].timing.bubble
    assert runs["interleaved"].memory.activations > runs["1f1b"].memory.activations
    # ZB-H1: (p-1)(F+B-W) against 1F1B's (p-1)(F+B+W), a third when F = B = W; here backward
    # also carries attention's and the elementwise passes' gradients. Same activations (Qi et al. 2024).
    assert 1 / 3 < runs["zero_bubble"].timing.bubble / runs["1f1b"].timing.bubble < 0.6
    assert runs["zero_bubble"].memory.activations == runs["1f1b"].memory.activations


@pytest.mark.parametrize("overrides,world,gpu,reason", [
    ({"parallel.tp": 16}, 16, "h100", "tp=16 exceeds GPUs per node 8"),
    ({"parallel.tp": 3}, 3, "h100", "model.n_heads=16 is not divisible by tp=3"),
    ({"parallel.tp": 2}, 7, "h100", "world size 7 is not a multiple of tp·pp·cp = 2"),
    ({"parallel.dp": 3}, 8, "h100", "parallel.dp·tp·pp·cp = 3 differs from world size 8"),
    ({"parallel.cp": 4, "train.seq_len": 12}, 4, "h100", "not divisible by 2·cp=8"),
    ({"parallel.pp": 32}, 32, "h100", "exceeds model.n_layers=16"),
    ({"parallel.pp": 4, "parallel.pp_schedule": "interleaved", "parallel.pp_virtual_stages": 2,
      "train.global_batch": 12, "train.micro_batch": 2}, 4, "h100", "multiple of pp=4"),
    ({"train.global_batch": 8}, 16, "h100", "not a multiple of micro_batch·dp = 32"),
    ({"precision.fp8.enabled": True}, 8, "a100", "no FP8 tensor cores"),
    ({"parallel.tp": 4, "parallel.cp": 8, "parallel.cp_mode": "ulysses"}, 32, "h100", "Ulysses needs heads per tp rank (4)"),
])
def test_impossible_layouts_are_reported_not_raised(overrides, world, gpu, reason):
    result = plan(small(**overrides), world, gpu)
    assert not result.valid and not result.fits
    assert any(reason in r for r in result.reasons), result.reasons
    assert result.memory is None and result.timing is None
    assert "INVALID" in render(result, small(**overrides))


def test_layout_that_does_not_fit_says_how_much_it_needs():
    cfg = load_config(ROOT / "configs" / "llama70b_64gpu.yaml",
                      ["parallel.tp=1", "parallel.pp=1", "parallel.cp=1", "zero.stage=0"])
    result = plan(cfg, 8, "h100")
    assert result.valid and not result.fits
    assert any(r.startswith("needs ") and "GiB per GPU" in r for r in result.reasons)


def test_planning_a_1t_model_is_arithmetic_without_torch():
    code = (
        "import sys; from angelptm.config import load_config; from angelptm.plan import plan\n"
        "r = plan(load_config('configs/llama1t_10240gpu.yaml'), 10240, 'h100')\n"
        "assert r.fits and r.params > 1e12, r.reasons\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# ---------------------------------------------------------------------------------------------
# Hardware profiles


def test_builtin_profiles_and_custom_yaml(tmp_path):
    assert set(BUILTIN) == {"a100", "h100", "h200"}
    assert resolve_hardware("H100") is BUILTIN["h100"]
    assert BUILTIN["h200"].memory_gib > BUILTIN["h100"].memory_gib
    custom = load_hardware(ROOT / "configs" / "hardware" / "a100_40gb.yaml")
    assert custom.memory_gib < 40 and custom.peak_tflops == BUILTIN["a100"].peak_tflops
    full = {**{k: v for k, v in vars(BUILTIN["h100"]).items()}, "name": "mine", "gpus_per_node": 4}
    path = tmp_path / "mine.yaml"
    path.write_text(json.dumps(full))  # JSON is YAML
    assert load_hardware(path).gpus_per_node == 4
    assert plan(small(**{"parallel.tp": 8}), 8, str(path)).reasons[0].startswith("tp=8 exceeds GPUs per node 4")


@pytest.mark.parametrize("text,message", [
    ("base: h100\nwarp_drive: 1\n", "unknown field warp_drive"),
    ("name: x\n", "missing field"),
    ("base: h100\nmatmul_efficiency: 1.5\n", "fraction of peak"),
    ("base: tpu\n", "base=tpu"),
    ("- a\n", "must be a mapping"),
    ("base: h100\nhbm_gbps: 3000\nhbm_gbps: 3350\n", "'hbm_gbps' given twice \\(line 3\\)"),
    ("base: h100\nname: [\n", "not valid YAML"),
])
def test_bad_hardware_profiles_name_the_field(tmp_path, text, message):
    path = tmp_path / "hw.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        load_hardware(path)


def test_unknown_gpu_name_is_a_user_error():
    with pytest.raises(UserError, match="not a known profile"):
        resolve_hardware("v100")


# ---------------------------------------------------------------------------------------------
# Search


def test_search_ranks_fitting_layouts_by_throughput():
    plans = search(small(), 16, "h100", top=5)
    assert 1 <= len(plans) <= 5
    assert all(p.valid and p.fits for p in plans)
    speeds = [p.timing.tokens_per_s for p in plans]
    assert speeds == sorted(speeds, reverse=True)
    assert all(p.layout.world_size == 16 and p.layout.tp <= 8 for p in plans)
    # Nothing that fits beats the winner: the configured layout is one of the candidates.
    assert plan(small(), 16, "h100").timing.tokens_per_s <= speeds[0]


def test_search_space_stays_small_at_16384_gpus():
    cfg = load_config(ROOT / "configs" / "llama1t_10240gpu.yaml", ["train.global_batch=4096"])
    m = model_shape(cfg.model)
    groups = list(candidate_layouts(m, cfg, BUILTIN["h100"], 16384))
    assert 0 < len(groups) < 40_000  # each a handful of evaluations: seconds, not minutes
    assert all(g[0].world_size == 16384 for g in groups)
    best = search(cfg, 16384, "h100", top=1)
    assert best and best[0].fits


def test_search_reports_when_nothing_fits():
    assert search(small(**{"model.n_layers": 2000}), 1, "h100") == []


# ---------------------------------------------------------------------------------------------
# Command line


def test_cli_text_json_search_and_exit_codes(capsys, tmp_path):
    cfg_path = tmp_path / "small.yaml"
    cfg_path.write_text(json.dumps(SMALL))
    assert angelptm_main(["plan", str(cfg_path), "--world-size", "8"]) == 0
    assert "verdict     fits" in capsys.readouterr().out
    assert angelptm_main(["plan", str(cfg_path), "--world-size", "8", "--json", "--gpu", "a100"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["hardware"] == "A100-SXM4-80GB" and doc["fits"]
    assert angelptm_main(["plan", str(cfg_path), "--world-size", "8", "--search", "--top", "3", "--json"]) == 0
    assert 1 <= len(json.loads(capsys.readouterr().out)) <= 3
    assert angelptm_main(["plan", str(cfg_path), "--world-size", "16", "--set", "parallel.tp=16"]) == 1
    assert "tp=16 exceeds GPUs per node 8" in capsys.readouterr().out
    assert angelptm_main(["plan", str(cfg_path), "--world-size", "8", "--gpu", "v100"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "v100" in err
    assert angelptm_main(["plan", str(tmp_path / "missing.yaml"), "--world-size", "8"]) == 2
    assert angelptm_main(["plan", str(cfg_path), "--world-size", "0"]) == 2
    assert angelptm_main(["plan", str(cfg_path), "--world-size", "8", "--search", "--top", "0"]) == 2


# ---------------------------------------------------------------------------------------------
# Presets, pinned


def _close(actual, expected, path="plan"):
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys(), path
        for k in expected:
            _close(actual[k], expected[k], f"{path}.{k}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected)):
            _close(a, e, f"{path}[{i}]")
    elif isinstance(expected, float):
        assert math.isclose(actual, expected, rel_tol=1e-9, abs_tol=1e-12), f"{path}: {actual} != {expected}"
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_plan_is_pinned(preset):
    result = plan(load_config(ROOT / "configs" / f"{preset}.yaml"), PRESETS[preset], "h100")
    assert result.fits, result.reasons
    actual = json.loads(json.dumps(result.to_dict()))
    snapshot = DATA / f"plan_{preset}.json"
    if os.environ.get("ANGELPTM_UPDATE_PLAN_SNAPSHOTS") == "1":
        snapshot.parent.mkdir(exist_ok=True)
        snapshot.write_text(json.dumps(actual, indent=1, sort_keys=True) + "\n")
    _close(actual, json.loads(snapshot.read_text()))


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_is_the_searchs_choice(preset):
    cfg = load_config(ROOT / "configs" / f"{preset}.yaml")
    best = search(cfg, PRESETS[preset], "h100", top=1)[0]
    assert best.layout == plan(cfg, PRESETS[preset], "h100").layout


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_passes_the_trainers_layout_rules(preset):
    """What `angelptm train` checks of a layout before any process starts, on the preset's world
    size: the degrees, the model's divisibility (validate_layout, which takes every ZeRO stage and
    tier with any layout and schedule), the microbatch count and the pipeline schedule."""
    cfg = load_config(ROOT / "configs" / f"{preset}.yaml")
    dims = ParallelDims.from_config(cfg.parallel, PRESETS[preset])
    validate_layout(dims, cfg)
    build_schedule(cfg.parallel.pp_schedule, dims.pp, cfg.grad_accum_steps(dims.dp), cfg.parallel.pp_virtual_stages)
