"""Weighted blends: which source, and which of that source's samples, each sample of a step reads.

Megatron-LM's BlendedDataset gives each sample to the source whose realised share lags its weight
most. This is the same idea in a form that is a pure function of the sample number g, so every
layout reads the same rows and a resumed run needs only the step: the weights are quantised to
integer shares a_s summing to PERIOD (each >= 1); source s's k-th sample falls due at (k + 1/2) / a_s
periods and samples are handed out in due order (ties to the lower source index). Every PERIOD
samples repeat the pattern with each source served exactly a_s times, so one period's table gives
sample g's source s and its index k within s (periods · a_s + its rank in the table), and a
source's realised count stays within about one sample of g · a_s / PERIOD at every g.
Each source draws its k-th sample from its own `TokenSampler` (its own window permutations).
"""

from __future__ import annotations

import hashlib
import json
from typing import Sequence

import numpy as np
import torch

from angelptm.data.builder import TokenDataset
from angelptm.data.sampler import SamplerState, TokenSampler, sample_indices

PERIOD = 2**20  # weights are exact to one part in a million


class Blend:
    """Several datasets with their weights, and what identifies the mixture."""

    def __init__(self, datasets: Sequence[TokenDataset], weights: Sequence[float]):
        self.datasets, self.weights = list(datasets), list(weights)
        self.shares = quantise(weights, PERIOD)
        self.vocab_size = max(d.vocab_size for d in self.datasets)
        parts = (f"{d.name}: {share / PERIOD:.4g}" for d, share in zip(self.datasets, self.shares))
        self.name = "blend(" + ", ".join(parts) + ")"
        identity = [[d.checksum, int(s)] for d, s in zip(self.datasets, self.shares)]
        self.checksum = "blend-sha256:" + hashlib.sha256(json.dumps(identity).encode()).hexdigest()

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)


def quantise(weights: Sequence[float], period: int) -> np.ndarray:
    """Integer shares >= 1 summing to `period`, proportional to `weights` (largest remainders round up)."""
    exact = np.asarray(weights, dtype=np.float64) / float(np.sum(weights)) * period
    shares = np.maximum(1, np.floor(exact)).astype(np.int64)
    short = period - int(shares.sum())
    if short >= 0:
        shares[np.argsort(shares - exact, kind="stable")[:short]] += 1
    else:  # the floor of 1 for tiny weights took more than the remainders gave
        for _ in range(-short):
            shares[np.argmax(shares)] -= 1
    return shares


class BlendSampler(SamplerState):
    """The rows of each step's global batch drawn from a `Blend`: the same interface as `TokenSampler`."""

    def __init__(self, blend: Blend, seq_len: int, global_batch: int, seed: int):
        self.dataset = blend
        self.seq_len, self.global_batch, self.seed = seq_len, global_batch, seed
        self.sources = [TokenSampler(d, seq_len, global_batch, seed, stream=(i + 1,))
                        for i, d in enumerate(blend.datasets)]
        source = np.repeat(np.arange(len(blend.shares)), blend.shares)
        rank = np.concatenate([np.arange(share) for share in blend.shares])
        order = np.lexsort((source, (rank + 0.5) / blend.shares[source]))  # by due time, then source
        self._source, self._rank = source[order].astype(np.int32), rank[order].astype(np.int64)

    def rows(self, step: int, start: int, count: int) -> torch.Tensor:
        """Rows start .. start + count of step's global batch: int64 (count, seq_len + 1), as `TokenSampler.rows`."""
        periods, positions = np.divmod(sample_indices(step, start, count, self.global_batch), PERIOD)
        source = self._source[positions]
        within = periods * self.dataset.shares[source] + self._rank[positions]
        out = torch.empty(count, self.seq_len + 1, dtype=torch.int64)
        for s in np.unique(source):
            here = source == s
            out[torch.from_numpy(here)] = self.sources[s].samples(within[here])
        return out

    def batch(self, step: int) -> torch.Tensor:
        return self.rows(step, 0, self.global_batch)

    def tokens_by_source(self, steps: int) -> dict[str, int]:
        """Tokens trained on (targets) in the first `steps` steps, by source."""
        periods, position = divmod(steps * self.global_batch, PERIOD)
        counts = periods * self.dataset.shares + np.bincount(self._source[:position], minlength=len(self.sources))
        return {d.name: int(c) * self.seq_len for d, c in zip(self.dataset.datasets, counts)}
