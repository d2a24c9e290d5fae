"""Turn a plain model into the one this rank runs: context, tensor and expert parallelism, FP8,
activation checkpointing, compilation, then materialisation; and layout-aware gradient clipping
for a loop without ZeROCache.

The model file knows nothing of parallelism; everything layout-specific is applied here from the
outside, as torchtitan does. `parallelize` works on a meta-device model, so no rank ever holds
more than its share; `materialize` then allocates the real storage and fills each parameter with
this rank's slice of the same full initial value a single process would have.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.utils.checkpoint import checkpoint

from angelptm.config import Config, Fp8Config
from angelptm.distributed.collectives import Group, all_reduce, group_of
from angelptm.distributed.context_parallel import (
    apply_context_parallel,
    local_positions,
)
from angelptm.distributed.expert_parallel import (
    apply_expert_parallel, expert_parallel_modules, sum_routing_over_token_shards,
)
from angelptm.distributed.mesh import DATA_DIMS, dims_of, expert_view, validate_layout
from angelptm.distributed.tensor_parallel import (
    apply_tensor_parallel,
    local_grad_norm_squared,
    squared_l2_norm,
)
from angelptm.fp8 import AmaxGroups, DelayedScale, convert_to_float8
from angelptm.finetune import lora as lora_adapters
from angelptm.models.moe import Router


def _checkpoint_forward(module: nn.Module) -> None:
    """Recompute `module` in backward instead of saving its activations.

    Replacing the instance's forward (rather than wrapping the module) keeps parameter names, and
    so checkpoints and initial values, unchanged.
    """
    inner = module.forward

    def forward(*args, **kwargs):
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    module.forward = forward


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """full: recompute whole transformer blocks; selective: recompute only the attention core."""
    if mode == "none":
        return
    for block in model.layers.values():
        _checkpoint_forward(block if mode == "full" else block.attention.core)


def apply_compile(model: nn.Module) -> None:
    """Compile each transformer block's forward, as torchtitan does: one graph per block, reused by
    every block of the same shape. Inductor fuses the elementwise work around the matmuls (FP8
    casts included) and launches far fewer kernels, which is what small and medium FP8 layers are
    bound by. Module hooks (ZeROCache's gathers) stay outside the graph, around the block."""
    for block in model.layers.values():
        # Not fullgraph: collectives inside a block (tp, cp) and the blockwise FP8 GEMM run eagerly
        # between graphs; a plain block compiles whole (tests/test_compile.py holds it to that).
        block.forward = torch.compile(block.forward, fullgraph=False)


def _local_positions_hook(cp: Group, mode: str, hidden_seq_shards: int):
    """Default `positions` to those of the tokens this rank holds.

    Under context parallelism the local tokens are not 0..n-1, and under sequence parallelism the
    hidden states a later pipeline stage receives hold 1/tp of them, so the model's own default
    would be wrong; with this hook `model(local_input)` is right under every layout.
    """
    def hook(module, args, kwargs):
        if len(args) > 1 or kwargs.get("positions") is not None:
            return None
        x = args[0]  # token ids, or hidden states on a later pipeline stage
        local = x.shape[1] * (hidden_seq_shards if module.tok_embeddings is None else 1)
        return args, {**kwargs, "positions": local_positions(local * cp.size, cp.rank, cp.size, mode, x.device)}
    return hook


def apply_float8(model: nn.Module, fp8: Fp8Config, tp: Group, data: Group) -> None:
    """Swap the linear layers for `Float8Linear` with the amax groups each operand needs.

    Under tensor parallelism a row-parallel layer (wo, w2) holds a slice of its input's columns and
    a column-parallel one a slice of its output gradient's, so those operands' amaxes are reduced
    over tp, as are the weight shards', and every rank scales its piece like the whole tensor.
    Delayed scaling also reduces activations and gradients over dp × cp (Transformer Engine's
    rule), so replicas keep identical scales. Rowwise and blockwise scales are local by nature.
    """
    options = {"power_of_two_scales": fp8.power_of_two_scales}
    if fp8.recipe == "delayed":
        options["amax_history_len"] = fp8.amax_history

    def groups(name: str) -> AmaxGroups:
        if fp8.recipe in ("rowwise", "blockwise"):
            return AmaxGroups()
        tp_groups = (tp.pg,) if tp.size > 1 else ()
        data_groups = (data.pg,) if fp8.recipe == "delayed" and data.size > 1 else ()
        row_parallel = name.endswith(("attention.wo", "feed_forward.w2", "shared_experts.w2"))
        return AmaxGroups(weight=tp_groups, input=data_groups + (tp_groups if row_parallel else ()),
                          grad_output=data_groups + (() if row_parallel else tp_groups))

    convert_to_float8(model, fp8.recipe, skip=fp8.skip, amax_groups=groups, **options)


def parallelize(model: nn.Module, mesh: DeviceMesh, cfg: Config) -> nn.Module:
    """Apply the layout `cfg` asks for to `model` (on any device, meta included) and return it."""
    validate_layout(dims_of(mesh), cfg)
    p = cfg.parallel
    tp, cp = group_of(mesh, "tp"), group_of(mesh, "cp")
    sequence_parallel = p.sequence_parallel and tp.size > 1
    if cp.size > 1:
        apply_context_parallel(model, cp, p.cp_mode)
    if tp.size > 1:
        apply_tensor_parallel(model, tp, sequence_parallel)
    experts = expert_view(mesh)
    if experts.ep.size > 1:
        apply_expert_parallel(model, experts.ep, experts.edp)
    sum_routing_over_token_shards(model, [cp] + ([tp] if sequence_parallel else []))
    if cfg.precision.fp8.enabled:
        apply_float8(model, cfg.precision.fp8, tp, group_of(mesh, DATA_DIMS))
    if cfg.finetune.lora.rank > 0:  # after TP and FP8: adapters hook onto the projections as they end up
        lora_adapters.apply_lora(model, cfg.finetune.lora, tp.size, cfg.train.seed)
    if cp.size > 1 or sequence_parallel:
        hidden_seq_shards = tp.size if sequence_parallel else 1
        model.register_forward_pre_hook(_local_positions_hook(cp, p.cp_mode, hidden_seq_shards), with_kwargs=True)
    apply_activation_checkpointing(model, cfg.train.activation_checkpointing)
    if cfg.train.compile:
        apply_compile(model)
    return model


def reset_buffers(model: nn.Module) -> None:
    """Give the buffers `to_empty` allocated but left unset the values a new model starts with:
    FP8 scaling state, MoE routing biases (zero). A checkpoint's stored buffers are loaded over them."""
    for module in model.modules():
        if isinstance(module, DelayedScale):
            module.reset()
        elif isinstance(module, Router):
            module.reset_bias()


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device, seed: int) -> nn.Module:
    """Allocate the parameters on `device` and give them the layout-independent initial values.

    Each parameter gets this rank's slice of its full initial value, so every layout starts from
    the same full weights.
    """
    model.to_empty(device=device)
    model.tie_weights()
    reset_buffers(model)
    specs = getattr(model, "shard_specs", {})
    for name, param in model.named_parameters():
        spec = specs.get(name)
        full = lora_adapters.initial_value(name, spec.full_shape if spec else tuple(param.shape), model.cfg, seed)
        param.copy_(spec.local_value(full, param.shape) if spec else full)
    return model


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, mesh: DeviceMesh) -> float:
    """Scale the gradients so their global norm, over every shard of the model, is at most `max_norm`.

    Run after the gradients are synchronised: each rank adds the squares of what it holds (a slice
    held by c tp ranks counts 1/c, the experts of the other ep ranks added), then the sum runs
    over tp and over pp (stages hold different layers). Returns the norm before clipping, as
    torch's `clip_grad_norm_` does, and leaves the gradients alone when it is not finite (the
    step is skipped).
    """
    tp = mesh["tp"].size()
    squared = local_grad_norm_squared(model, tp)
    # ep ranks hold different experts: their squares add up over ep (edp ranks hold the same ones),
    # each expert slice counted 1/tp on each of the tp ranks that hold it whole.
    expert_grads = [p.grad for m in expert_parallel_modules(model) for p in m.parameters() if p.grad is not None]
    if expert_grads:
        own_experts = squared_l2_norm(expert_grads) / tp
        squared += all_reduce(own_experts.clone(), expert_view(mesh).ep) - own_experts
    for dim in ("tp", "pp"):
        all_reduce(squared, group_of(mesh, dim))
    total = math.sqrt(squared.item())
    if math.isfinite(total):
        scale = min(1.0, max_norm / (total + 1e-6))
        if scale < 1.0:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            torch._foreach_mul_(grads, scale)
    return total
