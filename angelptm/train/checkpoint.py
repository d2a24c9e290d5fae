"""Checkpoints: complete-or-absent folders of sharded, reshardable state that load no pickled code.

A checkpoint is a folder `step_<N>/`:

    config.yaml        the resolved config of the run that wrote it
    train_state.json   step, sampler position, layout, and a manifest (size + crc32 of every file)
    state/             torch.distributed.checkpoint (DCP) shards: {"model": ..., "optim": ...}
    rng/rank_<r>.safetensors   each rank's RNG state

Each rank writes its own shards, so a checkpoint written with one layout loads into another.
The folder is written under a temporary name, fsynced, and renamed, so a crash leaves either
the whole checkpoint or none; a folder it replaces, or that pruning deletes, is renamed aside first
(`recover_interrupted_saves` tidies up after a crash at the next start). Loading goes through `angelptm.dcp_safe`, so it never runs code
from the checkpoint. A model-only checkpoint (from `import-hf`) has no "optim".
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException

from angelptm import dcp_safe
from angelptm.config import Config, load_config, save_config
from angelptm.errors import ConfigError, UserError
from angelptm.train.faults import TrainingStopped

FORMAT_VERSION = 1
STEP_PREFIX = "step_"
OWN_TOKENIZER = "tokenizer"  # the folder in a checkpoint that holds a copy of its tokenizer's files
# Names of folders on their way in or out, beside the step_<N> folders. A kill at any moment leaves
# a complete step_<N>, or a complete one under ASIDE_PREFIX that `recover_interrupted_saves` puts back.
TMP_PREFIX, ASIDE_PREFIX, PRUNED_PREFIX = ".tmp_", ".replaced_", ".pruned_"

# ---------------------------------------------------------------------------------------------
# Small helpers


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


@contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns that it assumes one process when no process group exists; that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")) + [root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def all_ranks_ok(ok: bool) -> bool:
    """True on every rank iff `ok` is true on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return ok
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces device tensors only
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64, device=device)
    dist.all_reduce(flag)
    return int(flag.item()) == 0


def step_of(path: Path) -> Optional[int]:
    name = path.name
    if name.startswith(STEP_PREFIX) and name[len(STEP_PREFIX):].isdigit():
        return int(name[len(STEP_PREFIX):])
    return None


def latest_checkpoint(ckpt_root: Path) -> Optional[Path]:
    """The newest complete `step_<N>` folder under `ckpt_root` (temporary folders are ignored)."""
    if not ckpt_root.is_dir():
        return None
    steps = [(step_of(p), p) for p in ckpt_root.iterdir() if p.is_dir() and step_of(p) is not None]
    return max(steps)[1] if steps else None


def resolve_checkpoint(path: Path) -> Path:
    """`path` if it is a checkpoint folder, else the newest one in a run's output_dir (or its checkpoints/)."""
    path = Path(path)
    if (path / "train_state.json").is_file() or step_of(path) is not None:
        return path
    for root in (path / "checkpoints", path):
        found = latest_checkpoint(root)
        if found:
            return found
    if path.is_dir():
        raise UserError(f"no checkpoint in {path}; train first, or pass a step_<N> folder")
    raise UserError(f"checkpoint {path} does not exist; pass a step_<N> folder or a run's output_dir")


# ---------------------------------------------------------------------------------------------
# Saving


def save_checkpoint(
    folder: Path,
    cfg: Config,
    state: dict[str, Any],
    train_state: dict[str, Any],
    keep: Optional[int] = None,
    files: Optional[dict[str, bytes]] = None,
) -> Path:
    """Write `state` ({"model": ..., "optim": ...}, DCP-ready) and `train_state` (JSON) atomically,
    with `files` (relative path -> contents, e.g. an imported model's tokenizer) beside them.

    Collective: every rank calls it with its own shards. Returns the final folder. With `keep`,
    older `step_<N>` siblings beyond the newest `keep` are removed afterwards.
    """
    folder = Path(folder)
    tmp = folder.with_name(TMP_PREFIX + folder.name)
    rank = _rank()
    needed = _bytes_to_write(state)
    free = shutil.disk_usage(_existing_ancestor(folder)).free
    if not all_ranks_ok(needed <= free):
        raise _no_space(folder, needed, free)
    error: Optional[BaseException] = None
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
        _barrier()
        with _single_process_quiet():
            dcp.save(state, storage_writer=FileSystemWriter(tmp / "state", sync_files=True))
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(tmp / "rng" / f"rank_{rank}.safetensors"))
    except (Exception, CheckpointException) as e:  # DCP raises on every rank alike; the rest is local
        error = e
    if all_ranks_ok(error is None) and rank == 0:
        try:
            save_config(cfg, tmp / "config.yaml")
            for name, data in (files or {}).items():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                (tmp / name).write_bytes(data)
            written = sorted(p for p in tmp.rglob("*") if p.is_file())
            manifest = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "crc32": _crc32(p)} for p in written}
            record = dict(train_state, format=FORMAT_VERSION, world_size=_world(), manifest=manifest)
            (tmp / "train_state.json").write_text(json.dumps(record, indent=1))
            fsync_tree(tmp)
            _swap_in(tmp, folder)
            if keep is not None:
                _prune(folder.parent, keep)
        except Exception as e:
            error = e
    if not all_ranks_ok(error is None):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # older checkpoints are untouched: only a swap changes them
        if error is not None and not _is_out_of_space(error):
            raise error
        raise _no_space(folder, needed, shutil.disk_usage(_existing_ancestor(folder)).free)
    return folder


