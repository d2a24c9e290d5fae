"""The GPU suite's dry run: benchmarks/gpu/run.sh --dry-run runs every section's code path on CPU."""

import importlib.util
import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"tensorwise", "delayed", "rowwise", "blockwise"}


def test_gpu_suite_dry_run_covers_every_section(tmp_path):
    proc = subprocess.run([str(ROOT / "benchmarks/gpu/run.sh"), str(tmp_path), "--dry-run"],
                          capture_output=True, text=True, timeout=900, env=dict(os.environ, PYTHON=sys.executable))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "fp8_suite.json").read_text())
    sections = results["sections"]
    assert results["dry_run"] and list(sections) == ["env", "parity", "overhead", "linear", "e2e", "kernels",
                                                     "compiled", "zerocache"]
    for name, section in sections.items():
        assert not {"error", "skipped", "skipped_from"} & set(section), (name, section)
        assert not section.get("errors"), (name, section["errors"])
        assert not any(row.get("errors") for row in section.get("shapes", {}).values()), name
    env = sections["env"]
    # CPU torch has no blockwise scaling: the probe says so and the recipe keeps its kernel.
    assert env["blockwise_triton_TFLOPs"] > 0 and "blockwise_cublas_TFLOPs" not in env
    assert len(env["blockwise_native"]) == 4 and not any(env["blockwise_native"].values())
    assert set(env["fast_accum_speedup"]) == {"128^3", "mlp_up", "mlp_down"}
    assert all(r["min"] <= r["median"] <= r["max"] for r in env["fast_accum_speedup"].values())
    assert "fast accumulation vs promoted" in proc.stdout
    parity = sections["parity"]
    assert parity["backend"] == ("triton" if importlib.util.find_spec("triton") else "torch")
    # every cast on bfloat16 (activations, gradients) and on float32 (master weights) sources
    assert len(parity["kernels_bit_exact"]) == 2 * 8 and all(parity["kernels_bit_exact"].values())
    assert {name.rsplit(" ", 1)[1] for name in parity["kernels_bit_exact"]} == {"bfloat16", "float32"}
    assert all(r.get("mismatches", 0) == 0 for reports in parity["kernel_diffs"].values() for r in reports)
    assert set(sections["overhead"]["calls"]) == RECIPES | {"bf16"}
    assert all(c["host_ops"] > 0 and c["host_us"] > 0 for c in sections["overhead"]["calls"].values())
    assert len(sections["overhead"]["host_costs_us"]) == (5 if importlib.util.find_spec("triton") else 4)
    # At the device-bound shape each layer's device time is split by kernel, adding up to the whole
    # (on CPU the profiler sees no device, so both are empty there).
    bound = sections["overhead"]["device_bound"]["calls"]
    assert set(bound) == RECIPES | {"bf16"}
    for name, call in bound.items():
        assert sum(k["launches"] for k in call["device_kernels"]) == call["device_ops"], name
        assert sum(k["us"] for k in call["device_kernels"]) == pytest.approx(call["device_us"]), name
    assert "bound by the device" in proc.stdout
    linear = sections["linear"]["shapes"]
    assert len(linear) == 5 and all(set(row["eager"]) == set(row["graphed"]) == RECIPES | {"bf16"}
                                    for row in linear.values())
    assert len(sections["kernels"]["kernels"]) == 11
    e2e = sections["e2e"]["recipes"]
    assert set(e2e) == RECIPES
    for recipe, row in e2e.items():
        # Same weights, same batches, fused AdamW: every FP8 model learns along with bf16 and stays
        # within 1.5% of its loss at every step (an FP8 model with stale weights drifts 3% away).
        assert row["fp8_learns"] and row["max_rel_loss_gap"] < 0.015, (recipe, row["loss"])
    compiled = sections["compiled"]
    assert all(set(row) == {"bf16", "tensorwise", "delayed", "rowwise"} for row in compiled["shapes"].values())
    assert compiled["shapes"] and set(compiled["e2e"]["recipes"]) == {"tensorwise"} and not compiled["e2e"]["errors"]
    # Compiled blocks (the FP8 weight cast in the graph every call) learn like compiled bf16.
    row = compiled["e2e"]["recipes"]["tensorwise"]
    assert row["fp8_learns"] and row["max_rel_loss_gap"] < 0.015, row["loss"]
    assert "compiled" in proc.stdout.split("goal (H100)")[1].split("\n\n")[0]  # compiled goal rows
    zerocache = sections["zerocache"]
    assert zerocache["backend"] == "gloo" and len(zerocache["runs"]) == 5
    tiers = {"none": "device", "cpu": "host", "nvme": "nvme"}
    for name, run in zerocache["runs"].items():
        # On one rank every layout computes torch AdamW's update: the same losses at every step.
        assert run["matched"] and run["steps"] == 6, (name, run["loss"])
        # The optimizer state sits on the tier asked for, and the ledger saw it there.
        assert run["ledger"][tiers[run["layout"].get("offload_optimizer", "none")]]["optimizer"] > 0, name
        # The FP8 run's 7 linear layers per block (q, k, v, o, w1, w2, w3) use the FP8 all-gather.
        assert run["fp8_gathered_layers"] == (2 * 7 if run["layout"].get("fp8_all_gather") else 0), name
    assert sum(f"ZeROCache {name} = torch AdamW" in proc.stdout for name in zerocache["runs"]) == 5
    tail = proc.stdout.strip().splitlines()
    assert "training" in proc.stdout and tail[-1].split()[:2] == ["compiled", "tensorwise"], "the table comes last"
    assert (tmp_path / "fp8_suite.txt").read_text().strip().splitlines()[-1] == tail[-1]


def test_gpu_suite_refuses_to_run_without_an_outdir():
    proc = subprocess.run([str(ROOT / "benchmarks/gpu/run.sh")], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_gpu_suite_refuses_an_interpreter_without_torch_in_one_line(tmp_path):
    venv.create(tmp_path / "bare", with_pip=False)  # a Python with nothing installed, as a fresh machine's
    bare = tmp_path / "bare" / "bin" / "python"
    proc = subprocess.run([str(ROOT / "benchmarks/gpu/run.sh"), str(tmp_path / "out"), "--dry-run"],
                          capture_output=True, text=True, env=dict(os.environ, PYTHON=str(bare)))
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "lacks torch" in proc.stderr
    assert not (tmp_path / "out" / "fp8_suite.json").exists()
