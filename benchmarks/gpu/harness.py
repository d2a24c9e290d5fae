"""Timing harness of the GPU suite: a global deadline, device timers, alternating comparisons, ratios,
CUDA-graph replays.

Comparisons run every candidate in the same process, alternating candidate by candidate within
each repeat, and report the median per candidate plus min/median/max of the per-repeat ratios.
On CUDA the timer brackets a loop of calls with CUDA events; on CPU (the dry run) it uses the
wall clock. Timing a call eagerly measures what a training loop gets, host overhead included
whenever the host is slower than the device; timing its CUDA-graph replay measures the device
work alone. The two side by side say which of the two bounds a case.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


class Deadline:
    """Global time budget; sections ask how much is left and skip work that would not fit."""

    def __init__(self, total_s: float):
        self.start = time.monotonic()
        self.total_s = total_s

    def left(self) -> float:
        return self.total_s - (time.monotonic() - self.start)

    def elapsed(self) -> float:
        return time.monotonic() - self.start


class OutOfTime(Exception):
    pass


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, iters: int) -> float:
    """Mean milliseconds per call over `iters` back-to-back calls."""
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) * 1e3 / iters


def compare(fns: dict[str, Callable[[], object]], device: torch.device, deadline: Deadline, *,
            repeats: int = 5, target_ms: float = 60.0, min_left_s: float = 5.0) -> dict[str, list[float]]:
    """Per-candidate lists of ms/call, one value per repeat, candidates alternating within a repeat.

    Each candidate is warmed up (which also compiles its kernels), then its loop length is set so
    one timed loop lasts about `target_ms`. Raises OutOfTime before starting a repeat that the
    deadline cannot afford.
    """
    iters = {}
    for name, fn in fns.items():
        if deadline.left() < min_left_s:
            raise OutOfTime(name)
        fn()
        one = max(time_ms(fn, device, 1), 1e-3)
        iters[name] = int(min(200, max(2, target_ms / one)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        if deadline.left() < min_left_s:
            if all(samples.values()):
                break
            raise OutOfTime("repeats")
        for name, fn in fns.items():
            samples[name].append(time_ms(fn, device, iters[name]))
    return samples


def graphed(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """A callable that replays `fn`'s device work from a CUDA graph (`fn` itself off CUDA, where
    there is nothing to capture). `fn` is warmed up on a side stream first, as capture requires."""
    if device.type != "cuda":
        return fn
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def ratio_stats(num: list[float], den: list[float]) -> dict[str, float]:
    """min/median/max of num[i]/den[i] over paired repeats (e.g. baseline ms / candidate ms = speedup)."""
    ratios = [n / d for n, d in zip(num, den)]
    return {"min": min(ratios), "median": statistics.median(ratios), "max": max(ratios)}


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])
