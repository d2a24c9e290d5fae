"""The memory ledger: bytes ZeROCache holds per tier and kind, now and at the peak of the last step.

Tiers are device, host (pinned) and nvme; kinds are params, grads, optimizer (moments and fp32
master weights) and buffers (staging and in-flight copies). Every allocation ZeROCache makes
goes through `add`/`sub` with the storage's real byte size, so the figures are the bytes held,
not an estimate. On a CPU-only machine the device tier is CPU memory too, counted apart.
"""

from __future__ import annotations

import threading

TIERS = ("device", "host", "nvme")
GIB = 2**30  # the "gb" of metrics and of zero.device_budget_gb
KINDS = ("params", "grads", "optimizer", "buffers")


class MemoryLedger:
    def __init__(self) -> None:
        self._lock = threading.Lock()  # staging buffers are also freed from I/O threads
        self._now = {(t, k): 0 for t in TIERS for k in KINDS}
        self._peak = dict(self._now)  # of the step in progress
        self._peak_total = {t: 0 for t in TIERS}
        self._last: tuple[dict, dict] | None = None  # (peak, peak_total) of the last finished step

    def add(self, tier: str, kind: str, nbytes: int) -> None:
        with self._lock:
            self._now[tier, kind] += nbytes
            self._peak[tier, kind] = max(self._peak[tier, kind], self._now[tier, kind])
            total = sum(self._now[tier, k] for k in KINDS)
            self._peak_total[tier] = max(self._peak_total[tier], total)

    def sub(self, tier: str, kind: str, nbytes: int) -> None:
        with self._lock:
            self._now[tier, kind] -= nbytes
            if self._now[tier, kind] < 0:
                raise RuntimeError(f"ledger underflow for {tier}/{kind}")  # a bookkeeping bug

    def start_step(self) -> None:
        """Close the step's peak window (the optimizer calls this at the end of each step)."""
        with self._lock:
            self._last = (dict(self._peak), dict(self._peak_total))
            self._peak = dict(self._now)
            self._peak_total = {t: sum(self._now[t, k] for k in KINDS) for t in TIERS}

    def report(self) -> dict:
        """{tier: {kind: bytes now, ..., "total": bytes now, "peak": the highest total during the
        last finished step, "peak_<kind>": the highest bytes of that kind then}}. Before the first
        step finishes, the peaks are those seen so far."""
        with self._lock:
            peak, peak_total = self._last or (self._peak, self._peak_total)
            out = {}
            for t in TIERS:
                row: dict = {k: self._now[t, k] for k in KINDS}
                row["total"] = sum(row[k] for k in KINDS)
                row["peak"] = peak_total[t]
                row.update({f"peak_{k}": peak[t, k] for k in KINDS})
                out[t] = row
            return out

    def metrics(self) -> dict:
        """The last step's peak per tier in GiB (as the trainer reports device memory), under the
        metrics.jsonl names."""
        report = self.report()
        return {f"mem_{t}_gb": report[t]["peak"] / GIB for t in TIERS}
