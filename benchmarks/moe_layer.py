"""MoE layer forward + backward on CPU: our grouped path against transformers' Mixtral block and a
naive per-expert loop, with the same weights and the same routing.

For 8 and 64 experts, top-2, TOKENS tokens of width DIM and experts of width FFN (float32), each
round runs every side once, in an order that rotates from round to round:
  ours grouped     `angelptm.models.moe.MoE` (tokens sorted by expert, `torch._grouped_mm` where
                   this torch build has a working one);
  ours looped      the same layer with its fallback, one matmul per expert over its sorted rows;
  transformers     `MixtralSparseMoeBlock` built from a `MixtralConfig` (a standalone block runs its
                   eager experts: a loop over the experts hit) with our weights copied in;
  transformers grouped_mm  the same block with `experts_implementation="grouped_mm"`, what a
                   whole transformers model picks by default where `torch._grouped_mm` exists;
  per-expert loop  for each expert: a mask, a gather, the SwiGLU and an `index_add` (our router);
  dense ceiling    the experts' GEMM FLOPs with nothing else: one dense SwiGLU of an expert's size
                   over all TOKENS · top_k token copies (no routing, sorting, gathering or combining),
                   the time no implementation of the layer can beat.
Outputs are checked to match before anything is timed (the ceiling computes other numbers). Goal
(issue 21): ours >= 2x transformers; where transformers itself runs near the ceiling, "fraction of
the ceiling" says what is left to gain.

    python benchmarks/moe_layer.py [--rounds 7] [--experts 8 64]

Prints a table (times: median, min, max of the rounds; speedups: the ratio within each round, median
[min, max]) and writes benchmarks/results/moe_layer.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from angelptm.config import MoEConfig
from angelptm.models.llama import FeedForward
from angelptm.models.moe import MoE, grouped_mm_works

TOKENS, DIM, FFN, TOP_K = 4096, 512, 1024, 2


def per_expert_loop(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """The layer's math the plain way: our router, then every expert over its tokens by mask."""
    routing = layer.router(x)
    ex = layer.experts
    out = torch.zeros_like(x)
    # unbind once: indexing w1[e] per expert would make each backward a full-size zero gradient
    for e, (w1, w2, w3) in enumerate(zip(ex.w1.unbind(0), ex.w2.unbind(0), ex.w3.unbind(0))):
        token, choice = (routing.experts == e).nonzero(as_tuple=True)
        rows = x[token]
        y = (F.silu(rows @ w1.T) * (rows @ w3.T)) @ w2.T
        out.index_add_(0, token, y * routing.gates[token, choice, None])
    return out


def dense_ceiling(layer: MoE) -> tuple[Callable[[torch.Tensor], torch.Tensor], FeedForward]:
    """Expert 0's SwiGLU over every token copy, summed back per token: the routed GEMMs' FLOPs alone."""
    ffn = FeedForward(DIM, layer.cfg.expert_ffn_dim)
    with torch.no_grad():
        for name in ("w1", "w2", "w3"):
            getattr(ffn, name).weight.copy_(getattr(layer.experts, name)[0])
    top_k = layer.cfg.top_k
    return (lambda t: ffn(t.repeat(top_k, 1)).view(top_k, *t.shape).sum(0)), ffn


def mixtral_block(layer: MoE, experts_implementation=None) -> MixtralSparseMoeBlock:
    cfg = layer.cfg
    block = MixtralSparseMoeBlock(MixtralConfig(hidden_size=DIM, intermediate_size=cfg.expert_ffn_dim,
                                                num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k,
                                                experts_implementation=experts_implementation))
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.weight)
        block.experts.gate_up_proj.copy_(torch.cat([layer.experts.w1, layer.experts.w3], dim=1))
        block.experts.down_proj.copy_(layer.experts.w2)
    return block


def timed(forward: Callable[[torch.Tensor], torch.Tensor], modules, x: torch.Tensor, grad: torch.Tensor) -> float:
    for module in modules:
        module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    start = time.perf_counter()
    forward(x).backward(grad)
    return time.perf_counter() - start


