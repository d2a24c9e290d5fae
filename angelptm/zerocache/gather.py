"""Stage 3: gather each unit's parameter pages just before it runs, free them right after.

Between uses a page's `full` tensor has no storage; only this rank's `param_shard` exists.
Hooks on every unit (transformer block, embeddings, norm, head) do the rest:

- forward pre-hook: gather the unit's pages (waiting for a prefetch already in flight), then start
  gathering the next pages in execution order, up to `prefetch_pages` pages ahead;
- forward post-hook: release the pages, and hook the unit's outputs so that the pages are
  gathered again when backward reaches the unit (prefetching in reverse order). The pages backward
  gathers first (the last units', as many as forward holds at once anyway) are kept instead:
  freeing them and gathering them again between forward and backward would move their bytes
  twice for nothing (torchtitan keeps its last block gathered for the same reason). The hold ends
  when backward reaches its first unit, or when the parameters are about to change
  (`drop_holds`); forward under no_grad, and recomputation inside backward, hold nothing;
- after the unit's last parameter gradient has been accumulated (told by the GradReducer), or
  when backward ends, release them again. A unit with frozen parameters (a LoRA base) is released
  when backward reaches an earlier unit instead: its last gradient may arrive before backward
  has finished multiplying by its frozen weights, while the gradient reaching the earlier unit's
  output means the whole unit is done.

A page is reference-counted by the units using it (a tied embedding is used by two), so it is
freed only when no running unit needs it.

Pages of FP8 weights, when `fp8_gather.Float8Gather` is given, are gathered as FP8 codes instead
(the forward copy in forward, the input-gradient copy in backward); `gather_all` still gathers
them in full precision.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch
from torch.autograd import Variable
from torch.utils._pytree import tree_flatten

from angelptm.zerocache.buffers import PageBuffers
from angelptm.zerocache.comm import Handle
from angelptm.zerocache.fp8_gather import Float8Gather
from angelptm.zerocache.pages import Unit
from angelptm.zerocache.tiers import Allocator


class ParamGatherer:
    def __init__(self, units: list[Unit], buffers: list[PageBuffers], alloc: Allocator, prefetch_pages: int,
                 fp8: Optional[Float8Gather] = None):
        self.units = units
        self.fp8 = fp8
        self.buffers = buffers
        self.alloc = alloc
        self.prefetch_pages = prefetch_pages
        self._users = [0] * len(buffers)  # running units holding each page
        self._gathers: dict[int, Handle] = {}  # pages gathered or being gathered
        self._full: set[int] = set()  # of those, the ones gathered in full precision
        self._units_of: dict[int, list[int]] = {}
        for i, unit in enumerate(units):
            for p in unit.params:
                self._units_of.setdefault(id(p), []).append(i)
        self._in_backward: set[int] = set()  # units whose pages backward holds
        self._kept_for_backward = self._first_backward_pages()
        self._holds: dict[int, int] = {}  # page -> forwards holding it until their backward
        self._grads_left = [0] * len(units)
        self._with_frozen = {i for i, unit in enumerate(units) if any(not p.requires_grad for p in unit.params)}
        self._callback_queued = False
        self._hooks = []
        for i, unit in enumerate(units):
            self._hooks.append(unit.module.register_forward_pre_hook(partial(self._pre_forward, i)))
            self._hooks.append(unit.module.register_forward_hook(partial(self._post_forward, i)))

    def _first_backward_pages(self) -> set[int]:
        """The pages forward holds at once when it runs the last unit whose prefetch reaches the
        end of the model: that unit's and those of every later unit. Keeping these until backward
        adds nothing to forward's peak."""
        keep: set[int] = set()
        for unit in reversed(self.units):
            if len(keep - set(unit.pages)) > self.prefetch_pages:
                break
            keep.update(unit.pages)
        return keep

    # -- pages ---------------------------------------------------------------------------------

    def _gather(self, index: int, full: bool = False) -> None:
        """Start gathering page `index`: as FP8 codes where it holds FP8 weights, unless `full`."""
        codes = self.fp8 is not None and index in self.fp8 and not full
        if index in self._gathers and (codes or index in self._full):
            return
        if codes:
            in_backward = torch._C._current_graph_task_id() != -1
            self._gathers[index] = self.fp8.gather(index, transposed=in_backward)
            return
        if index in self._gathers:  # it holds FP8 codes, kept until the page is freed
            self._gathers[index].wait()
        self._full.add(index)
        b = self.buffers[index]
        storage = b.full.untyped_storage()
        storage.resize_(b.page.nbytes)
        self.alloc.ledger.add("device", "params", b.page.nbytes)
        own = b.full[b.own_start : b.own_stop]
        own.copy_(b.param_shard, non_blocking=True)  # host -> device when offloaded
        self._gathers[index] = b.comm.all_gather(b.full, own)

    def _free(self, index: int) -> None:
        self._gathers.pop(index).wait()  # never free memory a collective still writes
        if self.fp8 is not None and index in self.fp8:
            self.fp8.free(index)  # codes gathered for the page, whichever way it was gathered
        if index in self._full:
            self._full.remove(index)
            b = self.buffers[index]
            b.full.untyped_storage().resize_(0)
            self.alloc.ledger.sub("device", "params", b.page.nbytes)

    def _acquire(self, unit: int) -> None:
        for index in self.units[unit].pages:
            self._gather(index)
            self._gathers[index].wait()
            self._users[index] += 1

    def _release(self, unit: int, hold: bool = False) -> None:
        """Let go of the unit's pages; with `hold`, keep those backward gathers first."""
        for index in self.units[unit].pages:
            if hold and index in self._kept_for_backward and index in self._full:
                self._holds[index] = self._holds.get(index, 0) + 1  # stays a user until drop_holds
                continue
            self._users[index] -= 1
            if self._users[index] == 0:
                self._free(index)

    def drop_holds(self, free: bool = True) -> None:
        """End the forward holds; their pages are freed now, or with `free=False` become
        prefetched pages for the running backward."""
        holds, self._holds = self._holds, {}
        for index, count in holds.items():
            self._users[index] -= count
            if self._users[index] == 0 and free:
                self._free(index)

    def _prefetch(self, order: list[int]) -> None:
        """Start gathering the pages of the units in `order` until `prefetch_pages` are ahead."""
        ahead = sum(1 for i in self._gathers if self._users[i] == 0)
        for unit in order:
            for index in self.units[unit].pages:
                if ahead >= self.prefetch_pages:
                    return
                if index not in self._gathers:
                    self._gather(index)
                    ahead += 1

    # -- hooks ---------------------------------------------------------------------------------

    def _pre_forward(self, unit: int, module, args) -> None:
        self._acquire(unit)
        self._prefetch(list(range(unit + 1, len(self.units))))

    def _post_forward(self, unit: int, module, args, output) -> None:
        training = torch.is_grad_enabled()
        self._release(unit, hold=training and torch._C._current_graph_task_id() == -1)
        if training:
            tensors = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
            for t in tensors:
                t.register_hook(partial(self._pre_backward, unit))

    def _pre_backward(self, unit: int, grad: torch.Tensor) -> None:
        if not self._callback_queued:
            self._callback_queued = True
            Variable._execution_engine.queue_callback(self._end_backward)
        if unit in self._in_backward:
            return
        for done in [u for u in self._in_backward if u > unit and u in self._with_frozen]:
            self._in_backward.discard(done)
            self._release(done)
        self._in_backward.add(unit)
        self._grads_left[unit] = sum(p.requires_grad for p in self.units[unit].params)
        self._acquire(unit)
        self.drop_holds(free=False)
        self._prefetch(list(range(unit - 1, -1, -1)))

    def on_param_grad(self, param: torch.nn.Parameter) -> None:
        """Called by the GradReducer once `param`'s gradient is accumulated."""
        for unit in self._units_of[id(param)]:
            if unit in self._in_backward:
                self._grads_left[unit] -= 1
                if self._grads_left[unit] == 0 and unit not in self._with_frozen:
                    self._in_backward.discard(unit)
                    self._release(unit)

    def _end_backward(self) -> None:
        for unit in sorted(self._in_backward):
            self._release(unit)
        self._in_backward.clear()
        for index in [i for i in self._gathers if self._users[i] == 0]:  # unused prefetches
            self._free(index)
        self._callback_queued = False

    def gather_all(self) -> None:
        """Gather every page (for evaluation or export outside the hooks); undo with free_all."""
        for index in range(len(self.buffers)):
            self._gather(index, full=True)
            self._gathers[index].wait()
            self._users[index] += 1

    def free_all(self) -> None:
        for index in range(len(self.buffers)):
            self._users[index] -= 1
            if self._users[index] == 0:
                self._free(index)

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
