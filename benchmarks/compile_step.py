"""Training-step time of a Llama with compiled transformer blocks (`train.compile`) against eager, in
full precision and per FP8 recipe, with torchao's float8 (compiled the same way) beside ours.

    python benchmarks/compile_step.py [--rounds 9]

Each variant is one model (same initial weights, same batch) stepped by its own fused AdamW;
blocks are compiled by the trainer's own `apply_compile`. Each comparison runs in a fresh process
on one thread, its two variants alternating step by step; figures are the median step time and
the median (min-max) of the per-round ratios. Ours against torchao (both compiled) runs twice,
once in each order, and pools the rounds.

Two sizes: a small model whose step is bound by per-op overhead (the host, on a GPU) and a larger
one where the arithmetic weighs more. On a CPU the FP8 GEMMs are emulated, so what compiling
changes there is the cost of everything around them: the casts, their amaxes and the per-op
dispatch. Writes benchmarks/results/compile_step.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from angelptm.config import ModelConfig
from angelptm.distributed.parallelize import apply_compile
from angelptm.fp8 import convert_to_float8, update_float8_scales
from angelptm.models.llama import build_llama

SIZES = {
    "small": dict(model=ModelConfig(dim=128, n_layers=4, n_heads=2, n_kv_heads=1, ffn_dim=352, vocab_size=512,
                                    max_seq_len=64), batch=2, seq=64),
    "medium": dict(model=ModelConfig(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=688, vocab_size=512,
                                     max_seq_len=256), batch=4, seq=256),
}
RECIPES = ("tensorwise", "delayed", "rowwise", "blockwise")
TORCHAO = ("tensorwise", "rowwise")


def torchao_float8(model: nn.Module, recipe: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    config = Float8LinearConfig.from_recipe_name(recipe)
    return convert_to_float8_training(model, config=config, module_filter_fn=lambda m, name: name != "output")


def make_step(size: dict, precision: str, compiled: bool):
    """A training step of a fresh model, converted to `precision` ('fp32', a recipe, 'torchao-<recipe>')."""
    model = build_llama(size["model"], "cpu")
    model.init_weights(0)
    if precision.startswith("torchao-"):
        torchao_float8(model, precision.removeprefix("torchao-"))
    elif precision != "fp32":
        convert_to_float8(model, precision)
    if compiled:
        apply_compile(model)
    return training_step(model, size)


def training_step(model: nn.Module, size: dict):
    """A fused-AdamW training step of `model` on one fixed batch of `size`."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    tokens = torch.randint(size["model"].vocab_size, (size["batch"], size["seq"] + 1),
                           generator=torch.Generator().manual_seed(0))

    def step() -> None:
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_float8_scales(model)
    return step


def time_variants(size_name: str, variants: list[tuple[str, bool]], rounds: int) -> list[list[float]]:
    """Step times (ms) of each (precision, compiled) variant, alternating within each round.

    Runs in a fresh process: compiled models of one block class share its code object, so a second
    compiled variant in the same process is found only after the first one's guards fail, which
    would tax whichever variant sits later in dynamo's cache."""
    torch.set_num_threads(1)
    steps = [make_step(SIZES[size_name], precision, compiled) for precision, compiled in variants]
    for step in steps:  # compile, and settle allocations and delayed scales
        for _ in range(3):
            step()
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(rounds):
        for step, samples in zip(steps, times):
            start = time.perf_counter()
            step()
            samples.append((time.perf_counter() - start) * 1e3)
    return times


def in_fresh_process(*args) -> list[list[float]]:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(time_variants, args)


def ratios(slow: list[float], fast: list[float]) -> list[float]:
    return [a / b for a, b in zip(slow, fast)]


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def measure(size_name: str, rounds: int) -> dict:
    rows = {}
    for precision in ("fp32", *RECIPES, *(f"torchao-{r}" for r in TORCHAO)):
        eager, compiled = in_fresh_process(size_name, [(precision, False), (precision, True)], rounds)
        rows[precision] = {"eager_ms": statistics.median(eager), "compiled_ms": statistics.median(compiled),
                           "compiled_speedup": spread(ratios(eager, compiled))}
    for recipe in TORCHAO:
        # Both compiled, in one process, once in each order (see time_variants).
        pair = [(recipe, True), (f"torchao-{recipe}", True)]
        ours, theirs = in_fresh_process(size_name, pair, rounds)
        theirs_2, ours_2 = in_fresh_process(size_name, pair[::-1], rounds)
        rows[recipe]["compiled_vs_torchao_compiled"] = spread(ratios(theirs + theirs_2, ours + ours_2))
    return rows


def spread_text(r) -> str:
    return "-" if r is None else f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})"


def record_size(results: dict, name: str, rows: dict) -> None:
    """Store one size's rows in `results` and print the header of its table."""
    size = SIZES[name]
    results["sizes"][name] = {"model": vars(size["model"]), "batch": size["batch"], "seq": size["seq"], "rows": rows}
    print(f"\n{name}: {size['batch']}x{size['seq']} tokens, dim {size['model'].dim}, {size['model'].n_layers} layers")


def run_benchmark(doc: str, filename: str, measure_size, print_rows) -> None:
    """The command line of the CPU step benchmarks: `--rounds`, every size measured
    (`measure_size(name, rounds)` -> rows) and printed, the results written to results/`filename`."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    results = {"rounds": args.rounds, "threads": 1, "torch": torch.__version__, "sizes": {}}
    for name in SIZES:
        rows = measure_size(name, args.rounds)
        record_size(results, name, rows)
        print_rows(rows)
    out = Path(__file__).resolve().parent / "results" / filename
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {out}")


def print_rows(rows: dict) -> None:
    print(f"{'precision':<20} {'eager ms':>9} {'compiled ms':>12} {'compiled speedup':>22} "
          f"{'compiled, vs torchao compiled':>30}")
    for precision, row in rows.items():
        print(f"{precision:<20} {row['eager_ms']:>9.1f} {row['compiled_ms']:>12.1f} "
              f"{spread_text(row['compiled_speedup']):>22} "
              f"{spread_text(row.get('compiled_vs_torchao_compiled')):>30}")


def main() -> None:
    run_benchmark(__doc__, "compile_step.json", measure, print_rows)


if __name__ == "__main__":
    main()
