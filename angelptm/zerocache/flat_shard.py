"""`FlatShard`: a parameter-shaped tensor of which this rank holds one range of its flat elements.

ZeROCache shards pages, not tensors, so a rank owns an arbitrary range [start, stop) of a
parameter's row-major elements (or nothing of it). Under tensor parallelism that parameter is
itself this rank's slice of a larger *global* one (its `ShardSpec`: a slice along one dim, maybe
padded, maybe held by several tp ranks). torch.distributed.checkpoint (DCP) saves and reshards
such a range when the object describes it through DCP's checkpointable protocol: the range is
split into a few boxes (N-d chunks), each contiguous in the local tensor, moved to their place in
the global tensor with the padding cut off, and each box hands DCP a view of the local data to
write from or read into. The checkpoint then holds every parameter under its own name and global
shape, like any model checkpoint (tp ranks holding the same slice describe the same boxes, which
DCP writes once), and loads into another dp or tp degree, stage, page size or tier, or into a
plain unsharded model.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

if TYPE_CHECKING:
    from angelptm.distributed.tensor_parallel import ShardSpec

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

    @staticmethod
    def __new__(cls, flat: torch.Tensor, shape: torch.Size, start: int,
                spec: Optional["ShardSpec"] = None) -> "FlatShard":
        """`flat` holds elements [start, start + flat.numel()) of this rank's tensor of `shape`, which
        is the slice `spec` says of the global tensor (the whole of it without a spec)."""
        sharded = spec is not None and spec.dim is not None
        global_shape = spec.full_shape if sharded else tuple(shape)
        shard = torch.Tensor._make_wrapper_subclass(cls, global_shape, dtype=flat.dtype, device=flat.device)
        shard._flat = flat
        shard._boxes = []
        for offsets, sizes, first in flat_range_boxes(tuple(shape), start, start + flat.numel()):
            view = flat[first - start : first - start + math.prod(sizes)].view(sizes)
            if sharded:  # to the slice's place in the global tensor, without its padding
                dim = spec.dim
                kept = min(sizes[dim], spec.length - offsets[dim])
                if kept <= 0:
                    continue
                view = view.narrow(dim, 0, kept)
                offsets = (*offsets[:dim], offsets[dim] + spec.start, *offsets[dim + 1:])
                sizes = view.shape
            shard._boxes.append((ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)), view))
        return shard

    @property
    def flat(self) -> torch.Tensor:
        """The local elements, in flat order."""
        return self._flat

    def copy_from_global(self, value: torch.Tensor) -> None:
        """Fill the local elements from `value`, the whole global tensor (a plain model's weight)."""
        for chunk, view in self._boxes:
            view.copy_(value[tuple(slice(o, o + n) for o, n in zip(chunk.offsets, chunk.sizes))])

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
