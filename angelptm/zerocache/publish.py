"""Stages 1-2: all-gather the updated parameters while the next forward runs.

After the step every rank has updated its own range of each page; the full pages are all-gathered
in place. Instead of waiting for every page at the end of the step, the gathers are started in
page order (the order forward uses them) and each unit (transformer block, embeddings, head)
waits, in a forward pre-hook, only for the pages it reads: the first block computes while the
later pages are still on the wire, as Megatron's overlapped parameter gather does.

Until a page's gather has finished, its parameters outside this rank's own range hold their
values from before the step. Forward passes see the new values (the hooks); everything else
that reads or writes parameters calls `wait_all` first (the optimizer does so in `step`,
`gathered_parameters`, `state_dict` and `load_state_dict`).
"""

from __future__ import annotations

from functools import partial

from angelptm.zerocache.buffers import PageBuffers
from angelptm.zerocache.comm import Handle
from angelptm.zerocache.pages import Unit


class PagePublisher:
    def __init__(self, units: list[Unit], buffers: list[PageBuffers]):
        self.units = units
        self.buffers = buffers
        self._pending: dict[int, Handle] = {}  # page index -> its gather in flight
        self._hooks = [unit.module.register_forward_pre_hook(partial(self._before_unit, i))
                       for i, unit in enumerate(units)]

    def start(self) -> None:
        """Start gathering every page's own range into the full page, in page order."""
        for b in self.buffers:
            self._pending[b.page.index] = b.comm.all_gather(b.full, b.full[b.own_start : b.own_stop])

    def _before_unit(self, unit: int, module, args) -> None:
        for index in self.units[unit].pages:
            handle = self._pending.pop(index, None)
            if handle is not None:
                handle.wait()

    def wait_all(self) -> None:
        """Finish every gather in flight."""
        pending, self._pending = self._pending, {}
        for handle in pending.values():
            handle.wait()
