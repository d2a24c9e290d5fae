"""The GPU suite's dry run: benchmarks/gpu/run.sh --dry-run runs every section's code path on CPU."""

import json
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_dry_run_covers_every_section(tmp_path):
    proc = subprocess.run([str(ROOT / "benchmarks/gpu/run.sh"), str(tmp_path), "--dry-run"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "fp8_suite.json").read_text())
    sections = results["sections"]
    assert results["dry_run"] and list(sections) == ["env", "parity", "linear", "kernels", "e2e"]
    for name, section in sections.items():
        assert not {"error", "skipped", "skipped_from"} & set(section), (name, section)
        assert not section.get("errors"), (name, section["errors"])
        assert not any(row["errors"] for row in section.get("shapes", {}).values()), name
    assert all(sections["parity"]["kernels_bit_exact"].values())
    assert set(sections["e2e"]["recipes"]) == {"tensorwise", "delayed", "rowwise", "blockwise"}
    assert len(sections["linear"]["shapes"]) == 4 and len(sections["kernels"]["kernels"]) == 8
    tail = proc.stdout.strip().splitlines()
    assert "training step" in proc.stdout and tail[-1].split()[0] == "blockwise", "the table comes last"
    assert (tmp_path / "fp8_suite.txt").read_text().strip().splitlines()[-1] == tail[-1]


def test_gpu_suite_refuses_to_run_without_an_outdir():
    proc = subprocess.run([str(ROOT / "benchmarks/gpu/run.sh")], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr
