"""Load torch.distributed.checkpoint (DCP) folders without running pickled code or reading outside
them (trainer checkpoints, ZeROCache state, model-only imports alike).

DCP's FileSystemReader reads the `.metadata` file with plain `pickle.load`, which would run any
callable a crafted file names. `SafeFileSystemReader` reads it with an unpickler that only
builds the handful of plain classes DCP metadata consists of (its dataclasses, torch.Size,
dtypes, layouts, paths); anything else is refused with a `UserError`. Tensor data is already
read with `torch.load(weights_only=True)`; items stored as pickled bytes (non-tensor objects),
and tensor payloads whose pickle names anything but tensors, are refused too, so a checkpoint
loaded through this reader holds tensors only.

The metadata also names the file (and byte range) each item is read from, and DCP opens whatever
path it names: `../../etc/passwd`, or an absolute path into another run's checkpoint, which
would load silently with the wrong weights. Every storage path must resolve, symlinks and `..`
followed, to a file inside the DCP folder (a checkpoint's `state/`); it is checked once against
the whole metadata before anything is read, and again for each file just before it is opened.

Read checkpoints with `load(state, path)`: DCP's load through the safe reader, with a refused
checkpoint raised as one line, `checkpoint <folder> is corrupt or incomplete (<what>); delete it
or use another checkpoint` (DCP itself wraps every failure in a multi-line CheckpointException).
`load_safetensors` reads a checkpoint's other tensor files (the RNG states) with the same refusal.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pathlib
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner
from torch.futures import Future

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

# ---------------------------------------------------------------------------------------------
# The one-line refusal


def corrupt(folder: str | os.PathLike, what: str) -> UserError:
    """The refusal of a damaged or tampered checkpoint, by this reader and by
    `angelptm.train.checkpoint`'s own checks (a bad manifest, a failed checksum) alike."""
    return UserError(f"checkpoint {folder} is corrupt or incomplete ({what}); delete it or use another checkpoint")


def _checkpoint_of(dcp_dir: str | os.PathLike) -> Path:
    """The folder a user knows: a trainer checkpoint's step_<N> for its `state/` DCP folder (the
    path `checkpoint.load_state` names, so its refusals and ours read the same), else the DCP folder."""
    dcp_dir = Path(dcp_dir)
    return dcp_dir.parent if dcp_dir.name == "state" else dcp_dir


def _shown(path: str | os.PathLike, folder: Path) -> str:
    """`path` as the user would look for it: relative to the checkpoint folder where it lies there."""
    try:
        return str(Path(path).relative_to(folder))
    except ValueError:
        return str(path)


def _one_line(error: BaseException) -> str:
    """A library error's message folded to one line (torch and safetensors messages span several)."""
    return " ".join(str(error).split()) or type(error).__name__


def _inside(path: Path, root: Path) -> bool:
    """Whether `path`, with symlinks and `..` resolved, lies strictly below `root` (itself resolved)."""
    path, root = path.resolve(), root.resolve()
    return path != root and path.is_relative_to(root)


# ---------------------------------------------------------------------------------------------
# Metadata


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[module, name]
        except KeyError:
            raise pickle.UnpicklingError(f"{module}.{name} is not DCP metadata") from None


def read_metadata_file(path: str | os.PathLike) -> Metadata:
    """Unpickle a DCP `.metadata` file, building only allow-listed classes."""
    folder = _checkpoint_of(Path(path).parent)
    with open(path, "rb") as f:
        data = f.read()
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as e:
        raise corrupt(folder, f"{_shown(path, folder)} is not plain DCP metadata: {_one_line(e)}") from None
    if not isinstance(metadata, Metadata):
        raise corrupt(folder, f"{_shown(path, folder)} holds a {type(metadata).__name__}, not DCP Metadata")
    return metadata


def check_storage_paths(metadata: Metadata, dcp_dir: str | os.PathLike) -> None:
    """Refuse metadata that names storage outside `dcp_dir` (after symlinks and `..`), a missing
    storage file, or a storage entry that is not DCP's plain (path, offset, length) record."""
    dcp_dir = Path(dcp_dir)
    folder = _checkpoint_of(dcp_dir)
    where = f"{_shown(dcp_dir / '.metadata', folder)} names storage"
    if not isinstance(metadata.storage_data, dict):
        raise corrupt(folder, f"{_shown(dcp_dir / '.metadata', folder)} has no storage table")
    checked: set[str] = set()
    for info in metadata.storage_data.values():
        if not isinstance(info, dcp_filesystem._StorageInfo):
            raise corrupt(folder, f"{where} as a {type(info).__name__}, not a file and byte range")
        relative = getattr(info, "relative_path", None)
        offsets = (getattr(info, "offset", None), getattr(info, "length", None))
        # Unpickling sets fields without the dataclass's types, so check them: DCP opens the path
        # and slices the byte range as given.
        if not isinstance(relative, (str, pathlib.PurePath)) or not str(relative):
            raise corrupt(folder, f"{where} with the path {relative!r}")
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in offsets):
            raise corrupt(folder, f"{where} {relative} at the byte range {offsets!r}")
        if str(relative) not in checked:
            _check_file(dcp_dir, relative, where)
            checked.add(str(relative))


