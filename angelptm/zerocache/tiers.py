"""The three storage tiers: device memory, pinned host memory and NVMe files, and moves between them.

- Host buffers are pinned when the device is a GPU (so copies run as DMA on a side stream) and
  always 4 KiB-aligned, so the same buffer can take part in O_DIRECT file I/O. Unpinned buffers
  of 2 MiB or more ask Linux for transparent huge pages (the CPU AdamW streams several buffers at
  once; one TLB entry per 2 MiB instead of per 4 KiB) and start at staggered offsets, so that
  those streams do not compete for the same cache sets (see benchmarks/zerocache_cpu_adam.py).
- `Transfers` copies between device and host on a side CUDA stream and hands back an event to
  wait on; on a CPU-only machine the copy runs in place and the wait is a no-op.
- `NvmeFile` is one preallocated file per rank under `zero.nvme_dir`, read and written with large
  aligned requests from a thread pool (O_DIRECT when the file system allows it, buffered
  otherwise). The file is unlinked as soon as it is open, so it disappears when the process
  ends however it ends; `close()` frees the space at once.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import mmap
import os
import sys
import uuid
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import torch

from angelptm.errors import UserError
from angelptm.zerocache.ledger import GIB, MemoryLedger

BLOCK = 4096  # O_DIRECT alignment of buffers, offsets and lengths
IO_CHUNK_BYTES = 16 * 2**20  # one request per chunk, so several threads share a large copy
IO_THREADS = 4


HUGE_PAGE = 2 * 2**20
# Large buffers start at staggered offsets within a huge page (a multiple of 4 KiB, 33 of them
# apart): a kernel streaming several buffers at once would otherwise hit the same cache sets with
# all of them (huge pages make that certain), which costs the CPU AdamW a third of its speed.
CACHE_COLOURS = 15
COLOUR_STRIDE = 33 * BLOCK
_MADVISE = ctypes.CDLL(None, use_errno=True).madvise if sys.platform.startswith("linux") else None
_colours = itertools.count()


def host_empty(numel: int, dtype: torch.dtype, pinned: bool) -> torch.Tensor:
    """An uninitialised host tensor whose data starts on a 4 KiB boundary (see the module notes)."""
    nbytes = numel * dtype.itemsize
    large = not pinned and nbytes >= HUGE_PAGE
    shift = (next(_colours) % CACHE_COLOURS) * COLOUR_STRIDE if large else 0
    raw = torch.empty(nbytes + BLOCK + shift, dtype=torch.uint8, pin_memory=pinned)
    start = (-raw.data_ptr()) % BLOCK + shift
    tensor = raw[start : start + nbytes]
    if large and _MADVISE is not None:  # a hint: where THP is off or unsupported it changes nothing
        _MADVISE(ctypes.c_void_p(tensor.data_ptr()), ctypes.c_size_t(nbytes - nbytes % BLOCK), mmap.MADV_HUGEPAGE)
    return tensor.view(dtype)


class Allocator:
    """Allocates device and host tensors and records each one in the ledger under its kind.

    `free` only settles the books; the memory goes back when the caller drops the tensor.
    """

    def __init__(self, device: torch.device, ledger: MemoryLedger):
        self.device = device
        self.ledger = ledger
        self.pinned = device.type == "cuda"

    def empty(self, tier: str, kind: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        if tier == "device":
            tensor = torch.empty(numel, dtype=dtype, device=self.device)
        else:
            tensor = host_empty(numel, dtype, self.pinned)
        self.ledger.add(tier, kind, tensor.untyped_storage().nbytes())
        return tensor

    def zeros(self, tier: str, kind: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        return self.empty(tier, kind, numel, dtype).zero_()

    def free(self, tensor: torch.Tensor, tier: str, kind: str) -> None:
        self.ledger.sub(tier, kind, tensor.untyped_storage().nbytes())


class Pending:
    """A copy in flight; `wait()` blocks the host until it is done."""

    def __init__(self, event: Optional["torch.cuda.Event"] = None):
        self._event = event

    def wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()
            self._event = None


class Transfers:
    """Device <-> host copies that overlap with compute on a GPU and run inline on a CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def copy(self, dst: torch.Tensor, src: torch.Tensor, divisor: Optional[torch.Tensor] = None) -> Pending:
        """dst.copy_(src) (with dtype conversion), or dst = src / divisor for tensors of one dtype
        (`divisor` a scalar on src's device; `src` may be overwritten). Returns once queued."""
        if self._stream is None:
            if divisor is None:
                dst.copy_(src)
            else:
                torch.div(src, divisor, out=dst)  # one pass: the same bytes as the copy
            return Pending()
        if divisor is not None:
            src.div_(divisor)  # on the GPU, before the copy, where it costs next to nothing
        # The side stream must see everything the compute stream wrote to `src` so far.
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        for t in (dst, src):
            if t.is_cuda:
                t.record_stream(self._stream)  # keep caching-allocator blocks alive until done
        return Pending(event)


