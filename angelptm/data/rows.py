"""`Rows`: what the trainer takes from a sampler for one microbatch: inputs, targets and, for packed
sequences, the positions and document ids that keep attention inside each document.

A plain window of the token stream (`TokenSampler.rows`, seq_len + 1 ids) becomes inputs [:, :-1]
and targets [:, 1:]. SFT samples and packed sequences carry more: targets of `IGNORE` where no loss
is taken (prompts, padding), and positions that restart at 0 where a document starts, with the
document ids (non-decreasing along a row) that tell attention which keys a query may see.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Optional

import torch

IGNORE = -100  # a target that takes no loss (torch's cross_entropy default ignore_index)


@dataclass
class Rows:
    """A microbatch: int64 tensors of shape (rows, seq_len); positions and doc_ids None = one document per row."""

    inputs: torch.Tensor
    targets: torch.Tensor
    positions: Optional[torch.Tensor] = None
    doc_ids: Optional[torch.Tensor] = None

    @classmethod
    def from_windows(cls, windows: torch.Tensor) -> "Rows":
        """Windows of seq_len + 1 tokens: each token predicts the next."""
        return cls(windows[:, :-1], windows[:, 1:])

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Rows":
        """The same rows with `fn` applied to every tensor present (a device copy, a sequence shard)."""
        return Rows(**{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                       for f in fields(self)})

    def loss_tokens(self) -> int:
        """How many targets take a loss."""
        return int((self.targets != IGNORE).sum())
