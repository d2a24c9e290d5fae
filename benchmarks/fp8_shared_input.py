"""Eager FP8 training step with layers that read one tensor sharing its cast (wq, wk and wv; w1 and
w3), against every layer casting its own input.

    python benchmarks/fp8_shared_input.py [--rounds 9]

Same models and batches as `compile_step.py`, eager. The baseline gives each layer a new view of
its input, so no two layers see the same tensor and each casts its own (what every layer did
before casts were shared); the two variants alternate in one process on one thread, each round
three steps of each, the first of the pair swapping every round.
Per recipe: the input casts per step, the FP8 bytes saved for the backward pass per step (distinct
storages), and the median step time with the median (min-max) of the per-round ratios.
Delayed scaling keeps a scale per layer and shares nothing, so it is not listed.
Writes benchmarks/results/fp8_shared_input.json.
"""

from __future__ import annotations

import statistics
import time

import torch

from compile_step import SIZES, ratios, run_benchmark, spread, spread_text, training_step

from angelptm.fp8 import Float8Linear, convert_to_float8
from angelptm.models.llama import build_llama

RECIPES = ("tensorwise", "rowwise", "blockwise")


def cast_per_layer(model: torch.nn.Module) -> None:
    """The baseline: each layer quantizes a view of its own, so no cast is shared."""
    for layer in model.modules():
        if isinstance(layer, Float8Linear):
            layer.quantized_input = lambda x, need_t, own=layer.quantized_input: own(x.view_as(x), need_t)


def make_step(size: dict, recipe: str, shared: bool):
    model = build_llama(size["model"], "cpu")
    model.init_weights(0)
    convert_to_float8(model, recipe)
    if not shared:
        cast_per_layer(model)
    return training_step(model, size)


def casts_and_saved_bytes(step) -> tuple[int, int]:
    """Input casts of one step, and the bytes of the distinct FP8 storages it saves for backward."""
    casts, storages = [], {}
    quantize = Float8Linear.quantize

    def counting(self, role, x, **kwargs):
        if role == "input":
            casts.append(role)
        return quantize(self, role, x, **kwargs)

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    Float8Linear.quantize = counting
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            step()
    finally:
        Float8Linear.quantize = quantize
    return len(casts), sum(storages.values())


def measure(size: dict, recipe: str, rounds: int, steps_per_round: int = 3) -> dict:
    steps = {"shared": make_step(size, recipe, True), "per_layer": make_step(size, recipe, False)}
    row = {}
    for name, step in steps.items():
        for _ in range(2):
            step()
        row[f"{name}_input_casts"], row[f"{name}_saved_fp8_bytes"] = casts_and_saved_bytes(step)
    times = {name: [] for name in steps}
    for i in range(rounds):
        for name, step in list(steps.items())[::1 if i % 2 else -1]:  # alternate which goes first
            start = time.perf_counter()
            for _ in range(steps_per_round):
                step()
            times[name].append((time.perf_counter() - start) * 1e3 / steps_per_round)
    row.update(shared_ms=statistics.median(times["shared"]), per_layer_ms=statistics.median(times["per_layer"]),
               speedup=spread(ratios(times["per_layer"], times["shared"])))
    return row


def print_rows(rows: dict) -> None:
    print(f"{'recipe':<11} {'input casts':>12} {'saved FP8 KiB':>15} {'per-layer ms':>13} {'shared ms':>10} "
          f"{'speedup':>18}")
    for recipe, r in rows.items():
        print(f"{recipe:<11} {r['per_layer_input_casts']:>5} -> {r['shared_input_casts']:<4} "
              f"{r['per_layer_saved_fp8_bytes'] / 1024:>6.0f} -> {r['shared_saved_fp8_bytes'] / 1024:<6.0f} "
              f"{r['per_layer_ms']:>13.1f} {r['shared_ms']:>10.1f} "
              f"{spread_text(r['speedup']):>18}")


def main() -> None:
    torch.set_num_threads(1)
    run_benchmark(__doc__, "fp8_shared_input.json",
                  lambda name, rounds: {recipe: measure(SIZES[name], recipe, rounds) for recipe in RECIPES},
                  print_rows)


if __name__ == "__main__":
    main()
