"""What keeps a run's work safe when things go wrong: the output-folder lock, SIGTERM, non-finite steps.

- `OutputLock`: one run per output folder. Two runs writing one folder would replace each other's
  metrics.jsonl and checkpoints; the second is refused, naming the holder's pid. The lock is an
  `flock` on `<output_dir>/.lock`, so the system releases it when its holder dies, however it dies.
- `Preemption`: SIGTERM, what SLURM and Kubernetes send before they kill a job, is remembered; the
  trainer finishes the step, writes a checkpoint and exits 0, and `resume: auto` continues from it.
- `SkipCounter`: steps whose loss or gradients are not finite are skipped; too many in a row stop
  the run, since no later step can repair weights or data that keep producing them.
- `collective_failure`: a collective that timed out (`parallel.timeout_s`) or lost its peer, told
  in one line naming the rank and the operation it waited in.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import traceback
from pathlib import Path
from typing import Optional

from angelptm.errors import UserError

LOCK_NAME = ".lock"


class TrainingStopped(UserError):
    """The run cannot go on (its steps keep failing); exit status 3 tells it from bad input (2)."""

    exit_code = 3


class PeerFailure(UserError):
    """A collective failed because another rank stalled or died; every rank says so (exit status 4)."""

    exit_code = 4
    every_rank = True


class OutputLock:
    """An exclusive lock on `output_dir`, held from `acquire()` until the process ends or `release()`.

    A later Trainer of the same process on the same folder (a run resumed in a user's own script)
    takes the lock over from the earlier one: flock would refuse a second open of the file, even
    in the process that holds it."""

    _holders: dict[str, "OutputLock"] = {}  # resolved folder -> the lock of this process that holds it

    def __init__(self, output_dir: Path):
        self.output_dir = Path(output_dir)
        self._fd: Optional[int] = None
        self._created: list[Path] = []  # folders acquire() made, removed again by release(undo=True)

    def acquire(self) -> None:
        where = f"train.output_dir={self.output_dir}"
        earlier = self._holders.get(str(self.output_dir.resolve()))
        if earlier is not None and earlier._fd is not None:
            self._fd, earlier._fd = earlier._fd, None
            self._holders[str(self.output_dir.resolve())] = self
            return
        missing = [p for p in [self.output_dir, *self.output_dir.parents] if not p.exists()]
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._created = missing
            fd = os.open(self.output_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except (FileExistsError, NotADirectoryError):
            raise UserError(f"{where} is a file or lies under one; set train.output_dir to a folder") from None
        except OSError as e:
            reason = "read-only" if e.errno == errno.EROFS else (e.strerror or type(e).__name__).lower()
            raise UserError(f"{where} cannot be written ({reason}); set train.output_dir to a writable "
                            "folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"{where} is in use by another run (pid {holder}); wait for it to end, or set "
                            "train.output_dir to another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        self._holders[str(self.output_dir.resolve())] = self

    def release(self, undo: bool = False) -> None:
        """Unlock; with `undo` (the run failed before it began) also remove what acquire() created."""
        if self._fd is None:
            return
        os.close(self._fd)
        self._fd = None
        self._holders.pop(str(self.output_dir.resolve()), None)
        if undo:
            (self.output_dir / LOCK_NAME).unlink(missing_ok=True)
            for folder in self._created:  # innermost first: each is empty once its child is gone
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()


class Preemption:
    """Remembers a SIGTERM (main thread only: Python delivers signals there) until `restore()`."""

    def __init__(self):
        self.requested = False
        self._previous = None
        try:
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        except ValueError:  # not the main thread (a user's own thread): SIGTERM keeps its handler
            pass

    def _on_signal(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


class SkipCounter:
    """Counts skipped steps; `record` raises TrainingStopped after `limit` skips in a row."""

    def __init__(self, limit: int):
        self.limit = limit
        self.steps: list[int] = []  # every skipped step
        self.in_a_row = 0

    def record(self, step: int, skipped: bool) -> None:
        if not skipped:
            self.in_a_row = 0
            return
        self.steps.append(step)
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise TrainingStopped(
                f"steps {step - self.limit + 1}-{step} were all skipped (non-finite loss or gradients), so the run "
                f"stops (train.max_skipped_steps={self.limit}); lower optim.lr or raise optim.warmup_steps, and "
                f"resume from a checkpoint written before step {step - self.limit + 1}")

    def summary(self, total: int) -> Optional[str]:
        if not self.steps:
            return None
        shown = ", ".join(map(str, self.steps[:10])) + (", ..." if len(self.steps) > 10 else "")
        return f"{len(self.steps)} of {total} steps skipped (non-finite loss or gradients): {shown}"


# What gloo and NCCL say when a peer stalls past the timeout or its connection goes away.
_TIMEOUT_WORDS = ("timeout", "timed out")
_REFUSED_WORDS = ("connection refused",)  # a peer that is not (or no longer) there while the group forms
_LOST_PEER_WORDS = _REFUSED_WORDS + ("connection closed", "connection reset", "broken pipe", "pair closure", "nccl", "socket")


def collective_failure(exc: BaseException, timeout_s: float) -> Optional[str]:
    """One line for `exc` if it is a collective that timed out or lost a peer, else None."""
    text = str(exc).lower()
    frames = traceback.extract_tb(exc.__traceback__)
    c10d = [f for f in frames if f.filename.endswith("distributed_c10d.py")]
    if not (c10d or any(word in text for word in _TIMEOUT_WORDS + _LOST_PEER_WORDS)):
        return None
    ours = [f for f in frames if f"{os.sep}angelptm{os.sep}" in f.filename]
    operation = c10d[-1].name if c10d else "a collective"
    # The innermost calls of ours say which step of training waited (a reduction, a gather, ...).
    path = " < ".join(f"{f.name} ({Path(f.filename).name}:{f.lineno})" for f in reversed(ours[-3:]))
    where = f" in {path}" if path else ""
    if any(word in text for word in _REFUSED_WORDS):
        why = "could not connect to a peer"
    elif any(word in text for word in _TIMEOUT_WORDS):
        why = f"waited longer than parallel.timeout_s={timeout_s:g} s"
    else:
        why = "lost its connection to a peer"
    rank = os.environ.get("RANK", "0")
    return (f"rank {rank}: {operation}{where} {why}: another rank stalled or died; check the other ranks' "
            "output, then resume with train.resume=auto")
