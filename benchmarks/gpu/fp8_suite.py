"""GPU suite: Float8Linear vs bf16 nn.Linear, cast kernels vs copy, ~1B Llama training step, ZeROCache on CUDA.

Run through `benchmarks/gpu/run.sh OUTDIR [--dry-run]`. Sections, each under its own time
budget inside one global deadline (whatever does not fit is recorded as skipped):

  env       torch/triton versions, GPU; ceilings: device copy GB/s, bf16 and FP8 GEMM TFLOP/s; the
            FP8 GEMM with fast accumulation against without, at training shapes
  parity    each Triton kernel against its torch reference on the device (bit for bit, with
            mismatch counts, FP8-ulp distances and examples: see fp8_parity.py), the blockwise
            GEMM against its reference, Float8Linear errors against FP64
  overhead  one fwd+bwd at 2048^3 per recipe and for bf16: host issue time, wall time, device
            kernel count and time, top host ops (fp8_overhead.py); then at 8192^3, bound by the
            device, its time per kernel: the GEMMs against the casts
  linear    fwd+bwd (weight cast included) per recipe vs bf16, M=K=N in {1024, 2048, 4096, 8192}
            and the Llama-3-8B MLP shapes; TFLOP/s and speedup, eagerly and as CUDA-graph replays
            (device time alone)
  e2e       a ~1.1B-parameter Llama trained a few steps in bf16 autocast and, from the same
            weights on the same batches, in FP8 per recipe; tokens/s, MFU and both loss curves
            (fp8_e2e.py)
  kernels   each cast's bandwidth as a fraction of a device-to-device copy
  compiled  what `train.compile` changes: the end-to-end pair with both models' blocks compiled, then
            fwd+bwd of bf16 and FP8 layers, each under torch.compile, at two sizes
  zerocache a small Llama trained ~10 steps by ZeROCacheOptimizer (stage 0; stage 3; stage 3 with
            state and parameters in pinned host memory; stage 1 with state on NVMe under OUTDIR;
            stage 3 FP8 with FP8 all-gather) against torch AdamW on the same model: per-step
            losses, step times, memory ledger (zerocache_check.py); last, because a device fault
            in code never run on a GPU before would leave the CUDA context unusable

Every comparison alternates its candidates in the same process; ratios are min/median/max
over repeats. Results go to OUTDIR/fp8_suite.json after every section.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import platform
import sys
import traceback
from pathlib import Path

import torch
from torch import nn

from fp8_e2e import E2E_SIZES, run_e2e
from fp8_overhead import device_trace, host_costs, profile_call
from fp8_parity import awkward_input, run_checks
from fp8_report import summary
from harness import Deadline, OutOfTime, compare, graphed, median, ratio_stats
from zerocache_check import ZEROCACHE_SIZES, run_zerocache

from angelptm.fp8 import E4M3, Float8Linear, kernels, update_float8_scales
from angelptm.fp8.gemm import blockwise_scaled_mm, native_blockwise, scaled_mm

RECIPES = ("tensorwise", "delayed", "rowwise", "blockwise")

FULL = dict(
    squares=[1024, 2048, 4096, 8192], overhead_n=2048, device_bound_n=8192,
    mlp={"llama3_8b_w1/w3": (8192, 4096, 14336), "llama3_8b_w2": (8192, 14336, 4096)},
    kernel_shape=(8192, 8192), ceiling_n=8192, copy_bytes=1 << 30, parity_shape=(1000, 1040),
    repeats=5, target_ms=40.0, e2e=E2E_SIZES["full"], zerocache=ZEROCACHE_SIZES["full"],
    compiled=dict(squares=[2048, 8192], recipes=("tensorwise", "delayed", "rowwise"),
                  e2e_recipes=("tensorwise", "rowwise")),
    budgets={"env": 25, "parity": 40, "overhead": 25, "linear": 80, "kernels": 30, "e2e": 70, "compiled": 180,
             "zerocache": 60},
)
DRY = dict(
    squares=[64, 128, 192], overhead_n=128, device_bound_n=192,
    mlp={"mlp_up": (64, 64, 224), "mlp_down": (64, 224, 64)},
    kernel_shape=(256, 384), ceiling_n=128, copy_bytes=1 << 20, parity_shape=(100, 136),
    repeats=2, target_ms=5.0, e2e=E2E_SIZES["dry"], zerocache=ZEROCACHE_SIZES["dry"],
    compiled=dict(squares=[128], recipes=("tensorwise", "delayed", "rowwise"), e2e_recipes=("tensorwise",)),
    budgets={"env": 30, "parity": 30, "overhead": 30, "linear": 60, "kernels": 30, "e2e": 60, "compiled": 150,
             "zerocache": 30},
)
SECTIONS = ("env", "parity", "overhead", "linear", "e2e", "kernels", "compiled", "zerocache")


def guarded(fn, errors: dict, key: str):
    """fn(), or None with the failure recorded under errors[key]: one kernel or recipe that fails
    on this machine must not take the rest of its section down."""
    try:
        return fn()
    except OutOfTime:
        raise
    except Exception:
        errors[key] = traceback.format_exc()
        print(f"{key}: {errors[key]}", file=sys.stderr, flush=True)
        return None


def linear_steps(m: int, k: int, n: int, device: torch.device, recipes=RECIPES, compiled: bool = False) -> dict:
    """name -> a fwd+bwd call of one bf16 layer (and its inputs), for bf16 and each recipe, eager or
    under torch.compile; the FP8 steps cast the weight every call (eager: the cache is dropped), and
    every call reads a new view of the input, as each step of training brings a new activation (an
    FP8 layer reuses the cast of the tensor it was last given)."""
    base = nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(m, n, device=device, dtype=torch.bfloat16)
    # Static shapes: each size gets its own graph, as a training run of fixed shapes does (the second
    # size would otherwise recompile the shared forward with dynamic shapes).
    wrap = functools.partial(torch.compile, dynamic=False) if compiled else (lambda module: module)
    run_base = wrap(base)
    steps = {"bf16": lambda: torch.autograd.grad(run_base(x.view_as(x)), (x, base.weight), dy)}
    errors = {}

    def fp8_step(recipe: str):
        layer = Float8Linear.from_linear(base, recipe)
        run = wrap(layer)
        torch.autograd.grad(run(x), (x, layer.weight), dy)
        update_float8_scales(layer)  # delayed: time the steady state, not the first step

        def step():
            layer.refresh_weight()
            return torch.autograd.grad(run(x.view_as(x)), (x, layer.weight), dy)
        return step
    for recipe in recipes:
        step = guarded(lambda: fp8_step(recipe), errors, recipe)
        if step is not None:
            steps[recipe] = step
    return {"steps": steps, "errors": errors}


def speedups(samples: dict[str, list[float]], flops: int) -> dict:
    """Per candidate (bf16 and the recipes timed): median ms, TFLOP/s, and speedup over bf16."""
    return {name: {"ms": median(t), "TFLOPs": flops / median(t) / 1e9, "speedup": ratio_stats(samples["bf16"], t)}
            for name, t in samples.items()}


class Suite:
    def __init__(self, outdir: Path, dry_run: bool, budget_s: float):
        self.outdir, self.dry_run = outdir, dry_run
        self.sizes = DRY if dry_run else FULL
        self.device = torch.device("cpu" if dry_run else "cuda")
        self.deadline = Deadline(budget_s)
        self.results: dict = {"dry_run": dry_run, "sections": {}}

    def section_deadline(self, name: str) -> Deadline:
        return Deadline(min(self.sizes["budgets"][name], self.deadline.left()))

    def save(self) -> None:
        self.results["elapsed_s"] = round(self.deadline.elapsed(), 1)
        (self.outdir / "fp8_suite.json").write_text(json.dumps(self.results, indent=2, default=str))

    def run(self, name: str, fn) -> None:
        print(f"[{self.deadline.elapsed():6.1f}s] {name} ...", flush=True)
        section: dict = {}
        self.results["sections"][name] = section
        if self.deadline.left() < 10:
            section["skipped"] = "global deadline reached"
        else:
            try:
                fn(section, self.section_deadline(name))
            except OutOfTime as e:
                section["skipped_from"] = f"section budget spent at {e}"
            except Exception:
                section["error"] = traceback.format_exc()
                print(section["error"], file=sys.stderr, flush=True)
        self.free()
        self.save()

    def free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------------------------------

    def env(self, out: dict, deadline: Deadline) -> None:
        try:
            import triton
            triton_version = triton.__version__
        except ImportError:  # CPU-only installs run the torch references
            triton_version = None
        dev = self.device
        out.update(torch=torch.__version__, triton=triton_version, python=platform.python_version(),
                   device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
                   cuda=torch.version.cuda)
        n = self.sizes["copy_bytes"]
        out["copy_GBps"] = 2 * n / median(self._copy_ms(n, deadline)) / 1e6
        k = self.sizes["ceiling_n"]
        a = torch.randn(k, k, device=dev, dtype=torch.bfloat16)
        b = torch.randn(k, k, device=dev, dtype=torch.bfloat16)
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
        one = torch.ones((), device=dev)
        qa, qb = kernels.cast_tiles(a, E4M3)[0], kernels.cast_blocks(b, E4M3)[0]
        candidates = {
            "bf16": lambda: a @ b,
            "fp8": lambda: torch._scaled_mm(a8, b8.t(), one, one, out_dtype=torch.bfloat16),
            "fp8_fast_accum": lambda: torch._scaled_mm(a8, b8.t(), one, one, out_dtype=torch.bfloat16,
                                                       use_fast_accum=True),
            "blockwise_triton": lambda: kernels.blockwise_mm(qa, qb, torch.bfloat16),
        }
        # Which blockwise GEMM the recipe gets here: cuBLASLt's, where the probe admits it.
        out["blockwise_native"] = {f"tiles x {kind}s -> {str(dtype).removeprefix('torch.')}":
                                   native_blockwise(dev, kind, dtype)
                                   for kind in ("block", "tile") for dtype in (torch.bfloat16, torch.float32)}
        if native_blockwise(dev, "block", torch.bfloat16):
            candidates["blockwise_cublas"] = lambda: blockwise_scaled_mm(qa, qb, torch.bfloat16)
        samples = compare(candidates, dev, deadline, repeats=3)
        for name in samples:
            out[f"{name}_TFLOPs"] = 2 * k**3 / median(samples[name]) / 1e9
        out["ceiling_shape"] = k
        out["fast_accum_speedup"] = self._fast_accum_speedups(deadline)

    def _fast_accum_speedups(self, deadline: Deadline) -> dict:
        """Whether the forward GEMM's fast accumulation (torchao's choice too) pays on this card: its
        speedup over FP32-promoted accumulation, per training shape (M, K, N)."""
        dev, s = self.device, self.sizes["overhead_n"]
        found = {}
        for label, (m, k, n) in ({f"{s}^3": (s, s, s)} | self.sizes["mlp"]).items():
            a = torch.randn(m, k, device=dev).to(torch.float8_e4m3fn)
            b = torch.randn(n, k, device=dev).to(torch.float8_e4m3fn)
            one = torch.ones((), device=dev)
            gemm = functools.partial(torch._scaled_mm, a, b.t(), one, one, out_dtype=torch.bfloat16)
            samples = compare({"promoted": gemm, "fast": functools.partial(gemm, use_fast_accum=True)}, dev, deadline,
                              repeats=3)
            found[label] = ratio_stats(samples["promoted"], samples["fast"])
        return found

    def _copy_ms(self, nbytes: int, deadline: Deadline) -> list[float]:
        src = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        dst = torch.empty_like(src)
        return compare({"copy": lambda: dst.copy_(src)}, self.device, deadline, repeats=3)["copy"]

    def parity(self, out: dict, deadline: Deadline) -> None:
        """The Triton kernels against backend='torch' on the same device tensors: on the GPU, or in
        the dry run under the Triton interpreter (run.sh sets TRITON_INTERPRET=1 there)."""
        dev = self.device
        rows, cols = self.sizes["parity_shape"]
        out["errors"] = errors = {}
        out["kernels_bit_exact"], out["kernel_diffs"] = {}, {}
        for dtype in (torch.bfloat16, torch.float32):  # activations/gradients, and master weights
            x = awkward_input(rows, cols, dev, dtype)
            out["backend"] = "triton" if kernels.use_triton(x) or (self.dry_run and kernels.HAVE_TRITON) else "torch"
            exact, diffs = run_checks(x, lambda fn, key: guarded(fn, errors, key), out["backend"])
            tag = str(dtype).removeprefix("torch.")
            out["kernels_bit_exact"].update({f"{name} {tag}": ok for name, ok in exact.items()})
            out["kernel_diffs"].update({f"{name} {tag}": d for name, d in diffs.items()})

        gen = torch.Generator(device=dev).manual_seed(0)
        a = kernels.cast_tiles(awkward_input(rows, cols, dev), E4M3, backend="torch")[0]
        w = torch.randn(rows // 2, cols, device=dev, generator=gen)
        gemm_diff = out["blockwise_gemm_max_rel_diff"] = {}
        out["blockwise_gemm_note"] = ("FP32 sums in another order, and on Hopper the tensor cores' own FP8 "
                                      "accumulation within each 128-long K-slice: ~1e-4 is expected there")

        def max_rel_diff(a, b, gemm) -> float:
            ref = kernels.blockwise_mm_reference(a, b, torch.float32)
            return ((gemm(a, b, torch.float32) - ref).abs().max() / ref.abs().max()).item()
        for name, b in (("128x128 weight", kernels.cast_blocks(w, E4M3, backend="torch")[0]),
                        ("1x128 operand", kernels.cast_tiles(w, E4M3, backend="torch")[0])):
            gemm_diff[name] = guarded(lambda: max_rel_diff(a, b, scaled_mm), errors, f"blockwise gemm {name}")
        # cuBLASLt's blockwise GEMM, where the probe admits it, on operands in whole 128-blocks.
        a = kernels.cast_tiles(torch.randn(512, 1024, device=dev, generator=gen), E4M3, backend="torch")[0]
        w = torch.randn(384, 1024, device=dev, generator=gen)
        for name, kind, b in (("128x128 weight", "block", kernels.cast_blocks(w, E4M3, backend="torch")[0]),
                              ("1x128 operand", "tile", kernels.cast_tiles(w, E4M3, backend="torch")[0])):
            if native_blockwise(dev, kind, torch.float32):
                gemm_diff[f"cuBLASLt {name}"] = guarded(lambda: max_rel_diff(a, b, blockwise_scaled_mm), errors,
                                                        f"cuBLASLt blockwise gemm {name}")

        m = k = n = 1024 if not self.dry_run else 64
        xf = torch.randn(m, k, device=dev, generator=gen)
        dy = torch.randn(m, n, device=dev, generator=gen)
        base = nn.Linear(k, n, bias=False, device=dev)
        xr = xf.double().requires_grad_()
        wr = base.weight.detach().double().requires_grad_()
        y_ref = xr @ wr.t()
        y_ref.backward(dy.double())
        y_ref = y_ref.detach()

        def rel(got, want) -> float:
            return ((got.double() - want).norm() / want.norm()).item()

        def linear_errors(recipe: str) -> dict:
            layer = Float8Linear.from_linear(base, recipe)
            xi = xf.clone().requires_grad_()
            y = layer(xi)
            gx, gw = torch.autograd.grad(y, (xi, layer.weight), dy)
            return {"y": rel(y, y_ref), "dx": rel(gx, xr.grad), "dw": rel(gw, wr.grad)}
        out["float8_linear_rel_err_vs_fp64"] = {
            recipe: guarded(lambda: linear_errors(recipe), errors, f"Float8Linear {recipe}") for recipe in RECIPES}

    def overhead(self, out: dict, deadline: Deadline) -> None:
        s = self.sizes["overhead_n"]
        out.update(shape=[s, s, s], errors={})
        out["host_costs_us"] = guarded(lambda: host_costs(self.device), out["errors"], "host costs")
        out["calls"] = self._each_layer(s, profile_call, deadline, out["errors"], "")
        self.free()
        # Where the device time goes once the host is no longer the bound (the 8192^3 goal).
        s = self.sizes["device_bound_n"]
        out["device_bound"] = {"shape": [s, s, s],
                               "calls": self._each_layer(s, device_trace, deadline, out["errors"], f"{s}^3 ")}

    def _each_layer(self, s: int, measure, deadline: Deadline, errors: dict, prefix: str) -> dict:
        """name -> measure(step, device) for one fwd+bwd of bf16 and of each recipe at s^3; failures
        go to `errors` under `prefix` + name."""
        built = linear_steps(s, s, s, self.device)
        errors.update({prefix + name: why for name, why in built["errors"].items()})
        found = {}
        for name, step in built["steps"].items():
            if deadline.left() < 5:
                raise OutOfTime(prefix + name)
            result = guarded(lambda: measure(step, self.device), errors, prefix + name)
            if result is not None:
                found[name] = result
        return found

    def linear(self, out: dict, deadline: Deadline) -> None:
        shapes = {f"{s}^3": (s, s, s) for s in self.sizes["squares"]} | self.sizes["mlp"]
        out["note"] = ("fwd+bwd (dgrad+wgrad), bf16 weights and activations, FP8 weight cast included every "
                       "call; 'graphed' replays each call from a CUDA graph: device time without host overhead")
        out["shapes"] = {}
        for label, (m, k, n) in shapes.items():
            if deadline.left() < 8:
                raise OutOfTime(label)
            out["shapes"][label] = self._linear_shape(m, k, n, label, deadline)
            self.free()
            self.save()

    def _linear_shape(self, m: int, k: int, n: int, label: str, deadline: Deadline) -> dict:
        built = linear_steps(m, k, n, self.device)
        steps = built["steps"]
        row: dict = {"M,K,N": [m, k, n], "errors": built["errors"]}
        flops = 6 * m * k * n
        reps, target = self.sizes["repeats"], self.sizes["target_ms"]
        try:
            eager = compare(steps, self.device, deadline, repeats=reps, target_ms=target)
        except OutOfTime:
            raise OutOfTime(label)
        replays = {}
        for name, step in steps.items():
            replay = guarded(lambda: graphed(step, self.device), row["errors"], f"{name} graph capture")
            if replay is not None:
                replays[name] = replay
        graph = None
        try:  # eager figures stand even when the replays no longer fit the budget
            graph = guarded(lambda: compare(replays, self.device, deadline, repeats=reps, target_ms=target),
                            row["errors"], "graphed timing") if "bf16" in replays else None
        except OutOfTime:
            row["graphed_skipped"] = "section budget spent"
        for mode, samples in (("eager", eager), ("graphed", graph or {})):
            if "bf16" not in samples:
                continue
            row[mode] = speedups(samples, flops)
        return row

    def kernels(self, out: dict, deadline: Deadline) -> None:
        dev = self.device
        rows, cols = self.sizes["kernel_shape"]
        x = torch.randn(rows, cols, device=dev, dtype=torch.bfloat16)
        x32 = x.float()  # under bf16 autocast with fp32 weights the norms feed the layers fp32
        dst = torch.empty_like(x)
        scale, record = torch.full((), 7.5, device=dev), torch.zeros(1, device=dev)
        n = x.numel()
        # Bytes each pass must move by design: bf16 reads (2 B) and FP8 writes (1 B) per element.
        # Current tensorwise scaling reads x once for its amax and once to cast; rowwise reads it for
        # the row amaxes, the column amaxes and the cast; tiles and blocks need one read (blocks
        # read a block twice, the second time from L2). From fp32 (4 B) the transposed copy of a
        # one-scale cast is a transpose of the row-major codes (1 B read, 1 B written).
        cases = {
            "amax": (lambda: kernels.amax(x), 2 * n),
            "cast_tensorwise+T (current)": (lambda: kernels.cast_tensorwise(x, E4M3, transpose=True), 6 * n),
            "cast_tensorwise+T (delayed)": (lambda: kernels.cast_tensorwise(x, E4M3, scale=scale, transpose=True,
                                                                           record_amax=record), 4 * n),
            "cast_tensorwise rows (delayed)": (lambda: kernels.cast_tensorwise(x, E4M3, scale=scale), 3 * n),
            "cast_rowwise rows+T": (lambda: kernels.cast_rowwise(x, E4M3, transpose=True), 8 * n),
            "cast_tiles 1x128 rows": (lambda: kernels.cast_tiles(x, E4M3), 3 * n),
            "cast_tiles 1x128 T": (lambda: kernels.cast_tiles(x, E4M3, rows=False, transpose=True), 3 * n),
            "cast_tiles 1x128 rows+T": (lambda: kernels.cast_tiles(x, E4M3, transpose=True), 4 * n),
            "cast_blocks+T 128x128": (lambda: kernels.cast_blocks(x, E4M3, transpose=True), 4 * n),
            "cast_tensorwise+T (current, fp32)": (lambda: kernels.cast_tensorwise(x32, E4M3, transpose=True), 11 * n),
            "cast_blocks+T 128x128 (fp32)": (lambda: kernels.cast_blocks(x32, E4M3, transpose=True), 7 * n),
        }
        out["shape"] = [rows, cols]
        out["kernels"], out["errors"] = {}, {}

        def bandwidth(name: str, fn, nbytes: int) -> dict:
            samples = compare({"copy": lambda: dst.copy_(x), name: fn}, dev, deadline,
                              repeats=self.sizes["repeats"], target_ms=self.sizes["target_ms"])
            copy_gbps = 4 * n / median(samples["copy"]) / 1e6
            gbps = nbytes / median(samples[name]) / 1e6
            return {"GBps": gbps, "copy_GBps": copy_gbps, "fraction_of_copy": gbps / copy_gbps, "bytes_moved": nbytes}
        for name, (fn, nbytes) in cases.items():
            result = guarded(lambda: bandwidth(name, fn, nbytes), out["errors"], name)
            if result is not None:
                out["kernels"][name] = result

    def e2e(self, out: dict, deadline: Deadline) -> None:
        run_e2e(out, deadline, self.device, self.sizes["e2e"], RECIPES, guarded, self.save, self.free)

    def compiled(self, out: dict, deadline: Deadline) -> None:
        """The end-to-end pair first (the goal that counts most), then the layers."""
        sizes = self.sizes["compiled"]
        out["note"] = ("end to end: both models' blocks compiled as train.compile does; layers: each (bf16 and "
                       "FP8) under torch.compile, fwd+bwd, FP8 weight cast in every call")
        out["e2e"], out["shapes"], out["errors"] = {}, {}, {}
        run_e2e(out["e2e"], deadline, self.device, self.sizes["e2e"], sizes["e2e_recipes"], guarded, self.save,
                self.free, compiled=True)
        for s in sizes["squares"]:
            if deadline.left() < 20:
                raise OutOfTime(f"{s}^3")
            built = linear_steps(s, s, s, self.device, sizes["recipes"], compiled=True)
            out["errors"].update({f"{s}^3 {k}": v for k, v in built["errors"].items()})
            samples = compare(built["steps"], self.device, deadline, repeats=self.sizes["repeats"],
                              target_ms=self.sizes["target_ms"])
            out["shapes"][f"{s}^3"] = speedups(samples, 6 * s**3)
            self.free()
            self.save()

    def zerocache(self, out: dict, deadline: Deadline) -> None:
        run_zerocache(out, deadline, self.device, self.sizes["zerocache"], self.outdir / "zerocache_nvme", guarded,
                      self.save, self.free)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="run the whole path on CPU with tiny shapes")
    parser.add_argument("--budget-s", type=float, default=400.0,
                        help="global deadline in seconds (default: the suite and its start-up fit 8 minutes)")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run to exercise the suite on CPU", file=sys.stderr)
        return 2
    args.outdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if args.dry_run:
        torch.set_num_threads(1)  # tiny shapes: extra threads only contend with whatever else runs
    suite = Suite(args.outdir, args.dry_run, args.budget_s)
    for name in SECTIONS:
        suite.run(name, getattr(suite, name))
    text = summary(suite.results, suite.sizes["squares"], RECIPES, suite.deadline.elapsed())
    (args.outdir / "fp8_suite.txt").write_text(text + "\n")
    print("\n" + text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