class IoRequest:
    """Several chunked reads or writes in flight; `wait()` re-raises the first I/O error."""

    def __init__(self, futures: list[Future], what: str, directory: str):
        self._futures = futures
        self._what = what
        self._directory = directory

    def wait(self) -> None:
        try:
            for f in self._futures:
                f.result()
        except OSError as e:
            raise UserError(
                f"zero.nvme_dir={self._directory}: {self._what} failed ({os.strerror(e.errno or 0)}); "
                "check the disk or point zero.nvme_dir at a healthy NVMe folder"
            ) from None
        finally:
            self._futures = []


def nvme_dir_problem(directory: str) -> Optional[str]:
    """Why `directory` cannot hold NVMe pages, or None: it must be a folder, or one new folder in an
    existing parent (a typo in a parent would otherwise create a tree, likely on the wrong disk)."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        return f"zero.nvme_dir={directory} is a file, not a folder; point zero.nvme_dir at a folder on an NVMe drive"
    parent = os.path.dirname(os.path.abspath(directory))
    if not os.path.exists(directory) and not os.path.isdir(parent):
        return (f"zero.nvme_dir={directory}: its parent folder {parent} does not exist; "
                "create it, or point zero.nvme_dir at a folder on an NVMe drive")
    return None


def _nvme_error(directory: str, e: OSError, nbytes: int) -> UserError:
    if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return UserError(
            f"zero.nvme_dir={directory} has no room for {nbytes / GIB:.2f} GB of optimizer state "
            f"({os.strerror(e.errno)}); free space there or point zero.nvme_dir at a larger disk"
        )
    if e.errno in (errno.ENOENT, errno.ENOTDIR) and nvme_dir_problem(directory):
        return UserError(nvme_dir_problem(directory))
    return UserError(
        f"zero.nvme_dir={directory} is not a writable folder ({os.strerror(e.errno or 0)}); "
        "point zero.nvme_dir at a folder this process can write"
    )


def _open_direct(path: str) -> tuple[int, bool]:
    """Open a new file with O_DIRECT if the file system supports it, buffered if not."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL
    direct = getattr(os, "O_DIRECT", 0)
    if direct:
        try:
            return os.open(path, flags | direct, 0o600), True
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: this file system refuses O_DIRECT
                raise
    return os.open(path, flags, 0o600), False


class NvmeFile:
    """One rank's NVMe file of `nbytes` (a multiple of 4 KiB), preallocated at construction."""

    def __init__(self, directory: str, nbytes: int, threads: int = IO_THREADS):
        self.directory = directory
        self.nbytes = nbytes
        try:
            try:
                os.mkdir(directory)  # one new folder at most: a typo in a parent must not create a tree
            except FileExistsError:
                pass
            path = os.path.join(directory, f"zerocache-{os.getpid()}-{uuid.uuid4().hex[:8]}.bin")
            self._fd, self.direct = _open_direct(path)
        except OSError as e:
            raise _nvme_error(directory, e, nbytes) from None
        os.unlink(path)  # the open descriptor keeps the data; nothing outlives the process
        self._closer = weakref.finalize(self, os.close, self._fd)
        try:
            if nbytes:
                os.posix_fallocate(self._fd, 0, nbytes)  # reserve every block now: no ENOSPC later
        except OSError as e:
            self.close()
            raise _nvme_error(directory, e, nbytes) from None
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="zerocache-nvme")

    def _chunks(self, offset: int, buffer: torch.Tensor):
        flat = buffer.view(torch.uint8)
        if offset % BLOCK or flat.numel() % BLOCK or flat.data_ptr() % BLOCK:
            raise ValueError("NVMe I/O needs 4 KiB-aligned offsets, lengths and buffers")
        view = memoryview(flat.numpy())
        for start in range(0, len(view), IO_CHUNK_BYTES):
            yield offset + start, view[start : start + IO_CHUNK_BYTES]

    def _write_all(self, offset: int, view: memoryview) -> None:
        while len(view):
            written = os.pwritev(self._fd, [view], offset)
            offset, view = offset + written, view[written:]

    def _read_all(self, offset: int, view: memoryview) -> None:
        while len(view):
            got = os.preadv(self._fd, [view], offset)
            if got == 0:
                raise OSError(errno.EIO, "unexpected end of file")
            offset, view = offset + got, view[got:]

    def write(self, offset: int, buffer: torch.Tensor) -> IoRequest:
        """Start writing `buffer` (host, aligned) at byte `offset`."""
        futures = [self._pool.submit(self._write_all, o, v) for o, v in self._chunks(offset, buffer)]
        return IoRequest(futures, "write", self.directory)

    def read(self, offset: int, buffer: torch.Tensor) -> IoRequest:
        """Start reading bytes at `offset` into `buffer` (host, aligned)."""
        futures = [self._pool.submit(self._read_all, o, v) for o, v in self._chunks(offset, buffer)]
        return IoRequest(futures, "read", self.directory)

    def close(self) -> None:
        """Release the file (and its disk space); safe to call twice."""
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True)
        self._closer()
