"""Where step records go besides metrics.jsonl: TensorBoard event files and Weights & Biases runs.

`build_loggers` turns `train.loggers` into one writer per backend; `MetricsLogger` hands each the
record it writes to metrics.jsonl. Every numeric field becomes a scalar at the record's step, a
nested mapping (`tokens_by_source`, `comm_bytes`) one scalar per entry named `field/entry`.
"""

from __future__ import annotations

import importlib
import queue
import threading
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import yaml

from angelptm.errors import UserError

if TYPE_CHECKING:
    from angelptm.config import Config

# logger -> the package it needs; the pip extra that installs it has the logger's name
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
WANDB_ID_FILE = "wandb_run_id"  # in output_dir: a resumed run continues the same W&B run


class StepLogger(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Every number in `record` (true/false as 1/0) under its name, nested mappings as `name/key`;
    `step`, the x axis, is left out."""
    found: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            found.update(scalars(value, f"{name}/"))
        elif isinstance(value, (int, float)) and name != "step":
            found[name] = float(value)
    return found


def _import(logger: str):
    package = PACKAGES[logger]
    try:
        return importlib.import_module(package)
    except ImportError:
        raise UserError(f"train.loggers names {logger}, but the {package} package is not installed; "
                        f"pip install angelptm[{logger}]") from None


class TensorBoardLogger:
    """Event files under `<output_dir>/tb/`; the resolved config is the text `config`."""

    def __init__(self, output_dir: Path, config: dict[str, Any], resume_step: int):
        _import("tensorboard")
        from tensorboard.compat.proto.summary_pb2 import Summary
        from torch.utils.tensorboard import SummaryWriter

        self.summary = Summary  # the protobuf type, imported here as tensorboard is optional
        # purge_step: TensorBoard hides what an earlier attempt logged after the resumed step,
        # as metrics.jsonl drops those records.
        self.writer = SummaryWriter(str(output_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)
        text = yaml.safe_dump(config, sort_keys=False)  # indented below: Markdown keeps a code block's layout
        self.writer.add_text("config", "".join(f"    {line}\n" for line in text.splitlines()), resume_step)

    def log(self, record: dict[str, Any]) -> None:
        # One event holding every scalar: a fifth of the time of an add_scalar call per field.
        values = [self.summary.Value(tag=name, simple_value=value) for name, value in scalars(record).items()]
        self.writer.file_writer.add_summary(self.summary(value=values), record["step"])

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """A W&B run with the resolved config; mode offline writes it under `<output_dir>/wandb/` for
    `wandb sync`. The run id is kept in `<output_dir>/wandb_run_id`, so a resumed run continues it."""

    def __init__(self, output_dir: Path, config: dict[str, Any], resume_step: int,
                 project: str, name: str | None, mode: str):
        wandb = _import("wandb")
        id_file = output_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resume_step and id_file.is_file() else uuid.uuid4().hex[:8]
        output_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id + "\n")
        try:
            # console off: the records are logged already, and W&B's capture of the terminal
            # would wrap the stream the progress line redraws.
            self.run = wandb.init(project=project, name=name or output_dir.resolve().name, mode=mode,
                                  dir=str(output_dir), id=run_id, resume="allow", config=config,
                                  settings=wandb.Settings(console="off"))
        except wandb.errors.Error as e:
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"wandb could not start a run ({first_line}); run `wandb login`, or set "
                            "train.wandb.mode=offline") from None

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


class InBackground:
    """Hands records to `loggers` on a thread of their own, so a training step only queues them.
    An error there is raised at the next `log` or at `close`."""

    def __init__(self, loggers: list[StepLogger]):
        self.loggers = loggers
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._write, name="angelptm-loggers", daemon=True)
        self.thread.start()

    def _write(self) -> None:
        while (record := self.queue.get()) is not None:
            try:
                for logger in self.loggers:
                    logger.log(record)
            except BaseException as e:  # noqa: BLE001 - kept for the training thread to raise
                self.error = e
                return

    def _raise_error(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def log(self, record: dict[str, Any]) -> None:
        self._raise_error()
        self.queue.put(record)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        for logger in self.loggers:
            logger.close()
        self._raise_error()


def build_loggers(cfg: Config, output_dir: Path, resume_step: int) -> list[StepLogger]:
    """The writers `cfg.train.loggers` names besides jsonl (which MetricsLogger writes itself).
    Every package is imported before any writer is made, so a missing one leaves nothing behind."""
    names = [name for name in cfg.train.loggers if name != "jsonl"]
    for name in names:
        _import(name)
    config = cfg.to_dict()
    made: list[StepLogger] = []
    for name in names:
        if name == "tensorboard":
            made.append(TensorBoardLogger(output_dir, config, resume_step))
        else:
            w = cfg.train.wandb
            made.append(WandbLogger(output_dir, config, resume_step, w.project, w.name, w.mode))
    return [InBackground(made)] if made else []
