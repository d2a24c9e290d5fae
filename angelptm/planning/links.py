"""What a collective costs: a communicator's bandwidth and latency by the links it spans, and the
seconds of each collective over it (ring volumes, Thakur et al. 2005: all-gather and
reduce-scatter move (n-1)/n of the data per rank, all-reduce twice that)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from angelptm.planning.hardware import Hardware


@dataclass(frozen=True)
class Group:
    """A communicator of `size` ranks spaced `stride` apart in the rank order (tp innermost).

    Inside a node rings run on NVLink. Across nodes each node's k members of the group drive k
    network cards in parallel rings (NCCL's channels), so the group gets k cards' worth of
    bandwidth, capped by NVLink. Every ring step also pays a fixed latency.
    """

    size: int
    bandwidth: float  # bytes/s
    latency: float  # s per ring step

    @classmethod
    def of(cls, hw: Hardware, size: int, stride: int) -> "Group":
        if size * stride <= hw.gpus_per_node:
            gbps, latency_us = hw.intra_node_gbps, hw.intra_node_latency_us
        else:
            per_node = max(1, hw.gpus_per_node // stride)
            gbps, latency_us = min(hw.intra_node_gbps, per_node * hw.inter_node_gbps), hw.inter_node_latency_us
        return cls(size, gbps * hw.link_efficiency * 1e9, latency_us * 1e-6)

    @classmethod
    def all_to_all_of(cls, hw: Hardware, size: int, stride: int) -> "Group":
        """As `of` inside a node. Across nodes an all-to-all has no ring to spread over the node's
        cards: what each rank sends off its node leaves through its own card."""
        if size * stride <= hw.gpus_per_node:
            return cls.of(hw, size, stride)
        return cls(size, hw.inter_node_gbps * hw.link_efficiency * 1e9, hw.inter_node_latency_us * 1e-6)

    def gather(self, full_bytes: float, calls: float = 1) -> float:
        """Seconds for all-gathers or reduce-scatters of tensors totalling `full_bytes` (ring:
        (n-1)/n of the data and n-1 steps per call)."""
        if self.size <= 1:
            return 0.0
        return (self.size - 1) / self.size * full_bytes / self.bandwidth + calls * (self.size - 1) * self.latency

    def all_reduce(self, full_bytes: float, calls: float = 1) -> float:
        """Seconds for all-reduces: twice a ring's volume, with a tree's 2·log2(n) steps of
        latency (NCCL picks the tree at scale)."""
        if self.size <= 1:
            return 0.0
        volume = 2 * (self.size - 1) / self.size * full_bytes
        return volume / self.bandwidth + calls * 2 * math.log2(self.size) * self.latency

    def all_to_all(self, local_bytes: float, calls: float = 1) -> float:
        """Seconds for all-to-alls of `local_bytes` per rank, spread evenly: (n-1)/n of them leave
        the rank, one peer per step over n-1 steps; a ring gather's volume and step count."""
        return self.gather(local_bytes, calls)

    def send(self, nbytes: float, calls: float = 1) -> float:
        """Seconds for point-to-point transfers."""
        return nbytes / self.bandwidth + calls * self.latency
