"""NVMe tier bandwidth: ZeROCache's NvmeFile against the raw sequential bandwidth of the same disk.

Raw bandwidth is `dd` with O_DIRECT and 64 MiB blocks into a preallocated file: one stream (what
a plain sequential copy gets) and as many concurrent streams over disjoint quarters as ZeROCache
has I/O threads (what the disk gives to parallel requests; the stricter baseline). ZeROCache
moves the same number of bytes the way the optimizer step does: page slabs (3 × 32 MiB of fp32
state) read and written through `NvmeFile` (4 KiB-aligned buffers, 16 MiB requests on a thread
pool, O_DIRECT where allowed) with `--depth` slabs in flight. The sides alternate for several
rounds in the same folder. Goal: ≥ 85% of raw.

    python benchmarks/zerocache_nvme.py --dir /mnt/nvme/tmp     # default: the system temp folder
    python benchmarks/zerocache_nvme.py --gib 2 --rounds 3

Prints a table and writes benchmarks/results/zerocache_nvme.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import tempfile
import time
from collections import deque
from pathlib import Path

import torch

from angelptm.zerocache.tiers import IO_THREADS, NvmeFile, host_empty

SLAB_BYTES = 3 * 32 * 2**20
DD_BLOCK = 64 * 2**20


def raw_dd(path: str, nbytes: int, write: bool, streams: int) -> float:
    """Seconds for `streams` concurrent dd processes to write (or read) `nbytes` with O_DIRECT,
    each over its own contiguous part of the file."""
    count = nbytes // DD_BLOCK // streams
    commands = []
    for i in range(streams):
        if write:
            commands.append(["dd", "if=/dev/zero", f"of={path}", f"bs={DD_BLOCK}", f"count={count}",
                             f"seek={i * count}", "oflag=direct", "conv=notrunc"])
        else:
            commands.append(["dd", f"if={path}", "of=/dev/null", f"bs={DD_BLOCK}", f"count={count}",
                             f"skip={i * count}", "iflag=direct"])
    start = time.perf_counter()
    running = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for c in commands]
    if any(p.wait() for p in running):
        raise RuntimeError("dd failed")
    return time.perf_counter() - start


def zerocache_io(f: NvmeFile, slabs: list[torch.Tensor], nbytes: int, write: bool, depth: int) -> float:
    """Seconds to move `nbytes` as slab-sized requests, `depth` in flight, as the optimizer does."""
    in_flight: deque = deque()
    start = time.perf_counter()
    for i, offset in enumerate(range(0, nbytes, SLAB_BYTES)):
        slab = slabs[i % len(slabs)]
        in_flight.append(f.write(offset, slab) if write else f.read(offset, slab))
        if len(in_flight) >= depth:
            in_flight.popleft().wait()
    while in_flight:
        in_flight.popleft().wait()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--gib", type=float, default=2.0, help="bytes moved per measurement")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--depth", type=int, default=3, help="slabs in flight (prefetch_pages + 1)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "zerocache_nvme.json"))
    args = parser.parse_args()
    quantum = math.lcm(SLAB_BYTES, DD_BLOCK * IO_THREADS)  # whole slabs, and whole dd blocks per stream
    nbytes = max(1, int(args.gib * 2**30) // quantum) * quantum
    folder = tempfile.mkdtemp(prefix="zerocache-bench-", dir=args.dir)
    dd_path = os.path.join(folder, "raw.bin")
    fd = os.open(dd_path, os.O_RDWR | os.O_CREAT, 0o600)
    os.posix_fallocate(fd, 0, nbytes)
    os.close(fd)
    f = NvmeFile(folder, nbytes)
    slabs = [host_empty(SLAB_BYTES // 4, torch.float32, pinned=False).normal_() for _ in range(args.depth)]
    sides = ("dd1", f"dd{IO_THREADS}", "zerocache")
    times = {f"{side}_{kind}": [] for side in sides for kind in ("write", "read")}
    try:
        for r in range(args.rounds):
            for write in (True, False):
                kind = "write" if write else "read"
                runs = [("dd1", raw_dd, (dd_path, nbytes, write, 1)),
                        (f"dd{IO_THREADS}", raw_dd, (dd_path, nbytes, write, IO_THREADS)),
                        ("zerocache", zerocache_io, (f, slabs, nbytes, write, args.depth))]
                for name, fn, fn_args in (runs if r % 2 == 0 else runs[::-1]):
                    times[f"{name}_{kind}"].append(fn(*fn_args))
    finally:
        f.close()
        os.unlink(dd_path)
        os.rmdir(folder)
    gbps = {k: nbytes / statistics.median(v) / 1e9 for k, v in times.items()}
    ratios = {}
    many = f"dd{IO_THREADS}"
    print(f"{'':>6} {'dd 1 stream':>12} {f'dd {IO_THREADS} streams':>13} {'zerocache':>10} "
          f"{'vs 1 stream':>18} {f'vs {IO_THREADS} streams':>18}  (GB/s; ratio median (min-max))")
    for kind in ("write", "read"):
        row = []
        for raw in ("dd1", many):
            per_round = [d / z for d, z in zip(times[f"{raw}_{kind}"], times[f"zerocache_{kind}"])]
            ratios[f"{kind} zerocache / {raw}"] = r = {
                "min": min(per_round), "median": statistics.median(per_round), "max": max(per_round)}
            row.append(f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})")
        print(f"{kind:>6} {gbps['dd1_' + kind]:>12.2f} {gbps[many + '_' + kind]:>13.2f} "
              f"{gbps['zerocache_' + kind]:>10.2f} {row[0]:>18} {row[1]:>18}")
    meta = {"dir": args.dir, "bytes": nbytes, "rounds": args.rounds, "depth": args.depth, "o_direct": f.direct,
            "slab_bytes": SLAB_BYTES, "dd_block": DD_BLOCK}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "GBps": gbps, "ratios": ratios, "seconds": times}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
