"""The process-group grid: `ParallelDims(dp, pp, cp, tp, ep)` -> a DeviceMesh ("pp", "dp", "cp", "tp")
and its expert view (ep is carved from dp × cp, so it adds no processes).

tp is innermost so that tensor-parallel peers sit on neighbouring ranks (one node, fastest links);
pp is outermost because its point-to-point traffic is the lightest. A single process is the
smallest mesh: it still gets a (gloo) process group of one, so every code path is the same.
The mesh also carries "dp_cp", dp and cp flattened: both split the tokens of a step, so gradients
are averaged over the two at once.

The expert view (`expert_view`) carves expert parallelism from those dp × cp data ranks: data
rank d (its rank in "dp_cp") is rank d % ep of an "ep" group, whose ranks hold different experts
and exchange tokens, and rank d // ep of an "edp" group (expert data parallelism, dp·cp / ep
ranks), whose ranks hold the same experts and shard and reduce them as dp × cp does the dense
weights. ep 1 gives an ep group of one and edp = dp_cp.

`validate_layout` holds every rule a layout must meet for the model and sequence length; it
reads only the config, so every rank raises the same `ConfigError` before any collective.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import time
import weakref
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from angelptm.config import Config, ParallelConfig
from angelptm.distributed.collectives import Group, group_of
from angelptm.errors import ConfigError

MESH_DIMS = ("pp", "dp", "cp", "tp")
DATA_DIMS = "dp_cp"  # the flattened (dp, cp) group over which gradients are averaged


@dataclass(frozen=True)
class ParallelDims:
    dp: int = 1
    pp: int = 1
    cp: int = 1
    tp: int = 1
    ep: int = 1  # carved from dp × cp: not a factor of the world size

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.cp * self.tp

    @classmethod
    def from_config(cls, parallel: ParallelConfig, world_size: int) -> "ParallelDims":
        """Resolve `dp: auto` to fill the world, and check that the degrees multiply to it."""
        fixed = parallel.pp * parallel.cp * parallel.tp
        if parallel.dp == "auto":
            if world_size % fixed:
                raise ConfigError(
                    f"world size {world_size} is not divisible by parallel.pp × cp × tp = "
                    f"{parallel.pp} × {parallel.cp} × {parallel.tp} = {fixed}; "
                    "change those degrees or the number of processes"
                )
            dp = world_size // fixed
        else:
            dp = parallel.dp
        dims = cls(dp=dp, pp=parallel.pp, cp=parallel.cp, tp=parallel.tp, ep=parallel.ep)
        if dims.world_size != world_size:
            raise ConfigError(
                f"parallel degrees dp × pp × cp × tp = {dp} × {parallel.pp} × {parallel.cp} × "
                f"{parallel.tp} = {dims.world_size} do not match the world size {world_size}; "
                "set parallel.dp=auto or launch that many processes"
            )
        return dims


def _rule(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_expert_degree(dims: ParallelDims) -> None:
    _rule(
        (dims.dp * dims.cp) % dims.ep == 0,
        f"parallel.ep={dims.ep} does not divide dp·cp = {dims.dp}·{dims.cp} = {dims.dp * dims.cp} (expert-parallel "
        "ranks are carved from the data ranks); pick ep dividing dp·cp",
    )


def validate_layout(dims: ParallelDims, cfg: Config) -> None:
    """Raise ConfigError, naming the degree and the rule, if `dims` cannot run `cfg`'s model."""
    m, tp, cp, seq = cfg.model, dims.tp, dims.cp, cfg.train.seq_len
    _check_expert_degree(dims)
    _rule(
        m.n_heads % tp == 0,
        f"parallel.tp={tp} does not divide model.n_heads={m.n_heads}; tensor parallelism splits "
        "attention heads, so pick tp dividing n_heads",
    )
    _rule(
        m.n_kv_heads % tp == 0 or tp % m.n_kv_heads == 0,
        f"parallel.tp={tp} and model.n_kv_heads={m.n_kv_heads}: one must divide the other (kv heads "
        "are split over tp, or each replicated on tp / n_kv_heads ranks); pick such a tp",
    )
    _rule(
        m.ffn_dim % tp == 0,
        f"parallel.tp={tp} does not divide model.ffn_dim={m.ffn_dim}; pick tp dividing ffn_dim",
    )
    if cfg.parallel.cp_mode == "ring":
        _rule(
            seq % (2 * cp) == 0,
            f"parallel.cp={cp} with cp_mode=ring needs train.seq_len={seq} divisible by 2·cp = {2 * cp} "
            "(each rank holds two chunks to balance causal work); change seq_len or cp",
        )
    else:
        _rule(
            seq % cp == 0,
            f"parallel.cp={cp} does not divide train.seq_len={seq}; change seq_len or cp",
        )
        heads = m.n_heads // tp
        _rule(
            heads % cp == 0,
            f"parallel.cp={cp} with cp_mode=ulysses needs the {heads} attention heads per tensor-parallel "
            f"rank (model.n_heads / tp) divisible by cp; use cp_mode=ring or a cp dividing {heads}",
        )
    if cfg.parallel.sequence_parallel and tp > 1:
        local = seq // cp
        _rule(
            local % tp == 0,
            f"parallel.tp={tp} with sequence_parallel needs the {local} tokens per context-parallel rank "
            "(train.seq_len / cp) divisible by tp; change seq_len or set parallel.sequence_parallel=false",
        )


