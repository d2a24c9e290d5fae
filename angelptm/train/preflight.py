"""Preflight: refuse a training run that cannot work on this machine, before anything is built or written.

`angelptm.config_validation.validate` checks what holds on any machine (and so also for `angelptm plan`);
this checks what depends on the machine the run starts on: the planner's memory estimate per
rank (`angelptm.planning`: parameters, gradients, optimizer state, activations, buffers) against
this host's RAM on CPU or this GPU's memory, and the NVMe folder. It is arithmetic on the config,
so a 10-million-layer model is refused in milliseconds instead of being built for minutes.
It also returns the lines worth a warning (not an error). Every rank computes the same verdict.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from angelptm.config import Config
from angelptm.distributed.mesh import ParallelDims, validate_layout, world_from_env
from angelptm.errors import ConfigError
from angelptm.planning.hardware import Hardware
from angelptm.planning.layout import layout_from_config
from angelptm.planning.memory import GIB, Memory, memory
from angelptm.planning.model import ANGELPTM, model_shape
from angelptm.zerocache.tiers import nvme_dir_problem


def check_run(cfg: Config, dims: Optional[ParallelDims] = None) -> list[str]:
    """Raise ConfigError (one line naming the key and the fix) if `cfg` cannot train on this machine
    with `dims` (default: the layout `cfg.parallel` gives the torchrun world); return warning lines.

    Cheap and free of side effects: call it before building the model or touching the output folder.
    """
    if dims is None:  # a caller with dims (the Trainer) has checked the layout and the microbatches
        dims = ParallelDims.from_config(cfg.parallel, world_from_env()[2])
        validate_layout(dims, cfg)
        cfg.grad_accum_steps(dims.dp)  # divisibility and the microbatch bound, before the schedule is built
    _check_nvme_dir(cfg)
    _check_memory(cfg, dims)
    return _warnings(cfg)


# ---------------------------------------------------------------------------------------------
# Memory


def host_memory_bytes() -> int:
    """RAM this process may use: the machine's, or its container's limit where that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # "max": no limit
            total = min(total, int(text))
    return total


def _on_gpu(cfg: Config) -> bool:
    """Whether the trainer will compute on CUDA (its backend choice: nccl exactly when on a GPU)."""
    if cfg.train.device == "cpu" or cfg.parallel.backend == "gloo":
        return False
    return torch.cuda.is_available()


def estimate(cfg: Config, dims: ParallelDims) -> Memory:
    """The planner's peak bytes per rank for `cfg` laid out as `dims` (the busiest pipeline stage)."""
    lay, _ = layout_from_config(cfg, dims.world_size)
    # Only the tensors are compared below, so the profile's rates and reserve do not matter.
    machine = Hardware(name="this machine", memory_gib=1.0, reserved_gib=0.0, peak_tflops={"bfloat16": 1.0},
                       gpus_per_node=1, host_memory_gib=1.0)
    return memory(model_shape(cfg.model), lay, cfg, machine, ANGELPTM)[0]


def _check_memory(cfg: Config, dims: ParallelDims) -> None:
    mem = estimate(cfg, dims)
    tensors = mem.device_total - mem.reserved  # the estimate itself, no allocator slack
    ranks_here = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))  # torchrun's processes on this host
    ram = host_memory_bytes()
    per_host = f" × {ranks_here} ranks on this host" if ranks_here > 1 else ""
    if _on_gpu(cfg):
        local_rank = world_from_env()[1]
        if local_rank < torch.cuda.device_count():  # else the trainer says which device is missing
            capacity = torch.cuda.get_device_properties(local_rank).total_memory
            if tensors > capacity:
                raise ConfigError(f"{_breakdown(mem, tensors, False)} per rank, more than the {_gib(capacity)} GiB "
                                  f"of GPU {local_rank}; {_what_to_lower(cfg, dims, mem, capacity, True)}")
        if mem.host * ranks_here > ram:
            raise ConfigError(f"the planner estimates {_gib(mem.host)} GiB of offloaded state in host memory "
                              f"per rank{per_host}, more than this host's {_gib(ram)} GiB of RAM; "
                              "set zero.offload_optimizer=none (or nvme) or zero.offload_params=none, or use more nodes")
        return
    need = tensors + mem.host  # on CPU the device tier is host memory too
    if need * ranks_here > ram:
        raise ConfigError(f"{_breakdown(mem, need, True)} per rank{per_host}, more than this host's "
                          f"{_gib(ram)} GiB of RAM; {_what_to_lower(cfg, dims, mem, ram / ranks_here, False)}")


