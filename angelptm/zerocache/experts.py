"""ZeROCache under expert parallelism: what the expert-data-parallel group changes for a rank's pages.

With expert parallelism (`angelptm.distributed.expert_parallel`) the ep ranks hold different
experts, and the ranks holding the same ones form the edp group (dp·cp / ep of them). The expert
weights get pages of their own (`pages.build_pages`), sharded, reduced and gathered over edp with a
`PageComm` of their own, while the dense pages keep the dp × cp group:

- Gradients: an expert's gradient on an ep rank already sums over the tokens of the whole ep group
  (the dispatch's backward brought their gradients back), so its sum over edp is the sum over all
  dp × cp ranks, and both kinds of page divide by the same dp·cp for the mean.
- The global norm: from stage 1 on, the own ranges over the dp × cp ranks (dp·cp = edp × ep)
  cover every element of both kinds once, so one sum over dp × cp is exact; at stage 0 every rank
  holds its pages whole, so the dense part is the same everywhere and the expert part adds up over
  ep alone.
- Checkpoints change nothing: each slice's `ShardSpec` places it in the full stacked tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from angelptm.distributed.collectives import Group
from angelptm.distributed.expert_parallel import expert_parallel_modules
from angelptm.errors import UserError
from angelptm.zerocache.buffers import PageBuffers
from angelptm.zerocache.tensor_parallel import TensorParallelPages


@dataclass(frozen=True)
class ExpertSharding:
    params: frozenset[int]  # ids of the expert weights (frozen ones too: each ep rank holds its own)
    ep: Group
    edp: Group

    @classmethod
    def of(cls, model: nn.Module) -> Optional["ExpertSharding"]:
        """The expert weights of `model` and their groups; None without expert parallelism."""
        modules = expert_parallel_modules(model)
        if not modules:
            return None
        if len({(m.ep.pg, m.edp.pg) for m in modules}) > 1:
            raise UserError("the model's MoE layers split their experts over different groups; parallelize "
                            "the whole model with one mesh")
        params = frozenset(id(p) for m in modules for p in m.parameters())
        return cls(params, modules[0].ep, modules[0].edp)

    def grad_norm_squared(self, tp_pages: TensorParallelPages, buffers: list[PageBuffers], stage: int) -> torch.Tensor:
        """The squares of the expert pages' own gradients (float64, tp copies counted as
        `tp_pages` says); at stage 0 summed over ep, from stage 1 on left for the caller's sum over dp × cp."""
        squares = tp_pages.grad_norm_squared([b for b in buffers if b.page.expert])
        if stage == 0 and self.ep.size > 1:
            dist.all_reduce(squares, group=self.ep.pg)
        return squares
