"""Samplers of SFT samples and packed sequences: each row's inputs, targets, positions and document ids,
a pure function of (seed, step, row) as for `TokenSampler`, so every layout reads the same rows and a
resumed run needs only the step.

- `SFTSampler` (data.format=sft, data.pack=false): row g is one SFT sample, perm_e[g mod n] of epoch
  e = g div n, padded to seq_len with the pad id; targets are IGNORE on padding and untrained tokens.
- `PackedSFTSampler` (sft, pack=true): several samples per row. Each epoch's plan shuffles the samples
  (seed, epoch) and places each into the first of the last PACK_WINDOW open rows it fits (first-fit
  over a bounded window: near-full rows without sorting the epoch by length); positions restart and
  doc ids step at each sample, and the tail is padding with its own doc id.
- `PackedTextSampler` (text, pack=true): TokenSampler's windows, with positions restarting and doc ids
  stepping where the dataset's documents start, and the target that would cross into the next
  document (one document's last token predicting the next one's first) IGNORE.

A sample of L tokens gives L - 1 (input, target) pairs: it fits a row when L <= seq_len + 1.
Longer ones are truncated to their first seq_len + 1 tokens or dropped (data.overlong), and a sample
left with no trained target is left out; `note()` says how many, for the trainer to print once.
Attention may join a query and a key only where their doc ids are equal and the key is not later.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from angelptm.data.builder import TokenDataset
from angelptm.data.rows import IGNORE, Rows
from angelptm.data.sampler import EpochOrder, SamplerState, TokenSampler, sample_indices
from angelptm.errors import UserError

PACK_WINDOW = 64  # open rows first-fit searches; more packs tighter and plans slower
_CHUNK = 1 << 24  # mask bytes read at a time when counting loss tokens


class LayoutCheck(SamplerState):
    """Resume also checks how the data is read (format, packing, overlong), not only which data."""

    layout: str

    def state_dict(self, next_step: int) -> dict:
        return {**super().state_dict(next_step), "layout": self.layout}

    def load_state_dict(self, state: dict) -> int:
        next_step = super().load_state_dict(state)
        saved = state.get("layout", "format=text pack=false")
        if saved != self.layout:
            raise UserError(f"the checkpoint read its data as {saved}, this run as {self.layout}; set data.format, "
                            "data.pack and data.overlong as the checkpoint had them, or set train.resume=never")
        return next_step


def _ones_before(mask, total: int, at: np.ndarray) -> np.ndarray:
    """For each position p of the sorted `at`, how many ones mask[0:p] holds (read in chunks: memmaps, views)."""
    out = np.zeros(len(at), dtype=np.int64)
    carry = 0
    for lo in range(0, total, _CHUNK):
        hi = min(lo + _CHUNK, total)
        counts = np.cumsum(np.asarray(mask[np.arange(lo, hi)], dtype=np.int64)) + carry
        first, last = np.searchsorted(at, lo, side="right"), np.searchsorted(at, hi, side="right")
        out[first:last] = counts[at[first:last] - lo - 1]
        carry = int(counts[-1])
    return out


class SFTSamples:
    """The samples of an SFT dataset a row can hold: start, kept length and loss tokens of each, and what
    `data.overlong` did to the longer ones."""

    def __init__(self, dataset: TokenDataset, seq_len: int, overlong: str):
        if dataset.loss_mask is None:
            raise UserError(f"data.format=sft needs a token file written by `angelptm prepare --sft`; {dataset.name} "
                            "has no loss mask: prepare it with --sft, or set data.format=text")
        offsets = np.asarray(dataset.doc_offsets, dtype=np.int64)
        lengths = np.diff(np.append(offsets, len(dataset)))
        self.limit = seq_len + 1
        self.total, self.overlong_policy = len(lengths), overlong
        long = lengths > self.limit
        self.overlong = int(long.sum())
        lengths = np.minimum(lengths, self.limit)
        at = np.concatenate([offsets + 1, offsets + lengths])  # a sample's first token is never a target
        order = np.argsort(at, kind="stable")
        ones = np.empty(len(at), dtype=np.int64)
        ones[order] = _ones_before(dataset.loss_mask, len(dataset), at[order])
        loss = ones[len(offsets):] - ones[:len(offsets)]
        dropped = long if overlong == "drop" else np.zeros_like(long)
        self.without_loss = int(((loss == 0) & ~dropped).sum())
        keep = (loss > 0) & ~dropped
        self.starts, self.lengths, self.loss = offsets[keep], lengths[keep], loss[keep]
        if not len(self.starts):
            raise UserError(f"no sample of {dataset.name} fits train.seq_len={seq_len} with a loss token in it "
                            f"(data.overlong={overlong}); raise train.seq_len or set data.overlong=truncate")

    def note(self) -> Optional[str]:
        """One line on the samples that are not trained as they are, or None if there are none."""
        parts = []
        if self.overlong:
            done = "truncated to their first" if self.overlong_policy == "truncate" else "dropped, being longer than"
            parts.append(f"{self.overlong:,} of {self.total:,} samples {done} train.seq_len + 1 = {self.limit:,} "
                         f"tokens (data.overlong={self.overlong_policy})")
        if self.without_loss:
            parts.append(f"{self.without_loss:,} left out with no trained token within that length")
        return "data: " + "; ".join(parts) if parts else None


class _SFTSampler(LayoutCheck):
    """What the SFT samplers share: the samples, their epoch order, the pad id, the counts to report."""

    def __init__(self, dataset: TokenDataset, seq_len: int, global_batch: int, seed: int, overlong: str, pack: bool):
        if seq_len < 1 or global_batch < 1:
            raise ValueError(f"seq_len={seq_len} and global_batch={global_batch} must be positive")
        self.dataset, self.seq_len, self.global_batch, self.seed = dataset, seq_len, global_batch, seed
        self.samples = SFTSamples(dataset, seq_len, overlong)
        self.order = EpochOrder(len(self.samples.starts), seed)
        self.pad_id = 0 if dataset.pad_id is None else dataset.pad_id
        self.layout = f"format=sft pack={str(pack).lower()} overlong={overlong}"

    @property
    def overlong(self) -> int:
        """How many samples are longer than a row (truncated or dropped, as data.overlong says)."""
        return self.samples.overlong

    def note(self) -> Optional[str]:
        return self.samples.note()

    def _sample(self, item: int) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and targets (IGNORE where untrained) of one sample: L - 1 each."""
        where = self.samples.starts[item] + np.arange(self.samples.lengths[item])
        tokens = np.asarray(self.dataset.tokens[where], dtype=np.int64)
        trained = np.asarray(self.dataset.loss_mask[where[1:]], dtype=bool)
        return tokens[:-1], np.where(trained, tokens[1:], IGNORE)


