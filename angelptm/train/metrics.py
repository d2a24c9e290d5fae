"""What a run reports: one JSON object per logged step in metrics.jsonl, and a progress line.

Global rank 0 writes; the others stay quiet. MFU is the model's training FLOPs per second over
the device's peak: a datasheet figure for known GPUs, and for CPUs the fp32 matmul rate measured
on this machine at start-up (so CPU "MFU" reads as the fraction of what this CPU's BLAS reaches).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence, TextIO

import torch

from angelptm.errors import UserError
from angelptm.train.loggers import StepLogger

# Dense peak FLOP/s per GPU by dtype (datasheet, without sparsity).
GPU_PEAK_FLOPS = {
    "H200": {"bfloat16": 989e12, "float32": 67e12},
    "H100": {"bfloat16": 989e12, "float32": 67e12},
    "A100": {"bfloat16": 312e12, "float32": 19.5e12},
}


def measure_cpu_matmul_flops(size: int = 1024, repeats: int = 3) -> float:
    gen = torch.Generator().manual_seed(0)  # not the default generator: LoRA dropout draws from it (finetune/lora.py)
    a, b = torch.randn(size, size, generator=gen), torch.randn(size, size, generator=gen)
    a @ b  # warm-up: thread pool and BLAS initialisation
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops(device: torch.device, dtype: str) -> Optional[float]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in GPU_PEAK_FLOPS.items():
            if key in name:
                return peaks.get(dtype)
        return None
    return measure_cpu_matmul_flops()


def _records_up_to(path: Path, step: int) -> list[str]:
    """The lines of `path` for steps <= `step`; a line cut short by a crash is dropped."""
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    return kept


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _memory(record: dict[str, Any]) -> str:
    """The device's peak memory when training on a GPU, else this process's peak resident memory."""
    if "mem_device_peak_gb" in record:
        return f"mem {record['mem_device_peak_gb']:.2f} GB"
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return f"rss {peak_rss / 2**30:.2f} GB"


class MetricsLogger:
    """Appends step records to `<output_dir>/metrics.jsonl`, hands each to the other `loggers`
    (TensorBoard, W&B: `angelptm.train.loggers`) and draws a progress line."""

    def __init__(self, path: Path, total_steps: int, enabled: bool, resume_step: int = 0,
                 stream: Optional[TextIO] = None, loggers: Sequence[StepLogger] = ()):
        """`resume_step` > 0 keeps the records up to that step and drops any written after it,
        so a resumed run's file reads as one uninterrupted history."""
        self.total_steps = total_steps
        self.enabled = enabled
        self.loggers = list(loggers)
        self.stream = stream or sys.stderr  # looked up now: a redirected sys.stderr is followed
        self.interactive = self.stream.isatty()
        self._file = None
        if enabled:
            kept = _records_up_to(path, resume_step) if resume_step else []
            tmp = path.with_name(path.name + ".tmp")
            try:
                with open(tmp, "w") as f:
                    f.writelines(kept)
                os.replace(tmp, path)
            except OSError as e:  # a full disk, most likely: say so, keep the old file
                tmp.unlink(missing_ok=True)
                raise UserError(f"cannot write {path} ({e.strerror or e}); free some space on its disk or set "
                                "train.output_dir elsewhere") from None
            self._file = open(path, "a")

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self._progress(record)
        for logger in self.loggers:  # last: a background writer then runs while the next step computes
            logger.log(record)

    def _progress(self, r: dict[str, Any]) -> None:
        done = r["step"] / self.total_steps
        bar = "=" * int(20 * done)
        line = (
            f"step {r['step']:>{len(str(self.total_steps))}}/{self.total_steps} [{bar:<20}] "
            f"loss {r['loss']:.4f} | {r['tokens_per_sec']:,.0f} tok/s | ETA {_duration(r['eta_s'])}"
        )
        if "val_loss" in r:
            line += f" | val loss {r['val_loss']:.4f} ppl {r['val_ppl']:.2f}"
        if r.get("skipped"):
            line += " | step skipped (non-finite loss or gradients)"
        line += f" | {_memory(r)}"
        if self.interactive:
            # Cut to the terminal's width and padded to it: a wrapped line would not be redrawn in
            # place, and the padding blanks what a longer line before it left.
            width = shutil.get_terminal_size().columns - 1
            end = "\n" if r["step"] >= self.total_steps else ""
            self.stream.write("\r" + line[:width].ljust(width) + end)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.enabled:
            self.stream.write(("\n" if self.interactive else "") + text + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        for logger in self.loggers:
            logger.close()
        self.loggers = []
