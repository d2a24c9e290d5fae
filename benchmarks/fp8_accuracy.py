"""FP8 accuracy table: relative error of y, dx and dW per recipe against float64, ours next to torchao's float8.

    python benchmarks/fp8_accuracy.py [--tokens 512 --dim 1024]

Errors are ||got - exact||_F / ||exact||_F of Float8Linear's forward output, input gradient and
weight gradient, on CPU (the numerics do not depend on the device: the GPU kernels are held bit
for bit to the references this runs). Two inputs: Gaussian activations, and the same with 1% of
the input channels 50x louder (the outlier features of trained LLMs). Delayed scaling is shown
in its steady state (second step, history holding the same amaxes). Writes
benchmarks/results/fp8_accuracy.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from angelptm.fp8 import Float8Linear, RowwiseRecipe, TensorwiseRecipe, update_float8_scales

OURS = {"tensorwise": TensorwiseRecipe(), "delayed": "delayed", "rowwise": RowwiseRecipe(power_of_two_scales=True),
        "blockwise": "blockwise"}
TORCHAO = ("tensorwise", "rowwise")  # the recipes torchao's float8 training offers


def make_inputs(tokens: int, dim: int, outliers: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, dim, generator=gen)
    if outliers:
        x[:, torch.randperm(dim, generator=gen)[: max(1, dim // 100)]] *= 50
    w = torch.randn(dim, dim, generator=gen) / dim**0.5
    dy = torch.randn(tokens, dim, generator=gen) / dim**0.5
    return x, w, dy


def errors(layer: nn.Module, x, w, dy, steps: int = 1) -> dict[str, float]:
    x64, w64, dy64 = x.double(), w.double(), dy.double()
    exact = {"y": x64 @ w64.t(), "dx": dy64 @ w64, "dW": dy64.t() @ x64}
    for _ in range(steps):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        dx, dw = torch.autograd.grad(y, (xi, layer.weight), dy)
        update_float8_scales(layer)
    got = {"y": y, "dx": dx, "dW": dw}
    return {k: ((got[k].double() - exact[k]).norm() / exact[k].norm()).item() for k in exact}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--dim", type=int, default=1024)
    args = parser.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    results = {}
    for data in ("gaussian", "outliers"):
        x, w, dy = make_inputs(args.tokens, args.dim, outliers=data == "outliers")
        base = nn.Linear(args.dim, args.dim, bias=False)
        with torch.no_grad():
            base.weight.copy_(w)
        for name, recipe in OURS.items():
            results[(data, f"angelptm {name}")] = errors(Float8Linear.from_linear(base, recipe), x, w, dy, steps=2)
        for name in TORCHAO:
            model = convert_to_float8_training(nn.Sequential(copy.deepcopy(base)),
                                               config=Float8LinearConfig.from_recipe_name(name))
            results[(data, f"torchao {name}")] = errors(model[0], x, w, dy)

    header = f"{'input':<9} {'implementation':<22} {'y':>9} {'dx':>9} {'dW':>9}"
    print(f"FP8 relative error vs float64 ({args.tokens} tokens, {args.dim}x{args.dim} weight, CPU)")
    print(header + "\n" + "-" * len(header))
    for (data, impl), err in results.items():
        print(f"{data:<9} {impl:<22} {err['y']:9.2e} {err['dx']:9.2e} {err['dW']:9.2e}")
    out = Path(__file__).resolve().parent / "results" / "fp8_accuracy.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"tokens": args.tokens, "dim": args.dim,
                               "rows": [{"input": d, "implementation": i, **e} for (d, i), e in results.items()]},
                              indent=2))


if __name__ == "__main__":
    main()
