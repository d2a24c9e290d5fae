"""Which token windows make up each step's global batch: a pure function of (seed, step, row).

The token stream is cut into W windows of seq_len + 1 tokens at stride seq_len (a window's last
token is the next one's first, so every token is a target once per epoch). Sample
g = step * global_batch + row is window perm_e[g mod W] of epoch e = g div W, where perm_e is a
permutation of the W windows seeded by (seed, e): each epoch sees every window exactly once.

Nothing depends on who asks or in what order, so every layout reads the same sequences: a dp rank
reads its slice of the global batch's rows, a microbatch a slice of that, and a resumed run needs
only the step number. The sampler therefore keeps no position of its own; the trainer passes the
step it will run next to `state_dict` and gets it back from `load_state_dict`, which also checks
that the resumed run reads the same data in the same order.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from angelptm.data.builder import TokenDataset
from angelptm.data.rows import Rows
from angelptm.errors import UserError


def count_windows(dataset: TokenDataset, seq_len: int) -> int:
    """How many windows of seq_len + 1 tokens at stride seq_len the dataset holds; at least one."""
    windows = (len(dataset) - 1) // seq_len
    if windows < 1:
        raise UserError(
            f"data {dataset.name} holds {len(dataset)} tokens, fewer than train.seq_len + 1 = {seq_len + 1}; "
            "lower train.seq_len or use more data"
        )
    return windows


def sample_indices(step: int, start: int, count: int, global_batch: int) -> np.ndarray:
    """The sample numbers g = step * global_batch + row of rows start .. start + count of `step`."""
    if step < 0 or start < 0 or count < 0 or start + count > global_batch:
        raise ValueError(f"rows {start}..{start + count} of step {step} lie outside a global batch of {global_batch}")
    return step * global_batch + np.arange(start, start + count, dtype=np.int64)


class SamplerState:
    """Resume support shared by the samplers: the position is the step; the rest checks it is the same data."""

    dataset: TokenDataset
    seed: int
    seq_len: int
    global_batch: int

    def microbatch(self, step: int, start: int, count: int) -> Rows:
        """Rows start .. start + count of `step`'s global batch as the trainer takes them."""
        return Rows.from_windows(self.rows(step, start, count))

    def note(self) -> Optional[str]:
        """A line the trainer prints once about how the data is read (SFT samples truncated or dropped);
        None when there is nothing to say."""
        return None

    def state_dict(self, next_step: int) -> dict:
        """JSON-serialisable position (the step the run continues with) and what fixes the order."""
        return {
            "next_step": next_step,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch": self.global_batch,
            "dataset_checksum": self.dataset.checksum,
            "dataset_tokens": len(self.dataset),
            "dataset_name": self.dataset.name,
        }

    def load_state_dict(self, state: dict) -> int:
        """Check that `state` was saved by a sampler over the same data and order; return its next step."""
        try:
            next_step = int(state["next_step"])
            saved = {key: state[key] for key in ("seed", "seq_len", "global_batch", "dataset_checksum")}
        except (KeyError, TypeError, ValueError):
            raise UserError("the checkpoint's sampler state is malformed; resume from another checkpoint "
                            "or set train.resume=never") from None
        if saved["dataset_checksum"] != self.dataset.checksum:
            raise UserError(
                f"the checkpoint was trained on other data ({state.get('dataset_name')}, "
                f"{state.get('dataset_tokens')} tokens) than {self.dataset.name} ({len(self.dataset)} tokens); "
                "resume with the same data (data.source, data.path, data.sources, data.valid_fraction), or set "
                "train.resume=never"
            )
        fields = {"seed": "data.seed", "seq_len": "train.seq_len", "global_batch": "train.global_batch"}
        for key, field in fields.items():
            if saved[key] != getattr(self, key):
                raise UserError(f"{field}={getattr(self, key)} differs from the checkpoint's {saved[key]}; "
                                f"set {field}={saved[key]} to resume it, or set train.resume=never")
        return next_step


class EpochOrder:
    """Sample g is item perm_e[g mod n] of epoch e = g div n, perm_e a permutation of the n items seeded
    by (seed, e, *stream): each epoch takes every item exactly once."""

    def __init__(self, n: int, seed: int, stream: tuple = ()):
        self.n, self.seed, self.stream = n, seed, tuple(stream)
        self._permutations: dict[int, np.ndarray] = {}  # epoch -> item order; a batch spans at most two

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:
                del self._permutations[min(self._permutations)]
            rng = np.random.default_rng([self.seed, epoch, *self.stream])
            self._permutations[epoch] = rng.permutation(self.n)
        return self._permutations[epoch]

    def __call__(self, numbers: np.ndarray) -> np.ndarray:
        """The items of samples `numbers`."""
        epochs, positions = np.divmod(numbers, self.n)
        items = np.empty(len(numbers), dtype=np.int64)
        for epoch in np.unique(epochs):
            here = epochs == epoch
            items[here] = self.permutation(int(epoch))[positions[here]]
        return items


class TokenSampler(SamplerState):
    """`stream` tells apart samplers that share a seed (the sources of a blend): each its own permutations."""

    def __init__(self, dataset: TokenDataset, seq_len: int, global_batch: int, seed: int, stream: tuple = ()):
        if seq_len < 1 or global_batch < 1:
            raise ValueError(f"seq_len={seq_len} and global_batch={global_batch} must be positive")
        self.dataset = dataset
        self.seq_len = seq_len
        self.global_batch = global_batch
        self.seed = seed
        self.stream = tuple(stream)
        self.num_windows = count_windows(dataset, seq_len)
        self.order = EpochOrder(self.num_windows, seed, self.stream)

    def rows(self, step: int, start: int, count: int) -> torch.Tensor:
        """Rows start .. start + count of step's global batch: int64 (count, seq_len + 1).

        Inputs are [:, :-1] and targets [:, 1:]. dp rank r with micro_batch m reads microbatch i as
        rows(step, (r * accum + i) * m, m), where accum = global_batch / (m * dp).
        """
        return self.samples(sample_indices(step, start, count, self.global_batch))

    def samples(self, numbers: np.ndarray) -> torch.Tensor:
        """The windows of samples `numbers` (g = step * global_batch + row): int64 (len, seq_len + 1)."""
        offsets = self.window_starts(numbers)[:, None] + np.arange(self.seq_len + 1)
        return torch.from_numpy(np.asarray(self.dataset.tokens[offsets], dtype=np.int64))

    def window_starts(self, numbers: np.ndarray) -> np.ndarray:
        """Where in the token stream the windows of samples `numbers` begin."""
        return self.order(numbers) * self.seq_len

    def batch(self, step: int) -> torch.Tensor:
        """The whole global batch of `step`."""
        return self.rows(step, 0, self.global_batch)

    def tokens_by_source(self, steps: int) -> dict[str, int]:
        """Tokens trained on (targets) in the first `steps` steps, by source."""
        return {self.dataset.name: steps * self.global_batch * self.seq_len}
