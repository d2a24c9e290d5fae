"""Kernel parity on the device: each Triton cast against its torch reference, with enough detail to
diagnose a mismatch from the JSON alone.

For every check the suite records whether the FP8 bytes and the scales are identical and, where
they are not: how many FP8 values differ, the largest difference in FP8 ulps (steps along the
FP8 number line; +0 and -0 are the same point, so a sign-of-zero difference counts 0 ulps and is
counted separately), and the first differing element with its input value, the scale each side
used, and both codes; likewise for the scales (count, largest relative difference, an example).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from angelptm.fp8 import E4M3, E5M2, kernels
from angelptm.fp8.scaling import Quantized


def awkward_input(rows: int, cols: int, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Values over 16 binades (FP8 subnormals and underflow after scaling, of both signs), exact
    zeros and negative zeros, in `dtype`: bfloat16 like activations and gradients under autocast,
    float32 like master weights."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(rows, cols, device=device, generator=gen)
    x = x * torch.exp2(torch.randint(-12, 4, (rows, cols), device=device, generator=gen).float())
    flat = x.view(-1)
    flat[::7] = 0.0
    flat[3::11] = -0.0
    return x.to(dtype)


def checks(x: torch.Tensor) -> dict[str, Callable[[Optional[str]], tuple]]:
    """name -> fn(backend) returning (copies, sources, recorded amax or None): the Quantized copies
    one call emits and, aligned with each, the tensor it quantizes (x, or x.t() for a transposed
    copy), so an element's input value can be looked up."""
    dev = x.device
    xt = x.t()

    def delayed(backend):
        record = torch.zeros(1, device=dev)
        q = kernels.cast_tensorwise(x, E4M3, scale=torch.full((), 7.5, device=dev), transpose=True,
                                    record_amax=record, backend=backend)
        return q, (x, xt), record
    return {
        "cast_tensorwise+T e4m3": lambda be: (kernels.cast_tensorwise(x, E4M3, transpose=True, backend=be),
                                              (x, xt), None),
        "cast_tensorwise+T e5m2 pow2": lambda be: (kernels.cast_tensorwise(x, E5M2, transpose=True, power_of_two=True,
                                                                           backend=be), (x, xt), None),
        "cast_tensorwise+T delayed": delayed,
        "cast_rowwise rows+T": lambda be: (kernels.cast_rowwise(x, E4M3, transpose=True, backend=be), (x, xt), None),
        "cast_tiles 1x128 rows": lambda be: (kernels.cast_tiles(x, E4M3, backend=be)[:1], (x,), None),
        "cast_tiles 1x128 T": lambda be: (kernels.cast_tiles(x, E4M3, rows=False, transpose=True, backend=be)[1:],
                                          (xt,), None),
        "cast_tiles 1x128 rows+T": lambda be: (kernels.cast_tiles(x, E4M3, transpose=True, backend=be), (x, xt), None),
        "cast_blocks+T 128x128": lambda be: (kernels.cast_blocks(x, E4M3, transpose=True, backend=be), (x, xt), None),
    }


def fp8_ordinal(codes: torch.Tensor) -> torch.Tensor:
    """Position on the FP8 number line of each sign-magnitude code (uint8): consecutive values
    differ by one, and +0 and -0 share position 0."""
    magnitude = (codes & 0x7F).to(torch.int32)
    return torch.where(codes >= 0x80, -magnitude, magnitude)


def _first(mask: torch.Tensor) -> tuple[int, int]:
    flat = int(mask.flatten().to(torch.uint8).argmax())
    return divmod(flat, mask.shape[1])


def _scale_at(q: Quantized, r: int, c: int) -> float:
    scale_inv = q.expanded_scale_inv()
    return float(scale_inv if scale_inv.dim() == 0 else scale_inv[r, c])


def compare(ours: Quantized, ref: Quantized, source: torch.Tensor) -> dict:
    """Where two quantizations of `source` differ, in the terms the module docstring lists."""
    a, b = ours.data.view(torch.uint8), ref.data.view(torch.uint8)
    report: dict = {"values": a.numel()}
    if a.shape != b.shape or ours.kind != ref.kind:
        report["layout"] = f"{ours.kind}{tuple(a.shape)} vs {ref.kind}{tuple(b.shape)}"
        return report
    differ = a != b
    report["mismatches"] = int(differ.sum())
    if report["mismatches"]:
        ulps = (fp8_ordinal(a) - fp8_ordinal(b)).abs()
        r, c = _first(differ)
        report.update(
            max_ulps=int(ulps.max()), signed_zero_only=int((differ & (ulps == 0)).sum()),
            example={"index": [r, c], "input": float(source[r, c]),
                     "scale_inv": {"ours": _scale_at(ours, r, c), "reference": _scale_at(ref, r, c)},
                     "code": {"ours": f"0x{int(a[r, c]):02x}", "reference": f"0x{int(b[r, c]):02x}"},
                     "value": {"ours": float(ours.data[r, c].float()), "reference": float(ref.data[r, c].float())}})
    sa, sb = ours.scale_inv.float(), ref.scale_inv.float()
    scale_differ = sa != sb
    report["scale_mismatches"] = int(scale_differ.sum())
    if report["scale_mismatches"]:
        rel = ((sa - sb).abs() / sb.abs()).max()
        flat = int(scale_differ.flatten().to(torch.uint8).argmax())
        report.update(scale_max_rel_diff=float(rel),
                      scale_example={"index": flat, "ours": float(sa.flatten()[flat]),
                                     "reference": float(sb.flatten()[flat])})
    return report


def run_checks(x: torch.Tensor, guarded, backend: Optional[str] = None) -> tuple[dict, dict]:
    """({name: bit-exact?}, {name: per-copy reports}) for every check, `backend` (the dispatch
    default when None) against the torch references; `guarded(fn, key)` runs one check so that a
    failure is recorded instead of ending the section."""
    bit_exact, details = {}, {}

    def one(fn):
        (ours, sources, rec_ours), (ref, _, rec_ref) = fn(backend), fn("torch")
        reports = [compare(o, r, s) for o, r, s in zip(ours, ref, sources) if o is not None]
        ok = all(not rep.get("layout") and not rep["mismatches"] and not rep["scale_mismatches"] for rep in reports)
        if rec_ours is not None:
            same_amax = torch.equal(rec_ours, rec_ref)
            reports.append({"recorded_amax": {"ours": float(rec_ours), "reference": float(rec_ref)}})
            ok = ok and same_amax
        return ok, reports
    for name, fn in checks(x).items():
        result = guarded(lambda: one(fn), name)
        if result is not None:
            bit_exact[name], details[name] = result
    return bit_exact, details
