"""Run one function on N local processes joined in a process group, and collect what each returns.

Tests, benchmarks and notebooks use this to exercise the real multi-process code paths on one
machine (gloo on CPU). Each worker sees the same environment torchrun would give it (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so code that initialises from torchrun's
environment runs unchanged.
"""

from __future__ import annotations

import faulthandler
import os
import socket
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, outdir: str, fn: Callable, args: tuple, kwargs: dict,
            init_group: bool, threads: int) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(threads)
    faulthandler.enable()  # a crash in native code (a gloo abort) still prints where Python was
    result: Any
    try:
        if init_group:
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = ("ok", fn(*args, **kwargs))
        if init_group and dist.is_initialized():
            dist.barrier()  # no rank tears the group down while another still talks to it
    except BaseException:  # report every failure, SystemExit included, to the parent
        result = ("error", traceback.format_exc())
    finally:
        if init_group and dist.is_initialized():
            dist.destroy_process_group()
    torch.save(result, Path(outdir) / f"rank{rank}.pt")


def run_distributed(fn: Callable, world_size: int, *args: Any, init_group: bool = True,
                    threads: int = 1, **kwargs: Any) -> list[Any]:
    """Call fn(*args, **kwargs) on `world_size` processes; return the per-rank results in rank order.

    With `init_group` the default process group (gloo) is ready when `fn` starts; without it,
    `fn` initialises it itself from the torchrun-style environment. A failure on any rank raises
    RuntimeError carrying that rank's traceback. `fn` must be importable (defined at module level).
    """
    with tempfile.TemporaryDirectory() as outdir:
        mp.start_processes(
            _worker,
            args=(world_size, free_port(), outdir, fn, args, kwargs, init_group, threads),
            nprocs=world_size,
            start_method="spawn",
            join=True,
        )
        results = [torch.load(Path(outdir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
    errors = [f"rank {r}:\n{payload}" for r, (status, payload) in enumerate(results) if status == "error"]
    if errors:
        raise RuntimeError("distributed run failed\n" + "\n".join(errors))
    return [payload for _, payload in results]
