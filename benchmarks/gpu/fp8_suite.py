"""FP8 GPU suite: Float8Linear vs bf16 nn.Linear, cast-kernel bandwidth vs copy, ~1B Llama training step.

Run through `benchmarks/gpu/run.sh OUTDIR [--dry-run]`. Sections, each under its own time
budget inside one global deadline (whatever does not fit is recorded as skipped):

  env      torch/triton versions, GPU; ceilings: device copy GB/s, bf16 and FP8 GEMM TFLOP/s
  parity   each Triton kernel against its torch reference on the device (bit for bit), the
           blockwise GEMM against its reference, Float8Linear errors against FP32
  linear   forward+backward (weight cast included) per recipe vs bf16, M=K=N in
           {1024, 2048, 4096, 8192} and the Llama-3-8B MLP shapes; TFLOP/s and speedup
  kernels  each cast kernel's bandwidth as a fraction of a device-to-device copy
  e2e      a ~1.1B-parameter Llama training step (AdamW), bf16 autocast vs FP8 per recipe;
           tokens/s and MFU (bf16 dense peak 989 TFLOP/s on H100)

Every comparison alternates its candidates in the same process; ratios are min/median/max
over repeats. Results go to OUTDIR/fp8_suite.json after every section.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import traceback
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from harness import Deadline, OutOfTime, compare, format_table, median, ratio_stats, time_ms

from angelptm.config import ModelConfig
from angelptm.fp8 import E4M3, E5M2, Float8Linear, convert_to_float8, kernels, update_float8_scales
from angelptm.fp8.gemm import scaled_mm
from angelptm.models.llama import build_llama, flops_per_token, num_params

RECIPES = ("tensorwise", "delayed", "rowwise", "blockwise")
H100_BF16_DENSE_PEAK = 989e12

FULL = dict(
    squares=[1024, 2048, 4096, 8192],
    mlp={"llama3_8b_w1/w3": (8192, 4096, 14336), "llama3_8b_w2": (8192, 14336, 4096)},
    kernel_shape=(8192, 8192), ceiling_n=8192, copy_bytes=1 << 30, parity_shape=(1000, 1040),
    llama=ModelConfig(dim=2048, n_layers=16, n_heads=16, n_kv_heads=8, ffn_dim=8192, vocab_size=32000,
                      max_seq_len=2048),
    batch=4, seq=2048, e2e_warmup=3, e2e_steps=8, repeats=5, target_ms=60.0,
    budgets={"env": 40, "parity": 60, "linear": 170, "kernels": 40, "e2e": 150},
)
DRY = dict(
    squares=[64, 128],
    mlp={"mlp_up": (64, 64, 224), "mlp_down": (64, 224, 64)},
    kernel_shape=(256, 384), ceiling_n=128, copy_bytes=1 << 20, parity_shape=(100, 136),
    llama=ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, vocab_size=259, max_seq_len=64),
    batch=2, seq=32, e2e_warmup=1, e2e_steps=2, repeats=2, target_ms=5.0,
    budgets={"env": 30, "parity": 30, "linear": 60, "kernels": 30, "e2e": 60},
)


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
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.save()

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
        samples = compare({
            "bf16": lambda: a @ b,
            "fp8": lambda: torch._scaled_mm(a8, b8.t(), one, one, out_dtype=torch.bfloat16),
        }, dev, deadline, repeats=3)
        out["bf16_matmul_TFLOPs"] = 2 * k**3 / median(samples["bf16"]) / 1e9
        out["fp8_scaled_mm_TFLOPs"] = 2 * k**3 / median(samples["fp8"]) / 1e9
        out["ceiling_shape"] = k

    def parity(self, out: dict, deadline: Deadline) -> None:
        """Dispatch default (Triton on GPU) against backend='torch' on the same device tensors."""
        dev = self.device
        gen = torch.Generator(device=dev).manual_seed(0)
        rows, cols = self.sizes["parity_shape"]
        x = (torch.randn(rows, cols, device=dev, generator=gen) * 3).to(torch.bfloat16)

        def same(a, b) -> bool:
            return (torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8))
                    and torch.equal(a.scale_inv, b.scale_inv))

        checks = {
            "cast_tensorwise+T e4m3": lambda be: kernels.cast_tensorwise(x, E4M3, transpose=True, backend=be),
            "cast_tensorwise+T e5m2 pow2": lambda be: kernels.cast_tensorwise(x, E5M2, transpose=True,
                                                                              power_of_two=True, backend=be),
            "cast_tensorwise delayed": lambda be: kernels.cast_tensorwise(
                x, E4M3, scale=torch.full((), 7.5, device=dev), record_amax=torch.zeros(1, device=dev), backend=be),
            "cast_groups rowwise dim1": lambda be: (kernels.cast_groups(x, E4M3, group=None, dim=1, backend=be),),
            "cast_groups rowwise dim0": lambda be: (kernels.cast_groups(x, E4M3, group=None, dim=0, backend=be),),
            "cast_groups 1x128 dim1": lambda be: (kernels.cast_groups(x, E4M3, group=128, dim=1, backend=be),),
            "cast_groups 1x128 dim0": lambda be: (kernels.cast_groups(x, E4M3, group=128, dim=0, backend=be),),
            "cast_blocks+T 128x128": lambda be: kernels.cast_blocks(x, E4M3, transpose=True, backend=be),
        }
        out["errors"] = errors = {}
        bit_exact = out["kernels_bit_exact"] = {}
        for name, fn in checks.items():
            bit_exact[name] = guarded(lambda: all(same(a, b) for a, b in zip(fn(None), fn("torch")) if a is not None),
                                      errors, name)

        a = kernels.cast_groups(x, E4M3, group=128, dim=1, backend="torch")
        w = torch.randn(rows // 2, cols, device=dev, generator=gen)
        gemm_diff = out["blockwise_gemm_max_rel_diff"] = {}

        def max_rel_diff(b) -> float:
            ref = kernels.blockwise_mm_reference(a, b, torch.float32)
            return ((scaled_mm(a, b, torch.float32) - ref).abs().max() / ref.abs().max()).item()
        for name, b in (("128x128 weight", kernels.cast_blocks(w, E4M3, backend="torch")[0]),
                        ("1x128 operand", kernels.cast_groups(w, E4M3, group=128, dim=1, backend="torch"))):
            gemm_diff[name] = guarded(lambda: max_rel_diff(b), errors, f"blockwise gemm {name}")

        m = k = n = 1024 if not self.dry_run else 64
        xf = torch.randn(m, k, device=dev, generator=gen)
        dy = torch.randn(m, n, device=dev, generator=gen)
        base = nn.Linear(k, n, bias=False, device=dev)
        xr = xf.double().requires_grad_()
        wr = base.weight.detach().double().requires_grad_()
        y_ref = xr @ wr.t()
        y_ref.backward(dy.double())
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

    def linear(self, out: dict, deadline: Deadline) -> None:
        shapes = {f"{s}^3": (s, s, s) for s in self.sizes["squares"]} | self.sizes["mlp"]
        out["note"] = "fwd+bwd (dgrad+wgrad), bf16 weights and activations, FP8 weight cast included every call"
        out["shapes"] = {}
        for label, (m, k, n) in shapes.items():
            if deadline.left() < 8:
                raise OutOfTime(label)
            out["shapes"][label] = self._linear_shape(m, k, n, label, deadline)
            self.save()

    def _copy_ms(self, nbytes: int, deadline: Deadline) -> list[float]:
        src = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        dst = torch.empty_like(src)
        return compare({"copy": lambda: dst.copy_(src)}, self.device, deadline, repeats=3)["copy"]

    def _linear_shape(self, m: int, k: int, n: int, label: str, deadline: Deadline) -> dict:
        dev, dtype = self.device, torch.bfloat16
        base = nn.Linear(k, n, bias=False, device=dev, dtype=dtype)
        x = torch.randn(m, k, device=dev, dtype=dtype, requires_grad=True)
        dy = torch.randn(m, n, device=dev, dtype=dtype)
        fns = {"bf16": lambda: torch.autograd.grad(base(x), (x, base.weight), dy)}
        row: dict = {"M,K,N": [m, k, n], "errors": {}}

        def fp8_step(recipe: str):
            layer = Float8Linear.from_linear(base, recipe)
            torch.autograd.grad(layer(x), (x, layer.weight), dy)
            update_float8_scales(layer)  # delayed: time the steady state, not the first step

            def step():
                layer.refresh_weight()
                return torch.autograd.grad(layer(x), (x, layer.weight), dy)
            return step
        for recipe in RECIPES:
            step = guarded(lambda: fp8_step(recipe), row["errors"], recipe)
            if step is not None:
                fns[recipe] = step
        try:
            samples = compare(fns, dev, deadline, repeats=self.sizes["repeats"], target_ms=self.sizes["target_ms"])
        except OutOfTime:
            raise OutOfTime(label)
        flops = 6 * m * k * n
        row.update(bf16_ms=median(samples["bf16"]), bf16_TFLOPs=flops / median(samples["bf16"]) / 1e9)
        for recipe in RECIPES:
            if recipe not in samples:
                continue
            row[recipe] = {"ms": median(samples[recipe]), "TFLOPs": flops / median(samples[recipe]) / 1e9,
                           "speedup": ratio_stats(samples["bf16"], samples[recipe])}
        return row

    def kernels(self, out: dict, deadline: Deadline) -> None:
        dev = self.device
        rows, cols = self.sizes["kernel_shape"]
        x = torch.randn(rows, cols, device=dev, dtype=torch.bfloat16)
        dst = torch.empty_like(x)
        scale, record = torch.full((), 7.5, device=dev), torch.zeros(1, device=dev)
        n = x.numel()
        # Bytes each pass must move by design: bf16 reads (2 B) and FP8 writes (1 B) per element.
        # Current tensorwise and rowwise scaling need a whole-tensor (or whole-row) amax before the
        # cast, so they read twice; tiles and blocks fit in one program and read once.
        cases = {
            "amax": (lambda: kernels.amax(x), 2 * n),
            "cast_tensorwise+T (current)": (lambda: kernels.cast_tensorwise(x, E4M3, transpose=True), 6 * n),
            "cast_tensorwise+T (delayed)": (lambda: kernels.cast_tensorwise(x, E4M3, scale=scale, transpose=True,
                                                                           record_amax=record), 4 * n),
            "cast_groups rowwise dim1": (lambda: kernels.cast_groups(x, E4M3, group=None, dim=1), 5 * n),
            "cast_groups rowwise dim0": (lambda: kernels.cast_groups(x, E4M3, group=None, dim=0), 5 * n),
            "cast_groups 1x128 dim1": (lambda: kernels.cast_groups(x, E4M3, group=128, dim=1), 3 * n),
            "cast_groups 1x128 dim0": (lambda: kernels.cast_groups(x, E4M3, group=128, dim=0), 3 * n),
            "cast_blocks+T 128x128": (lambda: kernels.cast_blocks(x, E4M3, transpose=True), 4 * n),
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
        dev, cfg = self.device, self.sizes["llama"]
        batch, seq = self.sizes["batch"], self.sizes["seq"]
        out.update(model=asdict(cfg), params=num_params(cfg), batch=batch, seq=seq,
                   note="fp32 master weights + AdamW; bf16 autocast; FP8 skips the output head; eager")
        gen = torch.Generator(device=dev).manual_seed(0)
        tokens = torch.randint(cfg.vocab_size, (batch, seq + 1), device=dev, generator=gen)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        fpt = flops_per_token(cfg, seq)

        def make_model() -> nn.Module:
            model = build_llama(cfg, "meta").to_empty(device=dev)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02, generator=gen)
            return model

        def make_step(model, fp8: bool):
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")

            def step():
                with torch.autocast(dev.type, dtype=torch.bfloat16):
                    logits = model(inputs)
                loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if fp8:
                    update_float8_scales(model)
                return loss
            return step

        base = make_model()
        base_step = make_step(base, fp8=False)

        def measure(recipe: str) -> dict:
            """Alternate bf16 and FP8 steps; the FP8 model and its optimizer die with this frame."""
            model = make_model()
            model.load_state_dict(base.state_dict())
            convert_to_float8(model, recipe)
            fp8_step = make_step(model, fp8=True)
            for _ in range(self.sizes["e2e_warmup"]):
                base_step(), fp8_step()
            times = {"bf16": [], "fp8": []}
            for _ in range(self.sizes["e2e_steps"]):
                times["bf16"].append(time_ms(base_step, dev, 1))
                times["fp8"].append(time_ms(fp8_step, dev, 1))
                if deadline.left() < 5:
                    break
            row = {"loss": {"bf16": base_step().item(), "fp8": fp8_step().item()},
                   "speedup": ratio_stats(times["bf16"], times["fp8"])}
            for name in ("bf16", "fp8"):
                tps = batch * seq / (median(times[name]) / 1e3)
                row[f"{name}_step_ms"] = median(times[name])
                row[f"{name}_tokens_per_s"] = tps
                row[f"{name}_mfu"] = tps * fpt / H100_BF16_DENSE_PEAK if dev.type == "cuda" else None
            return row

        out["recipes"], out["errors"] = {}, {}
        for recipe in RECIPES:
            if deadline.left() < 20:
                raise OutOfTime(recipe)
            row = guarded(lambda: measure(recipe), out["errors"], recipe)
            if row is not None:
                out["recipes"][recipe] = row
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            self.save()

    # ------------------------------------------------------------------------------------------

    def goals(self) -> list[list[str]]:
        """The issue's H100 targets against the best recipe (or, for kernels, the slowest cast)."""
        s = self.results["sections"]
        lin = s.get("linear", {}).get("shapes", {})
        ker = {k: v for k, v in s.get("kernels", {}).get("kernels", {}).items() if k != "amax"}
        e2e = s.get("e2e", {}).get("recipes", {})
        rows = []

        def best(table: dict, get) -> tuple[str, float] | None:
            scored = [(name, get(row)) for name, row in table.items()]
            return max(scored, key=lambda t: t[1]) if scored else None

        def best_linear(shape: str):
            row = lin.get(shape, {})
            return best({rc: row[rc] for rc in RECIPES if rc in row}, lambda r: r["speedup"]["median"])

        big, mid = f"{self.sizes['squares'][-1]}^3", f"{self.sizes['squares'][1]}^3"
        for label, target, found in (
                (f"fp8 fwd+bwd speedup at {big}", 1.6, best_linear(big)),
                (f"fp8 fwd+bwd speedup at {mid}", 1.0, best_linear(mid)),
                ("end-to-end training speedup", 1.3, best(e2e, lambda r: r["speedup"]["median"])),
                ("slowest cast kernel, fraction of copy", 0.8,
                 min(((k, v["fraction_of_copy"]) for k, v in ker.items()), key=lambda t: t[1], default=None))):
            if found is None:
                rows.append([label, f">= {target}", "not measured", "-"])
            else:
                met = "yes" if found[1] >= target else "NO"
                rows.append([label, f">= {target}", f"{found[1]:.2f} ({found[0]})", met])
        return rows

    def summary(self) -> str:
        s = self.results["sections"]
        lines = [f"FP8 GPU suite ({'DRY RUN on CPU' if self.dry_run else 'GPU'}), {self.deadline.elapsed():.0f}s"]
        env = s.get("env", {})
        if "copy_GBps" in env:
            lines.append(f"{env.get('device')} | torch {env.get('torch')} triton {env.get('triton')} | copy "
                         f"{env['copy_GBps']:.0f} GB/s, bf16 {env['bf16_matmul_TFLOPs']:.0f} TFLOP/s, FP8 _scaled_mm "
                         f"{env['fp8_scaled_mm_TFLOPs']:.0f} TFLOP/s at {env['ceiling_shape']}^3")
        par = s.get("parity", {})
        if "kernels_bit_exact" in par:
            bad = [k for k, ok in par["kernels_bit_exact"].items() if not ok]
            diffs = ", ".join(f"{k} {v:.1e}" for k, v in par.get("blockwise_gemm_max_rel_diff", {}).items())
            lines.append(f"kernel parity: {'all bit-exact' if not bad else 'MISMATCH ' + ', '.join(bad)}; "
                         f"blockwise GEMM max rel diff: {diffs}")
        lines += ["", format_table(["goal (H100)", "target", "measured", "met"], self.goals())]
        for name, sec in s.items():
            for key in ("error", "skipped", "skipped_from"):
                if key in sec:
                    lines.append(f"{name}: {key}: {sec[key].strip().splitlines()[-1]}")
            failures = dict(sec.get("errors", {}))
            for label, row in sec.get("shapes", {}).items():
                failures.update({f"{label} {rc}": why for rc, why in row.get("errors", {}).items()})
            lines += [f"{name}: {what} failed: {why.strip().splitlines()[-1]}" for what, why in failures.items()]
        lin = s.get("linear", {}).get("shapes", {})
        if lin:
            rows = [[label, f"{r['bf16_TFLOPs']:.0f}"]
                    + [f"{r[rc]['speedup']['median']:.2f}x ({r[rc]['TFLOPs']:.0f})" if rc in r else "error"
                       for rc in RECIPES]
                    for label, r in lin.items()]
            lines += ["", "Float8Linear fwd+bwd: speedup vs bf16 (TFLOP/s)",
                      format_table(["shape", "bf16 TF/s", *RECIPES], rows)]
        ker = s.get("kernels", {}).get("kernels", {})
        if ker:
            rows = [[name, f"{k['GBps']:.0f}", f"{k['fraction_of_copy']:.0%}"] for name, k in ker.items()]
            lines += ["", "Cast kernels vs device copy", format_table(["kernel", "GB/s", "of copy"], rows)]
        e2e = s.get("e2e", {}).get("recipes", {})
        if e2e:
            rows = [[rc, f"{r['bf16_tokens_per_s']:.0f}", f"{r['fp8_tokens_per_s']:.0f}",
                     f"{r['speedup']['median']:.2f}x", f"{r['fp8_mfu']:.1%}" if r["fp8_mfu"] is not None else "-",
                     f"{r['loss']['bf16']:.3f}/{r['loss']['fp8']:.3f}"] for rc, r in e2e.items()]
            e = s["e2e"]
            lines += ["", f"Llama {e['params'] / 1e9:.2f}B training step ({e['batch']}x{e['seq']} tokens)",
                      format_table(["recipe", "bf16 tok/s", "fp8 tok/s", "speedup", "fp8 MFU", "loss bf16/fp8"], rows)]
        return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="run the whole path on CPU with tiny shapes")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="global deadline in seconds (default leaves a minute of the 8 for start-up)")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run to exercise the suite on CPU", file=sys.stderr)
        return 2
    args.outdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if args.dry_run:
        torch.set_num_threads(1)  # tiny shapes: extra threads only contend with whatever else runs
    suite = Suite(args.outdir, args.dry_run, args.budget_s)
    for name in ("env", "parity", "linear", "kernels", "e2e"):
        suite.run(name, getattr(suite, name))
    summary = suite.summary()
    (args.outdir / "fp8_suite.txt").write_text(summary + "\n")
    print("\n" + summary, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
