"""What each FP8 Triton kernel costs an H100 in registers, spills and occupancy, found on a CPU.

Triton compiles for a GPU it does not have: this script runs each cast of `angelptm.fp8.kernels`
and the blockwise GEMM with the launches recorded instead of run, so it sees exactly the kernels,
constants and warp counts the library launches, compiles each for sm_90 (Hopper) and reads the
binary's resource usage with the `cuobjdump` that ships with Triton. For a kernel that streams
memory, as the casts do, spilled registers are extra memory traffic and fewer resident warps hide
less latency: the two things to rule out before a card is at hand to time them (the GPU suite's
`kernels` section does that).

    python benchmarks/fp8_kernel_resources.py [--out benchmarks/results/fp8_kernel_resources.json]

Per launch (per autotuning configuration for the GEMM): registers per thread, bytes of stack per
thread (spill space), shared memory per program, and warps resident per SM as registers, shared
memory and threads allow (64 at most on Hopper).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import tempfile
from pathlib import Path

import torch

os.environ.pop("TRITON_INTERPRET", None)  # compile, not interpret
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # what Triton releases before 3.10 do unasked

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from angelptm.fp8 import E4M3, kernels  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
REGISTERS_PER_SM, MAX_WARPS_PER_SM, MAX_BLOCKS_PER_SM = 65536, 64, 32
SHARED_PER_SM, SHARED_RESERVED_PER_BLOCK = 228 * 1024, 1024


class _Recorder:
    """Stands where `kernels._tk()` returns the Triton kernels module: `kernel[grid](...)` records
    the launch instead of making it."""

    def __init__(self):
        self.launches: list[tuple] = []

    def __getattr__(self, name: str):
        from angelptm.fp8 import triton_kernels
        fn = getattr(triton_kernels, name)
        recorder = self

        class Launch:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: recorder.launches.append((fn, args, kwargs))
        return Launch()


def recorded_launches(cast) -> list[tuple]:
    recorder = _Recorder()
    real = kernels._tk
    kernels._tk = lambda: recorder
    try:
        cast()
    finally:
        kernels._tk = real
    return recorder.launches


def compile_for_hopper(fn, args: tuple, kwargs: dict) -> dict:
    """Registers, stack bytes and resident warps of `fn` launched with these arguments on sm_90.

    The arguments go through Triton's own binder, as a launch's do, so the kernel is specialized
    as a launch would specialize it (pointers and sizes divisible by 16 marked so, which lets loads
    vectorize); the tensors are CPU ones, whose allocations are aligned as a GPU's are.
    """
    backend = make_backend(TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {"debug": False, **kwargs}
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET, options=options.__dict__)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(cubin)], capture_output=True,
                               text=True, check=True).stdout
    registers, stack = map(int, re.search(r"REG:(\d+).*?STACK:(\d+)", usage, re.S).groups())
    warps, shared = options.num_warps, compiled.metadata.shared
    blocks = min(REGISTERS_PER_SM // (registers * 32 * warps), MAX_WARPS_PER_SM // warps, MAX_BLOCKS_PER_SM,
                 SHARED_PER_SM // (shared + SHARED_RESERVED_PER_BLOCK))
    return {"kernel": fn.__name__, "num_warps": warps, "num_stages": options.num_stages,
            "tile": {k: v for k, v in kwargs.items() if k.startswith(("BLOCK", "GROUP", "SUB"))},
            "registers": registers, "stack_bytes": stack, "shared_bytes": shared, "warps_per_sm": blocks * warps}


def configurations(fn, kwargs: dict) -> list[tuple]:
    """(JIT function, launch keywords) per configuration an autotuned kernel may pick; one otherwise."""
    if isinstance(fn, triton.runtime.Autotuner):
        return [(fn.fn, {**kwargs, **config.all_kwargs()}) for config in fn.configs]
    return [(fn, kwargs)]


def casts(x: torch.Tensor) -> dict:
    scale, record = torch.full((), 7.5), torch.zeros(1)
    triton_backend = dict(backend="triton")
    return {
        "cast_tensorwise+T (current)": lambda: kernels.cast_tensorwise(x, E4M3, transpose=True, **triton_backend),
        "cast_tensorwise+T (delayed)": lambda: kernels.cast_tensorwise(x, E4M3, scale=scale, transpose=True,
                                                                       record_amax=record, **triton_backend),
        "cast_tensorwise rows (delayed)": lambda: kernels.cast_tensorwise(x, E4M3, scale=scale, **triton_backend),
        "cast_rowwise rows+T": lambda: kernels.cast_rowwise(x, E4M3, transpose=True, **triton_backend),
        "cast_tiles 1x128 rows": lambda: kernels.cast_tiles(x, E4M3, **triton_backend),
        "cast_tiles 1x128 T": lambda: kernels.cast_tiles(x, E4M3, rows=False, transpose=True, **triton_backend),
        "cast_tiles 1x128 rows+T": lambda: kernels.cast_tiles(x, E4M3, transpose=True, **triton_backend),
        "cast_blocks+T 128x128": lambda: kernels.cast_blocks(x, E4M3, transpose=True, **triton_backend),
    }


def gemms() -> dict:
    """The blockwise GEMM on 1x128-tiled activations, against 128x128-block weights and 1x128 tiles."""
    a = kernels.cast_tiles(torch.randn(512, 1024), E4M3, backend="torch")[0]
    w = torch.randn(384, 1024)
    b_blocks = kernels.cast_blocks(w, E4M3, backend="torch")[0]
    b_tiles = kernels.cast_tiles(w, E4M3, backend="torch")[0]
    return {"blockwise_mm x 128x128": lambda: kernels.blockwise_mm(a, b_blocks, torch.bfloat16, backend="triton"),
            "blockwise_mm x 1x128": lambda: kernels.blockwise_mm(a, b_tiles, torch.bfloat16, backend="triton")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fp8_kernel_resources.json")
    args = parser.parse_args()
    calls = {(name, "bfloat16"): call for name, call in gemms().items()}
    for dtype in (torch.bfloat16, torch.float32):
        calls |= {(name, str(dtype).removeprefix("torch.")): call
                  for name, call in casts(torch.zeros(256, 384, dtype=dtype)).items()}
    rows = []
    for (name, source), call in calls.items():
        for fn, launch_args, launch_kwargs in recorded_launches(call):
            for jit_fn, config_kwargs in configurations(fn, launch_kwargs):
                row = {"call": name, "source": source, **compile_for_hopper(jit_fn, launch_args, config_kwargs)}
                rows.append(row)
                print(f"{row['call']:30s} {row['source']:8s} {row['kernel']:21s} warps {row['num_warps']} "
                      f"stages {row['num_stages']} {json.dumps(row['tile']):52s} registers {row['registers']:3d}  "
                      f"stack {row['stack_bytes']:3d} B  shared {row['shared_bytes'] // 1024:3d} KiB  "
                      f"warps/SM {row['warps_per_sm']:2d}", flush=True)
    args.out.write_text(json.dumps({"target": "sm_90", "triton": triton.__version__, "torch": torch.__version__,
                                    "python": platform.python_version(), "launches": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