def _check_file(dcp_dir: Path, relative: str | os.PathLike, where: str) -> None:
    """Refuse one storage path that resolves outside `dcp_dir`, or to no file."""
    folder = _checkpoint_of(dcp_dir)
    target = dcp_dir / relative  # an absolute `relative` replaces dcp_dir here, as in DCP's concat_path
    outside = "state/" if folder != dcp_dir else "the checkpoint folder"
    if not _inside(target, dcp_dir):
        raise corrupt(folder, f"{where} {relative}, outside {outside}")
    if not target.is_file():
        raise corrupt(folder, f"{where} {relative}, which is missing")


# ---------------------------------------------------------------------------------------------
# The reader


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader that never unpickles code nor opens a file outside its folder: safe
    metadata, tensor items only, storage paths inside the folder."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        metadata = read_metadata_file(self._get_metadata_path(rank))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    # DCP passes rank= and use_collectives= only to a method whose signature has a `kwargs`.
    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)
        # Every rank checks the whole table, not only its own reads, so a tampered checkpoint is
        # refused the same way on all of them.
        check_storage_paths(metadata, self.path)

    def _file_of(self, item: Any) -> str:
        info = self.storage_data.get(item.storage_index)
        return _shown(Path(self.path) / info.relative_path, _checkpoint_of(self.path)) if info else "a shard"

    def _pickled(self, item: Any) -> UserError:
        return corrupt(_checkpoint_of(self.path), f"{self._file_of(item)} holds a pickled object at "
                                                  f"{item.dest_index.fqn}; angelptm loads tensors only")

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        pickled = [item for item in plan.items if item.type == LoadItemType.BYTE_IO]
        if pickled:
            raise self._pickled(pickled[0])
        return super().prepare_local_plan(plan)

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future:
        dcp_dir = Path(self.path)
        where = f"{_shown(dcp_dir / '.metadata', _checkpoint_of(dcp_dir))} names storage"
        by_file: dict[str, list] = {}
        for item in plan.items:
            by_file.setdefault(str(self.storage_data[item.storage_index].relative_path), []).append(item)
        for relative, items in by_file.items():
            # Again right before the open: a symlink swapped in since the metadata check would
            # otherwise still be followed.
            _check_file(dcp_dir, relative, where)
            for item in items:
                # One item at a time, so a refused payload is named by its key; torch's own error
                # ends with a pointer to its documentation, not what was refused.
                try:
                    super().read_data(dataclasses.replace(plan, items=[item]), planner).wait()
                except pickle.UnpicklingError:
                    raise self._pickled(item) from None
        done: Future = Future()
        done.set_result(None)
        return done


# ---------------------------------------------------------------------------------------------
# Entry points


def load(state_dict: dict, path: str | os.PathLike, process_group: dist.ProcessGroup | None = None) -> None:
    """Fill `state_dict` in place from the DCP checkpoint at `path`, running no pickled code and
    reading no file outside `path`."""
    metadata_path = os.path.join(path, ".metadata")
    if not os.path.isfile(metadata_path):
        raise UserError(f"{path} holds no .metadata; pass the folder of a complete checkpoint")
    # Refuse a bad file here, with its own one-line reason, before DCP opens anything it names.
    check_storage_paths(read_metadata_file(metadata_path), path)
    try:
        dcp.load(state_dict, storage_reader=SafeFileSystemReader(path), process_group=process_group)
    except CheckpointException as e:
        refused = [exc for exc, _ in e.failures.values() if isinstance(exc, UserError)]
        if refused:
            raise UserError(str(refused[0])) from None
        raise


def load_safetensors(path: Path, folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file `path` inside checkpoint `folder` (e.g. its
    `rng/rank_<r>.safetensors`); a missing, truncated, empty, pickled or otherwise unreadable file,
    or one that resolves outside `folder`, is refused with the one-line corrupt-checkpoint error."""
    path, folder = Path(path), Path(folder)
    shown = _shown(path, folder)
    if not _inside(path, folder):
        raise corrupt(folder, f"{shown} resolves outside the checkpoint")
    if not path.is_file():
        raise corrupt(folder, f"{shown} is missing")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # SafetensorError for a bad header or size, OSError, ...: all mean unreadable
        raise corrupt(folder, f"{shown} is not a readable safetensors file: {_one_line(e)}") from None
    return tensors
