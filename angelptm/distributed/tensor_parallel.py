"""Tensor parallelism with Megatron sequence parallelism, applied to the plain Llama from the outside.

Each tp rank holds a slice of every large weight: wq/wk/wv/w1/w3 and the output head by rows
(column-parallel: a slice of the output features), wo/w2 by columns (row-parallel: a slice of the
input features), the embedding by vocabulary rows; q/k/v biases are sliced like their weights'
rows, and q/k norm weights (one head long) stay whole. An MoE layer keeps its router and routed
experts whole and splits its shared experts (`_shard_moe`). The sharded layers stay plain `nn.Linear`
modules of smaller shape (so FP8 conversion and checkpoints see ordinary linears); the
communication sits at the edges of each block, as forward hooks on `attention`, `feed_forward`
and `output`:

    without sequence parallelism   enter: copy_to_parallel     leave: reduce_from_parallel (all-reduce)
    with sequence parallelism      enter: gather_sequence      leave: reduce_scatter_sequence

With sequence parallelism the residual stream and the norms between blocks hold only this rank's
slice of the sequence, so their activations shrink by tp and the all-reduce becomes a
reduce-scatter + all-gather pair of the same total volume. The vocabulary is padded to a multiple
of tp; padded rows start at zero, receive no gradient, and are masked out of the loss. Logits
stay split over the vocabulary: `vocab_parallel_cross_entropy` reduces three numbers per token
instead of gathering them.

Which slice of each parameter this rank holds is recorded in `model.shard_specs` (name ->
ShardSpec), keyed by the plain model's parameter names: initialisation, gradient sync, clipping
and gathering the full weights read it.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ReduceOp
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from angelptm.distributed.collectives import (
    Group,
    all_gather,
    all_reduce,
    all_reduce_coalesced,
    copy_to_parallel,
    gather_sequence,
    group_of,
    reduce_from_parallel,
    reduce_scatter_sequence,
)
from angelptm.models.moe import MoE


@dataclass(frozen=True)
class ShardSpec:
    """Which part of a parameter's full value this rank holds."""

    full_shape: tuple[int, ...]
    dim: Optional[int] = None  # None: the whole parameter
    start: int = 0  # first index along `dim`
    length: int = 0  # real entries along `dim`; the rest of the local size is padding (vocabulary)
    copies: int = 1  # ranks of the tp group that hold this same slice
    partial_grad: bool = False  # each copy computes only part of the gradient; the parts are summed

    def local_value(self, full: torch.Tensor, local_shape: torch.Size) -> torch.Tensor:
        """This rank's slice of the full value, zero-padded to `local_shape`."""
        if self.dim is None:
            return full
        local = full.new_zeros(local_shape)
        local.narrow(self.dim, 0, self.length).copy_(full.narrow(self.dim, self.start, self.length))
        return local


def replicated_spec(param: torch.Tensor, tp: int) -> ShardSpec:
    """The spec of a parameter every tp rank holds whole (norms without sequence parallelism)."""
    return ShardSpec(tuple(param.shape), copies=tp)


def spec_of(model: nn.Module, name: str, param: torch.Tensor, tp: int) -> ShardSpec:
    return getattr(model, "shard_specs", {}).get(name) or replicated_spec(param, tp)


