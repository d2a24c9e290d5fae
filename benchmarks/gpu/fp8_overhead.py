"""Where the time of one linear layer's forward+backward goes: the host (Python, dispatch, launches)
or the device.

Per call, for bf16 `nn.Linear` and each FP8 recipe at one shape:

  host_us       time to issue the call: the loop runs without waiting and the device is
                synchronised once after it, so the host is measured while it runs ahead
  wall_us       issue plus completion over the same loop: what an eager training loop gets
  device_ops    kernels, copies and memsets the device ran (from a torch.profiler trace)
  device_us     their summed duration
  device_kernels  per kernel name: launches and microseconds per call, longest first
  top_host_ops  the operators with the largest host-side self time (profiled, so inflated;
                their counts are exact)
  top_python    the Python functions with the largest own time under cProfile (Triton's
                launcher is Python, so a launch shows here and not among the operators)

host_us well above device_us means the case is bound by the host: a larger layer, more tokens
per call, or CUDA-graph replay hides it, and fewer launches shrink it; device_us near wall_us
means the kernels themselves are the cost. At a shape bound by the device, `device_trace` alone
splits that cost by kernel: the GEMMs against the casts around them.

`host_costs` prices the pieces a call is made of on this host, on tiny tensors: an empty
allocation, a torch reduction, one Triton cast launch (its allocations included), the launch of
a Triton kernel of one argument (the floor under any Triton launch) and one `torch._scaled_mm`.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import time
from pathlib import Path
from typing import Callable

import torch
from torch.autograd import DeviceType

from harness import sync

from angelptm.fp8 import E4M3, kernels

if kernels.HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _one_argument_kernel(x_ptr):
        tl.store(x_ptr, tl.load(x_ptr))


def profile_call(step: Callable[[], object], device: torch.device, calls: int = 5) -> dict:
    result = device_trace(step, device, calls)  # warms the step up, too
    start = time.perf_counter()
    for _ in range(calls):
        step()
    issued = time.perf_counter()
    sync(device)
    done = time.perf_counter()
    result.update(host_us=(issued - start) / calls * 1e6, wall_us=(done - start) / calls * 1e6)
    result["top_python"] = python_hotspots(step, device, calls)
    return result


def device_trace(step: Callable[[], object], device: torch.device, calls: int = 5) -> dict:
    """The profiled part of `profile_call`, after one call to warm up: device ops and time per
    kernel, and the host operators. Alone, it is the breakdown of a case bound by the device (host
    figures then say nothing)."""
    step()
    sync(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(calls):
            step()
        sync(device)
    device_events = [e for e in prof.events() if e.device_type != DeviceType.CPU]
    result = {"device_ops": len(device_events) / calls}
    result["device_us"] = sum(e.time_range.elapsed_us() for e in device_events) / calls
    kernels: dict[str, list[float]] = {}
    for e in device_events:
        count_us = kernels.setdefault(e.name, [0, 0.0])
        count_us[0] += 1 / calls
        count_us[1] += e.time_range.elapsed_us() / calls
    result["device_kernels"] = [{"kernel": name, "launches": n, "us": us}
                                for name, (n, us) in sorted(kernels.items(), key=lambda kv: -kv[1][1])]
    by_self_time = sorted((e for e in prof.key_averages() if e.device_type == DeviceType.CPU),
                          key=lambda e: e.self_cpu_time_total, reverse=True)
    result["top_host_ops"] = [{"op": e.key, "calls": e.count / calls, "self_us": e.self_cpu_time_total / calls}
                              for e in by_self_time[:8]]
    result["host_ops"] = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")) / calls
    return result


def python_hotspots(step: Callable[[], object], device: torch.device, calls: int, top: int = 10) -> list[dict]:
    """Own (not cumulative) time per call of the Python functions a call spends most in."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        step()
    profiler.disable()
    sync(device)
    stats = pstats.Stats(profiler).stats  # (file, line, function) -> (calls, primitive calls, own s, cum s, callers)
    rows = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    return [{"function": f"{Path(file).name}:{line}({name})", "calls": n / calls, "own_us": own / calls * 1e6}
            for (file, line, name), (n, _, own, _, _) in rows]


def host_costs(device: torch.device, calls: int = 200) -> dict:
    """Host microseconds per call of the building blocks of a Float8Linear call (see above)."""
    x = torch.randn(16, 16, device=device, dtype=torch.bfloat16)
    scale = torch.ones((), device=device)
    x8 = x.to(torch.float8_e4m3fn)
    pieces = {
        "torch.empty": lambda: torch.empty((16, 16), dtype=torch.float8_e4m3fn, device=device),
        "vector_norm": lambda: torch.linalg.vector_norm(x, float("inf")),
        "cast launch (delayed, rows)": lambda: kernels.cast_tensorwise(x, E4M3, scale=scale),
        "_scaled_mm": lambda: torch._scaled_mm(x8, x8.t(), scale, scale, out_dtype=torch.bfloat16),
    }
    if kernels.HAVE_TRITON and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        pieces["Triton launch, one argument"] = lambda: _one_argument_kernel[(1,)](scale)
    costs = {}
    for name, fn in pieces.items():
        for _ in range(10):
            fn()
        sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        costs[name] = (time.perf_counter() - start) / calls * 1e6
        sync(device)
    return costs