class SFTSampler(_SFTSampler):
    """One SFT sample per row, padded; positions and doc ids None (the padding follows the sample, so
    causal attention alone keeps the sample from seeing it)."""

    def __init__(self, dataset: TokenDataset, seq_len: int, global_batch: int, seed: int, overlong: str = "truncate"):
        super().__init__(dataset, seq_len, global_batch, seed, overlong, pack=False)

    def microbatch(self, step: int, start: int, count: int) -> Rows:
        items = self.order(sample_indices(step, start, count, self.global_batch))
        inputs = np.full((count, self.seq_len), self.pad_id, dtype=np.int64)
        targets = np.full((count, self.seq_len), IGNORE, dtype=np.int64)
        for row, item in enumerate(items):
            sample_inputs, sample_targets = self._sample(int(item))
            inputs[row, :len(sample_inputs)], targets[row, :len(sample_targets)] = sample_inputs, sample_targets
        return Rows(torch.from_numpy(inputs), torch.from_numpy(targets))

    def tokens_by_source(self, steps: int) -> dict[str, int]:
        """Loss tokens trained on in the first `steps` steps."""
        epochs, rest = divmod(steps * self.global_batch, len(self.samples.starts))
        seen = int(self.samples.loss[self.order.permutation(epochs)[:rest]].sum()) if rest else 0
        return {self.dataset.name: epochs * int(self.samples.loss.sum()) + seen}


def first_fit(sizes: np.ndarray, order: np.ndarray, capacity: int, window: int = PACK_WINDOW) -> list[list[int]]:
    """Items (in `order`) packed into rows of `capacity`: each into the oldest of at most `window` open rows
    with room for it, else a new row (closing the oldest when `window` are open). Rows in closing order."""
    done: list[list[int]] = []
    members: list[list[int]] = []  # the open rows, oldest first
    room = np.zeros(0, dtype=np.int64)
    for item in order.tolist():
        need = int(sizes[item])
        fits = np.flatnonzero(room >= need)
        if fits.size:
            k = int(fits[0])
            members[k].append(item)
            room[k] -= need
        else:
            if len(members) == window:
                done.append(members.pop(0))
                room = room[1:]
            members.append([item])
            room = np.append(room, capacity - need)
            k = len(members) - 1
        if room[k] == 0:  # full: nothing more fits, free its place in the window
            done.append(members.pop(k))
            room = np.delete(room, k)
    return done + members


