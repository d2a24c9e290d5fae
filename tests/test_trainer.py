"""Single-process Trainer: it learns, logs what DESIGN.md promises, resumes bit for bit, writes
complete-or-absent checkpoints, refuses corrupt or foreign checkpoints in one line, and
accumulates gradients exactly; plus the learning-rate schedule."""

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from angelptm.config import OptimConfig, load_config
from angelptm.errors import UserError
from angelptm.train import checkpoint as ckpt
from angelptm.train.schedule import lr_at
from angelptm.train.trainer import Trainer

from conftest import one_line, tiny_config as tiny


def fit(cfg) -> Trainer:
    """Train `cfg` to the end on one thread; the process group of one is torn down afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = Trainer(cfg)
        trainer.fit()
        return trainer
    finally:
        torch.set_num_threads(threads)
        if dist.is_initialized():
            dist.destroy_process_group()


def refused(cfg) -> str:
    """The one-line UserError that building a Trainer for `cfg` raises; nothing may be written."""
    try:
        with pytest.raises(UserError) as excinfo:
            Trainer(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    message = one_line(str(excinfo.value))
    assert not Path(cfg.train.output_dir).exists(), "a refused run wrote to its output_dir"
    return message


def records(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(output_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(output_dir)}


def step_folders(output_dir) -> list[str]:
    return sorted(p.name for p in (Path(output_dir) / "checkpoints").iterdir())


# ---------------------------------------------------------------------------------------------
# A 60-step run shared by the tests that only read its outputs


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("learned") / "run"
    fit(tiny(out, train={"steps": 60}))
    return out


def test_loss_falls_on_synthetic_data(learned_run):
    curve = losses(learned_run)
    assert sorted(curve) == list(range(1, 61))
    assert all(math.isfinite(v) for v in curve.values())
    assert curve[1] > 5.0  # starts near ln(259) = 5.56: the initial model knows nothing
    assert curve[60] < 0.6 * curve[1], curve


def test_metrics_have_the_design_fields_and_the_schedule(learned_run):
    rows = records(learned_run)
    cfg = load_config(learned_run / "config.yaml")
    for row in rows:
        for field in ("step", "loss", "lr", "grad_norm", "tokens_per_sec", "step_time_s", "mfu"):
            assert field in row, field
        assert row["tokens_per_sec"] > 0 and row["step_time_s"] > 0 and row["grad_norm"] > 0
        assert 0 < row["mfu"] < 1
        assert row["tokens_per_sec"] == pytest.approx(8 * 32 / row["step_time_s"])
        assert row["lr"] == pytest.approx(lr_at(row["step"] - 1, cfg.optim, cfg.train.steps))
    assert rows[0]["lr"] < rows[10]["lr"]  # warmup, then decay
    assert rows[-1]["lr"] < rows[10]["lr"]


def test_resolved_config_and_final_checkpoint_are_written(learned_run):
    assert load_config(learned_run / "config.yaml") == tiny(learned_run, train={"steps": 60})
    assert step_folders(learned_run) == ["step_60"]  # ckpt_every=0: only at the end
    record = ckpt.read_train_state(learned_run / "checkpoints" / "step_60")
    assert record["step"] == 60


# ---------------------------------------------------------------------------------------------
# Exact resume and complete-or-absent checkpoints


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    fit(tiny(straight, train={"steps": 8}))
    fit(tiny(resumed, train={"steps": 8, "ckpt_every": 4}))
    assert step_folders(resumed) == ["step_4", "step_8"]
    # Interrupted after step 4: step 8 never finished, its temporary folder is half-written.
    shutil.rmtree(resumed / "checkpoints" / "step_8")
    (resumed / "checkpoints" / ".tmp_step_8" / "state").mkdir(parents=True)
    (resumed / "checkpoints" / ".tmp_step_8" / "state" / "__0_0.distcp").write_bytes(b"half")
    trainer = fit(tiny(resumed, train={"steps": 8, "ckpt_every": 4, "resume": "auto"}))
    assert trainer.step == 8

    expected, got = records(straight), records(resumed)
    assert [r["step"] for r in got] == list(range(1, 9))  # each step logged exactly once
    for a, b in zip(expected, got):
        assert (a["step"], a["loss"], a["grad_norm"], a["lr"]) == (b["step"], b["loss"], b["grad_norm"], b["lr"])
    _, model_a = ckpt.load_model(straight / "checkpoints" / "step_8")
    _, model_b = ckpt.load_model(resumed / "checkpoints" / "step_8")
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name
    assert ".tmp_step_8" not in step_folders(resumed)


@pytest.mark.parametrize("sections", [
    {"precision": {"fp8": {"enabled": True, "recipe": "delayed", "amax_history": 4}}},
    {"zero": {"stage": 3, "offload_optimizer": "cpu", "page_mb": 0.05}},
], ids=["fp8-delayed", "zero3-host"])
def test_resume_carries_fp8_scaling_and_zerocache_state(tmp_path, sections):
    """Delayed scaling's amax histories and ZeROCache's sharded, offloaded state are in the
    checkpoint: steps after a resume have the uninterrupted run's losses, bit for bit."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    fit(tiny(straight, train={"steps": 6}, **sections))
    fit(tiny(resumed, train={"steps": 6, "ckpt_every": 3}, **sections))
    shutil.rmtree(resumed / "checkpoints" / "step_6")
    fit(tiny(resumed, train={"steps": 6, "ckpt_every": 3, "resume": "auto"}, **sections))
    assert losses(resumed) == losses(straight)


