"""GPU suite case: MoE expert GEMMs, grouped bf16 and grouped FP8 (`Float8Experts`) against one dense
bf16 GEMM of the same FLOPs, at Mixtral-8x7B shapes.

8 experts, dim 4096, hidden 14336, 4096 tokens routed top-2 (8192 token copies) in uneven splits
drawn once from a seeded skewed router: [1470, 1008, 536, 1248, 775, 714, 1133, 1308], the busiest
expert 1.44x the mean and the idlest 0.52x, about what a trained router with a balancing loss
leaves. For each expert GEMM (w1/w3: dim -> hidden; w2: hidden -> dim), forward and
forward+backward, timed alternating in one process:

  dense_bf16     one (copies, K) @ (K, N) matmul: the ceiling a grouped GEMM can reach
  grouped_bf16   `GroupedExperts`' own path (torch._grouped_mm where it works, else one matmul per expert)
  fp8_<recipe>   `Float8Experts(recipe).linear`, the weight cast included (as once per step)

Reports ms, TFLOP/s and min/median/max ratios (dense ms / candidate ms, grouped_bf16 ms / fp8 ms)
in OUTDIR/moe_grouped_gemm.json, plus which grouped kernels this build and device take; prints a
table last. `--dry-run` takes the same path on CPU with tiny shapes.

    python benchmarks/gpu/moe_grouped_gemm.py OUTDIR [--dry-run] [--budget-s 45]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

from harness import Deadline, OutOfTime, compare, format_table, median, ratio_stats

from angelptm.fp8 import Float8Experts
from angelptm.fp8.grouped import scaled_grouped_mm_works
from angelptm.models.moe import grouped_linear, grouped_mm_works, looped_linear

FULL = dict(experts=8, dim=4096, hidden=14336, tokens=4096, top_k=2, repeats=5, target_ms=30.0)
DRY = dict(experts=4, dim=64, hidden=128, tokens=96, top_k=2, repeats=2, target_ms=2.0)
RECIPES = ("tensorwise", "rowwise", "blockwise")


def expert_splits(tokens: int, top_k: int, experts: int, seed: int = 0) -> list[int]:
    """Token copies per expert: each token's top-k of router scores with a per-expert skew."""
    gen = torch.Generator().manual_seed(seed)
    skew = torch.randn(experts, generator=gen) * 0.2
    scores = torch.randn(tokens, experts, generator=gen) + skew
    chosen = scores.topk(top_k, dim=-1).indices.flatten()
    return torch.bincount(chosen, minlength=experts).tolist()


def gemm_steps(sizes: list[int], k: int, n: int, device: torch.device, backward: bool) -> dict:
    """name -> a call computing every expert's (rows, k) @ (k, n) (and its gradients with `backward`)."""
    rows = sum(sizes)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(rows, k, device=device, generator=gen).to(torch.bfloat16).requires_grad_(backward)
    weight = (torch.randn(len(sizes), n, k, device=device, generator=gen) * k ** -0.5).to(torch.bfloat16)
    weight.requires_grad_(backward)
    dense_w = weight[0].detach().clone().requires_grad_(backward)
    dy = torch.randn(rows, n, device=device, generator=gen).to(torch.bfloat16)
    ends = torch.tensor(sizes, device=device).cumsum(0).to(torch.int32)
    if grouped_mm_works(device, torch.bfloat16):
        grouped = functools.partial(grouped_linear, group_ends=ends)
    else:
        grouped = functools.partial(looped_linear, group_sizes=sizes)

    def run(fn):
        def step():
            x.grad = weight.grad = dense_w.grad = None
            out = fn()
            if backward:
                out.backward(dy)
        return step

    steps = {"dense_bf16": run(lambda: x @ dense_w.T), "grouped_bf16": run(lambda: grouped(x, weight))}
    for recipe in RECIPES:
        experts = Float8Experts(recipe)

        def fp8(experts=experts):
            experts.refresh_weight()  # the weight cast belongs to the step, as once per optimizer step
            return experts.linear(x, weight, "w", sizes)
        steps[f"fp8_{recipe}"] = run(fp8)
    return steps


def measure(sizes: list[int], k: int, n: int, device: torch.device, deadline: Deadline, cfg: dict,
            backward: bool) -> dict:
    steps = gemm_steps(sizes, k, n, device, backward)
    samples = compare(steps, device, deadline, repeats=cfg["repeats"], target_ms=cfg["target_ms"])
    flops = (6 if backward else 2) * sum(sizes) * k * n
    out = {name: {"ms": median(ms), "TFLOPs": flops / median(ms) / 1e9} for name, ms in samples.items()}
    out["ratios"] = {f"{name} vs dense_bf16": ratio_stats(samples["dense_bf16"], ms)
                     for name, ms in samples.items() if name != "dense_bf16"}
    out["ratios"].update({f"{name} vs grouped_bf16": ratio_stats(samples["grouped_bf16"], ms)
                          for name, ms in samples.items() if name.startswith("fp8_")})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="the same path on CPU with tiny shapes")
    parser.add_argument("--budget-s", type=float, default=45.0, help="deadline for the whole case")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run to exercise the case on CPU", file=sys.stderr)
        return 2
    cfg = DRY if args.dry_run else FULL
    device = torch.device("cpu" if args.dry_run else "cuda")
    deadline = Deadline(args.budget_s)
    sizes = expert_splits(cfg["tokens"], cfg["top_k"], cfg["experts"])
    dim, hidden = cfg["dim"], cfg["hidden"]
    results = {"dry_run": args.dry_run, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "shape": {**cfg, "tokens_per_expert": sizes},
               "grouped_mm_bf16": grouped_mm_works(device, torch.bfloat16),
               "scaled_grouped_mm": scaled_grouped_mm_works(device), "gemms": {}}
    args.outdir.mkdir(parents=True, exist_ok=True)
    path = args.outdir / "moe_grouped_gemm.json"
    rows = []
    for label, k, n in (("w1/w3", dim, hidden), ("w2", hidden, dim)):
        for pass_name, backward in (("fwd", False), ("fwd+bwd", True)):
            key = f"{label} {pass_name}"
            try:
                result = measure(sizes, k, n, device, deadline, cfg, backward)
            except OutOfTime as e:
                results["gemms"][key] = {"skipped": f"budget spent at {e}"}
                continue
            results["gemms"][key] = result
            path.write_text(json.dumps(results, indent=1))
            for name, r in result.items():
                if name == "ratios":
                    continue
                vs_dense = result["ratios"].get(f"{name} vs dense_bf16", {"median": 1.0})["median"]
                vs_grouped = result["ratios"].get(f"{name} vs grouped_bf16")
                rows.append([key, name, f"{r['TFLOPs']:.1f}", f"{vs_dense:.2f}",
                             f"{vs_grouped['median']:.2f}" if vs_grouped else ""])
    results["elapsed_s"] = round(deadline.elapsed(), 1)
    path.write_text(json.dumps(results, indent=1))
    print(f"MoE expert GEMMs, {cfg['experts']} experts, {sum(sizes)} token copies split {sizes}; "
          f"grouped bf16 kernel: {results['grouped_mm_bf16']}, grouped FP8 kernel: {results['scaled_grouped_mm']}")
    print(format_table(["gemm", "case", "TFLOP/s", "x dense bf16", "x grouped bf16"], rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
