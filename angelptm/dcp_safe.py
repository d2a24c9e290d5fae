"""Load torch.distributed.checkpoint (DCP) folders without running pickled code (trainer checkpoints,
ZeROCache state, model-only imports alike).

DCP's FileSystemReader reads the `.metadata` file with plain `pickle.load`, which would run any
callable a crafted file names. `SafeFileSystemReader` reads it with an unpickler that only
builds the handful of plain classes DCP metadata consists of (its dataclasses, torch.Size,
dtypes, layouts, paths); anything else is refused with a `UserError`. Tensor data is already
read with `torch.load(weights_only=True)`; items stored as pickled bytes (non-tensor objects)
are refused too, so a checkpoint loaded through this reader holds tensors only.

Read checkpoints with `load(state, path)`: DCP's load through the safe reader, with a refused
checkpoint raised as the one-line `UserError` (DCP itself wraps every failure in a multi-line
CheckpointException).
"""

from __future__ import annotations

import io
import os
import pathlib
import pickle
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan

from angelptm.errors import UserError

_DTYPES = {name: getattr(torch, name) for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}

_ALLOWED: dict[tuple[str, str], Any] = {
    **{("torch", name): dtype for name, dtype in _DTYPES.items()},
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,  # a name -> layout lookup
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): dcp_filesystem._StorageInfo,
    ("pathlib", "PosixPath"): pathlib.PosixPath,
    ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
    ("collections", "OrderedDict"): __import__("collections").OrderedDict,
}
for _name in ("Metadata", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
              "ChunkStorageMetadata", "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING"):
    _ALLOWED["torch.distributed.checkpoint.metadata", _name] = getattr(dcp_metadata, _name)


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[module, name]
        except KeyError:
            raise pickle.UnpicklingError(f"{module}.{name} is not DCP metadata") from None


def read_metadata_file(path: str | os.PathLike) -> Metadata:
    """Unpickle a DCP `.metadata` file, building only allow-listed classes."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as e:
        raise UserError(f"checkpoint metadata {path} is not plain DCP metadata ({e}); refusing to load it") from None
    if not isinstance(metadata, Metadata):
        raise UserError(f"checkpoint metadata {path} holds a {type(metadata).__name__}, not DCP Metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader that never unpickles code: safe metadata, tensor items only."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        metadata = read_metadata_file(self._get_metadata_path(rank))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        pickled = [item.dest_index.fqn for item in plan.items if item.type == LoadItemType.BYTE_IO]
        if pickled:
            raise UserError(
                f"checkpoint {self.path} stores {pickled[0]} as a pickled object; only tensors are "
                "loaded, so save that value as a tensor"
            )
        return super().prepare_local_plan(plan)


def load(state_dict: dict, path: str | os.PathLike, process_group: dist.ProcessGroup | None = None) -> None:
    """Fill `state_dict` in place from the DCP checkpoint at `path`, running no pickled code."""
    metadata_path = os.path.join(path, ".metadata")
    if not os.path.isfile(metadata_path):
        raise UserError(f"{path} holds no .metadata; pass the folder of a complete checkpoint")
    read_metadata_file(metadata_path)  # refuse a bad file here, with its own one-line reason
    try:
        dcp.load(state_dict, storage_reader=SafeFileSystemReader(path), process_group=process_group)
    except CheckpointException as e:
        refused = [exc for exc, _ in e.failures.values() if isinstance(exc, UserError)]
        if refused:
            raise UserError(str(refused[0])) from None
        raise
