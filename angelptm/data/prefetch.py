"""Background loading of the next step's batch while the current step computes.

A step's rows are a pure function of the step number (`TokenSampler`), so the next step's can be
read from the memory map, gathered and copied into (pinned) host tensors on a worker thread while
the accelerator runs this step. The trainer asks for step N and gets it at once if the worker has
finished; `wait_s` says how long it had to wait, which is what the step lost to data.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Callable, Optional, TypeVar

Batch = TypeVar("Batch")


class Prefetcher:
    """`get(step)` returns `load(step)` and starts `load(step + 1)` in the background.

    A step other than the one prefetched (the first call, a resume, a jump) is loaded in place, so
    the result never depends on timing. One worker thread: loads stay in step order."""

    def __init__(self, load: Callable[[int], Batch]):
        self._load = load
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="angelptm-data")
        self._next: Optional[tuple[int, Future]] = None
        self.wait_s = 0.0  # time the last `get` blocked

    def get(self, step: int) -> Batch:
        start = time.perf_counter()
        if self._next is not None and self._next[0] == step:
            batch = self._next[1].result()
        else:
            if self._next is not None:  # a load still running shares the sampler's caches: let it end
                self._next[1].cancel()
                wait([self._next[1]])
            batch = self._load(step)
        self.wait_s = time.perf_counter() - start
        self._next = (step + 1, self._worker.submit(self._load, step + 1))
        return batch
