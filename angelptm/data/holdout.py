"""Hold out a fraction of a dataset's documents for validation: two disjoint views of one token stream.

Which documents are held out depends only on the number of documents and the fraction (a fixed
seed, not data.seed), so runs that differ in their training order still share one validation set.
Neither view copies tokens: each maps positions of its own back-to-back stream onto spans of the
original (memory-mapped) one, so a training window can never reach into a held-out document.
An SFT dataset's loss mask is viewed the same way, so each sample keeps its mask.
"""

from __future__ import annotations

import hashlib

import numpy as np

from angelptm.data.builder import TokenDataset
from angelptm.errors import UserError

HOLDOUT_SEED = 0x5EED_0F_DA7A


class Spans:
    """Token ids of several spans of `tokens`, read as one stream; indexed by arrays of positions."""

    def __init__(self, tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray):
        self.tokens, self.starts = tokens, starts
        self.ends = np.cumsum(lengths)  # where each span ends in this stream
        self.begins = self.ends - lengths

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, positions: np.ndarray) -> np.ndarray:
        span = np.searchsorted(self.ends, positions, side="right")
        return self.tokens[self.starts[span] + positions - self.begins[span]]


def _view(dataset: TokenDataset, docs: np.ndarray, part: str, fraction: float) -> TokenDataset:
    offsets = np.asarray(dataset.doc_offsets, dtype=np.int64)
    ends = np.append(offsets[1:], len(dataset))
    starts, lengths = offsets[docs], ends[docs] - offsets[docs]
    keep = lengths > 0
    starts, lengths = starts[keep], lengths[keep]
    doc_offsets = np.cumsum(lengths) - lengths
    checksum = "sha256:" + hashlib.sha256(f"{dataset.checksum} {part} {fraction!r}".encode()).hexdigest()
    loss_mask = None if dataset.loss_mask is None else Spans(dataset.loss_mask, starts, lengths)
    return TokenDataset(Spans(dataset.tokens, starts, lengths), dataset.vocab_size, dataset.tokenizer, checksum,
                        f"{dataset.name} ({part})", doc_offsets=doc_offsets, loss_mask=loss_mask, pad_id=dataset.pad_id)


def hold_out(dataset: TokenDataset, fraction: float) -> tuple[TokenDataset, TokenDataset]:
    """(training view, validation view): round(fraction · documents) documents held out, chosen by a fixed seed."""
    documents = len(dataset.doc_offsets)
    held = round(fraction * documents)
    if not 0 < held < documents:
        raise UserError(f"data.valid_fraction={fraction} holds out {held} of the {documents} documents of "
                        f"{dataset.name}; pick a fraction that leaves some on each side, or set data.valid")
    chosen = np.zeros(documents, dtype=bool)
    chosen[np.random.default_rng(HOLDOUT_SEED).permutation(documents)[:held]] = True
    return (_view(dataset, np.flatnonzero(~chosen), "train", fraction),
            _view(dataset, np.flatnonzero(chosen), "valid", fraction))