# ---------------------------------------------------------------------------------------------
# Layers and the loss


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows are split over tp: each rank looks up the ids it owns, zeros for the rest.

    The partial embeddings are summed across tp (reduce-scattered along the sequence under
    sequence parallelism), so the output is the plain embedding of every id.
    """

    def __init__(self, rows: int, dim: int, vocab_start: int, group: Group, sequence_parallel: bool,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.vocab_start = vocab_start
        self.group = group
        self.sequence_parallel = sequence_parallel
        self.weight = nn.Parameter(torch.empty(rows, dim, device=device, dtype=dtype))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        h = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[..., None], 0.0)
        if self.sequence_parallel:
            return reduce_scatter_sequence(h, self.group)
        return reduce_from_parallel(h, self.group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy over logits split along the vocabulary; exact, with three reduced numbers per token."""

    @staticmethod
    def forward(ctx, logits, targets, vocab_start, vocab_length, group):
        ctx.dtype = logits.dtype
        logits = logits.float()
        if vocab_length < logits.shape[-1]:  # padded vocabulary rows never win and never count
            logits = logits.masked_fill(torch.arange(logits.shape[-1], device=logits.device) >= vocab_length,
                                        float("-inf"))
        row_max = logits.max(dim=-1).values
        all_reduce(row_max, group, ReduceOp.MAX)
        shifted = logits - row_max[:, None]
        local = targets - vocab_start
        inside = (local >= 0) & (local < vocab_length)
        local = local.clamp(0, logits.shape[-1] - 1)
        target_logit = shifted.gather(1, local[:, None]).squeeze(1).masked_fill(~inside, 0.0)
        exp = shifted.exp()
        stats = torch.stack([exp.sum(dim=-1), target_logit])
        all_reduce(stats, group)  # sum of exponentials and the target's logit, in one collective
        sum_exp, target_logit = stats
        softmax = exp.div_(sum_exp[:, None])
        ctx.save_for_backward(softmax, local, inside)
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local, inside = ctx.saved_tensors
        grad = softmax * grad_loss[:, None]
        grad.scatter_add_(1, local[:, None], -(grad_loss * inside)[:, None])
        return grad.to(ctx.dtype), None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, group: Group,
                                 vocab_start: int, vocab_length: int) -> torch.Tensor:
    """Per-token cross-entropy (shaped like `targets`) from this rank's vocabulary slice of the logits.

    `logits` (..., local_vocab) hold vocabulary ids vocab_start .. vocab_start + vocab_length
    (then padding). Every tp rank returns the same losses; the full logits never exist anywhere.
    """
    flat = _VocabParallelCrossEntropy.apply(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), vocab_start, vocab_length, group
    )
    return flat.view(targets.shape)


def vocab_slice(model: nn.Module) -> tuple[int, int]:
    """(first id, number of real ids) of the output head's rows on this rank."""
    spec = getattr(model, "shard_specs", {}).get("output.weight")
    return (spec.start, spec.length) if spec else (0, model.cfg.vocab_size)


# ---------------------------------------------------------------------------------------------
# Applying tensor parallelism to the model


def _column_spec(full: tuple[int, int], local_rows: int, rank: int) -> ShardSpec:
    return ShardSpec(full, dim=0, start=rank * local_rows, length=local_rows)


def _sharded_linear(linear: nn.Linear, local_out: int, local_in: int) -> nn.Linear:
    w = linear.weight
    return nn.Linear(local_in, local_out, bias=linear.bias is not None, device=w.device, dtype=w.dtype)


def _enter_hook(region: Callable, group: Group) -> Callable:
    def hook(module, args):
        return (region(args[0], group), *args[1:])
    return hook


def _leave_hook(region: Callable, group: Group) -> Callable:
    def hook(module, args, output):
        return region(output, group)
    return hook


def _shard_swiglu(ffn: nn.Module, prefix: str, specs: dict[str, ShardSpec], rank: int, tp: int) -> None:
    """w1 and w3 column-parallel, w2 row-parallel (the communication is the caller's)."""
    dim, hidden = ffn.w1.in_features, ffn.w1.out_features
    cols = hidden // tp
    ffn.w1 = _sharded_linear(ffn.w1, cols, dim)
    ffn.w3 = _sharded_linear(ffn.w3, cols, dim)
    ffn.w2 = _sharded_linear(ffn.w2, dim, cols)
    for name in ("w1", "w3"):
        specs[f"{prefix}.{name}.weight"] = _column_spec((hidden, dim), cols, rank)
    specs[f"{prefix}.w2.weight"] = ShardSpec((dim, hidden), dim=1, start=rank * cols, length=cols)


def _shard_moe(moe: MoE, prefix: str, specs: dict[str, ShardSpec], group: Group, sequence_parallel: bool) -> None:
    """An MoE layer under tp: the router and the routed experts whole on every rank, the shared
    experts split like a dense feed-forward.

    The routed experts compute the tokens this rank holds: with sequence parallelism its slice of
    the sequence, so the layer needs no tp communication and the router's and experts' gradients
    are partial (summed over tp, as the norms'); without it, every rank routes and computes the
    same tokens. The shared experts see the flattened tokens, so their regions gather and
    reduce-scatter along the token dim.
    """
    whole = dict(copies=group.size, partial_grad=sequence_parallel)
    for name, param in moe.named_parameters():
        if not name.startswith("shared_experts."):
            specs[f"{prefix}.{name}"] = ShardSpec(tuple(param.shape), **whole)
    if moe.shared_experts is None:
        return
    _shard_swiglu(moe.shared_experts, f"{prefix}.shared_experts", specs, group.rank, group.size)
    if sequence_parallel:
        enter, leave = functools.partial(gather_sequence, dim=0), functools.partial(reduce_scatter_sequence, dim=0)
    else:
        enter, leave = copy_to_parallel, reduce_from_parallel
    moe.shared_experts.register_forward_pre_hook(_enter_hook(enter, group))
    moe.shared_experts.register_forward_hook(_leave_hook(leave, group))


