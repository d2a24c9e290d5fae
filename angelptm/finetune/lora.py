"""LoRA: low-rank adapters on a plain model's projections, applied from the outside as TP and FP8 are.

Each target projection (`finetune.lora.targets`, of wq wk wv wo w1 w2 w3) computes

    y = W x + (alpha / rank) · B(A(dropout(x)))

with A (rank × in) and B (out × rank) two small linears registered under the projection itself,
`<projection>.lora_A.weight` and `<projection>.lora_B.weight`: PEFT's names, so an adapter folder
is a rename away. The adapter runs as a forward hook on the projection, so whatever the projection
is by then (a tp shard, a `Float8Linear`) stays untouched. Every other parameter is frozen
(requires_grad False): ZeROCache keeps frozen parameters in pages of their own that hold the
parameters alone, so the base weights get neither gradient buckets nor optimizer state at any
zero stage, are sharded and gathered for compute at stage 3, and are checkpointed with the model.

Under tensor parallelism an adapter is split like its base. A column-parallel projection (wq wk
wv w1 w3: a slice of the output rows, the whole input) keeps B's matching rows and A whole; each
rank's A gradient is the part its rows give, summed over tp. A row-parallel one (wo w2: a slice
of the input columns) keeps A's matching columns and B whole; B(A_r x_r) is this rank's part of
B A x, summed by the block's output reduction, and B's gradient is likewise summed over tp. The
`ShardSpec`s in `model.shard_specs` say so, and gradient sync, clipping and checkpoints follow.

Dropout (`finetune.lora.dropout`, off by default) must drop the same elements of an input on every
tp rank of a group: a column-parallel input is whole on every rank, and the tp-summed gradient of
A would otherwise mix different masks of it; a row-parallel rank's slice of the columns must be
that slice of one mask. `AdapterDropout` does both, with the single process's masks under tp.

Initial values follow PEFT: A kaiming-uniform (a = √5, i.e. U(±1/√in)), B zeros, so the model
starts as its base. A is drawn from a generator seeded by (seed, name) over its full shape, then
sliced, so every layout starts from the same adapters.
"""

from __future__ import annotations

import dataclasses
import json
import math
import zlib
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from angelptm.config import Config, LoraConfig, ModelConfig
from angelptm.distributed.tensor_parallel import ShardSpec
from angelptm.errors import UserError
from angelptm.models import llama

_BLOCK_PART = {  # config_validation.LORA_TARGETS, each with the block part holding it
    "wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention",
    "w1": "feed_forward", "w2": "feed_forward", "w3": "feed_forward"}
A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # where PeftModel puts the wrapped transformers model


def is_adapter(name: str) -> bool:
    return name.endswith((A_SUFFIX, B_SUFFIX))