class PackedSFTSampler(_SFTSampler):
    """Several SFT samples per row; row g is row g - (rows of the epochs before) of its epoch's plan."""

    def __init__(self, dataset: TokenDataset, seq_len: int, global_batch: int, seed: int, overlong: str = "truncate"):
        super().__init__(dataset, seq_len, global_batch, seed, overlong, pack=True)
        self._epoch_ends: list[int] = []  # rows before the end of each planned epoch
        self._plans: dict[int, list[list[int]]] = {}  # the last two epochs' rows; a batch spans at most two

    def plan(self, epoch: int) -> list[list[int]]:
        """The rows of `epoch`: which samples each holds, in order."""
        if epoch not in self._plans:
            if len(self._plans) >= 2:
                del self._plans[min(self._plans)]
            self._plans[epoch] = first_fit(self.samples.lengths - 1, self.order.permutation(epoch), self.seq_len)
        return self._plans[epoch]

    def _locate(self, number: int) -> tuple[int, int]:
        """(epoch, row within it) of sample number g."""
        while not self._epoch_ends or self._epoch_ends[-1] <= number:
            before = self._epoch_ends[-1] if self._epoch_ends else 0
            self._epoch_ends.append(before + len(self.plan(len(self._epoch_ends))))
        epoch = int(np.searchsorted(self._epoch_ends, number, side="right"))
        return epoch, number - (self._epoch_ends[epoch - 1] if epoch else 0)

    def members(self, number: int) -> list[int]:
        """The samples sample number g's row holds, in order (indices into `self.samples`)."""
        epoch, index = self._locate(number)
        return self.plan(epoch)[index]

    def microbatch(self, step: int, start: int, count: int) -> Rows:
        shape = (count, self.seq_len)
        inputs, targets = np.full(shape, self.pad_id, dtype=np.int64), np.full(shape, IGNORE, dtype=np.int64)
        positions, doc_ids = np.zeros(shape, dtype=np.int64), np.zeros(shape, dtype=np.int64)
        for row, number in enumerate(sample_indices(step, start, count, self.global_batch).tolist()):
            filled = 0
            members = self.members(number)
            for doc, item in enumerate(members):
                sample_inputs, sample_targets = self._sample(item)
                span = slice(filled, filled + len(sample_inputs))
                inputs[row, span], targets[row, span] = sample_inputs, sample_targets
                positions[row, span], doc_ids[row, span] = np.arange(len(sample_inputs)), doc
                filled = span.stop
            positions[row, filled:] = np.arange(self.seq_len - filled)  # the padding: a document of its own
            doc_ids[row, filled:] = len(members)
        return Rows(*(torch.from_numpy(a) for a in (inputs, targets, positions, doc_ids)))

    def tokens_by_source(self, steps: int) -> dict[str, int]:
        """Loss tokens trained on in the first `steps` steps: every sample once per whole epoch, then the
        rows of the epoch under way."""
        epoch, index = self._locate(steps * self.global_batch)
        rows = self.plan(epoch)[:index]
        seen = int(self.samples.loss[np.concatenate(rows)].sum()) if rows else 0
        return {self.dataset.name: epoch * int(self.samples.loss.sum()) + seen}


class PackedTextSampler(LayoutCheck, TokenSampler):
    """TokenSampler's windows as packed rows: attention, positions and targets kept inside each document."""

    layout = "format=text pack=true"

    def __init__(self, dataset: TokenDataset, seq_len: int, global_batch: int, seed: int):
        super().__init__(dataset, seq_len, global_batch, seed)
        self._doc_offsets = np.asarray(dataset.doc_offsets, dtype=np.int64)

    def microbatch(self, step: int, start: int, count: int) -> Rows:
        begins = self.window_starts(sample_indices(step, start, count, self.global_batch))
        where = begins[:, None] + np.arange(self.seq_len + 1)
        tokens = np.asarray(self.dataset.tokens[where], dtype=np.int64)
        doc = np.searchsorted(self._doc_offsets, where, side="right") - 1
        # A document begun before the window restarts at the window: its earlier tokens are not in the row.
        positions = where - np.maximum(self._doc_offsets[doc], begins[:, None])
        targets = np.where(doc[:, 1:] == doc[:, :-1], tokens[:, 1:], IGNORE)
        rows = (tokens[:, :-1], targets, positions[:, :-1], (doc - doc[:, :1])[:, :-1])
        return Rows(*(torch.from_numpy(np.ascontiguousarray(a)) for a in rows))

    def tokens_by_source(self, steps: int) -> dict[str, int]:
        """Targets that take a loss in the first `steps` steps: seq_len per window, less the targets that
        would cross into the next document (a window from w * seq_len holds those of the starts after it)."""
        epochs, rest = divmod(steps * self.global_batch, self.num_windows)
        begins = np.arange(self.num_windows, dtype=np.int64) * self.seq_len
        crossings = (np.searchsorted(self._doc_offsets, begins + self.seq_len, side="right")
                     - np.searchsorted(self._doc_offsets, begins, side="right"))
        seen = rest * self.seq_len - int(crossings[self.order.permutation(epochs)[:rest]].sum()) if rest else 0
        per_epoch = self.num_windows * self.seq_len - int(crossings.sum())
        return {self.dataset.name: epochs * per_epoch + seen}
