"""The validation pass: the mean loss over fixed batches of held-out data, the same under every layout.

Batch i of every pass is the validation sampler's step i, so each pass reads the same sequences and
a layout reads them as it reads a training step (its dp/cp slice of each microbatch). The loss is
the training loss path run forwards only (`PipelineRunner.evaluate`, also for pp = 1), in eval mode.
Like the training loss it is the mean over loss tokens: each batch's token mean, weighted by the
batch's count of loss tokens, so a masked or packed validation set weighs every token alike.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Union

from angelptm.data import BlendSampler, TokenSampler

if TYPE_CHECKING:
    from angelptm.train.trainer import Trainer


class Validation:
    """Every `every` steps, `batches` global batches of the validation sampler: `val_loss` and `val_ppl`."""

    def __init__(self, sampler: Union[TokenSampler, BlendSampler], every: int, batches: int):
        self.sampler, self.every, self.batches = sampler, every, batches

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def run(self, trainer: Trainer) -> dict[str, float]:
        stages = trainer.runner.stages
        for stage in stages:
            stage.eval()
        try:
            loss_sum = tokens = 0.0
            for i in range(self.batches):
                loss, count = trainer.batch_loss(trainer.host_rows(self.sampler, i), trainer.runner.evaluate)
                loss_sum += loss * count
                tokens += count
        finally:
            for stage in stages:
                stage.train()
        loss = loss_sum / max(tokens, 1)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))}  # exp overflows past ~709