def _bytes_to_write(state: Any) -> int:
    """The bytes every rank's shards of `state` take (what a save writes, less the small files),
    with 5% and 1 MiB on top for DCP's framing and metadata."""
    def local_bytes(value: Any) -> int:
        if isinstance(value, dict):
            return sum(local_bytes(v) for v in value.values())
        if isinstance(value, torch.Tensor):
            local = value.to_local() if hasattr(value, "to_local") else value
            return local.numel() * local.element_size()
        return 0

    total = torch.tensor([local_bytes(state)], dtype=torch.int64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        total = total.to("cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(total)
    return int(int(total.item()) * 1.05) + 2**20


def _existing_ancestor(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


# How a full disk shows through DCP's wrapper, which keeps only each rank's traceback text:
# the OS's words, or torch's zip writer finding a short write ("unexpected pos 704 vs 598").
_OUT_OF_SPACE_WORDS = ("no space left", "quota exceeded", "unexpected pos")


def _is_out_of_space(error: BaseException) -> bool:
    """Whether `error` (or what DCP wrapped in it, on any rank) is a full disk or quota."""
    return any(getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) for e in _causes(error)) or \
        any(words in str(error).lower() for words in _OUT_OF_SPACE_WORDS)


def _causes(error: Optional[BaseException]):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _no_space(folder: Path, needed: int, free: int) -> TrainingStopped:
    return TrainingStopped(
        f"no space for checkpoint {folder}: it needs {_size(needed)}, {_size(free)} are free "
        f"on {_existing_ancestor(folder)}; free some space, lower train.keep_checkpoints or put "
        "train.output_dir on a larger disk (older checkpoints are intact)")


def _swap_in(tmp: Path, folder: Path) -> None:
    """Rename the complete `tmp` to `folder`; an existing `folder` is renamed aside first and
    deleted only once the new one is in place (a rename over a non-empty folder is not possible)."""
    aside = folder.with_name(ASIDE_PREFIX + folder.name)
    if folder.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(folder, aside)
    os.replace(tmp, folder)
    fsync_tree(folder.parent)
    shutil.rmtree(aside, ignore_errors=True)


def _prune(ckpt_root: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, each renamed out of the step_<N> names first,
    so a kill half-way through a deletion never leaves a half-deleted step_<N>."""
    steps = sorted((step_of(p), p) for p in ckpt_root.iterdir() if p.is_dir() and step_of(p) is not None)
    doomed = []
    for _, old in steps[:-keep]:
        doomed.append(old.with_name(PRUNED_PREFIX + old.name))
        os.replace(old, doomed[-1])
    if doomed:
        fsync_tree(ckpt_root)
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)


def recover_interrupted_saves(ckpt_root: Path) -> list[str]:
    """After a crash: put back a checkpoint renamed aside whose replacement never arrived, and
    delete what a save or prune left half-done. Rank 0, before any checkpoint is looked for;
    returns one line per thing done."""
    if not ckpt_root.is_dir():
        return []
    done = []
    for path in sorted(ckpt_root.iterdir()):
        name = path.name
        if name.startswith(ASIDE_PREFIX):
            target = ckpt_root / name[len(ASIDE_PREFIX):]
            if target.exists():
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.replace(path, target)
                done.append(f"put back {target.name}, whose replacement was interrupted")
        elif name.startswith((TMP_PREFIX, PRUNED_PREFIX)):
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed {name}, left by an interrupted save or prune")
    if done:
        fsync_tree(ckpt_root)
    return done


def newest_complete_checkpoint(ckpt_root: Path) -> tuple[Optional[Path], Optional[dict[str, Any]], list[str]]:
    """The newest step_<N> under `ckpt_root` that passes `read_train_state`, its record, and one
    line for each newer one skipped as incomplete or corrupt. Collective, like read_train_state."""
    if not ckpt_root.is_dir():
        return None, None, []
    skipped = []
    steps = sorted(((step_of(p), p) for p in ckpt_root.iterdir() if p.is_dir() and step_of(p) is not None),
                   reverse=True)
    for _, path in steps:
        try:
            return path, read_train_state(path), skipped
        except UserError as e:
            skipped.append(f"skipped {path}: {e}")
    return None, None, skipped


# ---------------------------------------------------------------------------------------------
# Loading


def read_train_state(folder: Path) -> dict[str, Any]:
    """The checkpoint's JSON record, after checking every file against the manifest.

    Each rank checks the crc32 of a share of the files, so a large checkpoint is read once in all.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"checkpoint {folder} does not exist; pass the path of a step_<N> folder")
    try:
        record = json.loads((folder / "train_state.json").read_text())
        manifest = record["manifest"]
    except (OSError, ValueError, KeyError):
        raise dcp_safe.corrupt(folder, "train_state.json is missing or unreadable") from None
    if record.get("format") != FORMAT_VERSION:
        raise UserError(
            f"checkpoint {folder} has format {record.get('format')}, this angelptm reads format "
            f"{FORMAT_VERSION}; convert it with the angelptm version that wrote it"
        )
    problem = None
    for i, (name, entry) in enumerate(sorted(manifest.items())):
        path = folder / name
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            problem = f"{name} is missing or truncated"
        elif i % _world() == _rank() and _crc32(path) != entry["crc32"]:
            problem = f"{name} fails its checksum"
        if problem:
            break
    if not all_ranks_ok(problem is None):
        raise dcp_safe.corrupt(folder, problem or "a file fails its checksum on another rank")
    return record


def has_optimizer_state(record: dict[str, Any]) -> bool:
    return any(name.startswith("state/") for name in record["manifest"]) and record.get("kind") != "model"


def load_state(folder: Path, state: dict[str, Any]) -> None:
    """Fill `state` (same structure as saved, this rank's shards) in place from the DCP shards."""
    folder = Path(folder)
    try:
        with _single_process_quiet():
            dcp_safe.load(state, folder / "state")
    except UserError:
        raise
    except (Exception, CheckpointException) as e:  # DCP wraps per-rank failures (shape, key, truncation)
        first = str(e).strip().splitlines()
        raise dcp_safe.corrupt(folder, first[-1] if first else type(e).__name__) from None


def stored_keys(folder: Path) -> set[str]:
    """The flattened keys of the state a checkpoint holds (e.g. "model.norm.weight")."""
    return set(dcp_safe.read_metadata_file(Path(folder) / "state" / ".metadata").state_dict_metadata)


def restore_rng(folder: Path) -> None:
    """Restore this rank's RNG state when the checkpoint was written by the same world size."""
    path = Path(folder) / "rng" / f"rank_{_rank()}.safetensors"
    if not path.is_file():
        return
    rng = dcp_safe.load_safetensors(path, Path(folder))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def checkpoint_config(folder: Path) -> Config:
    """The config a checkpoint was written with (its file is in the manifest, so read_train_state
    has already checked it against its checksum). A checkpoint that keeps its own tokenizer
    (`import-hf`'s `tokenizer/`) is read with that copy, wherever the folder has been moved since."""
    try:
        cfg = load_config(Path(folder) / "config.yaml")
    except ConfigError as e:
        raise dcp_safe.corrupt(Path(folder), f"config.yaml: {e}") from None
    own = Path(folder) / OWN_TOKENIZER
    if (own / "tokenizer.json").is_file():
        cfg.data.tokenizer = str(own)
    return cfg


# ---------------------------------------------------------------------------------------------
# Model-only checkpoints (import-hf, export-hf, generate)


def save_model_checkpoint(folder: Path, cfg: Config, model_state: dict[str, torch.Tensor],
                          files: Optional[dict[str, bytes]] = None) -> Path:
    """Write a checkpoint holding only model weights (full tensors, keyed by parameter name), e.g.
    imported from elsewhere, and `files` beside them."""
    return save_checkpoint(Path(folder), cfg, {"model": model_state}, {"step": 0, "kind": "model"}, files=files)


def load_model(folder: Path, device: str | torch.device = "cpu") -> tuple[Config, torch.nn.Module]:
    """Build the plain model a checkpoint (or a run's newest) describes and load its full weights
    and the buffers it stores (MoE routing biases; the others keep their initial values)."""
    from angelptm.distributed.parallelize import reset_buffers
    from angelptm.models.llama import build_llama

    folder = resolve_checkpoint(folder)
    read_train_state(folder)
    cfg = checkpoint_config(folder)
    model = build_llama(cfg.model, "meta")
    model.to_empty(device=device)
    model.tie_weights()
    reset_buffers(model)
    # Parameters by their first name (a tied head shares the embedding's), filled in place.
    state: dict[str, Any] = {"model": {name: p.detach() for name, p in model.named_parameters()}}
    stored = stored_keys(folder)
    buffers = {name: b for name, b in model.named_buffers() if f"buffers.{name}" in stored}
    if buffers:
        state["buffers"] = buffers
    load_state(folder, state)
    return cfg, model