class AdapterDropout(nn.Module):
    """Dropout of an adapter's input that drops the same elements on every tp rank of a group.

    The mask is drawn over the *full* input width from torch's default generator of the input's
    device; a row-parallel projection, which sees a slice of the input columns, keeps that slice
    of the mask. `seed_dropout` seeds the default generators alike on a tp group's ranks and apart
    on ranks with other data (dp, cp) or layers (pp); the ranks of a group then draw the same
    shapes in the same order (angelptm draws nothing else from it) and stay in step, and under tp
    alone draw the single process's masks. The default generator is the stream to draw from
    because torch.utils.checkpoint replays it when it recomputes a block (recomputation drops what
    the forward dropped) and the trainer's checkpoints save and restore it per rank (a run resumed
    on as many ranks drops what the whole run would have).
    A row-parallel rank draws tp times the mask it keeps: cheap beside the projection's GEMM.
    """

    def __init__(self, p: float, columns: Optional[ShardSpec] = None):
        super().__init__()
        self.p = p
        self.columns = columns  # the base weight's spec when the input is a tp slice of its columns

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        width = self.columns.full_shape[1] if self.columns is not None else x.shape[-1]
        keep = torch.empty(*x.shape[:-1], width, dtype=x.dtype, device=x.device).bernoulli_(1 - self.p)
        if self.columns is not None:
            keep = keep.narrow(-1, self.columns.start, self.columns.length)
        return x * keep / (1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def seed_dropout(seed: int, tp: int) -> None:
    """Seed torch's default generators (CPU and every device) for `AdapterDropout`: from `seed` and
    this rank's place outside tp, global rank // tp, which names its (pp, dp, cp) coordinate
    because the mesh puts tp innermost (distributed/mesh.py)."""
    place = dist.get_rank() // tp if dist.is_initialized() else 0
    torch.manual_seed(zlib.crc32(f"lora-dropout/{seed}/{place}".encode()))


def _adapter_hook(scale: float):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + module.lora_B(module.lora_A(module.lora_dropout(args[0]))) * scale
    return hook


def _adapter_specs(base: ShardSpec, rank: int, tp: int) -> tuple[ShardSpec, ShardSpec]:
    """(A's spec, B's spec) for an adapter on the projection whose weight `base` describes."""
    full_out, full_in = base.full_shape
    whole_summed = dict(copies=tp, partial_grad=True)
    if base.dim == 0:  # column-parallel: B's rows follow W's (shared kv heads included), A is whole
        return ShardSpec((rank, full_in), **whole_summed), dataclasses.replace(base, full_shape=(full_out, rank))
    return dataclasses.replace(base, full_shape=(rank, full_in)), ShardSpec((full_out, rank), **whole_summed)


def apply_lora(model: nn.Module, lora: LoraConfig, tp: int = 1, seed: int = 0) -> None:
    """Freeze every parameter of `model`, then add trainable adapters on `lora.targets` of every block;
    with dropout, seed the streams its masks come from (`seed_dropout`, from the run's `seed`).

    Works on a meta-device model after tensor parallelism (`tp` ranks); `materialize` then gives
    the adapters their initial values (`initial_value`)."""
    if lora.dropout:
        seed_dropout(seed, tp)
    for param in model.parameters():
        param.requires_grad_(False)
    specs = getattr(model, "shard_specs", None)
    for i, block in model.layers.items():
        for target in lora.targets:
            projection = getattr(getattr(block, _BLOCK_PART[target]), target)
            weight = projection.weight
            out_local, in_local = weight.shape
            name = f"layers.{i}.{_BLOCK_PART[target]}.{target}"
            base = specs.get(name + ".weight") if specs is not None else None
            sharded = base is not None and base.dim is not None
            row_parallel = base if sharded and base.dim == 1 else None
            projection.lora_dropout = AdapterDropout(lora.dropout, row_parallel) if lora.dropout else nn.Identity()
            projection.lora_A = nn.Linear(in_local, lora.rank, bias=False, device=weight.device, dtype=weight.dtype)
            projection.lora_B = nn.Linear(lora.rank, out_local, bias=False, device=weight.device, dtype=weight.dtype)
            projection.register_forward_hook(_adapter_hook(lora.alpha / lora.rank))
            if sharded:
                specs[name + A_SUFFIX], specs[name + B_SUFFIX] = _adapter_specs(base, lora.rank, tp)


def initial_value(name: str, shape: tuple[int, ...], cfg: ModelConfig, seed: int) -> torch.Tensor:
    """The full initial value of parameter `name`: PEFT's for adapters, the model's own otherwise."""
    if name.endswith(B_SUFFIX):
        return torch.zeros(shape)
    if name.endswith(A_SUFFIX):
        gen = torch.Generator().manual_seed((seed * 1_000_033 + zlib.crc32(name.encode())) % 2**63)
        bound = 1 / math.sqrt(shape[1])  # kaiming_uniform_(a=√5): gain √(1/3), times √3 / √fan_in
        return torch.empty(shape).uniform_(-bound, bound, generator=gen)
    return llama.initial_value(name, shape, cfg, seed)


def fresh_adapters(model_state: dict, stored: set[str]) -> dict:
    """Take out of a state's "model" section the adapters a checkpoint does not hold (a base model's,
    for `train.init_from`) and return them: they keep their initial values instead of being loaded."""
    return {name: model_state.pop(name) for name in list(model_state)
            if is_adapter(name) and f"model.{name}" not in stored}


# ---------------------------------------------------------------------------------------------
# Export: merged into the base weights, or as a PEFT adapter folder


def read_adapters(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """The full adapter tensors a checkpoint holds (none for a full fine-tune), by name, on CPU."""
    from angelptm.dcp_safe import read_metadata_file
    from angelptm.train.checkpoint import load_state  # here: angelptm.train imports the distributed package

    metadata = read_metadata_file(Path(ckpt_dir) / "state" / ".metadata").state_dict_metadata
    prefix = "model."
    adapters = {key[len(prefix):]: torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
                for key, entry in metadata.items() if key.startswith(prefix) and is_adapter(key)}
    if adapters:
        load_state(ckpt_dir, {"model": adapters})
    return adapters


def merge_adapters(weights: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor],
                   lora: LoraConfig) -> dict[str, torch.Tensor]:
    """The adapted base weights with their adapters folded in, W + (alpha / rank) · B A, in W's dtype,
    from the full base `weights` and `adapters`; by base weight name."""
    merged = {}
    for name, a in adapters.items():
        if name.endswith(A_SUFFIX):
            module = name[: -len(A_SUFFIX)]
            w, b = weights[module + ".weight"], adapters[module + B_SUFFIX]
            merged[module + ".weight"] = (w.float() + lora.alpha / lora.rank * (b.float() @ a.float())).to(w.dtype)
    return merged


@torch.no_grad()
def load_merged_model(folder: Path, device: str | torch.device = "cpu") -> tuple[Config, nn.Module]:
    """The plain model a checkpoint describes (`train.checkpoint.load_model`), with a LoRA run's
    adapters merged into its weights: the model that computes what the checkpoint's computes."""
    from angelptm.train.checkpoint import load_model, resolve_checkpoint  # as in read_adapters

    cfg, model = load_model(folder, device)
    adapters = read_adapters(resolve_checkpoint(Path(folder)))
    weights = {name: p.detach().cpu() for name, p in model.named_parameters()}
    for name, value in merge_adapters(weights, adapters, cfg.finetune.lora).items():
        model.get_parameter(name).copy_(value)
    return cfg, model


def peft_config(lora: LoraConfig, hf_modules: list[str]) -> dict:
    """PEFT's adapter_config.json for these adapters on the Hugging Face modules `hf_modules`."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
            "lora_dropout": lora.dropout, "target_modules": sorted(set(hf_modules)), "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True, "inference_mode": True,
            "base_model_name_or_path": None, "modules_to_save": None}


def write_peft_adapter(folder: Path, adapters: dict[str, torch.Tensor], lora: LoraConfig,
                       hf_name: dict[str, str], ckpt_dir: Optional[Path] = None) -> None:
    """Write `adapters` into `folder` as PEFT does (adapter_config.json + adapter_model.safetensors,
    keyed `base_model.model.<Hugging Face module>.lora_A.weight`); `hf_name` maps each of our
    weight names to its Hugging Face name."""
    if not adapters:
        raise UserError(f"checkpoint {ckpt_dir} holds no LoRA adapters (finetune.lora.rank=0: a full fine-tune); "
                        "export it without --adapter")
    tensors, modules = {}, []
    for name, tensor in adapters.items():
        suffix = A_SUFFIX if name.endswith(A_SUFFIX) else B_SUFFIX
        hf_module = hf_name[name[: -len(suffix)] + ".weight"][: -len(".weight")]
        tensors[PEFT_PREFIX + hf_module + suffix] = tensor.contiguous()
        modules.append(hf_module.rsplit(".", 1)[-1])
    (folder / PEFT_CONFIG).write_text(json.dumps(peft_config(lora, modules), indent=2))
    save_file(tensors, str(folder / PEFT_WEIGHTS), metadata={"format": "pt"})