def test_resume_after_a_crash_mid_metrics_line(tmp_path):
    out = tmp_path / "run"
    fit(tiny(out, train={"steps": 4, "ckpt_every": 2}))
    shutil.rmtree(out / "checkpoints" / "step_4")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # the process died while writing step 5's record
    fit(tiny(out, train={"steps": 4, "ckpt_every": 2}))
    assert [r["step"] for r in records(out)] == [1, 2, 3, 4]


def test_checkpoints_are_pruned_and_complete(tmp_path):
    out = tmp_path / "run"
    fit(tiny(out, train={"steps": 6, "ckpt_every": 1, "keep_checkpoints": 2}))
    assert step_folders(out) == ["step_5", "step_6"]  # no .tmp_ folder left behind
    for name in ("step_5", "step_6"):
        folder = out / "checkpoints" / name
        assert ckpt.read_train_state(folder)["step"] == int(name[5:])
        assert (folder / "config.yaml").is_file() and (folder / "state" / ".metadata").is_file()
    assert ckpt.latest_checkpoint(out / "checkpoints").name == "step_6"


def test_a_crash_while_saving_leaves_no_step_folder_and_resume_uses_the_previous_one(tmp_path, monkeypatch):
    out = tmp_path / "run"
    replace = ckpt.os.replace

    def crash_on_step_6(src, dst):
        if Path(dst).name == "step_6":
            raise OSError("disk full")
        return replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crash_on_step_6)
    with pytest.raises(OSError, match="disk full"):
        fit(tiny(out, train={"steps": 6, "ckpt_every": 2, "keep_checkpoints": 5}))
    monkeypatch.undo()
    assert "step_6" not in step_folders(out)
    assert ckpt.latest_checkpoint(out / "checkpoints").name == "step_4"

    trainer = fit(tiny(out, train={"steps": 6, "ckpt_every": 2, "keep_checkpoints": 5}))
    assert step_folders(out) == ["step_2", "step_4", "step_6"]
    assert [r["step"] for r in records(out)] == list(range(1, 7))
    assert trainer.step == 6


# ---------------------------------------------------------------------------------------------
# Refused checkpoints: one line, nothing written


@pytest.fixture
def checkpoint_copy(learned_run, tmp_path) -> Path:
    folder = tmp_path / "step_60"
    shutil.copytree(learned_run / "checkpoints" / "step_60", folder)
    return folder


def first_distcp(folder: Path) -> Path:
    files = sorted((folder / "state").glob("*.distcp"))
    assert files
    return files[0]


def test_truncated_checkpoint_is_refused(tmp_path, checkpoint_copy):
    shard = first_distcp(checkpoint_copy)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    message = refused(tiny(tmp_path / "out", train={"resume": str(checkpoint_copy)}))
    assert str(checkpoint_copy) in message and "corrupt" in message and "delete it" in message


def test_checkpoint_with_a_flipped_byte_is_refused(tmp_path, checkpoint_copy):
    shard = first_distcp(checkpoint_copy)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    message = refused(tiny(tmp_path / "out", train={"resume": str(checkpoint_copy)}))
    assert "checksum" in message and str(checkpoint_copy) in message


@pytest.mark.parametrize("lost", ["train_state.json", "state/.metadata", "config.yaml"])
def test_checkpoint_missing_a_file_is_refused(tmp_path, checkpoint_copy, lost):
    (checkpoint_copy / lost).unlink()
    message = refused(tiny(tmp_path / "out", train={"resume": str(checkpoint_copy)}))
    assert str(checkpoint_copy) in message


def test_checkpoint_with_a_truncated_config_is_refused_as_corrupt(tmp_path, checkpoint_copy):
    config = checkpoint_copy / "config.yaml"
    config.write_text(config.read_text()[:150])
    message = refused(tiny(tmp_path / "out", train={"resume": str(checkpoint_copy)}))
    assert "corrupt" in message and str(checkpoint_copy) in message