def bench(n_experts: int, rounds: int) -> dict:
    torch.manual_seed(0)
    layer = MoE(DIM, MoEConfig(n_experts=n_experts, top_k=TOP_K, expert_ffn_dim=FFN))
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_(0, 0.02)
        layer.router.weight.normal_(0, 1.0)  # a router that spreads tokens, as a trained one does
    looped = MoE(DIM, layer.cfg)
    looped.load_state_dict(layer.state_dict())
    looped.experts.allow_grouped_mm = False
    block, grouped_block = mixtral_block(layer), mixtral_block(layer, "grouped_mm")
    ceiling, ceiling_ffn = dense_ceiling(layer)
    x, grad = torch.randn(TOKENS, DIM), torch.randn(TOKENS, DIM)
    sides = {
        "ours grouped": (layer, [layer]),
        "ours looped": (looped, [looped]),
        "transformers": (lambda t: block(t.unsqueeze(0)).squeeze(0), [block]),
        "transformers grouped_mm": (lambda t: grouped_block(t.unsqueeze(0)).squeeze(0), [grouped_block]),
        "per-expert loop": (lambda t: per_expert_loop(looped, t), [looped]),
    }
    with torch.no_grad():
        reference = block(x.unsqueeze(0)).squeeze(0)
        errors = {name: ((forward(x) - reference).abs().max() / reference.abs().max()).item()
                  for name, (forward, _) in sides.items()}
    sides["dense ceiling"] = (ceiling, [ceiling_ffn])
    assert max(errors.values()) < 1e-5, errors
    tokens_per_expert = torch.bincount(layer.router(x).experts.flatten(), minlength=n_experts)
    for forward, modules in sides.values():  # warm-up
        timed(forward, modules, x, grad)
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for round_ in range(rounds):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            seconds[name].append(timed(*sides[name], x, grad))
        print(f"experts {n_experts:>3} round {round_ + 1}: "
              + ", ".join(f"{name} {seconds[name][-1] * 1e3:,.0f} ms" for name in names))
    return {"n_experts": n_experts, "top_k": TOP_K, "tokens": TOKENS, "dim": DIM, "expert_ffn_dim": FFN,
            "max_load": (tokens_per_expert.max() / tokens_per_expert.float().mean()).item(),
            "max_relative_output_error_vs_transformers": errors,
            "seconds": {name: {"median": statistics.median(v), "min": min(v), "max": max(v), "all": v}
                        for name, v in seconds.items()}}


def per_round_ratio(base: list[float], side: list[float]) -> dict:
    """base / side in each round: the load of other jobs on shared cores drifts between rounds far
    more than between two runs of one round."""
    ratios = [b / s for b, s in zip(base, side)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "all": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    args = parser.parse_args()
    grouped = grouped_mm_works(torch.device("cpu"), torch.float32)
    results = [bench(n, args.rounds) for n in args.experts]
    print(f"\nforward + backward, {TOKENS} tokens, dim {DIM}, expert ffn {FFN}, top-{TOP_K}, float32, "
          f"{torch.get_num_threads()} threads; torch._grouped_mm used: {grouped}")
    print("speedups are per round (the sides of a round run back to back), then median [min, max] over the rounds")
    print(f"{'experts':>7} {'side':24s} {'median ms':>10s} {'min':>8s} {'max':>8s} {'vs transformers':>24s} "
          f"{'vs per-expert loop':>24s} {'fraction of ceiling':>24s}")
    for result in results:
        times = result["seconds"]
        keys = (("speedup_vs_transformers", "transformers"), ("speedup_vs_per_expert_loop", "per-expert loop"),
                ("fraction_of_dense_ceiling", "dense ceiling"))
        for key, base in keys:
            result[key] = {name: per_round_ratio(times[base]["all"], t["all"]) for name, t in times.items()}
        for name, t in times.items():
            ratios = [result[key][name] for key, _ in keys]
            print(f"{result['n_experts']:>7} {name:24s} {t['median'] * 1e3:>10,.0f} {t['min'] * 1e3:>8,.0f} "
                  f"{t['max'] * 1e3:>8,.0f} " + " ".join(
                      f"{r['median']:>7.2f}x [{r['min']:5.2f}, {r['max']:5.2f}]" for r in ratios))
    path = Path(__file__).resolve().parent / "results" / "moe_layer.json"
    path.write_text(json.dumps({
        "benchmark": "moe_layer", "rounds": args.rounds, "dtype": "float32", "threads": torch.get_num_threads(),
        "torch": torch.__version__, "grouped_mm_used": grouped,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "note": "cores shared with other jobs while measured; sides alternate within each round"},
        "goals": {"vs_transformers": 2.0},
        "results": results,
    }, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
