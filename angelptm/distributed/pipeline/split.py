"""Cut a plain model into pipeline stages: contiguous runs of layers balanced by training FLOPs.

Stage 0 also holds the token embedding; the last stage holds the final norm and the output head
(and so computes the loss). Splitting works on a meta-device model: each stage is a copy of the
model with the modules it does not own deleted, so parameter names (and therefore initial values
and checkpoints) stay those of the full model, and no rank ever allocates the whole of it.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from angelptm.errors import ConfigError


def _matmul_flops(module: Optional[nn.Module]) -> float:
    """Training FLOPs per token of the module's linear layers: 2 forward + 4 backward per weight."""
    if module is None:
        return 0.0
    return 6.0 * sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def _layer_flops(model: nn.Module, seq_len: int) -> list[float]:
    # Attention scores and their weighted sum add 12·dim·seq per token (forward + backward).
    attention = 12.0 * model.cfg.dim * seq_len
    return [_matmul_flops(layer) + attention for layer in model.layers.values()]


def _balanced_cuts(costs: list[float], stages: int, last_extra: float) -> list[int]:
    """First layer of each stage (plus len(costs)) minimising the costliest stage.

    Dynamic programme over (stages so far, layers so far); each stage gets at least one layer and
    the last one also pays `last_extra` (the output head).
    """
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: the lowest achievable maximum for layers [0, i) cut into s stages; cut[s][i] its last cut.
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        extra = last_extra if s == stages else 0.0
        for i in range(s, n - (stages - s) + 1):
            for j in range(s - 1, i):
                worst = max(best[s - 1][j], prefix[i] - prefix[j] + extra)
                if worst < best[s][i]:
                    best[s][i], cut[s][i] = worst, j
    bounds = [n]
    for s in range(stages, 0, -1):
        bounds.append(cut[s][bounds[-1]])
    return bounds[::-1]


def stage_layer_ranges(model: nn.Module, num_stages: int, seq_len: Optional[int] = None) -> list[range]:
    """The layer indices of each of `num_stages` stages, balanced by training FLOPs per token.

    `seq_len` (default: the model's max_seq_len) weighs attention against the matmuls.
    """
    cfg = model.cfg
    if len(model.layers) < num_stages:
        raise ConfigError(
            f"model.n_layers={len(model.layers)} cannot give each of the {num_stages} pipeline stages "
            "(parallel.pp × parallel.pp_virtual_stages) a layer; use fewer stages or more layers"
        )
    if cfg.tie_embeddings and num_stages > 1:
        raise ConfigError(
            "model.tie_embeddings=true needs the embedding and the output head on one stage; "
            "set model.tie_embeddings=false or parallel.pp=1"
        )
    costs = _layer_flops(model, seq_len or cfg.max_seq_len)
    head = _matmul_flops(model.output)  # the embedding is a lookup: no matmul FLOPs on stage 0
    bounds = _balanced_cuts(costs, num_stages, head)
    return [range(bounds[s], bounds[s + 1]) for s in range(num_stages)]


def split_model(model: nn.Module, pp_rank: int, pp: int, virtual_stages: int = 1,
                seq_len: Optional[int] = None) -> list[nn.Module]:
    """This rank's stages, chunk by chunk: stage c·pp + pp_rank for c in 0..virtual_stages-1.

    `model` is best on the meta device: each stage is a deep copy of it with the layers (and
    embedding, norm, head) it does not own removed, then `parallelize` and `materialize` apply
    to each stage as to a whole model.
    """
    num_stages = pp * virtual_stages
    ranges = stage_layer_ranges(model, num_stages, seq_len)
    chunks = []
    for chunk in range(virtual_stages):
        stage = chunk * pp + pp_rank
        part = copy.deepcopy(model)
        keep = {str(i) for i in ranges[stage]}
        for name in [n for n in part.layers if n not in keep]:
            del part.layers[name]
        if stage > 0:
            part.tok_embeddings = None
        if stage < num_stages - 1:
            part.norm = None
            part.output = None
        chunks.append(part)
    return chunks


def merge_stages(stages: list[nn.Module]) -> nn.Module:
    """One module holding all of a rank's stages' parameters, under the full model's names.

    The optimizer, checkpoints and gradient clipping see the rank's parameters through it; the
    runner runs the stages themselves. With one stage that is the stage. With several
    (interleaved) it is a model skeleton whose submodules are the stages' own, so it shares their
    parameters and gradients; merge after `parallelize` and `materialize`, which may replace
    submodules. Its own forward would run its layers back to back: not a pipeline step.
    """
    if len(stages) == 1:
        return stages[0]
    first, last = stages[0], stages[-1]
    with torch.device("meta"):
        merged = type(first)(first.cfg)
    merged.tok_embeddings = first.tok_embeddings
    merged.layers = nn.ModuleDict({name: layer for stage in stages for name, layer in stage.layers.items()})
    merged.norm, merged.output = last.norm, last.output
    merged.shard_specs = {k: v for stage in stages for k, v in getattr(stage, "shard_specs", {}).items()}
    return merged
