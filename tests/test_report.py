"""`angelptm report`: figures of a finished run, a run still being written, a run with skipped steps
and two runs overlaid (their config differences in the legend), as PNG or self-contained HTML; a
folder that is not a run fails in one line. And `benchmarks/report.py`'s figures of ratios."""

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from angelptm.config import config_from_dict
from angelptm.errors import UserError
from angelptm.report import panels_for, read_run, report, run_labels
from angelptm.train.faults import TrainingStopped
from angelptm.train.trainer import Trainer

from conftest import REPO, one_line, run_cli, tiny_sections

pytest.importorskip("matplotlib")
from matplotlib.image import imread  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def train(output_dir, **sections) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(config_from_dict(tiny_sections(output_dir, **sections))).fit()
    finally:
        torch.set_num_threads(threads)
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two finished 6-step runs that differ in optim.lr, and one whose steps are skipped until it stops."""
    root = tmp_path_factory.mktemp("runs")
    train(root / "lr3e-3", train={"steps": 6})
    train(root / "lr1e-3", optim={"lr": 1e-3, "min_lr": 1e-4}, train={"steps": 6})
    with pytest.raises(TrainingStopped):  # non-finite updates, skipped, until max_skipped_steps in a row
        train(root / "diverged", optim={"lr": 1e6, "warmup_steps": 0}, train={"steps": 30, "max_skipped_steps": 3})
    return {"a": root / "lr3e-3", "b": root / "lr1e-3", "diverged": root / "diverged"}


def panel_titles(*folders) -> list[str]:
    return [p.title for p in panels_for([read_run(f) for f in folders])]


def test_finished_run_png_from_the_command_line(runs):
    done = run_cli("report", runs["a"])
    assert done.returncode == 0, done.stderr
    out = runs["a"] / "report.png"
    assert done.stdout.strip() == f"wrote {out}"
    assert out.read_bytes().startswith(PNG_MAGIC)
    height, width, _ = imread(out).shape
    assert width == 1280 and height > width  # two columns of panels, four rows
    assert panel_titles(runs["a"]) == ["Loss", "Learning rate", "Gradient norm", "Throughput", "MFU",
                                       "Memory per tier", "Skipped steps"]
    (label,) = run_labels([read_run(runs["a"])])
    assert label == "lr3e-3 (step 6/6)"


def test_running_run_with_a_cut_last_line(runs, tmp_path):
    running = tmp_path / "running"
    running.mkdir()
    shutil.copy(runs["a"] / "config.yaml", running)
    lines = (runs["a"] / "metrics.jsonl").read_text().splitlines(keepends=True)
    (running / "metrics.jsonl").write_text("".join(lines[:4]) + lines[4][: len(lines[4]) // 2])  # step 5 half-written
    run = read_run(running)
    assert [r["step"] for r in run.records] == [1, 2, 3, 4]
    assert run_labels([run]) == ["running (step 4/6)"]
    out = report([running], tmp_path / "now.png")
    assert out.read_bytes().startswith(PNG_MAGIC)


def test_run_with_skipped_steps(runs, tmp_path):
    run = read_run(runs["diverged"])
    skipped = [r["step"] for r in run.records if r["skipped"]]
    assert len(skipped) == 3
    (panel,) = [p for p in panels_for([run]) if p.title == "Skipped steps"]
    steps, so_far = panel.series[0].values(run.records)
    assert steps == [r["step"] for r in run.records] and so_far[-1] == 3 and so_far == sorted(so_far)
    assert report([runs["diverged"]], tmp_path / "diverged.png").read_bytes().startswith(PNG_MAGIC)


def test_two_runs_overlaid_with_their_differences(runs, tmp_path):
    labels = run_labels([read_run(runs["a"]), read_run(runs["b"])])
    assert labels == ["lr3e-3 (step 6/6): optim.lr=0.003, optim.min_lr=0.0003",
                      "lr1e-3 (step 6/6): optim.lr=0.001, optim.min_lr=0.0001"]
    assert report([runs["a"], runs["b"]], tmp_path / "both.png").read_bytes().startswith(PNG_MAGIC)

    page = report([runs["a"], runs["b"]], tmp_path / "both.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == len(panel_titles(runs["a"], runs["b"]))  # one figure per panel, embedded
    assert all(base64.b64decode(i).startswith(PNG_MAGIC) for i in images)
    assert "http" not in page.replace("<!doctype html>", "")  # nothing fetched from elsewhere
    assert "<th>optim.lr</th>" in page and "<td>0.001</td>" in page


def test_folder_that_is_not_a_run_fails_in_one_line(runs, tmp_path):
    done = run_cli("report", runs["a"], tmp_path)
    assert done.returncode == 2
    assert one_line(done.stderr) == (f"angelptm: error: {tmp_path} is not a run: it has no metrics.jsonl; "
                                     "pass a run's train.output_dir")
    assert done.stdout == ""  # nothing drawn: every folder is read before any figure


def test_out_must_be_png_or_html(runs, tmp_path):
    with pytest.raises(UserError) as excinfo:
        report([runs["a"]], tmp_path / "report.pdf")
    assert ".png" in one_line(str(excinfo.value)) and not (tmp_path / "report.pdf").exists()


def test_benchmark_report_draws_ratios_and_skips_other_shapes(tmp_path):
    (tmp_path / "speed.json").write_text(json.dumps({
        "goals": {"vs_baseline": 1.5},
        "results": [{"side": "baseline", "ratio_vs_baseline": 1.0},
                    {"side": "ours", "ratio_vs_baseline": 1.6}],
        "ratios": {"ours / theirs": {"min": 1.1, "median": 1.2, "max": 1.4}}}))
    (tmp_path / "losses.json").write_text(json.dumps({"rows": [{"recipe": "fp8", "final_loss": 1.0}]}))
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "report.py"), "--results", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["skipped losses.json: no ratios in it",
                                        f"wrote {tmp_path / 'speed.png'} (ratio_vs_baseline, ratios)"]
    assert (tmp_path / "speed.png").read_bytes().startswith(PNG_MAGIC)
    assert not (tmp_path / "losses.png").exists()
