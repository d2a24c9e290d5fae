"""The checkpoint reader (angelptm.dcp_safe) refuses tampered checkpoints in one line, reading nothing
outside them: storage paths in `.metadata` that leave `state/` (`..`, absolute, symlinks), pickled
payloads, and truncated, empty or pickled RNG safetensors files. A valid checkpoint still loads."""

import io
import os
import pickle
from pathlib import Path

import pytest
import torch

from angelptm import dcp_safe
from angelptm.errors import UserError
from angelptm.train import checkpoint as ckpt
from conftest import one_line, tiny_config

SHARD = "__0_0.distcp"  # the one file a single process writes


def _weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}


def _save(folder: Path, seed: int) -> Path:
    return ckpt.save_checkpoint(folder, tiny_config(folder.parent / "out"), {"model": _weights(seed)}, {"step": 1})


@pytest.fixture
def saved(tmp_path) -> tuple[Path, Path]:
    """Two real checkpoints of the same layout with other weights: `mine`, and `other`, whose shard
    would load into `mine` without complaint if its metadata pointed there."""
    return _save(tmp_path / "run" / "step_1", seed=0), _save(tmp_path / "other" / "step_1", seed=1)


def _empty() -> dict:
    return {"model": {name: torch.zeros_like(t) for name, t in _weights(0).items()}}


def _refused(folder: Path, state: dict) -> str:
    """Load `folder` the way the trainer does and return its one-line refusal."""
    with pytest.raises(UserError) as excinfo:
        ckpt.load_state(folder, state)
    message = one_line(str(excinfo.value))
    assert message.startswith(f"checkpoint {folder} ") and "corrupt" in message, message
    return message


def _rewrite_storage(folder: Path, change) -> None:
    """Rewrite `state/.metadata` as DCP writes it (a plain pickle of its Metadata), with each storage
    entry replaced by `change(fqn, entry)`."""
    path = folder / "state" / ".metadata"
    metadata = dcp_safe.read_metadata_file(path)
    metadata.storage_data = {index: change(index.fqn, info) for index, info in metadata.storage_data.items()}
    path.write_bytes(pickle.dumps(metadata))


@pytest.fixture
def opened(monkeypatch) -> list[Path]:
    """Every file Python opens during the test, resolved (DCP opens shards with Path.open, which goes
    through io.open; the metadata is read with the builtin open)."""
    seen: list[Path] = []
    real = io.open

    def recording_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)):
            seen.append(Path(file).resolve())
        return real(file, *args, **kwargs)

    monkeypatch.setattr(io, "open", recording_open)
    monkeypatch.setattr("builtins.open", recording_open)
    return seen


def test_a_valid_checkpoint_loads(saved, opened):
    mine, _ = saved
    state = _empty()
    ckpt.load_state(mine, state)
    assert all(torch.equal(state["model"][n], t) for n, t in _weights(0).items())
    assert (mine / "state" / SHARD).resolve() in opened  # the recorder does see shard reads


# ---------------------------------------------------------------------------------------------
# Storage paths outside state/


def _outside_paths(mine: Path, other: Path) -> dict[str, str]:
    """Storage paths a crafted `.metadata` could name, each at a copy of another run's shard that
    has the same offsets, so reading it would load the wrong weights silently."""
    sentinel = mine.parent / "x"  # what state/../../x names
    sentinel.write_bytes((other / "state" / SHARD).read_bytes())
    return {"dotdot": "../../x", "absolute": str(other / "state" / SHARD)}


@pytest.mark.parametrize("kind", ["dotdot", "absolute"])
def test_storage_path_outside_the_checkpoint_is_refused_unopened(saved, opened, kind):
    mine, other = saved
    path = _outside_paths(mine, other)[kind]
    _rewrite_storage(mine, lambda fqn, info: type(info)(path, info.offset, info.length))
    state = _empty()
    opened.clear()  # the setup above read the other shard itself
    message = _refused(mine, state)
    assert path in message and "outside state/" in message
    assert opened and all(p.is_relative_to(mine.resolve()) for p in opened), opened  # its own metadata only
    assert all(not t.any() for t in state["model"].values())  # nothing was loaded


def test_one_outside_entry_refuses_the_whole_checkpoint(saved, opened):
    """Even for an entry this load does not ask for, so a tampered checkpoint never half-loads."""
    mine, other = saved
    outside = str(other / "state" / SHARD)
    _rewrite_storage(mine, lambda fqn, info: type(info)(outside, info.offset, info.length) if fqn == "model.b" else info)
    state = {"model": {"w": torch.zeros(4, 3)}}
    opened.clear()
    assert outside in _refused(mine, state)
    assert (other / "state" / SHARD).resolve() not in opened and not state["model"]["w"].any()


def test_symlinked_shard_outside_the_checkpoint_is_refused_unopened(saved, opened):
    mine, other = saved
    shard = mine / "state" / SHARD
    shard.unlink()
    shard.symlink_to(other / "state" / SHARD)  # the metadata is untouched; the file it names moved out
    opened.clear()
    message = _refused(mine, _empty())
    assert SHARD in message and "outside state/" in message
    assert (other / "state" / SHARD).resolve() not in opened