def apply_tensor_parallel(model: nn.Module, group: Group, sequence_parallel: bool) -> None:
    """Replace the model's large layers by this rank's shards and add the communication regions.

    Works on a meta-device model; `materialize` then fills each shard from the full initial value.
    """
    cfg, tp, rank = model.cfg, group.size, group.rank
    enter = gather_sequence if sequence_parallel else copy_to_parallel
    leave = reduce_scatter_sequence if sequence_parallel else reduce_from_parallel
    norm_spec = dict(copies=tp, partial_grad=sequence_parallel)  # SP norms see only this rank's tokens
    specs: dict[str, ShardSpec] = {}

    for i, block in model.layers.items():
        prefix = f"layers.{i}"
        attn, ffn = block.attention, block.feed_forward
        hd = attn.head_dim
        q_rows = cfg.n_heads // tp * hd
        if cfg.n_kv_heads >= tp:
            kv_rows = cfg.n_kv_heads // tp * hd
            kv_spec = _column_spec((cfg.n_kv_heads * hd, cfg.dim), kv_rows, rank)
        else:  # fewer kv heads than ranks: each kv head lives on tp / n_kv_heads ranks, as in the GQA groups
            copies = tp // cfg.n_kv_heads
            kv_rows = hd
            kv_spec = ShardSpec((cfg.n_kv_heads * hd, cfg.dim), dim=0, start=rank // copies * hd, length=hd,
                                copies=copies, partial_grad=True)
        attn.wq = _sharded_linear(attn.wq, q_rows, cfg.dim)
        attn.wk = _sharded_linear(attn.wk, kv_rows, cfg.dim)
        attn.wv = _sharded_linear(attn.wv, kv_rows, cfg.dim)
        attn.wo = _sharded_linear(attn.wo, cfg.dim, q_rows)
        specs[f"{prefix}.attention.wq.weight"] = _column_spec((cfg.n_heads * hd, cfg.dim), q_rows, rank)
        specs[f"{prefix}.attention.wk.weight"] = kv_spec
        specs[f"{prefix}.attention.wv.weight"] = kv_spec
        specs[f"{prefix}.attention.wo.weight"] = ShardSpec((cfg.dim, cfg.n_heads * hd), dim=1,
                                                           start=rank * q_rows, length=q_rows)
        if cfg.qkv_bias:  # column-parallel biases: sliced like their weight's rows
            for name in ("wq", "wk", "wv"):
                weight_spec = specs[f"{prefix}.attention.{name}.weight"]
                specs[f"{prefix}.attention.{name}.bias"] = dataclasses.replace(
                    weight_spec, full_shape=weight_spec.full_shape[:1])
        if cfg.qk_norm != "none":  # whole on every rank; each rank's heads give part of its gradient
            for name in ("q_norm", "k_norm"):
                specs[f"{prefix}.attention.{name}.weight"] = ShardSpec((hd,), copies=tp, partial_grad=True)
        for norm in ("attention_norm", "ffn_norm"):
            specs[f"{prefix}.{norm}.weight"] = ShardSpec((cfg.dim,), **norm_spec)
        regions = [attn]
        if isinstance(ffn, MoE):  # its own regions, around the shared experts alone
            _shard_moe(ffn, f"{prefix}.feed_forward", specs, group, sequence_parallel)
        else:
            _shard_swiglu(ffn, f"{prefix}.feed_forward", specs, rank, tp)
            regions.append(ffn)
        for module in regions:
            module.register_forward_pre_hook(_enter_hook(enter, group))
            module.register_forward_hook(_leave_hook(leave, group))

    rows = -(-cfg.vocab_size // tp)  # the vocabulary padded to a multiple of tp, split evenly
    vocab_spec = ShardSpec((cfg.vocab_size, cfg.dim), dim=0, start=rank * rows,
                           length=max(0, min(rows, cfg.vocab_size - rank * rows)))
    if model.tok_embeddings is not None:
        w = model.tok_embeddings.weight
        model.tok_embeddings = VocabParallelEmbedding(rows, cfg.dim, vocab_spec.start, group, sequence_parallel,
                                                      device=w.device, dtype=w.dtype)
        specs["tok_embeddings.weight"] = vocab_spec
    if model.norm is not None:
        specs["norm.weight"] = ShardSpec((cfg.dim,), **norm_spec)
    if model.output is not None:
        model.output = _sharded_linear(model.output, rows, cfg.dim)
        model.output.register_forward_pre_hook(_enter_hook(enter, group))
        specs["output.weight"] = vocab_spec
    model.tie_weights()
    model.shard_specs = specs


# ---------------------------------------------------------------------------------------------
# Gradients and full weights


def sum_over_copies(parts: list[tuple[ShardSpec, torch.Tensor]], group: Group) -> None:
    """Sum each tensor in place over the tp ranks that hold the same slice of its parameter.

    A tensor may be any part of this rank's value of the parameter (a flat range of it, say), as
    long as every rank of the group passes the same part. The ranks holding one slice are
    consecutive (a kv head's tp / n_kv_heads ranks; every rank for a replicated norm), so each
    part goes to row tp_rank // copies of a zero buffer with a row per slice, and one all-reduce
    over the tp group sums exactly the copies.
    """
    if group.size == 1 or not parts:
        return
    rows = [t.new_zeros(group.size // spec.copies, t.numel()) for spec, t in parts]
    for (spec, t), buffer in zip(parts, rows):
        buffer[group.rank // spec.copies].copy_(t.reshape(-1))
    all_reduce_coalesced(rows, group)
    for (spec, t), buffer in zip(parts, rows):
        t.copy_(buffer[group.rank // spec.copies].view_as(t))


def reduce_partial_gradients(model: nn.Module, group: Group) -> None:
    """Sum the gradient parts of parameters that several tp ranks hold but each sees only part of.

    These are the norms under sequence parallelism (each rank saw its own tokens) and kv
    projections shared by tp / n_kv_heads ranks (each rank served its own query heads).
    """
    specs = getattr(model, "shard_specs", {})
    sum_over_copies([(specs[name], p.grad) for name, p in model.named_parameters()
                     if name in specs and specs[name].partial_grad and p.grad is not None], group)


# Squared norms are summed from fp32 norms of chunks of this many elements. A ZeROCache shard is a
# whole number of them (pages.SHARD_ALIGN_NUMEL), so a page and its shards sum the same chunks.
NORM_CHUNK_NUMEL = 1024


def squared_l2_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The sum of the squares of every element of `tensors`, as a float64 scalar.

    One fp32 reduction over millions of elements drifts from the true sum by ~1e-5 relative on a CPU,
    and by a different amount for a whole page than for its shards, so the same gradients would
    get layout-dependent norms. Chunk norms in fp32 (short sums, accurate), squared and summed in
    float64, give the norm to float32 rounding in every layout.
    """
    parts = []
    for t in tensors:
        flat = t.detach().reshape(-1)
        whole = flat.numel() // NORM_CHUNK_NUMEL * NORM_CHUNK_NUMEL
        if whole:
            chunks = flat[:whole].view(-1, NORM_CHUNK_NUMEL)
            parts.append(torch.linalg.vector_norm(chunks, dim=1, dtype=torch.float32))
        if whole < flat.numel():
            parts.append(torch.linalg.vector_norm(flat[whole:], dtype=torch.float32)[None])
    if not parts:
        device = tensors[0].device if tensors else None
        return torch.zeros((), dtype=torch.float64, device=device)
    return torch.cat(parts).double().square().sum()


def local_grad_norm_squared(model: nn.Module, tp: int) -> torch.Tensor:
    """This rank's share of the squared global gradient norm (float64): a slice held by c ranks counts 1/c."""
    total = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)
    for name, p in model.named_parameters():
        if p.grad is not None:
            total += squared_l2_norm([p.grad]) / spec_of(model, name, p, tp).copies
    return total


def _gather_full(spec: ShardSpec, local: torch.Tensor, group: Group) -> torch.Tensor:
    """The full value of a sharded tensor from every tp rank's slice (padding dropped), on every rank."""
    pieces = all_gather(local.detach()[None], 0, group)
    places = all_gather(torch.tensor([[spec.start, spec.length]], device=local.device), 0, group).tolist()
    full = local.new_empty(spec.full_shape)
    for piece, (start, length) in zip(pieces, places):
        full.narrow(spec.dim, start, length).copy_(piece.narrow(spec.dim, 0, length))
    return full


@torch.no_grad()
def full_parameters(model: nn.Module, group: Group) -> dict[str, torch.Tensor]:
    """Every parameter's full value (padding dropped), on every rank of the tp group, on CPU."""
    full = {}
    for name, p in model.named_parameters():
        spec = spec_of(model, name, p, group.size)
        full[name] = (p.detach().clone() if spec.dim is None else _gather_full(spec, p, group)).cpu()
    return full


# ---------------------------------------------------------------------------------------------
# Checkpoints that load into any layout


def _map_shards(state: Any, model: nn.Module, fn: Callable, name: Optional[str] = None) -> Any:
    """Replace every tensor of `state` held under a tp-sharded parameter's name by fn(spec, local shape, tensor).

    Model state dicts are keyed by parameter name; optimizer state dicts (torch's
    `get_state_dict`) nest each parameter's moments under its name. Tensors of another rank than
    the parameter (an optimizer's step count) are left alone.
    """
    specs = getattr(model, "shard_specs", {})
    if isinstance(state, dict):
        return {k: _map_shards(v, model, fn, k if k in specs else name) for k, v in state.items()}
    if name is not None and isinstance(state, torch.Tensor) and specs[name].dim is not None:
        local_shape = model.get_parameter(name).shape
        if state.dim() == len(local_shape):
            return fn(specs[name], local_shape, state)
    return state


def to_checkpoint_state(state: dict, model: nn.Module, mesh: DeviceMesh) -> dict:
    """The model or optimizer `state` with every tp shard made layout-independent for DCP.

    A slice only this rank holds becomes a DTensor sharded over the tp mesh (the padded
    vocabulary is DTensor's uneven last shard); a slice several ranks hold (kv heads shared by
    tp / n_kv_heads ranks) becomes the gathered full tensor. DCP then writes each slice once and
    reads back whatever slice a later layout asks for, a single process included.
    """
    tp_mesh = mesh["tp"]
    group = group_of(mesh, "tp")

    def convert(spec: ShardSpec, local_shape: torch.Size, local: torch.Tensor) -> torch.Tensor:
        if spec.copies > 1:
            return _gather_full(spec, local, group)
        full_stride = torch.empty(spec.full_shape, device="meta").stride()
        return DTensor.from_local(local.narrow(spec.dim, 0, spec.length), tp_mesh, [Shard(spec.dim)],
                                  run_check=False, shape=torch.Size(spec.full_shape), stride=full_stride)

    return _map_shards(state, model, convert)


def from_checkpoint_state(state: dict, model: nn.Module) -> dict:
    """The inverse of `to_checkpoint_state`, once DCP has filled it: this rank's (padded) local tensors."""
    def restore(spec: ShardSpec, local_shape: torch.Size, value: torch.Tensor) -> torch.Tensor:
        if isinstance(value, DTensor):
            shard = value.to_local()
            local = shard.new_zeros(local_shape)
            local.narrow(spec.dim, 0, spec.length).copy_(shard)
            return local
        return spec.local_value(value, local_shape)

    return _map_shards(state, model, restore)


# ---------------------------------------------------------------------------------------------
# Random streams


def _get_rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class RNGTracker:
    """Random streams for dropout inside tensor-parallel regions.

    An activation every tp rank holds whole (the residual stream without sequence parallelism)
    must drop the same elements on every rank, or the replicas drift apart: `fork("replicated")`.
    An activation split over tp (heads, FFN columns, sequence shards under sequence parallelism)
    must drop independent elements on each rank, or the shards repeat one mask: `fork("sharded")`.
    Each stream continues where it left off. Initialisation needs no stream: every parameter's
    full initial value comes from (seed, name), and each rank keeps its slice of it.
    """

    REGIONS = ("replicated", "sharded")

    def __init__(self, seed: int, tp_rank: int, device: torch.device):
        self.device = device
        self._states = {}
        for region in self.REGIONS:
            stream_seed = zlib.crc32(f"{seed}/{region}/{tp_rank if region == 'sharded' else 0}".encode())
            self._states[region] = torch.Generator(device).manual_seed(stream_seed).get_state()

    @contextmanager
    def fork(self, region: str) -> Iterator[None]:
        """Run the block with the default generator of `device` drawing from `region`'s stream."""
        saved = _get_rng_state(self.device)
        _set_rng_state(self.device, self._states[region])
        try:
            yield
        finally:
            self._states[region] = _get_rng_state(self.device)
            _set_rng_state(self.device, saved)
