"""`FlatShard`: a parameter-shaped tensor of which this rank holds one range of its flat elements.

ZeROCache shards pages, not tensors, so a rank owns an arbitrary range [start, stop) of a
parameter's row-major elements (or nothing of it). torch.distributed.checkpoint (DCP) saves and
reshards such a range when the object describes it through DCP's checkpointable protocol: the
range is split into a few boxes (N-d chunks), each contiguous in memory, and each box hands DCP a
view of the local data to write from or read into. The checkpoint then holds every parameter
under its own name and full shape, like any model checkpoint, and loads into another dp degree,
stage, page size or tier, or into a plain unsharded model.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

Box = tuple[tuple[int, ...], tuple[int, ...], int]  # (offsets, sizes, first flat element)


def flat_range_boxes(shape: tuple[int, ...], start: int, stop: int) -> list[Box]:
    """Split the flat range [start, stop) of a row-major tensor of `shape` into boxes that are each
    contiguous in memory: a partial first row, whole rows, a partial last row (recursively)."""
    if start >= stop:
        return []
    if len(shape) <= 1:
        return [((start,) if shape else (), (stop - start,) if shape else (), start)]
    inner = math.prod(shape[1:])
    first, last = start // inner, (stop - 1) // inner
    if first == last:  # inside one row: split within it
        return [((first, *offsets), (1, *sizes), first * inner + flat)
                for offsets, sizes, flat in flat_range_boxes(shape[1:], start - first * inner, stop - first * inner)]
    boxes: list[Box] = []
    whole_from, whole_to = first, last + 1
    if start % inner:
        boxes += flat_range_boxes(shape, start, (first + 1) * inner)
        whole_from = first + 1
    tail = []
    if stop % inner:
        tail = flat_range_boxes(shape, last * inner, stop)
        whole_to = last
    if whole_to > whole_from:
        boxes.append(((whole_from, *[0] * (len(shape) - 1)), (whole_to - whole_from, *shape[1:]), whole_from * inner))
    return boxes + tail


class FlatShard(torch.Tensor):
    _boxes: list[tuple[ChunkStorageMetadata, torch.Tensor]]
    _flat: torch.Tensor
    _start: int

    @staticmethod
    def __new__(cls, flat: torch.Tensor, shape: torch.Size, start: int) -> "FlatShard":
        """`flat` holds elements [start, start + flat.numel()) of a tensor of `shape`."""
        shard = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=flat.dtype, device=flat.device)
        shard._flat = flat
        shard._start = start
        shard._boxes = [
            (ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)),
             flat[first - start : first - start + math.prod(sizes)].view(sizes))
            for offsets, sizes, first in flat_range_boxes(tuple(shape), start, start + flat.numel())
        ]
        return shard

    @property
    def flat(self) -> torch.Tensor:
        """The local elements, in flat order."""
        return self._flat

    @property
    def start(self) -> int:
        """The flat index of the first local element."""
        return self._start

    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        return [
            WriteItem(
                index=MetadataIndex(fqn, chunk.offsets),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(chunk=chunk, properties=TensorProperties(dtype=self.dtype),
                                            size=self.shape),
            )
            for chunk, _ in self._boxes
        ]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [chunk for chunk, _ in self._boxes]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        for chunk, view in self._boxes:
            if chunk.offsets == index.offset:
                return view
        raise KeyError(f"{index.fqn} has no local chunk at {index.offset}")  # DCP asks only for ours

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise TypeError(f"FlatShard is a checkpoint descriptor, not a tensor to compute with ({func})")

    def __repr__(self) -> str:  # type: ignore[override]
        return f"FlatShard(shape={tuple(self.shape)}, local={self._flat.numel()}, boxes={len(self._boxes)})"
