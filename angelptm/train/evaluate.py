"""The validation pass: the mean loss over fixed batches of held-out data, the same under every layout.

Batch i of every pass is the validation sampler's step i, so each pass reads the same sequences and
a layout reads them as it reads a training step (its dp/cp slice of each microbatch). The loss is
the training loss path run forwards only (`PipelineRunner.evaluate`, also for pp = 1), in eval mode.
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
            losses = [trainer.mean_over_data(trainer.runner.evaluate(*trainer.microbatches(trainer.host_rows(self.sampler, i))))
                      for i in range(self.batches)]
        finally:
            for stage in stages:
                stage.train()
        loss = sum(losses) / len(losses)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))}  # exp overflows past ~709
