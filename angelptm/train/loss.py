"""The language-model loss of a global batch: the mean cross-entropy over all of its loss tokens.

A mean of microbatch means weighs a token of a microbatch with few loss tokens (a long prompt,
padding) more than one of a full microbatch, so the gradient would change with the gradient
accumulation count and the layout. The loss here is the sum of the per-token losses over every
loss token (target != IGNORE) of the global batch divided by their count, whatever the split.

The engines keep their conventions: the pipeline runner averages its m microbatch losses and
ZeROCache averages gradients over the D = dp·cp data ranks. So each microbatch returns its summed
loss scaled by m·D / N, N the global count of loss tokens (all-reduced once per batch, before the
forwards): the averages then make Σ loss / N, the reported loss and the gradient alike. For an
unmasked batch every microbatch on every rank holds N / (m·D) tokens and this is the plain mean.
"""

from __future__ import annotations

from typing import Sequence

import torch

from angelptm.data.rows import IGNORE, Rows
from angelptm.distributed.collectives import Group, all_reduce
from angelptm.distributed.tensor_parallel import vocab_parallel_cross_entropy


class TokenMeanLoss:
    """`count(microbatches)` at the start of each batch, then `loss(...)` per microbatch."""

    def __init__(self, data_group: Group):
        self.data_group = data_group
        self.scale = 1.0  # m·D / N of the batch being run

    def count(self, microbatches: Sequence[Rows]) -> int:
        """All-reduce the batch's loss tokens over the data ranks (tp ranks hold the same rows, so
        count them once) and set the scale of its microbatch losses; return the global count."""
        local = torch.stack([(rows.targets != IGNORE).sum() for rows in microbatches]).sum()
        total = int(all_reduce(local, self.data_group).item())
        # A batch with no loss token at all (every target masked) has loss 0 and no gradient.
        self.scale = len(microbatches) * self.data_group.size / max(total, 1)
        return total

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, tp: Group, vocab: tuple[int, int]) -> torch.Tensor:
        """The microbatch's summed cross-entropy over its loss tokens, times the batch's scale."""
        per_token = vocab_parallel_cross_entropy(logits, targets, tp, *vocab)
        return torch.where(targets != IGNORE, per_token, 0.0).sum() * self.scale