def test_a_symlinked_checkpoint_folder_still_loads(saved, tmp_path):
    """Only where a storage path ends up matters, not how the checkpoint itself is reached."""
    mine, _ = saved
    link = tmp_path / "link_step_1"
    link.symlink_to(mine)
    state = _empty()
    ckpt.load_state(link, state)
    assert torch.equal(state["model"]["w"], _weights(0)["w"])


@pytest.mark.parametrize("change, said", [
    (lambda info: type(info)("", info.offset, info.length), "names storage with the path ''"),
    (lambda info: type(info)(".", info.offset, info.length), "outside state/"),
    (lambda info: type(info)("gone.distcp", info.offset, info.length), "gone.distcp, which is missing"),
    (lambda info: type(info)(info.relative_path, -1, info.length), "byte range"),
    (lambda info: "__0_0.distcp", "not a file and byte range"),
])
def test_malformed_storage_entries_are_refused(saved, change, said):
    mine, _ = saved
    _rewrite_storage(mine, lambda fqn, info: change(info))
    assert said in _refused(mine, _empty())


# ---------------------------------------------------------------------------------------------
# Pickled payloads


class _RunsCode:
    """Unpickling it would create `marker`: proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickled_tensor_payload_is_refused_by_name_without_running_it(saved, tmp_path):
    mine, _ = saved
    marker = str(tmp_path / "ran")
    payload = io.BytesIO()
    torch.save(_RunsCode(marker), payload)  # what DCP stores per tensor: a torch.save stream
    shard = mine / "state" / SHARD
    start = shard.stat().st_size
    shard.write_bytes(shard.read_bytes() + payload.getvalue())
    size = len(payload.getvalue())
    _rewrite_storage(mine, lambda fqn, info: type(info)(info.relative_path, start, size) if fqn == "model.w" else info)
    message = _refused(mine, _empty())
    assert f"state/{SHARD} holds a pickled object at model.w; angelptm loads tensors only" in message
    assert "documentation" not in message  # not torch's last line
    assert not os.path.exists(marker)


def test_non_tensor_value_stored_as_pickled_bytes_is_refused(tmp_path):
    folder = ckpt.save_checkpoint(tmp_path / "step_1", tiny_config(tmp_path / "out"),
                                  {"model": {"w": torch.ones(2)}, "note": "pickled by DCP"}, {"step": 1})
    message = _refused(folder, {"model": {"w": torch.zeros(2)}, "note": torch.zeros(1)})
    assert f"state/{SHARD} holds a pickled object at note" in message


def test_metadata_naming_code_is_refused_as_corrupt_without_running_it(saved, tmp_path):
    mine, _ = saved
    marker = str(tmp_path / "ran")
    (mine / "state" / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    assert "state/.metadata is not plain DCP metadata" in _refused(mine, _empty())
    assert not os.path.exists(marker)


# ---------------------------------------------------------------------------------------------
# RNG safetensors files


def _rng_file(folder: Path) -> Path:
    return folder / "rng" / "rank_0.safetensors"


def test_rng_file_loads(saved):
    mine, _ = saved
    rng = dcp_safe.load_safetensors(_rng_file(mine), mine)
    assert rng["cpu"].dtype == torch.uint8 and rng["cpu"].shape == torch.get_rng_state().shape


def _pickled_rng(path: Path, marker: str) -> None:
    torch.save({"cpu": torch.get_rng_state(), "code": _RunsCode(marker)}, path)


@pytest.mark.parametrize("damage", [
    lambda path, marker: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),  # truncated
    lambda path, marker: path.write_bytes(path.read_bytes()[:-1]),                         # one byte short
    lambda path, marker: path.write_bytes(b""),                                            # empty
    _pickled_rng,                                                                          # torch.save
    lambda path, marker: path.unlink(),                                                    # missing
], ids=["truncated", "one-byte-short", "empty", "pickled", "missing"])
def test_damaged_rng_file_is_refused_in_one_line(saved, tmp_path, damage):
    mine, _ = saved
    path, marker = _rng_file(mine), str(tmp_path / "ran")
    damage(path, marker)
    with pytest.raises(UserError) as excinfo:
        dcp_safe.load_safetensors(path, mine)
    message = one_line(str(excinfo.value))
    assert message.startswith(f"checkpoint {mine} is corrupt") and "rng/rank_0.safetensors" in message
    assert not os.path.exists(marker)


def test_rng_file_symlinked_outside_the_checkpoint_is_refused(saved):
    mine, other = saved
    path = _rng_file(mine)
    path.unlink()
    path.symlink_to(_rng_file(other))
    with pytest.raises(UserError, match="resolves outside the checkpoint") as excinfo:
        dcp_safe.load_safetensors(path, mine)
    assert one_line(str(excinfo.value)).startswith(f"checkpoint {mine} is corrupt")