def _gib(nbytes: float) -> str:
    gib = nbytes / GIB
    return f"{gib:.3g}" if gib < 1000 else f"{gib:,.0f}"


def _breakdown(mem: Memory, total: float, with_host: bool) -> str:
    kinds = [("parameters", mem.params), ("gradients", mem.grads), ("optimizer", mem.optimizer),
             ("activations", mem.activations), ("buffers", mem.fp8_buffers + mem.comm_buffers),
             ("offloaded", mem.host if with_host else 0.0)]
    parts = ", ".join(f"{name} {_gib(nbytes)}" for name, nbytes in kinds if nbytes)
    return f"the planner estimates {_gib(total)} GiB ({parts} GiB)"


def _what_to_lower(cfg: Config, dims: ParallelDims, mem: Memory, capacity: float, gpu: bool) -> str:
    """The knobs that shrink the part of the estimate that does not fit: the model's state when
    that alone is too big (naming the dimension that makes it so), else the batch's activations."""
    m, t = cfg.model, cfg.train
    state = mem.params + mem.grads + mem.optimizer + (0.0 if gpu else mem.host)  # what must fit in `capacity`
    if state <= capacity:
        fix = f"lower train.micro_batch={t.micro_batch} or train.seq_len={t.seq_len}"
        return fix + (", or set train.activation_checkpointing=full" if t.activation_checkpointing != "full" else "")
    embeddings = m.vocab_size * m.dim * (1 if m.tie_embeddings else 2)
    attention, mlp = m.dim * m.resolved_head_dim * (2 * m.n_heads + 2 * m.n_kv_heads), 3 * m.dim * m.ffn_dim
    blocks = m.n_layers * (attention + mlp)
    one_layer_state = state * (attention + mlp) / (embeddings + blocks)
    if embeddings >= blocks:
        fix = f"lower model.vocab_size={m.vocab_size} or model.dim={m.dim}"
    elif one_layer_state <= capacity:  # many layers that fit one by one
        fix = f"lower model.n_layers={m.n_layers} or model.dim={m.dim}"
    elif mlp > attention:
        fix = f"lower model.ffn_dim={m.ffn_dim} or model.dim={m.dim}"
    else:
        fix = f"lower model.dim={m.dim}"
    if dims.dp * dims.cp > 1 and cfg.zero.stage < 3:
        fix += ", or shard the model with zero.stage=3"
    if gpu and cfg.zero.offload_optimizer == "none":
        fix += ", or set zero.offload_optimizer=cpu"
    return fix


# ---------------------------------------------------------------------------------------------
# Folders and warnings


def _check_nvme_dir(cfg: Config) -> None:
    z = cfg.zero
    problem = z.offload_optimizer == "nvme" and z.nvme_dir is not None and nvme_dir_problem(z.nvme_dir)
    if problem:
        raise ConfigError(problem)


def _warnings(cfg: Config) -> list[str]:
    out = []
    o, t, z = cfg.optim, cfg.train, cfg.zero
    if o.warmup_steps > t.steps:
        out.append(f"optim.warmup_steps={o.warmup_steps} exceeds train.steps={t.steps}, so the learning rate never "
                   f"reaches optim.lr={o.lr:g}; lower optim.warmup_steps")
    if z.nvme_dir is not None and z.offload_optimizer != "nvme":
        out.append(f"zero.nvme_dir={z.nvme_dir} is unused: nothing is offloaded to NVMe unless "
                   "zero.offload_optimizer=nvme")
    return out