def world_from_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) as torchrun sets them; (0, 0, 1) for a plain process."""
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("LOCAL_RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
    )


def resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("parallel.backend=nccl needs CUDA devices; set parallel.backend=gloo or auto")
    return backend


def init_process_group(backend: str = "auto", timeout_s: float = 600.0) -> None:
    """Join torchrun's process group, or make a group of one for a plain single process.

    A collective that waits longer than `timeout_s` (a peer stalled or gone) raises on every rank
    instead of blocking forever; `angelptm.train.faults.collective_failure` names it in one line."""
    if dist.is_initialized():
        return
    backend = resolve_backend(backend)
    rank, local_rank, world_size = world_from_env()
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    timeout = timedelta(seconds=timeout_s)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        die_with_launcher()
        dist.init_process_group(backend, store=attempt_store(rank, world_size, timeout_s),
                                rank=rank, world_size=world_size, timeout=timeout)
    elif "MASTER_ADDR" in os.environ:
        die_with_launcher()
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


def attempt_store(rank: int, world_size: int, timeout_s: float) -> dist.Store:
    """A store of this attempt alone for the workers of a torchrun job.

    torchrun's agents keep one store for the whole job, so after `--max-restarts` restarts the
    workers the new process group would read the dead attempt's addresses left in it and hang or
    be refused. Instead rank 0 hosts a fresh store on a free port and publishes the port in the
    agents' store. A peer may read the previous attempt's port, but every worker of that attempt
    was stopped before this one started, so nothing answers there: it reads again until the port
    it reads answers, which can only be this attempt's store."""
    addr, timeout = os.environ["MASTER_ADDR"], timedelta(seconds=timeout_s)
    agents = dist.TCPStore(addr, int(os.environ["MASTER_PORT"]), world_size, is_master=False, timeout=timeout)
    key = f"angelptm/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/store_port"
    if rank == 0:
        store = dist.TCPStore(addr, 0, world_size, is_master=True, timeout=timeout, wait_for_workers=False)
        agents.set(key, str(store.port))
        return store
    deadline = time.monotonic() + timeout_s
    while True:
        port = int(agents.get(key))
        if listening(addr, port):
            try:
                store = dist.TCPStore(addr, port, world_size, is_master=False, timeout=timeout, wait_for_workers=False)
                return store
            except dist.DistNetworkError:
                pass
        if time.monotonic() > deadline:
            raise dist.DistNetworkError(f"rank {rank} found no store of this attempt at {addr}; rank 0 never published one")
        time.sleep(0.1)


