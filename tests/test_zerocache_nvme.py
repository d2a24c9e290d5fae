"""The NVMe tier: aligned chunked I/O, files gone at exit, clear errors for bad folders, no state lost."""

import importlib
import os
import resource
import signal

import pytest
import torch

from angelptm.distributed.spawn import run_distributed
from angelptm.errors import UserError
from angelptm.zerocache import ZeROCacheOptimizer
from angelptm.zerocache.tiers import IO_CHUNK_BYTES, NvmeFile, host_empty
from conftest import one_line
from test_zerocache_support import HYPER, SMALL_PAGES, batches, loss_of, tiny_model


def test_nvme_file_round_trips_chunked_aligned_io(tmp_path):
    numel = (IO_CHUNK_BYTES + 3 * 4096) // 4  # more than one chunk, so several threads share it
    data = host_empty(numel, torch.float32, pinned=False).copy_(torch.randn(numel))
    back = host_empty(numel, torch.float32, pinned=False).zero_()
    f = NvmeFile(str(tmp_path), 2 * data.numel() * 4)
    try:
        assert os.listdir(tmp_path) == []  # unlinked at once: nothing can be left behind
        f.write(4096 * 2, data).wait()
        f.read(4096 * 2, back).wait()
        assert torch.equal(back, data)
        with pytest.raises(ValueError, match="aligned"):
            f.read(100, back)
    finally:
        f.close()


def _train_without_closing(nvme_dir: str) -> tuple[list[str], int]:
    """Train a step with NVMe state, then let the process end without close()."""
    model = tiny_model()
    opt = ZeROCacheOptimizer(model, None, **HYPER, stage=2, page_mb=SMALL_PAGES, offload_optimizer="nvme",
                             nvme_dir=nvme_dir)
    loss_of(model, batches(1, 2)[0]).backward()
    opt.step()
    return os.listdir(nvme_dir), sum(target.startswith(nvme_dir) for target in _open_files())


def _open_files() -> list[str]:
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:  # the descriptor listdir itself used
            pass
    return targets


@pytest.mark.slow
def test_nvme_files_are_removed_at_exit(tmp_path):
    nvme_dir = str(tmp_path / "nvme")
    listing, open_files = run_distributed(_train_without_closing, 1, nvme_dir)[0]
    assert open_files == 1  # the state lives in one open, already unlinked file
    assert listing == [] and os.listdir(nvme_dir) == []


def _try_bad_folder(nvme_dir: str, how: str) -> tuple[str, bool, list[float]]:
    """Build an NVMe optimizer where it cannot work; report the error, whether the weights are
    untouched, and the losses of training on afterwards with host offload instead."""
    if how == "full":  # a disk that takes no more bytes: writes past 64 KiB fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
    else:  # a folder an unprivileged user may not write
        os.makedirs(nvme_dir, mode=0o555)
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    as_root = how == "unwritable" and os.geteuid() == 0
    if as_root:  # root writes anywhere: become an ordinary user for the attempt
        importlib.import_module("torch._dynamo")  # torch.optim imports it lazily; that user cannot
        os.seteuid(65534)
    try:
        ZeROCacheOptimizer(model, None, **HYPER, stage=1, page_mb=SMALL_PAGES, offload_optimizer="nvme",
                           nvme_dir=nvme_dir)
        message = ""
    except UserError as e:
        message = str(e)
    finally:
        if as_root:
            os.seteuid(0)
    untouched = all(torch.equal(before[n], p) for n, p in model.named_parameters())
    opt = ZeROCacheOptimizer(model, None, **HYPER, stage=1, page_mb=SMALL_PAGES, offload_optimizer="cpu")
    losses = []
    for rows in batches(3, 4):
        loss = loss_of(model, rows)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return message, untouched, losses


@pytest.mark.slow
@pytest.mark.parametrize("how, words", [("full", "no room"), ("unwritable", "not a writable folder")])
def test_bad_nvme_dir_is_one_clear_line_and_loses_no_state(tmp_path, how, words):
    message, untouched, losses = run_distributed(_try_bad_folder, 1, str(tmp_path / "nvme"), how)[0]
    assert "zero.nvme_dir=" in one_line(message) and words in message
    assert untouched
    assert losses[-1] < losses[0]  # the same model still trains