def test_corrupt_latest_checkpoint_is_refused_under_resume_auto(tmp_path, learned_run):
    out = tmp_path / "run"
    shutil.copytree(learned_run / "checkpoints", out / "checkpoints")
    shard = first_distcp(out / "checkpoints" / "step_60")
    shard.write_bytes(b"")
    with pytest.raises(UserError) as excinfo:
        try:
            Trainer(tiny(out, train={"steps": 61}))
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    assert "corrupt" in one_line(str(excinfo.value))
    assert not (out / "metrics.jsonl").exists() and not (out / "config.yaml").exists()


def test_checkpoint_of_a_different_model_is_refused(tmp_path, checkpoint_copy):
    message = refused(tiny(tmp_path / "out", model={"n_layers": 3}, train={"resume": str(checkpoint_copy)}))
    assert "model.n_layers" in message and "train.resume=never" in message


def test_resume_path_that_does_not_exist_is_refused(tmp_path):
    message = refused(tiny(tmp_path / "out", train={"resume": str(tmp_path / "nope")}))
    assert "train.resume" in message and "nope" in message


# ---------------------------------------------------------------------------------------------
# Gradient accumulation and precision


def test_gradient_accumulation_matches_one_big_microbatch(tmp_path):
    whole = fit(tiny(tmp_path / "whole", train={"steps": 4, "micro_batch": 8}))
    split = fit(tiny(tmp_path / "split", train={"steps": 4, "micro_batch": 2}))
    assert (whole.accum_steps, split.accum_steps) == (1, 4)
    a, b = losses(tmp_path / "whole"), losses(tmp_path / "split")
    assert a.keys() == b.keys() == {1, 2, 3, 4}
    norms_a = {r["step"]: r["grad_norm"] for r in records(tmp_path / "whole")}
    norms_b = {r["step"]: r["grad_norm"] for r in records(tmp_path / "split")}
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
        assert norms_b[step] == pytest.approx(norms_a[step], rel=1e-4), step  # the mean gradient, not the sum
    assert a[4] != a[1]  # the steps did update the model


def test_bf16_autocast_trains(tmp_path, learned_run):
    out = tmp_path / "bf16"
    fit(tiny(out, precision={"dtype": "bfloat16"}, train={"steps": 30}))
    curve = losses(out)
    assert all(math.isfinite(v) for v in curve.values())
    fp32_first = losses(learned_run)[1]  # same weights and data before the first update
    assert curve[1] != fp32_first and curve[1] == pytest.approx(fp32_first, rel=2e-2)  # bf16 did run
    assert curve[30] < 0.8 * curve[1], curve
    _, model = ckpt.load_model(out / "checkpoints" / "step_30")
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast keeps fp32 master weights


# ---------------------------------------------------------------------------------------------
# Learning-rate schedule


def optim(**changes) -> OptimConfig:
    return dataclasses.replace(OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10), **changes)


def test_warmup_rises_linearly_to_the_peak():
    o = optim()
    assert [lr_at(s, o, 100) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    for schedule in ("cosine", "linear", "constant"):
        assert lr_at(9, optim(schedule=schedule), 100) == pytest.approx(1.0)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decay_falls_monotonically_from_lr_to_min_lr(schedule):
    o = optim(schedule=schedule)  # 10 warmup steps, then 100 of decay
    values = [lr_at(s, o, 110) for s in range(10, 111)]
    assert values[0] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert lr_at(60, o, 110) == pytest.approx(0.55)  # halfway: halfway between lr and min_lr
    assert lr_at(110, o, 110) == pytest.approx(0.1)  # the end of the run reaches min_lr
    assert lr_at(109, o, 110) < 0.1 + 0.01  # the last step is next to it
    assert lr_at(500, o, 110) == pytest.approx(0.1)  # and it stays there past the end


def test_cosine_falls_slower_than_linear_early_and_faster_late():
    cosine, linear = optim(schedule="cosine"), optim(schedule="linear")
    assert lr_at(35, cosine, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lr_at(35, linear, 110) == pytest.approx(0.1 + 0.9 * 0.75)
    assert lr_at(35, cosine, 110) > lr_at(35, linear, 110)
    assert lr_at(85, cosine, 110) < lr_at(85, linear, 110)


def test_constant_schedule_holds_lr_and_no_warmup_starts_at_lr():
    assert {lr_at(s, optim(schedule="constant"), 110) for s in range(10, 110)} == {1.0}
    assert lr_at(0, optim(warmup_steps=0), 110) == 1.0