def listening(addr: str, port: int) -> bool:
    """Whether anything listens on addr:port (a plain probe: a store client would retry and log)."""
    try:
        with socket.create_connection((addr, port), timeout=2):
            return True
    except OSError:
        return False


def die_with_launcher() -> None:
    """Ask Linux to send this worker SIGTERM when the process that launched it (torchrun) dies, so
    no orphan keeps training and writing; SIGTERM lets it checkpoint on the way out (faults.Preemption)."""
    if not sys.platform.startswith("linux"):
        return
    launcher = os.getppid()
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != launcher:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def init(dims: Optional[ParallelDims] = None, backend: str = "auto", timeout_s: float = 600.0) -> DeviceMesh:
    """Initialise the process group (if needed) and return the 4D DeviceMesh for `dims`.

    `dims=None` means pure data parallelism over the whole world.
    """
    init_process_group(backend, timeout_s)
    world_size = dist.get_world_size()
    dims = dims or ParallelDims(dp=world_size)
    if dims.world_size != world_size:
        raise ConfigError(
            f"parallel degrees dp × pp × cp × tp = {dims.world_size} do not match the world size "
            f"{world_size}; launch that many processes or change the degrees"
        )
    _check_expert_degree(dims)
    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(device_type, (dims.pp, dims.dp, dims.cp, dims.tp), mesh_dim_names=MESH_DIMS)
    mesh["dp", "cp"]._flatten(DATA_DIMS)
    if dims.ep > 1:
        _add_expert_view(mesh, dims.ep)
    return mesh


@dataclass(frozen=True)
class ExpertView:
    """This rank's expert-parallel groups: "ep" (ranks holding different experts, which exchange
    tokens) and "edp" (ranks holding the same experts, over which those are sharded and reduced)."""

    ep: Group
    edp: Group


_EXPERT_VIEWS: dict[int, ExpertView] = {}  # by id of the mesh; an entry dies with its mesh


def _add_expert_view(mesh: DeviceMesh, ep: int) -> None:
    """Create the ep and edp groups of every (pp, tp) coordinate and keep this rank's.

    `new_group` is collective over the world, so every rank creates every group, in one order."""
    pp, dp, cp, tp = mesh.mesh.shape
    data_ranks = mesh.mesh.permute(0, 3, 1, 2).reshape(pp * tp, dp * cp // ep, ep)  # [.., d // ep, d % ep]
    me = dist.get_rank()
    mine = {}
    for grid in data_ranks:
        for name, lines in (("ep", grid), ("edp", grid.T)):
            for line in lines:
                ranks = line.tolist()
                pg = dist.new_group(ranks)
                if me in ranks:
                    mine[name] = Group(name, pg, dist.get_rank(pg), len(ranks))
    _EXPERT_VIEWS[id(mesh)] = ExpertView(mine["ep"], mine["edp"])
    weakref.finalize(mesh, _EXPERT_VIEWS.pop, id(mesh), None)


def expert_view(mesh: DeviceMesh) -> ExpertView:
    """The ep and edp groups of this rank (ep of one and edp = dp_cp where `init` made no expert view)."""
    view = _EXPERT_VIEWS.get(id(mesh))
    if view is not None:
        return view
    data = group_of(mesh, DATA_DIMS)
    return ExpertView(Group("ep", None, 0, 1), Group("edp", data.pg, data.rank, data.size))


def dims_of(mesh: DeviceMesh) -> ParallelDims:
    return ParallelDims(**{name: mesh[name].size() for name in MESH_DIMS}, ep=expert_view(mesh).ep.size)


def device_of(mesh: DeviceMesh) -> torch.device:
    """The device this rank computes on: its GPU under NCCL, else the CPU."""
    if mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
