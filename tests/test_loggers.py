"""TensorBoard and W&B logging: the event files and the offline W&B run hold exactly metrics.jsonl's
values, a resumed run continues both histories, a missing package or a bad `train.loggers` is one
line, and the progress line shows memory and stays one line on a terminal."""

import io
import json
import struct
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from angelptm.config import config_from_dict
from angelptm.errors import ConfigError, UserError
from angelptm.train.loggers import WANDB_ID_FILE, WandbLogger, scalars
from angelptm.train.metrics import MetricsLogger
from angelptm.train.trainer import Trainer

from conftest import one_line, tiny_sections

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")

import wandb  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from wandb.proto import wandb_internal_pb2  # noqa: E402

ALL_LOGGERS = {"loggers": ["jsonl", "tensorboard", "wandb"], "wandb": {"mode": "offline", "project": "tests"}}


@pytest.fixture(scope="module", autouse=True)
def quiet_wandb():
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_SILENT", "true")
        env.setenv("WANDB_DISABLE_GIT", "true")
        env.delenv("WANDB_MODE", raising=False)  # train.wandb.mode decides
        yield


def train(output_dir, **train_keys) -> None:
    """Train the tiny config for 4 steps on one thread, logging to all three loggers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(config_from_dict(tiny_sections(output_dir, train={"steps": 4, **ALL_LOGGERS, **train_keys}))).fit()
        wandb.teardown()  # the run's writer process finishes the run file as the process would at exit
    finally:
        torch.set_num_threads(threads)


def records(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def tensorboard_scalars(output_dir) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(Path(output_dir) / "tb"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def wandb_records(path: Path):
    """The protobuf records of a `.wandb` file: W&B's LevelDB-style log of 32 KiB blocks, each
    record split into chunks with a 7-byte header (crc32, length, kind: 1 full, 2 first, 3 middle, 4 last)."""
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = 7, b""  # past the file header: ":W&B", magic, version
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_runs(output_dir) -> list[tuple[str, dict, dict[int, dict]]]:
    """(run id, config, history by step) of each offline W&B run folder, oldest first."""
    runs = []
    for run_file in sorted((Path(output_dir) / "wandb").glob("offline-run-*/run-*.wandb")):
        run_id, config, history = None, {}, {}
        for record in wandb_records(run_file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id = record.run.run_id
                config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
            elif kind == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                       for item in record.history.item}
                history[row["_step"]] = row
        runs.append((run_id, config, history))
    return runs


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("logged") / "run"
    try:
        train(out)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return out


def test_tensorboard_events_equal_metrics_jsonl(logged_run):
    logged = records(logged_run)
    events = tensorboard_scalars(logged_run)
    expected_tags = set().union(*(scalars(r) for r in logged))
    numeric = {k for r in logged for k, v in r.items() if isinstance(v, (int, float)) and k != "step"}
    assert numeric | {"tokens_by_source/synthetic(seed=0)"} <= expected_tags
    assert set(events) == expected_tags
    for tag, points in events.items():
        want = [(r["step"], scalars(r)[tag]) for r in logged if tag in scalars(r)]
        assert [s for s, _ in points] == [s for s, _ in want], tag
        for (_, got), (_, value) in zip(points, want):
            assert got == pytest.approx(value, rel=1e-6, abs=1e-30), tag  # stored as float32


def test_tensorboard_holds_the_resolved_config(logged_run):
    events = EventAccumulator(str(logged_run / "tb"))
    events.Reload()
    (text,) = events.Tensors("config/text_summary")
    shown = text.tensor_proto.string_val[0].decode()
    assert "dim: 64" in shown and f"output_dir: {logged_run}" in shown


def test_wandb_offline_run_holds_metrics_jsonl(logged_run):
    ((run_id, config, history),) = wandb_runs(logged_run)
    assert run_id == (logged_run / WANDB_ID_FILE).read_text().strip()
    assert config["model"]["dim"] == 64 and config["train"]["steps"] == 4
    logged = records(logged_run)
    assert sorted(history) == [r["step"] for r in logged]
    for r in logged:
        row = history[r["step"]]
        for name, value in scalars(r).items():
            assert row[name] == pytest.approx(value, rel=1e-12), name


def test_resumed_run_continues_both_histories(tmp_path, own_process_group):
    out = tmp_path / "run"
    train(out, ckpt_every=2)
    first_id = (out / WANDB_ID_FILE).read_text().strip()
    dist.destroy_process_group()
    train(out, resume=str(out / "checkpoints" / "step_2"))  # steps 3 and 4 again

    (first, first_history), (second, second_history) = [(r[0], r[2]) for r in wandb_runs(out)]
    assert first == second == first_id
    assert sorted(first_history) == [1, 2, 3, 4] and sorted(second_history) == [3, 4]
    # TensorBoard drops what the first attempt logged after step 2: one value per step, the
    # resumed run's, as in metrics.jsonl.
    losses = tensorboard_scalars(out)["loss"]
    assert [step for step, _ in losses] == [1, 2, 3, 4]
    assert [v for _, v in losses] == pytest.approx([r["loss"] for r in records(out)], rel=1e-6)


@pytest.mark.parametrize("logger", ["tensorboard", "wandb"])
def test_missing_package_is_one_line_naming_the_extra(logger, tmp_path, monkeypatch, own_process_group):
    monkeypatch.setitem(sys.modules, logger, None)  # what `import` finds when the package is absent
    out = tmp_path / "run"
    with pytest.raises(UserError) as excinfo:
        Trainer(config_from_dict(tiny_sections(out, train=ALL_LOGGERS)))
    message = one_line(str(excinfo.value))
    assert f"pip install angelptm[{logger}]" in message and "train.loggers" in message
    assert not out.exists(), "a refused run wrote to its output_dir"


@pytest.mark.parametrize("train_keys, expected", [
    ({"loggers": ["jsonl", "tb"]}, "train.loggers[1]='tb' is not one of: jsonl, tensorboard, wandb"),
    ({"loggers": "tensorboard"}, "train.loggers='tensorboard' must be a list of jsonl | tensorboard | wandb"),
    ({"loggers": ["tensorboard"]}, "train.loggers=[tensorboard] leaves out jsonl"),
    ({"loggers": ["jsonl", "wandb", "wandb"]}, "train.loggers=[jsonl, wandb, wandb] names a logger twice"),
    ({"wandb": {"mode": "offfline"}}, "train.wandb.mode='offfline' is not one of: online, offline, disabled"),
])
def test_bad_loggers_config_is_one_line(train_keys, expected, tmp_path):
    with pytest.raises(ConfigError) as excinfo:
        config_from_dict(tiny_sections(tmp_path, train=train_keys))
    assert one_line(str(excinfo.value)).startswith(expected)


RECORD = {"step": 3, "loss": 2.5, "tokens_per_sec": 1000.0, "eta_s": 12.0, "skipped": False}


def test_progress_line_shows_memory(tmp_path):
    stream = io.StringIO()
    metrics = MetricsLogger(tmp_path / "metrics.jsonl", 10, enabled=True, stream=stream)
    metrics.log(RECORD)
    metrics.log({**RECORD, "step": 4, "mem_device_peak_gb": 1.5})
    metrics.close()
    first, second = stream.getvalue().splitlines()  # not a terminal: plain lines
    assert first.startswith("step  3/10") and " | rss " in first and first.endswith(" GB")
    assert second.endswith(" | mem 1.50 GB")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_stays_one_terminal_line(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "50")
    stream = Terminal()
    metrics = MetricsLogger(tmp_path / "metrics.jsonl", 10, enabled=True, stream=stream)
    metrics.log({**RECORD, "val_loss": 2.6, "val_ppl": 13.5})
    metrics.log({**RECORD, "step": 4})
    metrics.close()
    drawn = stream.getvalue()
    assert "\n" not in drawn
    assert [len(line) for line in drawn.split("\r")[1:]] == [49, 49]  # cut to the width, padded to it


@pytest.mark.timeout(120)
def test_wandb_online_without_login_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no saved W&B settings
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with pytest.raises(UserError) as excinfo:
        WandbLogger(tmp_path / "run", {}, 0, "tests", None, "online")
    assert one_line(str(excinfo.value)).endswith("run `wandb login`, or set train.wandb.mode=offline")
